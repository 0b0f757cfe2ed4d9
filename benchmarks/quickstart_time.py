"""Wall time of the README's main job, `merlin-molar quickstart`, run as a user runs it (the installed CLI, in a
fresh work directory, all cores), with the time of each phase and the metrics it printed.

    python benchmarks/quickstart_time.py --runs 2

Writes ``benchmarks/results/quickstart_time/quickstart_time.json`` and prints a table. Time it on a quiet
machine: the load average at the start and end of each run is recorded, and a run that shared the cores says so there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, data_dir, git_commit, machine, now, table, result_path, write_result  # noqa: E402

from merlin_molar.quickstart import MOLAR_ROW, SASREC_ROW  # noqa: E402

TARGET_SECONDS = 300  # issue 10: the quickstart finishes in under 5 minutes on 2 cores


def cli() -> list:
    """The installed `merlin-molar` beside this interpreter, else the module."""
    exe = Path(sys.executable).with_name("merlin-molar")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "merlin_molar.cli"]


def one_run(data: Path, workdir: Path) -> dict:
    import json

    shutil.rmtree(workdir, ignore_errors=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()
    proc = subprocess.run([*cli(), "quickstart", "--data", str(data), "--workdir", str(workdir), "--no-download"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"quickstart_time.py: error: quickstart exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    models = {name: {"train_seconds": r["train_seconds"], "best_epoch": r.get("best_epoch"),
                     "test_ndcg@10": r["test"]["ndcg@10"], "valid_ndcg@10": r["valid"]["ndcg@10"]}
              for name, r in summary.items() if isinstance(r, dict)}
    train_s = sum(m["train_seconds"] for m in models.values())
    return {"wall_seconds": wall, "quickstart_total_seconds": summary["total_seconds"],
            "other_seconds": wall - train_s, "models": models,
            "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=data_dir("ml-100k"), help="MovieLens directory (the README's default)")
    p.add_argument("--runs", type=int, default=2, help="back-to-back runs, each in a fresh work directory")
    p.add_argument("--name", default="quickstart_time", help="result file name (without .json)")
    args = p.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"quickstart_time.py: error: --data: {args.data} does not exist")
    info = machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="molar_quickstart_time_") as tmp:
        for i in range(args.runs):
            runs.append(one_run(args.data, Path(tmp) / "quickstart"))
            print(f"run {i + 1}/{args.runs}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
    walls = [r["wall_seconds"] for r in runs]
    summary = {"wall_seconds": {"mean": statistics.fmean(walls), "min": min(walls), "max": max(walls)},
               "target_seconds": TARGET_SECONDS, "met_in_every_run": max(walls) < TARGET_SECONDS}
    write_result(result_path("quickstart_time", f"{args.name}.json"), {
        "benchmark": args.name, "summary": summary, "runs": runs, "command": command_line(),
        "git_commit": git_commit(), "date": now(), "machine": info,
    })
    rows = [{"run": i + 1, "wall s": r["wall_seconds"],
             "SASRec train s": r["models"][SASREC_ROW]["train_seconds"],
             "Molar train s": r["models"][MOLAR_ROW]["train_seconds"], "other s": r["other_seconds"],
             "load at start": r["load_average_at_start"][0]} for i, r in enumerate(runs)]
    print(table(rows, list(rows[0])))
    print(f"target < {TARGET_SECONDS} s: {'met' if summary['met_in_every_run'] else 'NOT met'} in every run")


if __name__ == "__main__":
    main()
