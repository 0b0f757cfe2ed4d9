"""Scale-out on this machine: NVTabular preprocessing on 1 vs 2 Dask workers, SASRec training on 1 vs 2 processes.

* ``preprocess``: :func:`merlin_molar.data.prepare` on MovieLens-1M (1,000,209 interactions) without a
  cluster (Dask's default threaded scheduler, one partition, as users call it), then inside
  :func:`merlin_molar.distributed.dask_cluster` with 1 and 2 worker processes (one thread each,
  ``partitions=`` 4). Rows/s counts input interactions; cluster start-up is timed separately. Before timing,
  the 2-worker output is checked to be identical to the single-process output.
* ``train``: SASRec (width 64, 2 layers, max length 200, dropout 0.2) through
  :func:`merlin_molar.training.make_trainer` on the ML-1M train split, global batch 128: one process with 1
  and with 2 torch threads, and ``torchrun --nproc_per_node=2`` (DDP over gloo) with 1 thread per process
  and 64 sequences per process. Sequences/s is measured over the optimizer steps after the first
  ``--warmup-steps``, on rank 0's wall clock (DDP synchronises every step).
* ``score``: exact full-ranking scoring at the paper's Amazon catalogue size (``--score-items`` 301,000):
  ``[256 users x d] @ [d x items]`` in fp32 plus top-50, for d = 64 (SASRec) and d = 1536 (the hidden size
  of Qwen2-VL-2B / Qwen2-1.5B), in this process (2 torch threads); input to docs/capacity_plan.md.

The machine has 2 logical CPUs shared with other jobs: compare rows with each other within one run only.

    nice -n 10 .venv/bin/python benchmarks/scale_out.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import data_dir, command_line, git_commit, machine, now, table, result_path, write_result  # noqa: E402


class StepClock:
    """TrainerCallback: wall-clock time of every optimizer step end."""

    def __init__(self):
        self.times = []

    def __call__(self, *args, **kwargs):
        self.times.append(time.perf_counter())


def train_worker(args) -> None:
    """One training measurement (run as a subprocess, possibly under torchrun); rank 0 writes JSON."""
    import torch
    from transformers import TrainerCallback

    import merlin_molar  # noqa: F401
    from merlin_molar.data import load_prepared
    from merlin_molar.distributed import data_parallel_config, world
    from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
    from merlin_molar.training import TrainConfig, make_trainer

    data = load_prepared(args.prepared)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock()

    torch.manual_seed(0)
    model = sasrec_model(data.schema, SASRecConfig(max_length=data.max_length))
    config = data_parallel_config(
        TrainConfig(epochs=1, logging_steps=1000, extra={"max_steps": args.steps}), global_batch_size=args.global_batch
    )
    trainer = make_trainer(model, data, Path(args.out) / "run", config)
    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    me = world()
    if me.is_main:
        timed = clock.times[args.warmup_steps:]
        steps = len(timed) - 1
        seconds = timed[-1] - timed[0]
        result = {
            "processes": me.size,
            "torch_threads": torch.get_num_threads(),
            "per_device_batch": config.batch_size,
            "global_batch": args.global_batch,
            "steps_timed": steps,
            "seconds_timed": seconds,
            "sequences_per_second": steps * args.global_batch / seconds,
            "train_seconds_incl_warmup": total,
        }
        Path(args.out, "result.json").write_text(json.dumps(result))


def run_training(prepared: Path, out: Path, processes: int, threads: int, args) -> dict:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    worker = [str(Path(__file__).resolve()), "--train-worker", "--prepared", str(prepared), "--out", str(out),
              "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
              "--global-batch", str(args.global_batch)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *worker]
    else:
        cmd = [sys.executable, *worker]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads((out / "result.json").read_text())


def time_prepare(raw, root: Path, repeats: int, partitions: int) -> list:
    from merlin_molar.data import prepare

    seconds = []
    for i in range(repeats + 1):
        target = root / f"run{i}"
        start = time.perf_counter()
        prepare(raw, target, max_length=200, partitions=partitions)
        seconds.append(time.perf_counter() - start)
        shutil.rmtree(target)
    return seconds[1:]  # the first run is a warm-up


def same_output(a: Path, b: Path) -> bool:
    from merlin_molar.data import SPLITS, load_prepared

    pa, pb = load_prepared(a), load_prepared(b)
    return all(pa.split_frame(s).equals(pb.split_frame(s)) for s in SPLITS) and pa.items().equals(pb.items())


def score_throughput(n_items: int, dim: int, batch: int = 256, repeats: int = 3) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    items = torch.randn(n_items, dim, generator=generator)
    users = torch.randn(batch, dim, generator=generator)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.topk(users @ items.t(), k=50, dim=1)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[1:])
    return {"items": n_items, "dim": dim, "batch": batch, "torch_threads": torch.get_num_threads(),
            "seconds_per_batch": [round(x, 4) for x in seconds[1:]], "users_per_second": batch / median,
            "gflops_per_second": 2 * batch * dim * n_items / median / 1e9,
            "item_matrix_mib_fp32": n_items * dim * 4 / 2**20, "scores_mib_per_batch": batch * n_items * 4 / 2**20}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=data_dir("ml-1m"))
    p.add_argument("--repeats", type=int, default=3, help="timed prepare runs per setting (after one warm-up)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--score-items", type=int, default=301_000)
    p.add_argument("--output", type=Path, default=result_path("scale_out", "scale_out.json"))
    # internal: one training measurement
    p.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.train_worker:
        return train_worker(args)

    import merlin_molar  # noqa: F401
    from merlin_molar.data import prepare, read_dataset
    from merlin_molar.distributed import dask_cluster

    info = machine()
    started = now()
    raw = read_dataset(args.data)
    n_rows = len(raw.interactions)
    tmp = Path(tempfile.mkdtemp(prefix="molar-scale-out-"))
    try:
        reference = prepare(raw, tmp / "single", max_length=200)
        pre_rows, pre_runs = [], {}
        settings = [("no cluster (threaded scheduler)", None, 1)] + [
            (f"LocalCluster, {n} worker{'s' * (n > 1)}", n, args.partitions) for n in (1, 2)
        ]
        check = None
        for label, workers, partitions in settings:
            if workers is None:
                startup = 0.0
                seconds = time_prepare(raw, tmp / "t", args.repeats, partitions)
            else:
                t0 = time.perf_counter()
                with dask_cluster(n_workers=workers):
                    startup = time.perf_counter() - t0
                    if workers == 2:
                        prepare(raw, tmp / "dask2", max_length=200, partitions=partitions)
                        check = same_output(reference.root, tmp / "dask2")
                    seconds = time_prepare(raw, tmp / "t", args.repeats, partitions)
            median = statistics.median(seconds)
            pre_runs[label] = {"workers": workers, "partitions": partitions,
                               "cluster_startup_seconds": round(startup, 2),
                               "seconds": [round(s, 3) for s in seconds], "median_seconds": round(median, 3),
                               "rows_per_second_median": round(n_rows / median)}
            pre_rows.append({"preprocess": label, "partitions": partitions, "startup s": startup,
                             "median s": median, "rows/s": n_rows / median})
        base = pre_runs["LocalCluster, 1 worker"]["median_seconds"]
        for row in pre_rows:
            row["vs 1 worker"] = f"{base / row['median s']:.2f}x"

        train_rows, train_runs = [], {}
        for label, processes, threads in (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
                                          ("torchrun 2 processes x 1 thread", 2, 1)):
            result = run_training(reference.root, tmp / f"train-{processes}-{threads}", processes, threads, args)
            train_runs[label] = result
            train_rows.append({"train": label, "per-device batch": result["per_device_batch"],
                               "steps timed": result["steps_timed"], "seq/s": result["sequences_per_second"]})
        base = train_runs["1 process x 1 thread"]["sequences_per_second"]
        for row in train_rows:
            row["vs 1x1"] = f"{row['seq/s'] / base:.2f}x"
        users = reference.manifest["users"]
        score_runs = [score_throughput(args.score_items, dim) for dim in (64, 1536)]
        score_rows = [{"score": f"{r['items']:,} items x d={r['dim']}", "users/s": r["users_per_second"],
                       "GFLOP/s": r["gflops_per_second"], "item matrix MiB": r["item_matrix_mib_fp32"]}
                      for r in score_runs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "scale_out",
        "command": command_line(),
        "git_commit": git_commit(),
        "date": started,
        "machine": info,
        "data": {"dir": str(args.data), "interactions": n_rows, "users": users, "max_length": 200},
        "preprocess": {"runs": pre_runs, "two_worker_output_identical_to_single_process": check,
                       "note": "rows = input interactions; one untimed warm-up per setting; NVTabular in CPU mode"},
        "train": {"runs": train_runs, "model": "SASRec d_model=64 n_layers=2 n_heads=1 dropout=0.2 max_length=200",
                  "note": f"global batch {args.global_batch}; {args.steps} steps per run, the first "
                          f"{args.warmup_steps} untimed; DDP over gloo on CPU"},
        "score": {"runs": score_runs, "note": "random fp32 matrices; matmul + top-50, batch of 256 users"},
    }
    path = write_result(args.output, result)
    print(table(pre_rows, ["preprocess", "partitions", "startup s", "median s", "rows/s", "vs 1 worker"]))
    print(f"2-worker output identical to single process: {check}\n")
    print(table(train_rows, ["train", "per-device batch", "steps timed", "seq/s", "vs 1x1"]))
    print()
    print(table(score_rows, ["score", "users/s", "GFLOP/s", "item matrix MiB"]))
    print(f"\n{n_rows:,} interactions; {info['cpu_model']} ({info['logical_cpus']} CPUs), "
          f"load {info['load_average_at_start']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
