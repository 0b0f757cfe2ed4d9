"""Catalogue embedding throughput of the MIRM item encoders (items/s), and model FLOP utilisation on GPU.

Rows (``--device cpu``, the default):

* ``minilm_full_catalogue``: the packaged all-MiniLM-L6-v2 over all 3,883 ML-1M catalogue items of
  ``items.csv`` (:func:`merlin_molar.items.encode_items`, length-sorted batches).
* ``minilm_item_table``: :func:`merlin_molar.items.embed_catalogue` over the prepared ML-1M items (the
  3,706 interacted ones), end to end with planning, chunk files, merge and the parquet/schema/metadata
  write; ``--table-out`` keeps that table (e.g. ``outputs/p1m/item_table``, the one the Molar model reads).
* ``tiny_qwen2_vl``: a tiny randomly initialised Qwen2-VL (real processor, real 224-px posters) over the
  first ``--vlm-items`` catalogue items, so the VLM path is exercised by the benchmark.

``--encoders smollm2,efficientnet-lite0,...`` measures only the named item encoders instead (the ``embed-items
--encoder`` names): each one embeds the prepared catalogue through :func:`merlin_molar.pipeline.embed_item_table`
(what the CLI runs) into ``PREPARED/item_table_<name>``, kept for the quality runs, with the time to load the
encoder and the time per item of the embedding itself (planning, image checks, encoding, table write).

``--device cuda`` adds ``qwen2_vl_2b_random``: a randomly initialised model with Qwen2-VL-2B's shapes
(28 layers, hidden 1536, vision depth 32, embed 1280) in bf16 with SDPA on 224-px posters + the item text,
reporting items/s and model FLOP utilisation (MFU = model FLOPs / time / peak bf16 dense FLOP/s of the GPU).
Model FLOPs per batch: 2 x (vision params x patches + language-model non-embedding params x real tokens)
+ attention (vision: 4 x depth x patches^2 x width per image, full; LLM: 2 x layers x tokens^2 x hidden,
causal). The tokenizer is a byte-level BPE trained here (no hub access), so token counts are reported.

    nice -n 10 .venv/bin/python benchmarks/embed_items.py --table-out outputs/p1m/item_table
    python benchmarks/embed_items.py --prepared outputs/quality/ml-1m/prepared_L50 \
        --encoders efficientnet-lite0,minilm+efficientnet-lite0,smollm2,smollm2+efficientnet-lite0
    python benchmarks/embed_items.py --device cuda --skip-cpu-rows     # on a GPU machine
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401
import numpy as np  # noqa: E402

from common import REPO, data_dir, command_line, git_commit, machine, now, peak_flops, table, result_path, write_result  # noqa: E402
from merlin_molar.data import load_prepared, prepare, read_dataset  # noqa: E402
from merlin_molar.items import (  # noqa: E402
    ItemPromptBuilder,
    build_encoder,
    embed_catalogue,
    encode_items,
    load_item_table,
)
from merlin_molar.items.testing import (  # noqa: E402
    QWEN2_VL_2B_TEXT,
    QWEN2_VL_2B_VISION,
    save_random_backbone,
)



def catalogue(data: Path):
    raw = read_dataset(data)
    prompts = ItemPromptBuilder(text_columns=tuple(raw.text_columns))
    return raw, prompts.items_from_frame(raw.items, f"{data}/items.csv")


def timed_encode(encoder, items, batch_size, device):
    import torch

    encode_items(encoder, items[: 2 * batch_size], batch_size, progress=False)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = encode_items(encoder, items, batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def vlm_flops(encoder, items, batch: "EncodedBatch") -> float:  # noqa: F821
    """Model FLOPs of one pass over ``items`` (see the module docstring for the formula)."""
    model = encoder.model
    vision = model.visual
    language = model.language_model
    v_params = sum(p.numel() for p in vision.parameters())
    l_params = sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()
    vcfg, tcfg = model.config.vision_config, model.config.get_text_config()
    patches = encoder.image_tokens * vcfg.spatial_merge_size**2
    width = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size
    tokens = np.array(encoder.lengths(items))
    with_image = batch.used_image
    tokens = tokens - np.where(np.array([it.image is not None for it in items]) & ~with_image, encoder.image_tokens, 0)
    n_img = int(with_image.sum())
    flops = 2.0 * v_params * patches * n_img + 4.0 * vcfg.depth * patches**2 * width * n_img
    tokens = tokens.astype(float)
    flops += float(np.sum(2.0 * l_params * tokens + 2.0 * tcfg.num_hidden_layers * tokens**2 * tcfg.hidden_size))
    return flops


def vlm_row(name, path, items, batch_size, device, image_size, peak=None):
    encoder = build_encoder(path, kind="vlm", device=device, image_size=image_size)
    out, seconds = timed_encode(encoder, items, batch_size, device)
    text_tokens = np.array(encoder.lengths(items)) - np.array([encoder.image_tokens if it.image else 0 for it in items])
    row = {
        "row": name,
        "device": device,
        "items": len(items),
        "items_with_image": int(out.used_image.sum()),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "items_per_s": round(len(items) / seconds, 2),
        "dim": encoder.dim,
        "dtype": str(encoder.dtype).replace("torch.", ""),
        "attn_implementation": encoder.model.config._attn_implementation,
        "image_size": image_size,
        "image_tokens_per_item": encoder.image_tokens,
        "mean_text_tokens": round(float(text_tokens.mean()), 1),
        "missing_or_unreadable_images": len(out.image_problems),
        "params": sum(p.numel() for p in encoder.model.parameters()),
    }
    flops = vlm_flops(encoder, items, out)
    row["model_tflops_per_s"] = round(flops / seconds / 1e12, 4)
    row["mfu"] = round(flops / seconds / peak, 4) if peak else None
    return row


def encoder_row(name: str, prepared, batch_size: int, device: str) -> dict:
    """One ``embed-items --encoder NAME`` over ``prepared``'s catalogue, timed (a model directory, e.g. a stage-1
    output, is named by its last path component)."""
    from merlin_molar.items import read_table_metadata
    from merlin_molar.pipeline import embed_item_table

    label = Path(name).name if Path(name).is_dir() else name
    output = prepared.root / f"item_table_{label}"
    details = {}
    start = time.perf_counter()
    embed_item_table(prepared, output, encoder=name, details=details, batch_size=batch_size, device=device,
                     resume=False)
    total = time.perf_counter() - start
    result = details["result"]
    meta = read_table_metadata(output)
    return {
        "row": f"{label}_item_table", "encoder": name, "device": device, "items": result.items_encoded,
        "batch_size": batch_size, "load_seconds": round(total - result.seconds, 1),
        "seconds": round(result.seconds, 1), "seconds_per_item": round(result.seconds / result.items_encoded, 4),
        "items_per_s": round(result.items_encoded / result.seconds, 2), "dim": meta["dim"],
        "items_with_image": meta["items_with_image"], "zero_rows": len(meta["zero_rows"]), "table": str(output),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(data_dir("ml-1m")))
    parser.add_argument("--prepared", default=str(REPO / "outputs" / "p1m"), help="prepared ML-1M (made if missing)")
    parser.add_argument("--table-out", default=None, help="keep the MiniLM item table here (default: a temp dir)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vlm-items", type=int, default=256, help="items for the tiny Qwen2-VL row")
    parser.add_argument("--gpu-items", type=int, default=None, help="items for the 2B row (default: all)")
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-cpu-rows", action="store_true", help="only the GPU row")
    parser.add_argument("--encoders", default=None,
                        help="comma-separated embed-items --encoder names: time only these, over --prepared")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    measured_on = machine()  # load average at the start; write_result adds the one at the end
    import torch

    torch.set_num_threads(args.threads)
    if args.encoders:
        prepared = load_prepared(args.prepared)
        rows = []
        for name in [n.strip() for n in args.encoders.split(",") if n.strip()]:
            rows.append(encoder_row(name, prepared, args.batch_size, args.device))
            path = write_result(  # after every row: a long run stopped half-way keeps the rows it finished
                args.output or result_path("embed_items", "pretrained_encoders.json"),
                {"benchmark": "embed_items", "command": command_line(), "date": now(), "git_commit": git_commit(),
                 "machine": measured_on, "prepared": str(args.prepared), "threads": args.threads, "rows": rows},
            )
        print(table(rows, ["row", "items", "load_seconds", "seconds", "seconds_per_item", "dim", "items_with_image"]))
        print(f"wrote {path}")
        return

    raw, items = catalogue(Path(args.data))
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="embed-items-"))
    if not args.skip_cpu_rows:
        encoder = build_encoder(device="cpu")
        out, seconds = timed_encode(encoder, items, args.batch_size, "cpu")
        rows.append({
            "row": "minilm_full_catalogue", "device": "cpu", "items": len(items), "batch_size": args.batch_size,
            "seconds": round(seconds, 3), "items_per_s": round(len(items) / seconds, 2), "dim": encoder.dim,
            "dtype": "float32",
        })
        prepared_dir = Path(args.prepared)
        if not (prepared_dir / "molar_manifest.json").exists():
            prepare(raw, prepared_dir, max_length=200)
        prepared = load_prepared(prepared_dir)
        table_out = Path(args.table_out) if args.table_out else workdir / "item_table"
        start = time.perf_counter()
        result = embed_catalogue(prepared, encoder, table_out, batch_size=args.batch_size, resume=False)
        seconds = time.perf_counter() - start
        loaded = load_item_table(table_out, prepared)
        rows.append({
            "row": "minilm_item_table", "device": "cpu", "items": result.items_encoded, "batch_size": args.batch_size,
            "seconds": round(seconds, 3), "items_per_s": round(result.items_encoded / seconds, 2), "dim": encoder.dim,
            "dtype": "float32", "table": str(table_out) if args.table_out else "(temporary)",
            "table_shape": list(loaded.shape),
        })
        tiny = save_random_backbone(workdir / "tiny-qwen2-vl", "qwen2_vl", corpus=raw.items["title"].astype(str))
        rows.append(vlm_row("tiny_qwen2_vl", tiny, items[: args.vlm_items], 16, "cpu", args.image_size))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        peak, peak_note = peak_flops(args.peak_tflops)
        path = save_random_backbone(
            workdir / "qwen2-vl-2b-random", "qwen2_vl", corpus=raw.items["title"].astype(str),
            text=QWEN2_VL_2B_TEXT, vision=QWEN2_VL_2B_VISION, vocab_size=8000, device="cuda", dtype=torch.bfloat16,
        )
        row = vlm_row(
            "qwen2_vl_2b_random", path, items[: args.gpu_items], args.gpu_batch_size, "cuda", args.image_size, peak
        )
        row["peak_flops"] = peak
        row["peak_note"] = peak_note
        rows.append(row)

    columns = ["row", "device", "items", "batch_size", "seconds", "items_per_s", "dim", "mfu"]
    print(table(rows, columns))
    name = "embed_items" + ("_cuda" if args.device == "cuda" else "")
    path = write_result(
        args.output or result_path("embed_items", f"{name}.json"),
        {
            "benchmark": "embed_items",
            "command": command_line(),
            "date": now(),
            "git_commit": git_commit(),
            "machine": measured_on,
            "data": args.data,
            "catalogue_items": len(items),
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
