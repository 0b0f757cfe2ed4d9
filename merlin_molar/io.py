"""Atomic file and directory writes, and the output-directory manifest that refuses mixed runs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

from merlin_molar.errors import MolarDataError

LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Nothing half-written ever appears under the final name: a crash leaves at most a ``.tmp-*`` sibling.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_scratch(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{owner_tag()}-", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir:
            if final.exists():
                old = final.with_name(f".old-{final.name}-{owner_tag()}-")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            os.replace(target, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag(pid: Optional[int] = None) -> str:
    """``p<pid>h<host>``: who wrote a scratch entry, so a later run can tell a dead run's leftovers."""
    return f"p{pid or os.getpid()}h{_host_tag()}"


_SCRATCH_OWNER = re.compile(r"^\.(?:tmp|old)-.+-p(\d+)h([0-9a-f]{6})-[a-z0-9_]*$")


def sweep_stale_scratch(directory: Path) -> None:
    """Remove the ``.tmp-*`` / ``.old-*`` entries in ``directory`` left by runs of this machine that are no longer
    alive (killed with SIGKILL, or the machine went down): they would otherwise stay for good."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _SCRATCH_OWNER.match(entry.name)
        if not match or match.group(2) != _host_tag() or _alive(int(match.group(1))):
            continue
        LOG.info("removing %s, left by a run that ended without cleaning up", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, payload) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MolarDataError(path, f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise MolarDataError(path, "not valid JSON (not UTF-8 text: the file is damaged)") from None


MANIFEST = "molar_manifest.json"


# scratch names this package writes inside output directories (never results)
SCRATCH_PREFIXES = (".tmp-", ".old-", ".categories", ".lock")
LOCK_FILE = ".lock"


def _launch_id() -> Optional[str]:
    """What the processes of one ``torchrun`` launch on this machine share (its agent is their parent);
    None outside one."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    return f"{socket.gethostname()}:{os.getppid()}:{os.environ.get('MASTER_PORT', '')}"


@contextlib.contextmanager
def locked_output_dir(output_dir, command: str) -> Iterator[None]:
    """Hold ``output_dir`` for one run: a second run into it while this one lives is refused, naming the
    holder. The lock is the kernel's (``flock``), so a run that is killed releases it; the ``.lock`` file it
    leaves records only who held it. The processes of one ``torchrun`` launch share the lock."""
    import fcntl

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise MolarDataError(output_dir, "is a file, not a directory: choose another output path")
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    launch = _launch_id()
    handle = None
    for _ in range(50):
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            handle = None
            if not holder:  # the holder is between taking the lock and writing its name
                time.sleep(0.1)
                continue
            if launch is not None and _holder(holder).get("launch") == launch:
                break  # another process of this torchrun launch holds it for all of them
            raise MolarDataError(output_dir, f"in use by another run ({_holder_text(holder)}): wait for it to end "
                                             "or choose another output directory") from None
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            handle.close()  # the previous holder removed the file while we waited: lock the new one
            handle = None
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"), "launch": launch}))
        handle.flush()
        break
    try:
        yield
    finally:
        if handle is not None:
            path.unlink(missing_ok=True)
            handle.close()
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_text(text: str) -> str:
    h = _holder(text)
    return (f"`merlin-molar {h.get('command', '?')}`, pid {h.get('pid', '?')} on {h.get('host', '?')}, "
            f"since {h.get('since', '?')}")


def holds_results(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds anything besides its manifest and scratch: a file anywhere below a
    non-scratch entry (an empty ``checkpoints/`` left by a run that failed before its first save is not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False
    for entry in output_dir.iterdir():
        if entry.name == MANIFEST or entry.name.startswith(SCRATCH_PREFIXES):
            continue
        if entry.is_file() or entry.is_symlink() or any(p.is_file() for p in entry.rglob("*")):
            return True
    return False


def claim_output_dir(output_dir: Path, identity: dict) -> None:
    """Record which dataset/schema an output directory belongs to, refusing a directory of another one.

    A directory whose manifest came from a run that failed (or was killed) before it wrote any result is
    not refused: it holds nothing to protect, so the corrected rerun claims it anew."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise MolarDataError(output_dir, "is a file, not a directory: choose another output path")
    sweep_stale_scratch(output_dir)
    manifest = output_dir / MANIFEST
    if manifest.exists():
        try:
            recorded = read_json(manifest)
        except MolarDataError:
            if holds_results(output_dir):
                raise
            recorded = {}
        existing = {k: recorded.get(k) for k in identity}
        if existing == identity:
            return
        changed = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
        # `prepare` completes its manifest (with counts) last: without them its outputs are an unfinished run's
        unfinished_prepare = recorded.get("stage") == "prepare" and "users" not in recorded
        if holds_results(output_dir) and not unfinished_prepare:
            raise MolarDataError(
                output_dir,
                f"holds outputs of a different dataset or configuration (differs in {changed}); "
                "use another output directory or delete this one",
            )
        LOG.info("%s: earlier run left no results (differs in %s): claiming it for this run", output_dir, changed)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest, identity)


@contextlib.contextmanager
def rollback_on_failure(output_dir, keep_if_present: Iterable[str] = ()) -> Iterator[None]:
    """Run a step that writes into ``output_dir``; if it fails, remove what it added (its manifest too),
    so that no partial output is left and a corrected rerun is not refused.

    Nothing is removed when one of ``keep_if_present`` (e.g. ``checkpoints``) holds a file: an
    interrupted training run keeps its checkpoints (and its manifest) so that ``--resume`` can continue."""
    output_dir = Path(output_dir)
    existed = output_dir.is_dir()
    before = set(os.listdir(output_dir)) if existed else set()
    manifest_before = (output_dir / MANIFEST).read_bytes() if (output_dir / MANIFEST).is_file() else None
    try:
        yield
    except BaseException:
        if any(p.is_file() for name in keep_if_present for p in (output_dir / name).rglob("*")):
            raise
        if output_dir.is_dir():
            for name in set(os.listdir(output_dir)) - before:
                target = output_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            if manifest_before is not None and (output_dir / MANIFEST).is_file():
                if (output_dir / MANIFEST).read_bytes() != manifest_before:
                    (output_dir / MANIFEST).write_bytes(manifest_before)
            if not existed:
                shutil.rmtree(output_dir, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(root: Path, names: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file below ``root`` (or below the given entries of it)."""
    root = Path(root)
    entries = [root / n for n in names] if names is not None else [root]
    files = []
    for entry in entries:
        files += [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def verify_checksums(root: Path, checksums: Dict[str, str], remedy: str) -> None:
    """Raise :class:`MolarDataError` naming the first file that is missing or differs from ``checksums``."""
    root = Path(root)
    for name, expected in sorted(checksums.items()):
        path = root / name
        if not path.is_file():
            raise MolarDataError(path, f"file not found: {remedy}")
        if sha256_file(path) != expected:
            raise MolarDataError(
                path, f"checksum mismatch: the file is corrupted or changed since it was written; {remedy}"
            )
