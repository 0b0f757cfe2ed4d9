"""Atomic file and directory writes, and the output-directory manifest that refuses mixed runs."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from merlin_molar.errors import MolarDataError


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Nothing half-written ever appears under the final name: a crash leaves at most a ``.tmp-*`` sibling.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir:
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}")
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


def write_json(path: Path, payload) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MolarDataError(path, f"not valid JSON ({e.msg})") from None


MANIFEST = "molar_manifest.json"


def claim_output_dir(output_dir: Path, identity: dict) -> None:
    """Record which dataset/schema an output directory belongs to, refusing a directory of another one."""
    output_dir = Path(output_dir)
    manifest = output_dir / MANIFEST
    if manifest.exists():
        existing = read_json(manifest)
        existing = {k: existing.get(k) for k in identity}
        if existing != identity:
            changed = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
            raise MolarDataError(
                output_dir,
                f"holds outputs of a different dataset or configuration (differs in {changed}); "
                "use another output directory or delete this one",
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest, identity)
