"""DUEG training throughput: sequences/s and model FLOP utilisation of MolarBlock + the Molar losses.

    python benchmarks/dueg_throughput.py --device cuda                      # Qwen2-1.5B shape, bf16, AdamW
    python benchmarks/dueg_throughput.py --device cpu --shape tiny          # what runs on a CPU machine

One training step = content item tower (frozen table -> projection) -> MolarBlock (Qwen2 over
inputs_embeds, bf16 autocast on CUDA) -> full-softmax next-item loss at every position + alignment loss,
backward, AdamW step (full fine-tuning). Random weights and random histories: throughput does not
depend on the values. Reference (issue): plain PyTorch/HF on one H100, bf16, AdamW, batch 128 ->
about 1,170 seq/s at length 11 and 580 at length 51.

Model FLOPs per step = 6 * (LLM non-embedding params) * tokens + 12 * layers * hidden * length^2 * batch
(attention scores + values, forward + backward) + 6 * tokens * n_items * hidden (next-item logits).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import merlin_molar  # noqa: F401
from merlin_molar.models.dueg import MolarBlock
from merlin_molar.models.item_tower import ContentItemEmbedding
from merlin_molar.models.losses import FullSoftmaxLoss, symmetric_infonce

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine, now, peak_flops, table, result_path, write_result  # noqa: E402

SHAPES = {
    # Qwen2-1.5B: 28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
}


def measure(shape: str, length: int, batch: int, n_items: int, content_dim: int, steps: int, warmup: int,
            device: str) -> dict:
    from transformers import Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8, max_position_embeddings=4096, **SHAPES[shape])
    config._attn_implementation = "sdpa"
    block = MolarBlock(config).to(device)
    items = ContentItemEmbedding(torch.randn(n_items, content_dim), config.hidden_size).to(device)
    id_users = torch.randn(batch, config.hidden_size, device=device)
    loss_fn = FullSoftmaxLoss()
    params = [p for m in (block, items) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    ids = torch.randint(3, n_items, (batch, length + 1), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            users = block(items(ids[:, :-1]))
            table_ = items.weight
            loss = loss_fn(users.reshape(-1, users.size(-1)), ids[:, 1:].reshape(-1), table_)
            loss = loss + 0.1 * symmetric_infonce(users[:, -1], id_users)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    llm_params = sum(p.numel() for n, p in block.llm.named_parameters() if "embed_tokens" not in n)
    h, layers, tokens = config.hidden_size, config.num_hidden_layers, batch * length
    flops = 6 * llm_params * tokens + 12 * layers * h * length * length * batch + 6 * tokens * n_items * h
    return {"shape": shape, "length": length, "batch": batch, "llm_params_m": llm_params / 1e6,
            "step_s": seconds, "seq_per_s": batch / seconds, "tflops": flops / seconds / 1e12, "flops_per_step": flops}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-1.5b on cuda, tiny on cpu")
    p.add_argument("--lengths", default="11,51")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n-items", type=int, default=3706)
    p.add_argument("--content-dim", type=int, default=1536)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    shape = args.shape or ("qwen2-1.5b" if args.device == "cuda" else "tiny")
    info = machine()
    peak, peak_source = peak_flops(args.peak_tflops)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        row = measure(shape, length, args.batch, args.n_items, args.content_dim, args.steps, args.warmup, args.device)
        row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
        rows.append(row)
        print(table([row], ["shape", "length", "batch", "seq_per_s", "tflops", "mfu"]), flush=True)
    reference = {"11": 1170, "51": 580} if shape == "qwen2-1.5b" else None
    out = Path(args.output or result_path("dueg_throughput", f"dueg_throughput_{args.device}.json"))
    write_result(out, {
        "benchmark": "dueg_throughput", "command": command_line(), "date": now(), "git_commit": git_commit(),
        "machine": info, "device": args.device, "peak_flops": peak, "peak_source": peak_source,
        "reference_h100_plain_hf_seq_per_s": reference, "rows": rows,
    })
    print(table(rows, ["shape", "length", "batch", "llm_params_m", "step_s", "seq_per_s", "tflops", "mfu"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
