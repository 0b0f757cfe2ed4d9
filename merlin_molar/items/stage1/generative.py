"""Stage 1 for generative backbones (Qwen2-VL / Qwen2.5-VL, text LLMs such as the packaged SmolLM2): the task
mixtures with the causal-LM loss on the target tokens, LoRA (peft) or full fine-tuning, checkpointed and resumable."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from merlin_molar.errors import MolarDataError, check_choice
from merlin_molar.io import atomic_path, locked_output_dir, rollback_on_failure
from merlin_molar.items.encoders import (
    PACKAGED,
    STAGE1_META,
    add_cur_item_token,
    check_gguf,
    default_device,
    detect_kind,
    is_gguf,
    load_preprocessor,
    pretrained_location,
    resolve_encoder_name,
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
    """Stage-1 fine-tuning settings (:func:`finetune`); any field can also be passed to it as a keyword.

    ``checkpoint_every``: save the trainable weights, optimizer, schedule and RNG state every this many steps
    under ``OUTPUT/checkpoints`` (0: never), so that an interrupted run continues where it stopped."""

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
    checkpoint_every: int = 0
    device: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        check_choice("method", self.method, ("lora", "full"))
        self.target_modules = tuple(self.target_modules)
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (no checkpoints) or more, got {self.checkpoint_every}")


CHECKPOINTS = "checkpoints"
# settings that do not change what a run computes: a run may be continued with other values of them
NOT_IDENTITY = ("checkpoint_every", "device")


def _examples_fingerprint(examples: Sequence[Stage1Example]) -> str:
    text = json.dumps([dataclasses.astuple(e) for e in examples], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class _Checkpoints:
    """``OUTPUT/checkpoints/step-NNNNNNNN.pt``: the newest one only, each written atomically.

    A checkpoint holds the trainable tensors (the LoRA matrices and the ``[Cur_Item]`` row, or every weight),
    the optimizer and schedule, the losses so far, the RNG state and the run's identity (base model, settings,
    a fingerprint of the examples): only the same run continues from it."""

    def __init__(self, output_dir: Path, identity: Dict[str, object]):
        self.dir = Path(output_dir) / CHECKPOINTS
        self.identity = identity

    def latest(self) -> Optional[Path]:
        found = sorted(self.dir.glob("step-*.pt")) if self.dir.is_dir() else []
        return found[-1] if found else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def save(self, step: int, model, optimizer, scheduler, losses: List[float], seconds: float) -> None:
        import torch

        state = {
            "identity": self.identity,
            "step": step,
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "losses": list(losses),
            "seconds": seconds,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        previous = self.latest()
        path = self.dir / f"step-{step:08d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        if previous is not None and previous != path:
            previous.unlink(missing_ok=True)

    def load(self, path: Path) -> dict:
        import torch

        remedy = "delete it (or pass --restart) to start over"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MolarDataError(path, f"unreadable stage-1 checkpoint ({type(e).__name__}): {remedy}") from None
        recorded = state.get("identity") or {}
        if recorded != self.identity:
            changed = sorted(k for k in set(recorded) | set(self.identity) if recorded.get(k) != self.identity.get(k))
            raise MolarDataError(
                self.dir, f"holds checkpoints of another stage-1 run (differs in {changed}): pass --restart "
                          "(restart=True) to remove them, or choose another output directory")
        return state

    @staticmethod
    def restore(state: dict, model, optimizer, scheduler) -> None:
        import torch

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(params) != set(state["trainable"]):
            raise MolarDataError("stage-1 checkpoint", "its trainable tensors are not this model's")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _base_model_name(base_model, source: str) -> str:
    """What the output records as its base model: a packaged name as it is (it resolves in any install),
    otherwise the absolute path of a local model (or the hub id)."""
    if str(base_model) in PACKAGED:
        return str(base_model)
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def _use_gguf_end_token(tokenizer, model, source: str) -> None:
    """A GGUF file names its end-of-text token (``tokenizer.ggml.eos_token_id``, read into the config), but the
    tokenizer transformers rebuilds from it can carry another one (SmolLM2's says ``<|im_start|>``, its file
    ``<|im_end|>``): the targets end with the file's token, and the saved tokenizer says so."""
    eos = getattr(model.config, "eos_token_id", None)
    if not is_gguf(source) or not isinstance(eos, int) or eos == tokenizer.eos_token_id or eos >= len(tokenizer):
        return
    LOG.info("stage 1: %s: end-of-text token %r (the GGUF file's), not %r", source,
             tokenizer.convert_ids_to_tokens(eos), tokenizer.eos_token)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def finetune(
    base_model,
    examples: Sequence[Stage1Example],
    output_dir,
    config: Optional["Stage1Config"] = None,
    progress: bool = True,
    resume: Optional[bool] = None,
    **overrides,
) -> Path:
    """Fine-tune ``base_model`` on ``examples``; returns ``output_dir``.

    ``base_model`` is a VLM or text LLM: a local model directory, a hub id, a GGUF file (dequantised to float32,
    or bf16 on GPU) or the packaged ``smollm2``. ``method="lora"`` trains LoRA adapters on ``target_modules``
    (the language model's attention projections) plus the ``[Cur_Item]`` embedding row (peft trainable tokens)
    and saves the adapter; ``method="full"`` trains and saves every weight. Either way the output is a normal
    Hugging Face / peft directory with the tokenizer (``[Cur_Item]`` included) that :func:`build_encoder`
    (``embed-items --encoder``) loads: a GGUF file cannot be written back. Cosine schedule with warm-up,
    AdamW, gradient clipping at 1.0; bf16 autocast on GPU. Image examples are dropped for a text-only backbone.

    With ``checkpoint_every`` > 0 the run checkpoints under ``output_dir/checkpoints``; ``resume``: None (the
    default) continues from the newest checkpoint of this same run when there is one, True the same but warns
    when there is none, False removes the checkpoints and starts over. A finished run replaces
    ``output_dir`` as a whole (its checkpoints go with it); one run at a time may write into it.

        >>> finetune("/models/Qwen2-VL-2B-Instruct", examples, "/tmp/stage1", max_steps=1000)  # doctest: +SKIP
        >>> finetune("smollm2", examples, "outputs/smollm2-stage1", checkpoint_every=20)  # doctest: +SKIP
    """
    c = replace(config or Stage1Config(), **overrides)
    source = resolve_encoder_name(base_model)
    if source is None:
        raise ValueError("stage-1 fine-tuning needs a base model")
    if is_gguf(source):
        check_gguf(source)
    c.kind = c.kind or detect_kind(source)
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
    output_dir = Path(output_dir)
    hyperparameters = {**asdict(c), "target_modules": list(c.target_modules), "device": str(c.device)}
    identity = {
        "base_model": _base_model_name(base_model, source),
        "examples": _examples_fingerprint(examples),
        **{k: v for k, v in hyperparameters.items() if k not in NOT_IDENTITY},
    }
    with locked_output_dir(output_dir, "finetune-items"), \
            rollback_on_failure(output_dir, keep_if_present=(CHECKPOINTS,)):
        checkpoints = _Checkpoints(output_dir, identity)
        if resume is False:
            checkpoints.remove()  # restart: nothing of an earlier run is left to continue from by mistake
        last = checkpoints.latest() if resume is not False else None
        if resume and last is None:
            LOG.warning("stage 1: no checkpoint in %s: starting from scratch", checkpoints.dir)
        state = checkpoints.load(last) if last is not None else None
        return _finetune_claimed(base_model, source, examples, output_dir, c, progress, checkpoints, state,
                                 hyperparameters)


