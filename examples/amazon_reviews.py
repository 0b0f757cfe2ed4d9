"""Amazon reviews (JSON lines) + product metadata -> Molar, text-only MIRM.

    python examples/amazon_reviews.py --reviews Beauty.jsonl.gz --meta meta_Beauty.jsonl.gz [--images DIR]

Works with both public dumps: 2018 (reviewerID / asin / unixReviewTime, metadata with title, brand,
categories, description, price) and 2023 (user_id / parent_asin / timestamp in ms). Users and items are
5-core filtered with NVTabular, as in the paper's Amazon setting. No Amazon data ships here; to see the
format path run on real files you do have. `--from-movielens DIR` writes a MovieLens directory out in
the Amazon JSON-lines format first (for a smoke run where no Amazon dump is available).
"""
import argparse
import gzip
import json
from pathlib import Path

from merlin_molar.data import prepare, read_amazon, read_dataset
from merlin_molar.pipeline import embed_item_table, metrics_table, train
from merlin_molar.training import TrainConfig


def movielens_as_amazon(source: str, out: Path):
    raw = read_dataset(source)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "reviews.jsonl.gz", "wt") as f:
        for row in raw.interactions.itertuples():
            f.write(json.dumps({"reviewerID": f"u{row.user_id}", "asin": f"i{row.item_id}",
                                "unixReviewTime": int(row.timestamp), "overall": 5}) + "\n")
    with gzip.open(out / "meta.jsonl.gz", "wt") as f:
        for row in raw.items.to_dict("records"):
            f.write(json.dumps({"asin": f"i{row['item_id']}", "title": str(row.get("clean_title") or row.get("title")),
                                "categories": [str(row.get("genres", ""))]}) + "\n")
    return out / "reviews.jsonl.gz", out / "meta.jsonl.gz"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reviews")
    p.add_argument("--meta")
    p.add_argument("--images", help="directory of <asin>.jpg product images (optional)")
    p.add_argument("--from-movielens", help="convert this MovieLens directory to the Amazon format first")
    p.add_argument("--workdir", default="outputs/amazon")
    p.add_argument("--k-core", type=int, default=5)
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--epochs", type=float, default=10)
    args = p.parse_args()
    workdir = Path(args.workdir)
    if args.from_movielens:
        reviews, meta = movielens_as_amazon(args.from_movielens, workdir / "amazon_format")
    elif args.reviews and args.meta:
        reviews, meta = Path(args.reviews), Path(args.meta)
    else:
        p.error("give --reviews and --meta (or --from-movielens DIR)")

    raw = read_amazon(reviews, meta, Path(args.images) if args.images else None)
    prepared = prepare(raw, workdir / "prepared", max_length=args.max_length, k=args.k_core)
    table = embed_item_table(prepared, batch_size=64)
    config = TrainConfig(epochs=args.epochs, batch_size=128, save_steps=0)
    sasrec_options = {"d_model": 64, "n_layers": 2, "n_heads": 1, "dropout": 0.2}
    results = {"SASRec": train(prepared, "sasrec", workdir / "runs" / "sasrec", sasrec_options, config)}
    results["Molar"] = train(
        prepared, "molar", workdir / "runs" / "molar",
        {"id_branch": "frozen", "sasrec": {**sasrec_options, "max_length": args.max_length}}, config,
        item_table_path=table, init_id_branch_from=results["SASRec"]["model_dir"],
    )
    print(metrics_table(results, "test"))


if __name__ == "__main__":
    main()
