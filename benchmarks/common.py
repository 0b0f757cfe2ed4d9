"""Shared helpers for the benchmark scripts: machine description, result JSON, a plain-text table."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_ROOT = BENCHMARKS / "results"
REPO = BENCHMARKS.parent
# Every result file carries these top-level keys (tests/unit/test_benchmark_results.py holds the committed ones to it).
PROVENANCE_KEYS = ("command", "git_commit", "machine", "date")


def result_path(benchmark: str, name: str) -> Path:
    """Where a result goes: ``benchmarks/results/<benchmark>/<name>``, one folder per benchmark script."""
    return RESULTS_ROOT / benchmark / name


def data_dir(name: str) -> Path:
    """``$MOLAR_DATA/<name>``, else ``../shared/data/<name>`` beside the checkout."""
    root = os.environ.get("MOLAR_DATA")
    return Path(root) / name if root else REPO.parent / "shared" / "data" / name


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> Dict:
    """What the numbers were measured on; the load average matters on a shared machine."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "nice": os.nice(0),
        "load_average_at_start": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_result(path, payload: Dict) -> Path:
    """Write a result JSON with the one provenance schema: ``command``, ``git_commit``, ``date`` (filled in
    here when the payload leaves them out) and ``machine`` (the payload's, taken at the start, else taken
    now), plus the load average at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drifted = {"git", "commit"} & set(payload)
    if drifted:
        raise ValueError(f"write_result: use the key 'git_commit', not {sorted(drifted)}")
    payload = {"command": command_line(), "git_commit": git_commit(), "date": now(), **payload}
    payload["machine"] = {**(payload.get("machine") or machine()), "load_average_at_end": list(os.getloadavg())}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def table(rows: Sequence[Dict], columns: Iterable[str]) -> str:
    columns = list(columns)
    cells: List[List[str]] = [columns] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# bf16 dense tensor-core peaks from the vendors' datasheets, for model FLOP utilisation.
PEAK_BF16_DENSE = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.0e12}


def peak_flops(override_tflops):
    import torch

    if override_tflops:
        return override_tflops * 1e12, "given with --peak-tflops"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_DENSE.items():
        if key in name:
            return value, f"bf16 dense peak of {key} (datasheet)"
    return None, f"unknown peak for {name}: pass --peak-tflops"


def finished_prepare(root: Path, raw, max_length: int):
    """``root`` as :class:`PreparedData` when a finished ``prepare`` of this very data and length is there (same
    interactions and item ids: the manifest's fingerprint; no k-core, no cold items) that writes the
    earlier-items tables the evaluation masks whole histories with, else None (prepare it again)."""
    from merlin_molar.data import load_prepared
    from merlin_molar.data.workflow import EVALUATED_SPLITS, dataset_fingerprint
    from merlin_molar.errors import MolarDataError

    try:
        prepared = load_prepared(root)
    except MolarDataError:
        return None
    m = prepared.manifest
    same = (m.get("fingerprint"), m.get("max_length"), m.get("k_core"), m.get("cold_items"))
    whole_histories = all(prepared.earlier_items_path(split).is_file() for split in EVALUATED_SPLITS)
    return prepared if same == (dataset_fingerprint(raw), max_length, 0, None) and whole_histories else None
