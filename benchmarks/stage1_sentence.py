"""Stage 1 for the default sentence encoder on CPU: does contrastive history -> next item fine-tuning of the
packaged all-MiniLM-L6-v2 make its item vectors better at predicting the next item? (issue 10, item 5)

1. ML-100K prepared with max length 50 (``--workdir``, default ``outputs/stage1_sentence``).
2. Item table of the original MiniLM.
3. Stage 1 (:func:`merlin_molar.items.stage1.finetune_sentence_encoder`): ``--examples`` windows of the
   **train** split (the text of the last ``--history-length`` items, newest last -> the next item's text),
   ``--steps`` AdamW steps of ``--batch-size`` with in-batch negatives; wall time measured.
4. Item table of the fine-tuned MiniLM.
5. For both tables: content-kNN (cosine of every item to the user's last history item,
   :func:`merlin_molar.cold_start.content_knn_scorer`), full ranking of the catalogue, history and reserved
   ids masked, NDCG/Recall@10/20 on the validation and test splits, and the paired per-user difference
   (fine-tuned - original) with its standard error.

Writes ``benchmarks/results/stage1_sentence/<name>.json`` (command, commit, machine, date, timings) and prints a table.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/stage1_sentence.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides before T4Rec is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import REPO, command_line, data_dir, git_commit, machine, now, table, result_path, write_result  # noqa: E402

from merlin_molar.cold_start import content_knn_scorer  # noqa: E402
from merlin_molar.ids import ITEM_SEQUENCE  # noqa: E402
from merlin_molar.data import prepare, read_dataset  # noqa: E402
from merlin_molar.evaluation import mask_seen_items, reference_metrics  # noqa: E402
from merlin_molar.items import load_item_table, read_table_metadata  # noqa: E402
from merlin_molar.items.stage1 import finetune_sentence_encoder, sentence_behaviour_examples  # noqa: E402
from merlin_molar.pipeline import embed_item_table  # noqa: E402

TOP_KS = (10, 20)


def split_histories(prepared, split: str):
    """``(histories [users, max_length] left-aligned, targets [users])``: each row's last item is the target."""
    rows = [np.asarray(s, dtype=np.int64) for s in prepared.split_frame(split)[ITEM_SEQUENCE]]
    histories = torch.zeros(len(rows), prepared.max_length, dtype=torch.long)
    for i, row in enumerate(rows):
        h = np.array(row[:-1][-prepared.max_length:])
        histories[i, : len(h)] = torch.from_numpy(h)
    return histories, torch.tensor([int(r[-1]) for r in rows])


