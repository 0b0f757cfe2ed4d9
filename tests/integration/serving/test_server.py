"""The bundled-tritonserver launcher: loopback ports, clear errors, the numpy-1.x stub environment guard."""
import socket
import sys
from pathlib import Path

import pytest

from merlin_molar.serving.server import TritonServer, TritonServerError, check_stub_env, default_stub_env


def test_empty_repository_starts_on_loopback_and_stops(tmp_path):
    with TritonServer(tmp_path) as server:
        assert server.is_ready()
        assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
        process = server.process
    assert process.poll() is not None and server.process is None
    assert "Started HTTPService at 127.0.0.1" in server.last_log


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = TritonServer(tmp_path, http_port=taken.getsockname()[1])
        with pytest.raises(TritonServerError, match="already in use"):
            server.start()
    assert server.process is None


def test_missing_repository(tmp_path):
    with pytest.raises(TritonServerError, match="model repository not found"):
        TritonServer(tmp_path / "nope")


def test_stub_environment_must_hold_numpy_1(tmp_path):
    assert check_stub_env(default_stub_env())  # the one scripts/install_serving.sh built
    with pytest.raises(TritonServerError, match="needs numpy 1.x"):
        check_stub_env(Path(sys.prefix))  # the project's virtualenv: numpy 2
    with pytest.raises(TritonServerError, match="no Triton stub environment"):
        TritonServer(tmp_path, stub_env=tmp_path)
