"""MovieLens-1M with posters: a vision-language MIRM reads each movie's title, year, genres and poster.

    # with a real MLLM you have locally (no hub access is needed once it is on disk):
    python examples/ml1m_multimodal.py --data ../shared/data/ml-1m --encoder /models/Qwen2-VL-2B-Instruct
    # without one: a tiny RANDOMLY INITIALISED Qwen2-VL, only to exercise the multimodal path end to end
    python examples/ml1m_multimodal.py --data ../shared/data/ml-1m --tiny-random-vlm --epochs 1

Steps: NVTabular prepare -> MIRM item table (text + 224-px poster through the model's real processor;
the 450 rated movies without a poster are encoded text-only and listed in the table metadata) ->
SASRec -> Molar (DUEG + frozen SASRec ID branch, scores fused; the CLI defaults) -> test metrics.
"""
import argparse
import os
from pathlib import Path

from merlin_molar.pipeline import embed_item_table, metrics_table, prepare_dataset, train
from merlin_molar.training import TrainConfig

DATA_ROOT = Path(os.environ.get("MOLAR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA_ROOT / "ml-1m"))
    p.add_argument("--workdir", default="outputs/ml1m_multimodal")
    p.add_argument("--encoder", help="local path of a Qwen2-VL / Qwen2.5-VL (or other HF VLM) checkpoint")
    p.add_argument("--tiny-random-vlm", action="store_true", help="random tiny Qwen2-VL (pipeline check only)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--epochs", type=float, default=10)
    args = p.parse_args()
    if not args.encoder and not args.tiny_random_vlm:
        p.error("give --encoder PATH (a local VLM checkpoint) or --tiny-random-vlm")
    workdir = Path(args.workdir)

    prepared = prepare_dataset(args.data, workdir / "prepared", max_length=args.max_length)
    encoder = args.encoder
    if args.tiny_random_vlm:
        from merlin_molar.items.testing import save_random_backbone

        titles = prepared.items()["clean_title"].dropna().astype(str).tolist()
        encoder = str(save_random_backbone(workdir / "tiny-qwen2-vl", "qwen2_vl", corpus=titles))
    table = embed_item_table(prepared, workdir / "item_table", encoder=encoder, image_size=args.image_size,
                             batch_size=16)

    config = TrainConfig(epochs=args.epochs, batch_size=128, save_steps=0)
    sasrec_options = {"d_model": 64, "n_layers": 2, "n_heads": 1, "dropout": 0.2}
    results = {"SASRec": train(prepared, "sasrec", workdir / "runs" / "sasrec", sasrec_options, config)}
    molar_options = {"id_branch": "frozen", "sasrec": {**sasrec_options, "max_length": args.max_length}}
    results["Molar (multimodal)"] = train(
        prepared, "molar", workdir / "runs" / "molar", molar_options, config, item_table_path=table,
        init_id_branch_from=results["SASRec"]["model_dir"],
    )
    print(metrics_table(results, "test"))


if __name__ == "__main__":
    main()
