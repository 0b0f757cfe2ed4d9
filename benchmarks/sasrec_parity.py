"""SASRec parity: the project's SASRec (Transformers4Rec, trained by its Trainer at the CLI defaults) and the plain
PyTorch reference SASRec trained side by side, same seeds, same machine, same early-stopping rule.

The reference is an external yardstick: ``<repo>/../shared/reference/ref_sasrec.py`` (``--reference``), run as a
subprocess with the project's recipe (2 layers, width 64, 1 head, dropout 0.2, full softmax at every position,
Adam 1e-3 betas (0.9, 0.98), batch 128) and the project's early-stopping rule (validate every ``--eval-every``
epochs, stop after ``--patience`` validations without a better NDCG@10, keep the best). Nothing of it is
imported. The project's run is ``merlin_molar.pipeline.train`` (what ``merlin-molar train --model sasrec``
runs) on the project's own preparation of the same raw data (chronological leave-one-out, users with at least
3 interactions; the reference does the same split itself). Both evaluations mask each user's whole history (the
project's since its ``earlier/<split>.parquet`` tables; runs before that masked only the window). One difference
stays: the project's window of ``--max-length`` items holds the target, so its model reads one item fewer than
the reference's, at evaluation (49 against 50 at length 50) and in training (49 targets per window against 50).

Time per epoch is each run's training wall time (its periodic validations included, its final evaluations not)
over the epochs it trained. One invocation runs its runs one after the other; to save wall time the two models
can be run by two invocations side by side, one thread each (``--models project`` and ``--models reference``,
same ``--workdir``), and ``--summary-only`` then writes the result from the finished runs (the times are then
measured under that shared load, the same for both).

``--timing-epochs N`` measures time per epoch alone, on a machine left to it: each model trains a fresh run of
exactly N epochs (validating every ``--eval-every``, never stopping early), ``--timing-rounds`` times, the order
alternating A B B A so that a drift in the machine's speed falls on both alike; it writes
``sasrec_parity_<dataset>_L<length>_timing.json`` with each run's seconds per epoch and the 1-minute load average
when it started.

Writes ``benchmarks/results/sasrec_parity/sasrec_parity_<dataset>_L<length>.json`` (``summary``: mean and std
over seeds of each model's test metrics and time per epoch, and the ratio project / reference) and prints a
table. Each finished run is kept under ``--workdir``; ``--resume`` skips finished runs and continues an
interrupted project run from its last checkpoint (a reference run restarts).

Example::

    python benchmarks/sasrec_parity.py --dataset ../shared/data/ml-100k --max-length 200 --seeds 0,1,2 --resume
    python benchmarks/sasrec_parity.py --dataset ../shared/data/ml-100k --max-length 200 --timing-epochs 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, data_dir, finished_prepare, machine, result_path, table, write_result  # noqa: E402

MODELS = ("project", "reference")
METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20")
REFERENCE = REPO.parent / "shared" / "reference" / "ref_sasrec.py"
TARGET_RATIO = 0.98  # the project's mean test NDCG@10 over the reference's
BENCHMARK = "sasrec_parity"


def result_name(dataset: str, max_length: int) -> str:
    return f"{BENCHMARK}_{dataset}_L{max_length}"


def run_path(workdir: Path, model: str, seed: int) -> Path:
    """Where a finished run's result (``result.json``) is kept."""
    return workdir / model / f"seed{seed}" / "result.json"


def reference_command(script: Path, data: Path, out: Path, *, max_length: int, epochs: int, seed: int, threads: int,
                      eval_every: int, patience: int, python: str = sys.executable) -> list:
    """The reference's command line: the project's recipe is its default one; only the run's settings are given."""
    return [python, str(script), str(data), str(out), "--maxlen", str(max_length), "--epochs", str(epochs),
            "--seed", str(seed), "--threads", str(threads), "--eval-every", str(eval_every),
            "--patience", str(patience)]


def reference_result(output: dict) -> dict:
    """A run's record from the reference's output JSON: metrics, epochs trained, best epoch, seconds."""
    log = output["log"]
    best = max(log, key=lambda entry: entry["valid_ndcg@10"])
    epochs = log[-1]["epoch"]
    return {"valid": output["valid"], "test": output["test"], "epochs": epochs, "best_epoch": best["epoch"],
            "train_seconds": output["wall_s"], "seconds_per_epoch": output["wall_s"] / epochs,
            "valid_ndcg@10_by_epoch": {str(e["epoch"]): e["valid_ndcg@10"] for e in log}}