def per_user_metrics(scorer, histories, targets, batch_size: int = 256):
    out = {}
    for start in range(0, len(targets), batch_size):
        h, t = histories[start : start + batch_size], targets[start : start + batch_size]
        for key, value in reference_metrics(mask_seen_items(scorer(h), h, t), t, TOP_KS).items():
            out.setdefault(key, []).append(value)
    return {k.replace("_at_", "@"): torch.cat(v).double() for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(data_dir("ml-100k")))
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--steps", type=int, default=200, help="stage-1 optimizer steps (the CPU budget)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--history-length", type=int, default=3)
    p.add_argument("--examples", type=int, default=10_000, help="train windows sampled (with replacement)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "stage1_sentence"))
    p.add_argument("--name", default="stage1_sentence_ml100k")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    workdir = Path(args.workdir)
    timings = {}
    started = time.perf_counter()

    t = time.perf_counter()
    prepared = prepare(read_dataset(args.data), workdir / f"prepared_L{args.max_length}", max_length=args.max_length)
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tables = {"original": embed_item_table(prepared, workdir / "table_original", device="cpu", batch_size=64)}
    timings["embed_original_s"] = time.perf_counter() - t

    t = time.perf_counter()
    examples = sentence_behaviour_examples(prepared, args.examples, args.history_length, seed=args.seed)
    timings["examples_s"] = time.perf_counter() - t
    source = {"prepared": Path(args.data).name + f" max_length {args.max_length}", "split": "train",
              "history_length": args.history_length, "examples": args.examples, "seed": args.seed}
    t = time.perf_counter()
    tuned = finetune_sentence_encoder(
        None, examples, workdir / "minilm_stage1", max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, temperature=args.temperature, device="cpu", seed=args.seed, source=source,
    )
    timings["finetune_s"] = time.perf_counter() - t  # loading the model + training + saving
    stage1 = json.loads((tuned / "molar_stage1.json").read_text())
    timings["finetune_train_loop_s"] = stage1["seconds"]

    t = time.perf_counter()
    tables["stage1"] = embed_item_table(prepared, workdir / "table_stage1", encoder=str(tuned), device="cpu",
                                        batch_size=64)
    timings["embed_stage1_s"] = time.perf_counter() - t
    assert read_table_metadata(tables["stage1"])["encoder"]["stage1"]["method"] == "contrastive"

    t = time.perf_counter()
    per_user = {}
    for split in ("valid", "test"):
        histories, targets = split_histories(prepared, split)
        for name, path in tables.items():
            scorer = content_knn_scorer(load_item_table(path, prepared))
            per_user[(split, name)] = per_user_metrics(scorer, histories, targets)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    rows, results = [], {}
    for split in ("valid", "test"):
        results[split] = {}
        for name in tables:
            m = per_user[(split, name)]
            results[split][name] = {k: float(v.mean()) for k, v in sorted(m.items())}
            results[split][name]["users"] = len(m["ndcg@10"])
        for key in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"):
            diff = per_user[(split, "stage1")][key] - per_user[(split, "original")][key]
            results[split].setdefault("stage1_minus_original", {})[key] = {
                "mean": float(diff.mean()), "std_error": float(diff.std() / math.sqrt(len(diff)))}
        change = results[split]["stage1_minus_original"]
        for name in tables:
            r = results[split][name]
            rows.append({"split": split, "item table": f"MiniLM {name}", "NDCG@10": r["ndcg@10"],
                         "Recall@10": r["recall@10"], "NDCG@20": r["ndcg@20"], "Recall@20": r["recall@20"],
                         "users": r["users"]})
        rows.append({"split": split, "item table": "stage1 - original (± s.e.)",
                     "NDCG@10": f"{change['ndcg@10']['mean']:+.4f} ± {change['ndcg@10']['std_error']:.4f}",
                     "Recall@10": f"{change['recall@10']['mean']:+.4f} ± {change['recall@10']['std_error']:.4f}",
                     "NDCG@20": f"{change['ndcg@20']['mean']:+.4f}",
                     "Recall@20": f"{change['recall@20']['mean']:+.4f}"})

    losses = stage1["losses"]
    window = max(1, min(10, len(losses) // 4))
    path = write_result(result_path("stage1_sentence", f"{args.name}.json"), {
        "benchmark": "stage1_sentence", "command": command_line(), "git_commit": git_commit(), "date": now(),
        "machine": info,
        "setup": {"data": Path(args.data).name, "max_length": args.max_length, "encoder": "packaged all-MiniLM-L6-v2",
                  "stage1": {k: v for k, v in vars(args).items() if k not in ("data", "workdir", "name")},
                  "examples_built": len(examples), "example": stage1["example"],
                  "evaluation": "content-kNN: cosine to the last history item, full ranking, history and reserved "
                                "ids masked, leave-one-out valid/test targets"},
        "stage1": {"steps": stage1["steps"], "train_loop_s": stage1["seconds"],
                   "s_per_step": stage1["seconds"] / stage1["steps"],
                   f"loss_first_{window}_steps": float(np.mean(losses[:window])),
                   f"loss_last_{window}_steps": float(np.mean(losses[-window:])), "losses": losses,
                   "hyperparameters": stage1["hyperparameters"]},
        "timings_s": timings,
        "results": results,
    })
    print(table(rows, ["split", "item table", "NDCG@10", "Recall@10", "NDCG@20", "Recall@20", "users"]))
    print(f"stage 1: {stage1['steps']} steps in {stage1['seconds']:.0f} s ({stage1['seconds'] / stage1['steps']:.2f} "
          f"s/step), loss {np.mean(losses[:window]):.3f} -> {np.mean(losses[-window:]):.3f}; "
          f"whole run {timings['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
