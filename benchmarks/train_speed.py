"""Training step time on CPU: fp32 eager vs bf16 autocast vs torch.compile, at 1 and 2 torch threads.

One process, one prepared dataset, the CLI's default SASRec and Molar models at batch 128; every
configuration is timed in rounds that alternate, so a change of machine load hits all of them alike.
Writes ``benchmarks/results/train_speed/train_speed.json`` and prints a table.

Example::

    python benchmarks/train_speed.py --data ../shared/data/ml-100k --max-length 50
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides before T4Rec is imported)
import torch  # noqa: E402
from common import REPO, command_line, data_dir, git_commit, machine, now, table, result_path, write_result  # noqa: E402

from merlin_molar.ids import ITEM_SEQUENCE  # noqa: E402
from merlin_molar.data import prepare, read_dataset  # noqa: E402
from merlin_molar.models import MolarConfig, SASRecConfig, molar_model, sasrec_model  # noqa: E402
from merlin_molar.pipeline import embed_item_table  # noqa: E402


def batch_of(prepared, size: int) -> dict:
    seqs = prepared.split_frame("train")[ITEM_SEQUENCE].tolist()[:size]
    x = torch.zeros(len(seqs), prepared.max_length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[-prepared.max_length:]
        x[i, : len(s)] = torch.tensor(s)
    return {ITEM_SEQUENCE: x}


def step_fn(model, mode: str):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    forward = torch.compile(model) if mode == "compile" else model

    def step(batch):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = forward(batch, training=True)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(data_dir("ml-100k")))
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--modes", default="fp32,bf16,compile")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "train_speed"))
    args = p.parse_args(argv)
    info = machine()
    prepared = prepare(read_dataset(args.data), Path(args.workdir) / f"prepared_L{args.max_length}",
                       max_length=args.max_length)
    item_table = embed_item_table(prepared, batch_size=64)
    from merlin_molar.items import load_item_table

    content = load_item_table(item_table, prepared)
    batch = batch_of(prepared, args.batch_size)
    configs = {}
    for name in ("sasrec", "molar"):
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            model = (sasrec_model(prepared.schema, SASRecConfig(max_length=args.max_length)) if name == "sasrec"
                     else molar_model(prepared.schema, content, MolarConfig(max_length=args.max_length)))
            model.train()
            configs[(name, mode)] = step_fn(model, mode)
    times = {(n, m, t): [] for (n, m) in configs for t in args.threads.split(",")}
    losses = {}
    for _ in range(args.rounds):
        for (name, mode, threads) in times:
            torch.set_num_threads(int(threads))
            step = configs[(name, mode)]
            losses[(name, mode)] = step(batch)  # warm-up (compiles on the first round)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(batch)
            times[(name, mode, threads)].append((time.perf_counter() - start) / args.steps)
    rows = []
    for (name, mode, threads), ts in times.items():
        best = min(ts[1:] or ts)  # the first round includes compilation
        base = min(times[(name, "fp32", threads)][1:] or times[(name, "fp32", threads)])
        rows.append({"model": name, "mode": mode, "threads": int(threads), "step_s_min": best,
                     "step_s_median": statistics.median(ts[1:] or ts), "speedup_vs_fp32": base / best,
                     "last_loss": losses[(name, mode)]})
    write_result(result_path("train_speed", "train_speed.json"), {
        "benchmark": "train_speed", "command": command_line(), "git_commit": git_commit(), "date": now(),
        "machine": {**info, "load_average_at_end": list(os.getloadavg())},
        "setup": {"data": Path(args.data).name, "max_length": args.max_length, "batch_size": args.batch_size,
                  "rounds": args.rounds, "steps": args.steps},
        "rows": rows,
    })
    print(table(rows, ["model", "mode", "threads", "step_s_min", "step_s_median", "speedup_vs_fp32", "last_loss"]))


if __name__ == "__main__":
    main()