def project_result(result: dict) -> dict:
    """A run's record from :func:`merlin_molar.pipeline.train`'s result. A resumed run's time covers only the
    epochs after its checkpoint (``resumed_from``, ``.../checkpoint-<step>``)."""
    history = result["log_history"]
    curve = {h["epoch"]: h[VALID_KEY] for h in history if VALID_KEY in h}
    last = max((h for h in history if "epoch" in h and "step" in h), key=lambda h: h["step"])
    epochs = last["epoch"]
    resumed_epochs = 0.0
    if result.get("resumed_from"):
        resumed_epochs = int(Path(result["resumed_from"]).name.split("-")[-1]) * epochs / last["step"]
    return {"valid": _metrics(result["valid"]), "test": _metrics(result["test"]), "epochs": round(epochs),
            "best_epoch": result["best_epoch"], "train_seconds": result["train_seconds"],
            "resumed_from_epoch": round(resumed_epochs),
            "seconds_per_epoch": result["train_seconds"] / (epochs - resumed_epochs),
            "valid_ndcg@10_by_epoch": {str(round(e)): round(v, 4) for e, v in curve.items()}}


VALID_KEY = "eval_/next-item/ndcg_at_10"


def _metrics(values: dict) -> dict:
    return {k: v for k, v in values.items() if "@" in k}


def mean_std(values) -> dict:
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict) -> dict:
    """``runs``: {model: {seed: record}} -> {model: {"seeds", "test": {metric: {mean, std}}, "valid": ...,
    "seconds_per_epoch", "epochs", "best_epoch"}, "project_over_reference": ...} (the ratios only where both
    models have runs, over the seeds both finished)."""
    summary = {}
    for model, by_seed in runs.items():
        seeds = sorted(by_seed)
        if not seeds:
            continue
        summary[model] = {
            "seeds": seeds,
            **{split: {m: mean_std(by_seed[s][split][m] for s in seeds) for m in METRICS}
               for split in ("valid", "test")},
            "seconds_per_epoch": mean_std(by_seed[s]["seconds_per_epoch"] for s in seeds),
            "epochs": [by_seed[s]["epochs"] for s in seeds],
            "best_epoch": [by_seed[s]["best_epoch"] for s in seeds],
        }
    both = sorted(set(runs.get("project", {})) & set(runs.get("reference", {})))
    if both:
        project, reference = runs["project"], runs["reference"]
        ndcg = (statistics.fmean(project[s]["test"]["ndcg@10"] for s in both)
                / statistics.fmean(reference[s]["test"]["ndcg@10"] for s in both))
        speed = (statistics.fmean(project[s]["seconds_per_epoch"] for s in both)
                 / statistics.fmean(reference[s]["seconds_per_epoch"] for s in both))
        summary["project_over_reference"] = {
            "seeds": both, "test_ndcg@10": ndcg, "seconds_per_epoch": speed,
            "targets_met": {f"test_ndcg@10 >= {TARGET_RATIO}": ndcg >= TARGET_RATIO,
                            "seconds_per_epoch <= 1": speed <= 1},
        }
    return summary


def rows(summary: dict) -> list:
    out = []
    for model in MODELS:
        if model in summary:
            entry = summary[model]
            out.append({"model": model, "seeds": len(entry["seeds"]),
                        "test N@10": entry["test"]["ndcg@10"]["mean"], "std": entry["test"]["ndcg@10"]["std"],
                        "test R@10": entry["test"]["recall@10"]["mean"],
                        "s/epoch": entry["seconds_per_epoch"]["mean"],
                        "epochs": ",".join(str(e) for e in entry["epochs"]),
                        "best": ",".join(str(e) for e in entry["best_epoch"])})
    return out


