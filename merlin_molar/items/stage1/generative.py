"""Stage 1 for generative backbones (Qwen2-VL / Qwen2.5-VL, text LLMs): the three task mixtures with the causal-LM
loss on the target tokens, LoRA (peft) or full fine-tuning."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from merlin_molar.errors import MolarDataError, check_choice
from merlin_molar.io import atomic_path
from merlin_molar.items.encoders import (
    STAGE1_META,
    add_cur_item_token,
    default_device,
    detect_kind,
    load_preprocessor,
    task_model_class,
    tokenizer_of,
)
from merlin_molar.items.images import load_image
from merlin_molar.items.prompts import CUR_ITEM_TOKEN
from merlin_molar.items.stage1.tasks import (
    STAGE1_TASKS,
    Stage1Example,
    shuffled_batches,
)
from merlin_molar.progress import progress_bar

LOG = logging.getLogger(__name__)


class _Collator:
    """Prompt (+ image) and target -> right-padded ids with the loss on the target tokens only."""

    def __init__(self, preprocessor, kind, image_placeholder, image_size, max_prompt_tokens, max_target_tokens):
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer_of(preprocessor)
        self.kind = kind
        self.image_placeholder = image_placeholder
        self.image_size = image_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = max_target_tokens

    def __call__(self, examples: Sequence[Stage1Example]):
        import torch

        texts, images = [], []
        for ex in examples:
            if ex.image is not None:
                image, problem = load_image(ex.image, self.image_size)
                if image is None:
                    raise MolarDataError(ex.image, f"stage-1 image {problem}")
                images.append(image)
                texts.append(ex.prompt.replace("{image}", self.image_placeholder))
            else:
                texts.append(ex.prompt)
        if self.kind == "vlm":
            encoded = self.preprocessor(text=texts, images=images or None, padding=True, return_tensors="pt")
        else:
            encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        eos = self.tokenizer.eos_token_id
        rows, labels = [], []
        for ids, mask, ex in zip(encoded["input_ids"], encoded["attention_mask"], examples):
            prompt = ids[mask.bool()].tolist()
            if len(prompt) > self.max_prompt_tokens:
                raise MolarDataError(
                    f"stage-1 {ex.task} example",
                    f"prompt has {len(prompt)} tokens, more than max_prompt_tokens={self.max_prompt_tokens}",
                )
            target = self.tokenizer(ex.target, add_special_tokens=False)["input_ids"][: self.max_target_tokens] + [eos]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        }
        for key in ("pixel_values", "image_grid_thw"):
            if key in encoded:
                batch[key] = encoded[key]
        return batch


@dataclass


class Stage1Config:
    """Stage-1 fine-tuning settings (:func:`finetune`); any field can also be passed to it as a keyword."""

    method: str = "lora"  # "lora" | "full"
    kind: Optional[str] = None  # "vlm" | "text-llm" (default: detected from the backbone)
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    image_size: Optional[int] = 224
    max_prompt_tokens: int = 1024
    max_target_tokens: int = 128
    device: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        check_choice("method", self.method, ("lora", "full"))
        self.target_modules = tuple(self.target_modules)


def finetune(
    base_model,
    examples: Sequence[Stage1Example],
    output_dir,
    config: Optional["Stage1Config"] = None,
    progress: bool = True,
    **overrides,
) -> Path:
    """Fine-tune ``base_model`` (VLM or text LLM: local dir or hub id) on ``examples``; returns ``output_dir``.

    ``method="lora"`` trains LoRA adapters on ``target_modules`` (the language model's attention
    projections) plus the ``[Cur_Item]`` embedding row (peft trainable tokens) and saves the adapter;
    ``method="full"`` trains and saves every weight. Cosine schedule with warm-up, AdamW, gradient
    clipping at 1.0; bf16 autocast on GPU. Image examples are dropped for a text-only backbone.

        >>> finetune("/models/Qwen2-VL-2B-Instruct", examples, "/tmp/stage1", max_steps=1000)  # doctest: +SKIP
    """
    c = replace(config or Stage1Config(), **overrides)
    import torch
    from transformers import get_cosine_schedule_with_warmup

    c.kind = c.kind or detect_kind(base_model)
    if c.kind not in ("vlm", "text-llm"):
        raise ValueError(f"stage-1 fine-tuning needs an LLM or vision-language backbone; {base_model} is {c.kind!r} "
                         "(a sentence encoder's stage 1 is finetune_sentence_encoder)")
    examples = list(examples)
    if c.kind == "text-llm" and any(ex.image for ex in examples):
        LOG.warning("stage 1: %s is text-only: image_description examples skipped", base_model)
        examples = [ex for ex in examples if ex.image is None]
    if not examples:
        raise MolarDataError("stage-1 mixture", "no training examples")

    c.device = c.device or default_device()
    on_gpu = str(c.device).startswith("cuda")
    torch.manual_seed(c.seed)
    preprocessor = load_preprocessor(base_model, c.kind)
    tokenizer = tokenizer_of(preprocessor)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    weights_dtype = torch.bfloat16 if on_gpu and c.method == "lora" else torch.float32
    model = task_model_class(c.kind).from_pretrained(str(base_model), dtype=weights_dtype, attn_implementation="sdpa")
    cur_id = add_cur_item_token(tokenizer, model)
    if c.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=list(c.target_modules),
            task_type="CAUSAL_LM",
            trainable_token_indices={"embed_tokens": [cur_id]},
        )
        model = get_peft_model(model, config)
    model.to(c.device).train()

    placeholder = ""
    if c.kind == "vlm":
        image_token = getattr(preprocessor, "image_token", None) or "<image>"
        vocab = tokenizer.get_vocab()
        qwen = "<|vision_start|>" in vocab and "<|vision_end|>" in vocab
        placeholder = f"<|vision_start|>{image_token}<|vision_end|>" if qwen else image_token
    collate = _Collator(preprocessor, c.kind, placeholder, c.image_size, c.max_prompt_tokens, c.max_target_tokens)

    steps_per_epoch = math.ceil(len(examples) / (c.batch_size * c.gradient_accumulation_steps))
    total_steps = c.max_steps or max(1, math.ceil(steps_per_epoch * c.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=c.learning_rate, weight_decay=c.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * total_steps), total_steps)
    losses: List[float] = []
    stream = shuffled_batches(examples, c.batch_size, c.seed)
    started = time.perf_counter()
    desc = f"stage-1 {c.method} ({c.kind})"
    with progress_bar(total=total_steps, desc=desc, unit="step", disable=not progress) as bar:
        for _ in range(total_steps):
            step_loss = 0.0
            for _ in range(c.gradient_accumulation_steps):
                batch = {k: v.to(c.device) for k, v in collate(next(stream)).items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                    loss = model(**batch).loss / c.gradient_accumulation_steps
                loss.backward()
                step_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)  # a log file gets a line per tenth only
            bar.update(1)

    model.eval()
    output_dir = Path(output_dir)
    base = Path(str(base_model))
    meta = {
        "kind": c.kind,
        "method": c.method,
        "base_model": str(base.resolve()) if base.exists() else str(base_model),
        "cur_item_token": CUR_ITEM_TOKEN,
        "cur_item_id": cur_id,
        "examples": {t: sum(e.task == t for e in examples) for t in STAGE1_TASKS},
        "steps": total_steps,
        "seconds": round(time.perf_counter() - started, 2),
        "losses": losses,
        "hyperparameters": {**asdict(c), "target_modules": list(c.target_modules), "device": str(c.device)},
    }
    with atomic_path(output_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        preprocessor.save_pretrained(str(tmp))
        (tmp / STAGE1_META).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)
    LOG.info("stage 1: %d steps, loss %.4f -> %.4f, saved to %s", total_steps, losses[0], losses[-1], output_dir)
    return output_dir
