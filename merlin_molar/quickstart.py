"""The README's main job: MovieLens -> NVTabular -> MIRM item table -> SASRec and Molar -> metrics table
and example recommendations, with the CLI's default (recommended) model settings, on CPU.

Two settings differ from ``train``'s defaults, to keep it a few-minute demo that can be compared with a
committed multi-seed result: sequences of at most 50 items, and the early-stopping rule that result was
measured with (validation after every epoch, patience 10). ``train`` now validates every 5 epochs with patience
8 (40 epochs without a gain, the reference SASRec's rule), which took the quickstart past 9 minutes."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from merlin_molar.io import read_json, write_json
from merlin_molar.pipeline import (
    embed_item_table,
    metrics_table,
    prepare_dataset,
    recommend,
    resolve_dataset,
    train,
)
from merlin_molar.training import TrainConfig

MAX_LENGTH = 50
# the result rows, by name (benchmarks/quickstart_time.py reads them)
SASREC_ROW, MOLAR_ROW = "SASRec (ID only)", "Molar (content + ID)"
SEED = 0  # seed 0 of benchmarks/quality.py's ml-100k rows, so this run can be compared with them
QUALITY_RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality" / "quality_ml100k.json"
# the early stopping quality_ml100k.json was measured with (see the module docstring)
EARLY_STOPPING = {"eval_every": 1, "early_stopping_patience": 10}


def run_quickstart(data: Optional[str] = None, workdir="outputs/quickstart", epochs: Optional[float] = None,
                   download: bool = True) -> dict:
    """SASRec, then Molar on top of it, with the CLI's default model settings (early stopping on validation:
    :data:`EARLY_STOPPING`)."""
    start = time.perf_counter()
    workdir = Path(workdir)
    config = TrainConfig(seed=SEED, **EARLY_STOPPING, **({"epochs": epochs} if epochs else {}))
    source = resolve_dataset(data, download=download)
    print(f"[1/5] data: {source}")
    prepared = prepare_dataset(source, workdir / "prepared", max_length=MAX_LENGTH)
    m = prepared.manifest
    print(f"      {m['users']} users, {m['items_interacted']} items, {m['interactions']} interactions "
          f"-> NVTabular leave-one-out splits in {prepared.root}")
    print("[2/5] MIRM item table with the packaged all-MiniLM-L6-v2 (text; a Qwen2-VL path adds posters)")
    table = embed_item_table(prepared, batch_size=64)
    # the quickstart always trains anew: its previous runs (perhaps of an older version's defaults, which
    # `train` would refuse to overwrite) are its own outputs, not a user's work
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    print(f"[3/5] SASRec (Transformers4Rec Trainer, early stopping on validation NDCG@10, seed {SEED})")
    results = {SASREC_ROW: train(prepared, "sasrec", workdir / "runs" / "sasrec", None, config)}
    print("[4/5] Molar: DUEG (random-init 2-layer Qwen2) over the item table (MoE adaptor), the trained SASRec "
          "as its frozen ID branch; fusion weight chosen on validation")
    results[MOLAR_ROW] = train(
        prepared, "molar", workdir / "runs" / "molar", None, config, item_table_path=table,
        init_id_branch_from=results[SASREC_ROW]["model_dir"],
    )
    print("[5/5] results on the held-out last item (full ranking, history masked)")
    print(metrics_table(results, "test"))
    gain = results[MOLAR_ROW]["test"]["ndcg@10"] / results[SASREC_ROW]["test"]["ndcg@10"]
    print(f"Molar / SASRec test NDCG@10 on seed {SEED}: {gain:.3f}")
    print(seed_spread_note())

    test = prepared.split_frame("test").head(3)
    items = prepared.items()
    raw_of = dict(zip(items["item_id"], items["item_id_raw"]))
    title_of = dict(zip(items["item_id"], items.get("clean_title", items.get("title", items["item_id_raw"]))))
    histories = [[raw_of[int(i)] for i in seq[:-1]] for seq in test["item_id-list"]]
    recs = recommend(results[MOLAR_ROW]["model_dir"], prepared, histories, top_k=5)
    print("\nexample recommendations (Molar):")
    for user, seq in enumerate(test["item_id-list"]):
        print(f"  user {test['user_id'].iloc[user]}: recently watched "
              + "; ".join(str(title_of[int(i)]) for i in seq[-4:-1]))
        print(f"    held-out next: {title_of[int(seq[-1])]}")
        for _, row in recs[recs.history == user].iterrows():
            print(f"    {row['rank']}. {row['title']}")
    summary = {name: {k: r.get(k) for k in ("valid", "test", "train_seconds", "best_epoch", "fusion", "model_dir")}
               for name, r in results.items()}
    summary["total_seconds"] = time.perf_counter() - start
    write_json(workdir / "summary.json", summary)
    print(f"\nwrote {workdir}/ (prepared data, item table, runs/*/model, summary.json) "
          f"in {summary['total_seconds'] / 60:.1f} min")
    return summary


def seed_spread_note() -> str:
    """How this one seed compares with the committed multi-seed benchmark of the same settings."""
    if not QUALITY_RESULT.exists():
        return "(no committed multi-seed result to compare with: run benchmarks/quality.py --datasets ml-100k)"
    summary = read_json(QUALITY_RESULT)["summary"]
    lines = [f"multi-seed benchmark ({QUALITY_RESULT.name}, same settings, early-stopped):"]
    for variant in ("sasrec", "molar"):
        e = summary[variant]
        n = e["test"]["ndcg@10"]
        lines.append(f"  {variant:<7} test NDCG@10 {n['mean']:.4f} +- {n['std']:.4f} over seeds {e['seed_list']}")
    ratio = summary["molar"].get("test_ndcg@10_ratio_to_sasrec")
    if ratio:
        lines.append(f"  Molar / SASRec, paired by seed: {ratio['mean']:.3f} +- {ratio['std']:.3f}")
    return "\n".join(lines)
