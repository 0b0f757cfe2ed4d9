"""Run a model repository on the ``tritonserver`` binary bundled with PyPI ``nvidia-pytriton`` (CPU, loopback).

That binary (Triton 2.51) has the Python backend only, which is all :func:`export_triton` needs. Three
things make it run from a virtualenv:

* a backend directory of our own (a temporary one: site-packages is never edited) holding the Python
  backend library and the backend stub built for this Python version;
* ``LD_LIBRARY_PATH`` with this Python's ``LIBDIR``: the stub links ``libpython3.X.so``;
* the ``merlin_molar`` package this process imported, linked into that backend directory (on the stub's
  ``sys.path``), so the server runs the same source as its caller;
* the stub's Python environment. The stub embeds Python and finds its environment through the
  ``python3`` first on ``PATH``. The bundled stub was built against numpy 1.x (old pybind11): under numpy 2
  every input element reads as the first one and outputs go out empty or wrong. So the stub runs under a
  small environment (``scripts/install_serving.sh`` builds it) that holds numpy 1.26 and a pyarrow that
  accepts it, and then adds the project's virtualenv site-packages behind them. The tests compare served
  top-k with in-process top-k, so a return of this bug cannot pass unnoticed.

Example::

    with TritonServer("/tmp/repo") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

STUB_ENV_VAR = "MOLAR_TRITON_STUB_ENV"
INSTALL_HINT = "run `bash scripts/install_serving.sh` (installs requirements/serving.txt and the stub environment)"


class TritonServerError(RuntimeError):
    """The bundled Triton server is missing, misconfigured, or did not become ready."""


def bundled_tritonserver() -> Path:
    """The directory holding ``bin/tritonserver``, ``backends/python`` and ``python_backend_stubs``."""
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (it wants numpy<2)
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"nvidia-pytriton is not installed: {INSTALL_HINT}")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"{dist} holds no bin/tritonserver: {INSTALL_HINT}")
    return dist


def default_stub_env() -> Path:
    return Path(os.environ.get(STUB_ENV_VAR) or Path(sys.prefix) / "triton-stub")


def check_stub_env(stub_env: Path) -> Path:
    """Refuse a stub environment that is missing or would load numpy 2 (the corruption described above)."""
    stub_env = Path(stub_env)
    if not (stub_env / "bin" / "python3").exists():
        raise TritonServerError(f"no Triton stub environment at {stub_env}: {INSTALL_HINT}")
    numpy_dists = sorted(stub_env.glob("lib/python*/site-packages/numpy-*.dist-info"))
    if not numpy_dists:
        raise TritonServerError(f"{stub_env} holds no numpy of its own: {INSTALL_HINT}")
    version = numpy_dists[0].name.split("-")[1]
    if int(version.split(".")[0]) >= 2:
        raise TritonServerError(
            f"{stub_env} has numpy {version}; the bundled Python-backend stub needs numpy 1.x: {INSTALL_HINT}"
        )
    return stub_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` process bound to 127.0.0.1, serving ``repository``; a context manager.

    ``start()`` waits until the server reports ready (every model loaded) or raises with the server log.
    ``stop()`` always ends the server and its backend stub processes (its own process group).
    """

    def __init__(
        self,
        repository,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        stub_env=None,
        startup_timeout: float = 300.0,
        log_verbose: int = 0,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonServerError(f"{self.repository}: model repository not found")
        self._auto_ports = not (http_port or grpc_port)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.stub_env = check_stub_env(stub_env or default_stub_env())
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.process: Optional[subprocess.Popen] = None
        self._workdir: Optional[Path] = None
        self.last_log = ""

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "tritonserver.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self._workdir and self.log_path.exists() else ""

    def _backend_dir(self, dist: Path) -> Path:
        python = self._workdir / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            os.symlink(dist / "backends" / "python" / name, python / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
        shutil.copy2(stub, python / "triton_python_backend_stub")
        # The backend puts this directory on the stub's sys.path (the stub ignores PYTHONPATH). A link to the
        # merlin_molar package this process runs makes the models run the same source, also from a checkout
        # that is not the installed one (an editable install's finder comes after sys.path; an ordinary
        # install in site-packages is found first, and is then what this process runs too).
        os.symlink(Path(__file__).resolve().parents[1], python / "merlin_molar")
        return python.parent

    def _env(self, dist: Path) -> dict:
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise TritonServerError(
                f"{sys.executable} was built without a shared libpython, which the Python-backend stub links"
            )
        env = os.environ.copy()
        # the copied stub no longer finds the wheel's vendored libraries through its relative RPATH
        vendored = dist.parent.parent / "nvidia_pytriton.libs"
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            str(p) for p in (libdir, vendored, env.get("LD_LIBRARY_PATH")) if p
        )
        env["PATH"] = os.pathsep.join([str(self.stub_env / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)  # the stub's embedded Python ignores it anyway
        return env

    def start(self) -> "TritonServer":
        for attempt in range(3):
            try:
                return self._start()
            except TritonServerError as exc:
                # a free port picked here can be taken by another process before the server binds it
                if not (self._auto_ports and "already in use" in str(exc) and attempt < 2):
                    raise
                self.http_port, self.grpc_port = free_port(), free_port()

    def _start(self) -> "TritonServer":
        dist = bundled_tritonserver()
        self._workdir = Path(tempfile.mkdtemp(prefix="molar-triton-"))
        backends = self._backend_dir(dist)
        command = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=self._env(dist), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode}; log:\n{self.log()[-6000:]}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:.0f}s; log:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            # the backend stubs are children of the server in its own session: end any that outlived it
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
            self.process = None
        if self._workdir is not None:
            self.last_log = self.log()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