def _finetune_claimed(base_model, source, examples, output_dir, c, progress, checkpoints, state, hyperparameters):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    on_gpu = str(c.device).startswith("cuda")
    torch.manual_seed(c.seed)
    preprocessor = load_preprocessor(source, c.kind)
    tokenizer = tokenizer_of(preprocessor)
    tokenizer.padding_side = "right"
    weights_dtype = torch.bfloat16 if on_gpu and c.method == "lora" else torch.float32
    model = task_model_class(c.kind).from_pretrained(**pretrained_location(source), dtype=weights_dtype,
                                                     attn_implementation="sdpa")
    _use_gguf_end_token(tokenizer, model, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cur_id = add_cur_item_token(tokenizer, model)
    if c.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=list(c.target_modules),
            task_type="CAUSAL_LM",
            trainable_token_indices={"embed_tokens": [cur_id]},
        )
        model = get_peft_model(model, lora)
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
    start_step, earlier_seconds = 0, 0.0
    if state is not None:
        checkpoints.restore(state, model, optimizer, scheduler)
        start_step, losses, earlier_seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
        for _ in range(start_step * c.gradient_accumulation_steps):
            next(stream)  # the batches the checkpointed steps consumed: the data order of an uninterrupted run
        LOG.warning("stage 1: continuing from step %d of %d (%s)", start_step, total_steps, checkpoints.latest())
    started = time.perf_counter()
    desc = f"stage-1 {c.method} ({c.kind})"
    with progress_bar(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not progress) as bar:
        for step in range(start_step + 1, total_steps + 1):
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
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < total_steps:
                checkpoints.save(step, model, optimizer, scheduler, losses,
                                 earlier_seconds + time.perf_counter() - started)
    seconds = earlier_seconds + time.perf_counter() - started

    model.eval()
    meta = {
        "kind": c.kind,
        "method": c.method,
        "base_model": checkpoints.identity["base_model"],
        "cur_item_token": CUR_ITEM_TOKEN,
        "cur_item_id": cur_id,
        "examples": {t: sum(e.task == t for e in examples) for t in STAGE1_TASKS},
        "steps": total_steps,
        "resumed_from_step": start_step or None,
        "seconds": round(seconds, 2),
        "losses": losses,
        "hyperparameters": hyperparameters,
    }
    if str(base_model) in PACKAGED:
        meta["base_model_file"] = str(Path(source).resolve())
    with atomic_path(output_dir, is_dir=True) as tmp:  # replaces the directory: its checkpoints go with it
        # a LoRA adapter leaves the resized embedding matrix out: add_cur_item_token rebuilds its new row exactly
        # when the adapter is loaded, and the trained [Cur_Item] row is the adapter's own (trainable tokens)
        model.save_pretrained(str(tmp), **({"save_embedding_layers": False} if c.method == "lora" else {}))
        preprocessor.save_pretrained(str(tmp))
        (tmp / STAGE1_META).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)
    LOG.info("stage 1: %d steps, loss %.4f -> %.4f, saved to %s", total_steps, losses[0], losses[-1], output_dir)
    return output_dir
