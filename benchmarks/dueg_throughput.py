"""DUEG training throughput: step time, sequences/s and model FLOP utilisation of MolarBlock + the Molar losses.

    python benchmarks/dueg_throughput.py --device cuda                      # Qwen2-1.5B shape, bf16, AdamW
    python benchmarks/dueg_throughput.py --device cpu --duegs tiny          # what runs on a CPU machine
    python benchmarks/dueg_throughput.py --device cpu --threads 1 --lengths 50 --adaptor moe --content-dim 384 \
        --duegs tiny,smollm2:2,smollm2:2+lora,smollm2:4,smollm2:4+lora,smollm2,smollm2+lora   # pretrained SmolLM2
    python benchmarks/dueg_throughput.py --device cuda --lengths 50 --adaptor moe --content-dim 384 \
        --duegs tiny,smollm2:2,smollm2:4,smollm2,smollm2+lora,qwen2-1.5b     # the same on a GPU (bf16 autocast)

``--duegs`` lists the DUEGs to time, each ``NAME[:LAYERS][+lora]``. NAME is a random-init shape (``tiny``: the
default ``MolarConfig`` DUEG, Qwen2 hidden 64, 2 layers; ``qwen2-1.5b``: the paper's size) or a pretrained LLM as
``MolarConfig.llm`` takes it (``smollm2``: the packaged SmolLM2-135M-Instruct GGUF, dequantised to float32; a
GGUF file; a model directory). ``:LAYERS`` keeps its first LAYERS decoder layers (``MolarConfig.llm_layers``);
``+lora`` freezes the LLM and trains LoRA adapters (``MolarConfig.lora`` = :data:`LORA`). A pretrained LLM is
read once and copied for each of its variants.

One training step = content item tower (frozen table -> adaptor, ``--adaptor``) -> MolarBlock (the LLM over
inputs_embeds, bf16 autocast on CUDA, float32 on CPU) -> full-softmax next-item loss at every position +
alignment loss, backward, AdamW step over the trainable parameters. Random histories: throughput does not depend
on the values. Reference (issue): plain PyTorch/HF on one H100, bf16, AdamW, batch 128 -> about 1,170 seq/s
at length 11 and 580 at length 51.

Model FLOPs per step = (4 + 2 * trained) * (LLM non-embedding params) * tokens (forward, input gradients, and
weight gradients when the LLM's weights train, i.e. not under LoRA) + 12 * layers * hidden * length^2 * batch
(attention scores + values, forward + backward) + 6 * tokens * n_items * hidden (next-item logits).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path

import torch

import merlin_molar  # noqa: F401
from merlin_molar.models.dueg import MolarBlock, load_pretrained_llm
from merlin_molar.models.item_tower import ADAPTORS, ContentItemEmbedding
from merlin_molar.models.losses import FullSoftmaxLoss, symmetric_infonce

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine, now, peak_flops, table, result_path, write_result  # noqa: E402

SHAPES = {
    # Qwen2-1.5B: 28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2),
    # = small_decoder_config(), the default MolarConfig DUEG
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
}
# MolarConfig.lora for the "+lora" variants: every linear map of attention and MLP (Llama / Qwen2 names)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def parse_dueg(spec: str) -> dict:
    """``NAME[:LAYERS][+lora]`` -> ``{"name", "layers", "lora"}``."""
    name, lora = (spec[: -len("+lora")], True) if spec.endswith("+lora") else (spec, False)
    layers = None
    if ":" in name and name.rsplit(":", 1)[1].isdigit():
        name, layers = name.rsplit(":", 1)[0], int(name.rsplit(":", 1)[1])
    return {"dueg": spec, "name": name, "layers": layers, "lora": lora}


class Pretrained:
    """Each pretrained LLM read once (a GGUF file takes a minute to read and dequantise), copied for each of its
    variants but the last, which takes the read model itself (one copy less in memory)."""

    def __init__(self, names):
        self.uses = {name: list(names).count(name) for name in set(names)}
        self.loaded = {}

    def __call__(self, name: str):
        if name not in self.loaded:
            start = time.perf_counter()
            self.loaded[name] = load_pretrained_llm(name)
            print(f"read {name} in {time.perf_counter() - start:.0f} s", flush=True)
        self.uses[name] -= 1
        return copy.deepcopy(self.loaded[name]) if self.uses[name] > 0 else self.loaded.pop(name)


def build_dueg(dueg: dict, pretrained: Pretrained) -> MolarBlock:
    from peft import LoraConfig
    from transformers import Qwen2Config

    if dueg["name"] in SHAPES:
        llm = Qwen2Config(vocab_size=8, max_position_embeddings=4096, **SHAPES[dueg["name"]])
        llm._attn_implementation = "sdpa"
    else:
        llm = pretrained(dueg["name"])
    return MolarBlock(llm, lora=LoraConfig(**LORA) if dueg["lora"] else None, layers=dueg["layers"])


def measure(dueg: dict, pretrained: Pretrained, length: int, batch: int, n_items: int, content_dim: int,
            adaptor: str, steps: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    block = build_dueg(dueg, pretrained).to(device)
    base = block.llm.get_base_model() if dueg["lora"] else block.llm
    config = base.config
    items = ContentItemEmbedding(torch.randn(n_items, content_dim), config.hidden_size, adaptor=adaptor).to(device)
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
    llm_params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    h, layers, tokens = config.hidden_size, config.num_hidden_layers, batch * length
    trained = 0 if dueg["lora"] else 1
    flops = ((4 + 2 * trained) * llm_params * tokens + 12 * layers * h * length * length * batch
             + 6 * tokens * n_items * h)
    return {
        "dueg": dueg["dueg"], "pretrained": None if dueg["name"] in SHAPES else dueg["name"], "layers": layers,
        "hidden": h, "lora": dueg["lora"], "adaptor": adaptor, "content_dim": content_dim, "length": length,
        "batch": batch, "llm_params_m": llm_params / 1e6, "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "steps": steps, "step_s": seconds, "seq_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
        "flops_per_step": flops, "load_average_1min_after": os.getloadavg()[0],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--duegs", default=None, help="comma-separated NAME[:LAYERS][+lora] (see above); default: "
                                                 "qwen2-1.5b on cuda, tiny on cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="one random-init shape (= --duegs SHAPE)")
    p.add_argument("--lengths", default="11,51")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n-items", type=int, default=3706, help="catalogue size (3,706: ML-1M)")
    p.add_argument("--content-dim", type=int, default=1536, help="width of the frozen item table")
    p.add_argument("--adaptor", choices=ADAPTORS, default="linear",
                   help="content adaptor (MolarConfig.content_adaptor; its default is moe)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    duegs = args.duegs or args.shape or ("qwen2-1.5b" if args.device == "cuda" else "tiny")
    duegs = [parse_dueg(d.strip()) for d in duegs.split(",") if d.strip()]
    info = machine()
    peak, peak_source = peak_flops(args.peak_tflops)
    lengths = [int(x) for x in args.lengths.split(",")]
    pretrained = Pretrained([d["name"] for d in duegs for _ in lengths if d["name"] not in SHAPES])
    columns = ["dueg", "layers", "lora", "length", "batch", "step_s", "seq_per_s", "tflops", "mfu"]
    reference = {"11": 1170, "51": 580} if any(d["name"] == "qwen2-1.5b" for d in duegs) else None
    out = Path(args.output or result_path("dueg_throughput", f"dueg_throughput_{args.device}.json"))
    rows = []
    for dueg in duegs:
        for length in lengths:
            row = measure(dueg, pretrained, length, args.batch, args.n_items, args.content_dim, args.adaptor,
                          args.steps, args.warmup, args.device)
            gc.collect()  # the measured model and its optimizer state go before the next one is built
            row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
            rows.append(row)
            print(table([row], columns), flush=True)
            write_result(out, {  # after every row: a run stopped on the way keeps what it measured
                "benchmark": "dueg_throughput", "command": command_line(), "date": now(), "git_commit": git_commit(),
                "machine": info, "device": args.device, "peak_flops": peak, "peak_source": peak_source,
                "lora": LORA, "reference_h100_plain_hf_seq_per_s": reference, "rows": rows,
                "complete": len(rows) == len(duegs) * len(lengths),
            })
    print(table(rows, ["dueg", "layers", "lora", "length", "batch", "llm_params_m", "trainable_params_m", "step_s",
                       "seq_per_s", "tflops", "mfu"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
