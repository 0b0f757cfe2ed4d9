"""MIRM stage 1 for the packaged decoder LLM (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32) on CPU:
LoRA training throughput on ML-1M, the time per item of embedding the catalogue with the fine-tuned encoder, and
what a full stage 1 would cost on this machine (issue 29, item 4).

1. ML-1M prepared by the CLI, ``merlin-molar prepare --max-length 50`` (the quality benchmark's ML-1M setting),
   into ``--workdir`` (skipped when it is there).
2. ``merlin-molar finetune-items --base-model smollm2 --device cpu`` as a subprocess with one torch thread
   (``OMP_NUM_THREADS=1``): the task mixtures a text LLM can read from ML-1M, ``attribute_description`` (item
   text -> description written from its fields) and ``user_behaviour`` (titles of up to 10 train items -> the
   next title); the poster task needs an image-reading backbone and is not built. LoRA r 16 on q/k/v/o plus
   the ``[Cur_Item]`` row, batch ``--batch-size``, ``--steps`` steps, checkpoints every ``--checkpoint-every``
   steps: after an interruption, the same command continues the run from its last checkpoint.
3. ``embed-items --encoder OUTPUT`` over the prepared catalogue (``embed_items.encoder_row``, what the CLI
   runs), timed: load time and seconds per item.
4. With ``--compare-pretrained`` (the default): the packaged SmolLM2's own item table (``embed-items --encoder
   smollm2``, timed the same way, kept in PREPARED/item_table_smollm2 and reused when there), and both tables
   scored by content kNN as in ``stage1_sentence.py`` (cosine of every item to the user's last history item, full
   ranking, history masked, valid/test leave-one-out targets), with the paired per-user difference: a cheap
   signal of what the short stage 1 did to the vectors, not the Molar quality table.
5. The batches the run trained on, replayed and tokenised with the output's tokenizer: real and padded tokens
   per example, so examples/s becomes tokens/s; the estimated wall time of one epoch over the full mixture
   (``--examples-per-task`` per task, the paper's 10k) on this CPU with one thread.

The machine is shared: the load average at the start and end is in the result; the times are indicative.

    OMP_NUM_THREADS=1 nohup python benchmarks/stage1_llm.py --steps 100 > outputs/stage1_llm.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides before T4Rec is imported)
import numpy as np  # noqa: E402
from common import REPO, command_line, data_dir, git_commit, machine, now, result_path, table, write_result  # noqa: E402

TEXT_TASKS = ("attribute_description", "user_behaviour")


def cli(*args: str, threads: int) -> float:
    """Run ``merlin-molar ARGS`` (this checkout's package) with ``threads`` torch threads; its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "merlin_molar.cli", *args], check=True, env=env)
    return time.perf_counter() - start


def replayed_tokens(examples, tokenizer, steps: int, batch_size: int, seed: int) -> dict:
    """Real and padded tokens of the ``steps`` batches the run drew (``shuffled_batches`` with its seed), counted
    the way the collator builds them: prompt (with the tokenizer's special tokens) + target (cut at 128) + end."""
    from merlin_molar.items.stage1.tasks import shuffled_batches

    stream = shuffled_batches(examples, batch_size, seed)
    real = padded = 0
    for _ in range(steps):
        batch = next(stream)
        lengths = [len(tokenizer(ex.prompt)["input_ids"]) + len(tokenizer(ex.target, add_special_tokens=False)
                                                                  ["input_ids"][:128]) + 1 for ex in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    examples_seen = steps * batch_size
    return {"examples": examples_seen, "real_tokens_per_example": real / examples_seen,
            "padded_tokens_per_example": padded / examples_seen}


def compare_content_knn(prepared, tables: dict) -> dict:
    """Content-kNN metrics of each item table on valid and test, and the paired per-user difference
    (``smollm2_stage1`` - ``smollm2``) with its standard error."""
    from stage1_sentence import per_user_metrics, split_histories

    from merlin_molar.cold_start import content_knn_scorer
    from merlin_molar.items import load_item_table

    out = {}
    for split in ("valid", "test"):
        histories, targets = split_histories(prepared, split)
        per_user = {name: per_user_metrics(content_knn_scorer(load_item_table(path, prepared)), histories, targets)
                    for name, path in tables.items()}
        out[split] = {name: {**{k: float(v.mean()) for k, v in sorted(m.items())}, "users": len(m["ndcg@10"])}
                      for name, m in per_user.items()}
        out[split]["stage1_minus_pretrained"] = {}
        for key in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"):
            diff = per_user["smollm2_stage1"][key] - per_user["smollm2"][key]
            out[split]["stage1_minus_pretrained"][key] = {"mean": float(diff.mean()),
                                                          "std_error": float(diff.std() / math.sqrt(len(diff)))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(data_dir("ml-1m")))
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--steps", type=int, default=100, help="stage-1 optimizer steps (the CPU budget)")
    p.add_argument("--batch-size", type=int, default=8, help="finetune-items' default for an LLM")
    p.add_argument("--examples-per-task", type=int, default=10_000, help="the paper's 10k")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--embed-batch-size", type=int, default=32, help="embed-items batch (as the pretrained rows)")
    p.add_argument("--skip-embed", action="store_true", help="stage 1 only")
    p.add_argument("--no-compare-pretrained", dest="compare_pretrained", action="store_false",
                   help="do not embed with (and compare against) the packaged SmolLM2 as it is")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "stage1_llm"))
    p.add_argument("--name", default="stage1_smollm2_ml1m")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    workdir = Path(args.workdir)
    prepared_dir = workdir / "ml-1m" / f"prepared_L{args.max_length}"
    output = workdir / f"smollm2_stage1_{args.steps}steps"
    timings = {}

    if not (prepared_dir / "molar_manifest.json").is_file():
        timings["prepare_s"] = cli("prepare", "--data", args.data, "--output", str(prepared_dir), "--max-length",
                                   str(args.max_length), threads=args.threads)
    finetune_args = ["finetune-items", "--prepared", str(prepared_dir), "--base-model", "smollm2", "--output",
                     str(output), "--method", "lora", "--examples-per-task", str(args.examples_per_task),
                     "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--checkpoint-every",
                     str(args.checkpoint_every), "--seed", str(args.seed), "--device", "cpu"]
    if not (output / "molar_stage1.json").is_file():  # a finished run is kept; an interrupted one continues
        timings["finetune_command_s"] = cli(*finetune_args, threads=args.threads)
    stage1 = json.loads((output / "molar_stage1.json").read_text())

    from transformers import AutoTokenizer

    from merlin_molar.data import load_prepared
    from merlin_molar.items import build_stage1_mixture

    prepared = load_prepared(prepared_dir)
    examples = build_stage1_mixture(prepared, examples_per_task=args.examples_per_task, tasks=TEXT_TASKS,
                                    seed=args.seed)
    tokens = replayed_tokens(examples, AutoTokenizer.from_pretrained(str(output)), stage1["steps"],
                             args.batch_size, args.seed)
    seconds, steps = stage1["seconds"], stage1["steps"]
    examples_per_s = steps * args.batch_size / seconds
    full_epoch_examples = len(examples)
    throughput = {
        "steps": steps, "batch_size": args.batch_size, "train_loop_s": seconds, "s_per_step": seconds / steps,
        "examples_per_s": examples_per_s,
        "real_tokens_per_s": examples_per_s * tokens["real_tokens_per_example"],
        "padded_tokens_per_s": examples_per_s * tokens["padded_tokens_per_example"],
        **tokens,
        "resumed_from_step": stage1.get("resumed_from_step"),
        "loss_first_10_steps": float(np.mean(stage1["losses"][:10])),
        "loss_last_10_steps": float(np.mean(stage1["losses"][-10:])),
    }
    estimate = {
        "mixture_examples": {t: sum(e.task == t for e in examples) for t in TEXT_TASKS},
        "one_epoch_examples": full_epoch_examples,
        "one_epoch_hours": full_epoch_examples / examples_per_s / 3600,
        "paper_three_tasks_30k_examples_hours": 30_000 / examples_per_s / 3600,
        "basis": "examples/s of this run's train loop (one torch thread, shared machine) x examples; a VLM's "
                 "poster task (the paper's third 10k) is not readable by SmolLM2",
    }

    embed, content_knn = [], None
    if not args.skip_embed:
        from embed_items import encoder_row

        embed.append(encoder_row(str(output), prepared, args.embed_batch_size, "cpu"))
        tables = {"smollm2": prepared.root / "item_table_smollm2", "smollm2_stage1": Path(embed[0]["table"])}
        if args.compare_pretrained:
            if not (tables["smollm2"] / "metadata.json").is_file():
                embed.append(encoder_row("smollm2", prepared, args.embed_batch_size, "cpu"))
            content_knn = compare_content_knn(prepared, tables)

    path = write_result(result_path("stage1_llm", f"{args.name}.json"), {
        "benchmark": "stage1_llm", "command": command_line(), "git_commit": git_commit(), "date": now(),
        "machine": info,
        "setup": {"data": Path(args.data).name, "max_length": args.max_length, "prepared": str(prepared_dir),
                  "base_model": "smollm2 (packaged SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to float32)",
                  "finetune_command": "merlin-molar " + " ".join(finetune_args),
                  "embed_command": f"merlin-molar embed-items --prepared {prepared_dir} --encoder {output} "
                                   f"--batch-size {args.embed_batch_size} --device cpu",
                  "threads": args.threads, "hyperparameters": stage1["hyperparameters"],
                  "examples_per_task_in_run": stage1["examples"]},
        "timings_s": timings,
        "stage1": {**throughput, "losses": stage1["losses"]},
        "full_stage1_estimate": estimate,
        "embed_items": embed,
        "content_knn": content_knn,
    })
    print(table([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in throughput.items()}],
                ["steps", "batch_size", "train_loop_s", "s_per_step", "examples_per_s", "real_tokens_per_s",
                 "padded_tokens_per_s", "loss_first_10_steps", "loss_last_10_steps"]))
    if embed:
        print(table(embed, ["row", "items", "load_seconds", "seconds", "seconds_per_item", "dim"]))
    if content_knn:
        print(table([{"split": split, "item table": name, **{k: round(v, 4) for k, v in m.items() if k != "users"}}
                     for split, by_table in content_knn.items() for name, m in by_table.items()
                     if name != "stage1_minus_pretrained"], ["split", "item table", "ndcg@10", "recall@10"]))
        for split in content_knn:
            d = content_knn[split]["stage1_minus_pretrained"]["ndcg@10"]
            print(f"{split}: stage 1 - pretrained NDCG@10 {d['mean']:+.4f} ± {d['std_error']:.4f}")
    print(f"one epoch over the {full_epoch_examples} examples: {estimate['one_epoch_hours']:.1f} h on this CPU "
          f"(one thread); wrote {path}")


if __name__ == "__main__":
    main()