def run_reference(args, data: Path, seed: int, workdir: Path) -> dict:
    out = run_path(workdir, "reference", seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name("reference_output.json")
    command = reference_command(args.reference, data, raw, max_length=args.max_length, epochs=args.epochs, seed=seed,
                                threads=args.threads, eval_every=args.eval_every, patience=args.patience)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(out.with_name("reference.log"), "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"sasrec_parity.py: error: the reference failed (exit {done.returncode}): see "
                         f"{out.with_name('reference.log')}")
    return {**reference_result(json.loads(raw.read_text())), "command": command}


def run_project(args, prepared, seed: int, workdir: Path) -> dict:
    from merlin_molar.pipeline import train
    from merlin_molar.training import TrainConfig

    config = TrainConfig(seed=seed, epochs=args.epochs, early_stopping_patience=args.patience,
                         eval_every=args.eval_every, logging_steps=10_000)
    run_dir = run_path(workdir, "project", seed).parent / "run"
    # an interrupted run continues from its last checkpoint
    result = train(prepared, "sasrec", run_dir, {}, config, resume=(run_dir / "checkpoints").exists())
    return {**project_result(result), "model_dir": result["model_dir"]}


def prepared_data(data: Path, root: Path, max_length: int):
    """The project's preparation of ``data`` at ``max_length`` under ``root``, made once and then reused."""
    from merlin_molar.data import prepare, read_dataset

    raw = read_dataset(data)
    return finished_prepare(root, raw, max_length) or prepare(raw, root, max_length=max_length)


def timing_order(rounds: int) -> list:
    """``[(round, model)]``: A B, B A, A B, ... so that each model runs first in half the rounds."""
    return [(r, m) for r in range(rounds) for m in (MODELS if r % 2 == 0 else MODELS[::-1])]


def summarise_timing(runs: list) -> dict:
    """Mean and std of each model's seconds per epoch over the rounds, and the ratio project / reference."""
    by_model = {m: [r["seconds_per_epoch"] for r in runs if r["model"] == m] for m in MODELS}
    out = {m: {"rounds": len(v), "seconds_per_epoch": mean_std(v)} for m, v in by_model.items() if v}
    if all(by_model.values()):
        ratio = statistics.fmean(by_model["project"]) / statistics.fmean(by_model["reference"])
        out["project_over_reference"] = {"seconds_per_epoch": ratio, "target_met": ratio <= 1}
    return out


def run_timing(args, name: str, workdir: Path) -> None:
    import shutil

    timing = argparse.Namespace(**{**vars(args), "epochs": args.timing_epochs,
                                   "patience": args.timing_epochs // args.eval_every + 1})
    prepared = prepared_data(args.dataset, workdir / "prepared", args.max_length)
    seed, runs = args.seeds[0], []
    for round_, model in timing_order(args.timing_rounds):
        round_dir = workdir / "timing" / f"round{round_}"
        shutil.rmtree(round_dir / model, ignore_errors=True)  # always a fresh run of exactly N epochs
        load = os.getloadavg()[0]
        print(f"{name}: timing round {round_ + 1}/{args.timing_rounds}: {model}, {args.timing_epochs} epochs "
              f"(load average {load:.2f})", flush=True)
        record = run_project(timing, prepared, seed, round_dir) if model == "project" else \
            run_reference(timing, args.dataset, seed, round_dir)
        if record["epochs"] != args.timing_epochs:
            raise SystemExit(f"sasrec_parity.py: error: {model} trained {record['epochs']} epochs, not "
                             f"{args.timing_epochs}")
        runs.append({"round": round_, "model": model, "seconds_per_epoch": record["seconds_per_epoch"],
                     "load_average_before": load})
        print(f"{name}: timing {model}: {record['seconds_per_epoch']:.2f} s/epoch", flush=True)
    summary = summarise_timing(runs)
    write_result(result_path(BENCHMARK, f"{name}_timing.json"), {
        "benchmark": f"{name}_timing",
        "machine": machine(),
        "dataset": str(args.dataset),
        "max_length": args.max_length,
        "rule": {"epochs": args.timing_epochs, "eval_every": args.eval_every, "threads": args.threads,
                 "rounds": args.timing_rounds, "seed": seed},
        "summary": summary,
        **({"note": args.note} if args.note else {}),
        "runs": runs,
    })
    print(table([{"model": m, "rounds": e["rounds"], "s/epoch": e["seconds_per_epoch"]["mean"],
                  "std": e["seconds_per_epoch"]["std"]} for m, e in summary.items() if m in MODELS],
                ["model", "rounds", "s/epoch", "std"]))
    if "project_over_reference" in summary:
        print(f"project / reference: s/epoch {summary['project_over_reference']['seconds_per_epoch']:.3f} "
              "(target <= 1)")


def parse_args(argv=None):
    from merlin_molar.training import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", type=Path, default=data_dir("ml-100k"),
                   help="raw dataset directory (interactions.csv with user_id, item_id, timestamp)")
    p.add_argument("--max-length", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    p.add_argument("--epochs", type=int, default=int(d.epochs), help="maximum epochs (early stopping decides)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate after every N-th epoch")
    p.add_argument("--patience", type=int, default=d.early_stopping_patience,
                   help="stop after N validations without a better NDCG@10")
    p.add_argument("--reference", type=Path, default=REFERENCE, help="the reference SASRec script")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / BENCHMARK)
    p.add_argument("--resume", action="store_true",
                   help="keep and skip finished runs, continue an interrupted project run from its checkpoint")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: write the result from the runs already finished under --workdir (e.g. by "
                        "invocations that ran the models side by side)")
    p.add_argument("--suffix", default="", help="appended to the result file's name")
    p.add_argument("--note", help="recorded in the result: what else shared the CPU with the runs, and when")
    p.add_argument("--timing-epochs", type=int, default=0,
                   help="measure time per epoch only: fresh runs of exactly N epochs each, the models alternating "
                        "(0: train to early stopping and measure quality)")
    p.add_argument("--timing-rounds", type=int, default=2, help="with --timing-epochs: runs of each model")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.models = args.models.split(",")
    bad = sorted(set(args.models) - set(MODELS))
    if bad:
        p.error(f"--models: unknown {bad}; choose from {MODELS}")
    if not (args.dataset / "interactions.csv").is_file():
        p.error(f"--dataset: {args.dataset}: no interactions.csv")
    if "reference" in args.models and not args.reference.is_file():
        p.error(f"--reference: {args.reference}: file not found")
    if min(args.threads, args.eval_every, args.patience, args.epochs, args.max_length - 1) < 1:
        p.error("--threads, --eval-every, --patience and --epochs must be at least 1, --max-length at least 2")
    if args.timing_epochs < 0 or args.timing_rounds < 1:
        p.error("--timing-epochs must be at least 0, --timing-rounds at least 1")
    if args.timing_epochs % args.eval_every:
        p.error("--timing-epochs: a multiple of --eval-every, so that both models validate as often")
    if args.timing_epochs and (args.summary_only or set(args.models) != set(MODELS)):
        p.error("--timing-epochs: runs both models itself; not with --summary-only or --models")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    name = result_name(args.dataset.name, args.max_length) + args.suffix
    workdir = args.workdir / f"{args.dataset.name}_L{args.max_length}"
    if args.timing_epochs:
        import merlin_molar  # noqa: F401  (compat overrides before T4Rec is imported)

        return run_timing(args, name, workdir)
    finished = [run_path(workdir, m, s) for m in args.models for s in args.seeds if run_path(workdir, m, s).exists()]
    if args.summary_only and not finished:
        raise SystemExit(f"sasrec_parity.py: error: --workdir: {workdir} holds no finished run of {args.models}")
    if finished and not (args.resume or args.summary_only):
        raise SystemExit(f"sasrec_parity.py: error: --workdir: {workdir} holds {len(finished)} finished run(s): pass "
                         "--resume to keep them, or remove them")
    import merlin_molar  # noqa: F401  (compat overrides before T4Rec is imported)

    info = machine()
    train_project = "project" in args.models and not args.summary_only
    prepared = prepared_data(args.dataset, workdir / "prepared", args.max_length) if train_project else None
    runs = {m: {} for m in args.models}
    for seed in args.seeds:
        for model in args.models:
            path = run_path(workdir, model, seed)
            if path.exists():
                runs[model][seed] = json.loads(path.read_text())
                continue
            if args.summary_only:
                continue
            print(f"{name}: {model} seed {seed}: training", flush=True)
            start = time.perf_counter()
            record = run_project(args, prepared, seed, workdir) if model == "project" else \
                run_reference(args, args.dataset, seed, workdir)
            record["wall_seconds"] = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1, default=str))
            tmp.replace(path)
            runs[model][seed] = record
            print(f"{name}: {model} seed {seed}: test N@10 {record['test']['ndcg@10']:.4f}, {record['epochs']} "
                  f"epochs (best {record['best_epoch']}), {record['seconds_per_epoch']:.1f} s/epoch", flush=True)
    summary = summarise(runs)
    write_result(result_path(BENCHMARK, f"{name}.json"), {
        "benchmark": name,
        "machine": info,
        "dataset": str(args.dataset),
        "max_length": args.max_length,
        "rule": {"epochs": args.epochs, "eval_every": args.eval_every, "patience": args.patience,
                 "threads": args.threads},
        "summary": summary,
        **({"note": args.note} if args.note else {}),
        "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
    })
    print(table(rows(summary), ["model", "seeds", "test N@10", "std", "test R@10", "s/epoch", "epochs", "best"]))
    ratio = summary.get("project_over_reference")
    if ratio:
        print(f"project / reference: test N@10 {ratio['test_ndcg@10']:.3f} (target >= {TARGET_RATIO}), "
              f"s/epoch {ratio['seconds_per_epoch']:.2f} (target <= 1), seeds {ratio['seeds']}")


if __name__ == "__main__":
    main()
