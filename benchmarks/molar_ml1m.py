"""Molar vs a same-run SASRec on MovieLens (leave-one-out, full ranking, history masked).

    python benchmarks/molar_ml1m.py --data ../shared/data/ml-1m --epochs 20 --max-length 50

Trains, in one run and on one split: SASRec; Molar (content DUEG + SASRec ID branch, post-aligned);
Molar without alignment (alpha=0); content only (no ID branch). The trained Molar is also scored with
content-only and ID-only scores (id_weight 0 and 1) to show where its accuracy comes from. Writes
benchmarks/results/molar_ml1m/<name>.json and a PNG (metrics per model, training loss), prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import merlin_molar  # noqa: E402,F401
from merlin_molar.models.dueg import small_decoder_config  # noqa: E402
from merlin_molar.persistence import load_model  # noqa: E402
from merlin_molar.pipeline import embed_item_table, metrics_table, prepare_dataset, train  # noqa: E402
from merlin_molar.training import TrainConfig, evaluate, make_trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, git_commit, machine, result_path, write_result  # noqa: E402


def rescore(model_dir, prepared, id_weight: float, workdir: Path) -> dict:
    model, _, _, _ = load_model(model_dir)
    model.heads[0].prediction_task_dict["next-item"].id_weight = id_weight
    trainer = make_trainer(model, prepared, workdir, TrainConfig(eval_batch_size=256))
    return {"valid": evaluate(trainer, prepared, "valid"), "test": evaluate(trainer, prepared, "test")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(results)
    for offset, metric in ((-0.2, "ndcg@10"), (0.2, "recall@10")):
        values = [results[n]["test"][metric] for n in names]
        bars.bar([i + offset for i in range(len(names))], values, width=0.4, label=metric)
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    bars.set_title("test, full ranking, history masked")
    bars.legend()
    for name, r in results.items():
        history = [h for h in r.get("log_history", []) if "loss" in h and "epoch" in h]
        if history:
            curve.plot([h["epoch"] for h in history], [h["loss"] for h in history], label=name)
    curve.set_xlabel("epoch")
    curve.set_ylabel("training loss")
    curve.set_title("training loss (Molar includes the ID-branch and alignment terms)")
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(data_dir("ml-1m")))
    p.add_argument("--workdir", default=str(REPO / "outputs" / "molar_bench"))
    p.add_argument("--item-table", help="existing item table dir (default: embed with MiniLM)")
    p.add_argument("--epochs", type=float, default=20, help="SASRec epochs")
    p.add_argument("--molar-epochs", type=float, default=None, help="epochs of the Molar variants (default: --epochs)")
    p.add_argument("--id-branch", default="frozen", choices=["frozen", "joint"],
                   help="frozen: Molar's ID branch is this run's trained SASRec, kept fixed; joint: trained together")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--llm-hidden", type=int, default=64)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--id-weight", type=float, default=0.5)
    p.add_argument("--variants", default="sasrec,molar,molar_no_align,content_only")
    p.add_argument("--name", default="molar_ml1m")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    machine_info = machine()
    started = time.perf_counter()
    workdir = Path(args.workdir)
    prepared_dir = workdir / f"prepared_L{args.max_length}"
    prepared = prepare_dataset(args.data, prepared_dir, max_length=args.max_length)
    table_dir = Path(args.item_table) if args.item_table else embed_item_table(prepared, batch_size=64)

    sasrec = {"d_model": 64, "n_layers": 2, "n_heads": 1, "dropout": 0.2}
    llm = small_decoder_config("qwen2", hidden_size=args.llm_hidden, num_layers=args.llm_layers, num_heads=2,
                               max_positions=max(512, args.max_length)).to_dict()
    molar = {"llm": llm, "sasrec": {**sasrec, "max_length": args.max_length}, "alpha": args.alpha,
             "id_weight": args.id_weight, "id_branch": args.id_branch}
    variants = {
        "sasrec": ("SASRec", "sasrec", sasrec),
        "molar": ("Molar", "molar", molar),
        "molar_no_align": ("Molar w/o alignment", "molar", {**molar, "alpha": 0.0}),
        "content_only": ("Content only (DUEG)", "molar", {**molar, "id_branch": "none"}),
    }
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                         save_steps=0, logging_steps=50)
    molar_config = TrainConfig(**{**config.__dict__, "epochs": args.molar_epochs or args.epochs})
    results = {}
    sasrec_dir = None
    for key in args.variants.split(","):
        label, kind, options = variants[key]
        init_from = sasrec_dir if kind == "molar" and options.get("id_branch") == "frozen" else None
        if kind == "molar" and options.get("id_branch") == "frozen" and init_from is None:
            raise SystemExit("--id-branch frozen needs the sasrec variant first in --variants")
        print(f"=== {label}", flush=True)
        results[label] = train(prepared, kind, workdir / "runs" / f"{key}_{args.name}", options,
                               molar_config if kind == "molar" else config,
                               item_table_path=table_dir if kind == "molar" else None, init_id_branch_from=init_from)
        if kind == "sasrec":
            sasrec_dir = results[label]["model_dir"]
    if "molar" in args.variants.split(","):
        # Where Molar's accuracy comes from, and the fusion weight chosen on validation (reported on test).
        model_dir = results["Molar"]["model_dir"]
        sweep = {w: rescore(model_dir, prepared, w, workdir / "rescore") for w in (0.0, 0.25, 0.5, 0.75, 1.0)}
        results["Molar, content scores only"] = {**sweep[0.0], "train_seconds": float("nan")}
        results["Molar, ID-branch scores only"] = {**sweep[1.0], "train_seconds": float("nan")}
        best = max(sweep, key=lambda w: sweep[w]["valid"]["ndcg@10"])
        results[f"Molar, id_weight={best} (valid-chosen)"] = {**sweep[best], "train_seconds": float("nan")}
        fusion_sweep = {str(w): {"valid_ndcg@10": r["valid"]["ndcg@10"], "test_ndcg@10": r["test"]["ndcg@10"]}
                        for w, r in sweep.items()}
    else:
        fusion_sweep = None

    for split in ("valid", "test"):
        print(f"\n{split} (full ranking over {prepared.manifest['items_interacted']} items, history masked)")
        print(metrics_table(results, split))
    out = {
        "benchmark": args.name,
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(),
        "machine": machine_info,
        "data": {**{k: v for k, v in prepared.manifest.items() if k != "source"}, "source": str(args.data)},
        "item_table": str(table_dir),
        "settings": vars(args),
        "total_seconds": time.perf_counter() - started,
        "fusion_sweep": fusion_sweep,
        "results": {n: {k: r[k] for k in ("valid", "test", "train_seconds") if k in r} for n, r in results.items()},
        "training_loss": {n: [(h["epoch"], h["loss"]) for h in r.get("log_history", []) if "loss" in h]
                          for n, r in results.items()},
    }
    path = write_result(result_path("molar_ml1m", f"{args.name}.json"), out)
    plot(results, path.with_suffix(".png"))
    print(f"\nwrote {path} and .png")


if __name__ == "__main__":
    main()
