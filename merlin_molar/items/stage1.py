"""Stage 1 of Molar: align the MIRM backbone with item content before recommendation training.

Three task mixtures are built from the prepared data (paper: 10k examples each):

* ``image_description`` — item image -> detailed description of the item;
* ``attribute_description`` — structured attributes -> description;
* ``user_behaviour`` — titles of a user's recent items (train split) -> title of the next item.

MovieLens has no item descriptions, so there (and wherever the item table has no ``description``
column) the target description is written from the item's own text fields ("Toy Story. Year: 1995.
Genres: Animation, Children's, Comedy."): the image task then teaches the model to name a film and its
genres from the poster, and the attribute task is a verbalisation of the fields. Item-level prompts end
with ``[Cur_Item]`` so the description is generated from that token's state — the same token whose
hidden state becomes the item embedding, which trains it (as a LoRA trainable token) to carry the item.

:func:`finetune` trains the backbone on the mixture with the causal-LM loss on the target tokens only,
with LoRA (peft) or fully, bf16 autocast on GPU, in a small plain loop with tqdm; the output directory is
a peft adapter (or full model) plus the processor/tokenizer, and :func:`build_encoder` accepts it.

    >>> from merlin_molar.items import build_stage1_mixture, finetune, build_encoder
    >>> examples = build_stage1_mixture(prepared, examples_per_task=10_000)             # doctest: +SKIP
    >>> adapter = finetune("/models/Qwen2-VL-2B-Instruct", examples, "/tmp/mirm-stage1")  # doctest: +SKIP
    >>> encoder = build_encoder(adapter)                                                 # doctest: +SKIP

A sentence encoder (the default packaged all-MiniLM-L6-v2) cannot generate text, so its stage 1 is the
``user_behaviour`` task made contrastive: :func:`sentence_behaviour_examples` pairs the text of a user's
last few **train** items (joined, newest last) with the next item's text, and
:func:`finetune_sentence_encoder` trains every weight with in-batch InfoNCE through the model's own mean
pooling; its output is a sentence-transformers directory that :func:`build_encoder` loads.

    >>> examples = sentence_behaviour_examples(prepared, n=10_000, history_length=3)   # doctest: +SKIP
    >>> tuned = finetune_sentence_encoder(None, examples, "outputs/minilm-stage1", max_steps=200)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
from merlin_molar.items.prompts import CUR_ITEM_TOKEN, ItemContent, ItemPromptBuilder
from merlin_molar.progress import progress_bar

LOG = logging.getLogger(__name__)
STAGE1_TASKS = ("image_description", "attribute_description", "user_behaviour")
IMAGE_PROMPT = "Describe the item in this image in detail. Item Image: {image}. " + CUR_ITEM_TOKEN
ATTRIBUTE_PROMPT = "Describe the item from its attributes. Item information: {text}. " + CUR_ITEM_TOKEN
BEHAVIOUR_PROMPT = "A user interacted with these items, in order: {history}. The next item the user interacts with is:"


@dataclass(frozen=True)
class Stage1Example:
    """One training example; ``{image}`` in ``prompt`` marks where the backbone's image placeholder goes."""

    task: str
    prompt: str
    target: str
    image: Optional[str] = None


def describe_item(item: ItemContent, description: Optional[str] = None) -> str:
    """The item's own description, or one written from its text fields when it has none.

        >>> fields = (("clean_title", "Toy Story"), ("year", "1995"), ("genres", "Animation|Comedy"))
        >>> describe_item(ItemContent(3, fields))
        'Toy Story. Year: 1995. Genres: Animation, Comedy.'
    """
    if description:
        return description
    if not item.fields:
        return ""
    (_, name), rest = item.fields[0], item.fields[1:]
    parts = [name] + [f"{field.replace('_', ' ').capitalize()}: {value.replace('|', ', ')}" for field, value in rest]
    return ". ".join(parts) + "."


def _descriptions(frame, description_column: str) -> Dict[int, str]:
    if description_column not in frame:
        return {}
    pairs = zip(frame["item_id"], frame[description_column])
    return {int(i): str(d) for i, d in pairs if isinstance(d, str) and d.strip()}


def image_description_examples(
    items: Sequence[ItemContent], n: int, seed: int = 0, descriptions: Optional[Dict[int, str]] = None
) -> List[Stage1Example]:
    """Up to ``n`` (image -> description) examples over distinct items whose image opens."""
    descriptions = descriptions or {}
    readable = [it for it in items if it.image is not None and load_image(it.image, size=16)[0] is not None]
    chosen = random.Random(seed).sample(readable, min(n, len(readable)))
    return [
        Stage1Example("image_description", IMAGE_PROMPT, describe_item(it, descriptions.get(it.item_id)), it.image)
        for it in chosen
        if describe_item(it, descriptions.get(it.item_id))
    ]


def attribute_description_examples(
    items: Sequence[ItemContent],
    n: int,
    prompts: ItemPromptBuilder,
    seed: int = 0,
    descriptions: Optional[Dict[int, str]] = None,
) -> List[Stage1Example]:
    """Up to ``n`` (structured attributes -> description) examples over distinct items with text."""
    descriptions = descriptions or {}
    with_text = [it for it in items if it.has_text]
    chosen = random.Random(seed + 1).sample(with_text, min(n, len(with_text)))
    return [
        Stage1Example(
            "attribute_description",
            ATTRIBUTE_PROMPT.replace("{text}", prompts.item_text(it)),
            describe_item(it, descriptions.get(it.item_id)),
        )
        for it in chosen
    ]


def behaviour_windows(
    histories: Sequence[Sequence[int]], known, n: int, history_length: int = 10, seed: int = 0
) -> List[Tuple[List[int], int]]:
    """``n`` (up to ``history_length`` consecutive item ids, the next item id) windows, each at a random user
    and position of ``histories`` (sampling with replacement); items not in ``known`` are dropped first.

    Pass the train split's histories only: a window never reaches past the end of its history, so the
    validation and test targets (the two items after the train history) are never in a window.

        >>> behaviour_windows([[5, 6, 7]], {5, 6, 7}, n=2, history_length=1)
        [([5], 6), ([6], 7)]
    """
    usable = [[int(i) for i in h if i in known] for h in histories]
    usable = [h for h in usable if len(h) >= 2]
    if not usable:
        return []
    rng = random.Random(seed + 2)
    out = []
    for _ in range(n):
        history = usable[rng.randrange(len(usable))]
        t = rng.randrange(1, len(history))
        out.append((history[max(0, t - history_length) : t], history[t]))
    return out


def user_behaviour_examples(
    histories: Sequence[Sequence[int]], titles: Dict[int, str], n: int, history_length: int = 10, seed: int = 0
) -> List[Stage1Example]:
    """``n`` (titles of up to ``history_length`` consecutive items -> next item's title) examples, each at a
    random user and position of the train histories (sampling with replacement)."""
    return [
        Stage1Example(
            "user_behaviour",
            BEHAVIOUR_PROMPT.replace("{history}", "; ".join(titles[i] for i in context)),
            titles[target],
        )
        for context, target in behaviour_windows(histories, titles, n, history_length, seed)
    ]


def build_stage1_mixture(
    prepared,
    examples_per_task: int = 10_000,
    tasks: Sequence[str] = STAGE1_TASKS,
    prompts: Optional[ItemPromptBuilder] = None,
    history_length: int = 10,
    title_column: Optional[str] = None,
    description_column: str = "description",
    seed: int = 0,
) -> List[Stage1Example]:
    """The stage-1 mixture from the prepared item table and train histories, shuffled (deterministic).

    A task that cannot be built (e.g. ``image_description`` on a dataset without readable images) is
    logged and skipped."""
    from merlin_molar.ids import ITEM_SEQUENCE

    unknown = set(tasks) - set(STAGE1_TASKS)
    if unknown:
        raise ValueError(f"unknown stage-1 task(s) {sorted(unknown)}; choose from {STAGE1_TASKS}")
    frame = prepared.items()
    frame = frame[frame["has_content"]]
    prompts = (prompts or ItemPromptBuilder()).with_columns(prepared.manifest.get("text_columns") or [])
    items = prompts.items_from_frame(frame, prepared.items_path)
    descriptions = _descriptions(frame, description_column)
    out: List[Stage1Example] = []
    if "image_description" in tasks:
        built = image_description_examples(items, examples_per_task, seed, descriptions)
        if built:
            out += built
        else:
            LOG.warning("stage 1: image_description skipped: no item of %s has a readable image", prepared.root)
    if "attribute_description" in tasks:
        built = attribute_description_examples(items, examples_per_task, prompts, seed, descriptions)
        if built:
            out += built
        else:
            LOG.warning("stage 1: attribute_description skipped: no item of %s has text", prepared.root)
    if "user_behaviour" in tasks:
        title_column = title_column or next((c for c in ("title", "clean_title", "name") if c in frame), None)
        title_column = title_column or (prompts.text_columns[0] if prompts.text_columns else None)
        if title_column is None or title_column not in frame:
            LOG.warning("stage 1: user_behaviour skipped: no title column in %s", prepared.items_path)
        else:
            titles = {int(i): str(t) for i, t in zip(frame["item_id"], frame[title_column]) if isinstance(t, str) and t}
            histories = prepared.split_frame("train")[ITEM_SEQUENCE].tolist()
            built = user_behaviour_examples(histories, titles, examples_per_task, history_length, seed)
            if built:
                out += built
            else:
                LOG.warning("stage 1: user_behaviour skipped: no train history has two titled items")
    random.Random(seed + 3).shuffle(out)
    counts = {t: sum(e.task == t for e in out) for t in STAGE1_TASKS}
    LOG.info("stage 1 mixture: %s", counts)
    return out


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


def _shuffled_batches(examples: Sequence, batch_size: int, seed: int, full_only: bool = False):
    """Endless batches of ``examples``: a fresh seeded permutation per pass (``full_only`` drops each pass's
    short last batch)."""
    import torch

    order = torch.Generator().manual_seed(seed)
    last_start = len(examples) - batch_size + 1 if full_only else len(examples)
    while True:
        perm = torch.randperm(len(examples), generator=order).tolist()
        for start in range(0, last_start, batch_size):
            yield [examples[i] for i in perm[start : start + batch_size]]


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
    stream = _shuffled_batches(examples, c.batch_size, c.seed)
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


# --------------------------------------------------------------------------------------------------------------
# stage 1 for a sentence encoder: contrastive, history -> next item
# --------------------------------------------------------------------------------------------------------------
QUERY_SEPARATOR = " || "


def sentence_behaviour_examples(
    prepared,
    n: int = 10_000,
    history_length: int = 3,
    prompts: Optional[ItemPromptBuilder] = None,
    separator: str = QUERY_SEPARATOR,
    seed: int = 0,
) -> List[Stage1Example]:
    """``n`` (query -> positive) examples for :func:`finetune_sentence_encoder` from the **train** split.

    The query is the text of up to ``history_length`` consecutive items of a user's train history joined
    with ``separator``, newest last; the positive is the next item's text, written exactly as the sentence
    encoder embeds it in the item table (``prompts``, default the sentence encoder's: the plain item text).
    Windows are sampled as for the LLM's ``user_behaviour`` task (:func:`behaviour_windows`)."""
    from merlin_molar.ids import ITEM_SEQUENCE
    from merlin_molar.items.prompts import SENTENCE_PROMPTS

    if n < 1 or history_length < 1:
        raise ValueError(f"n and history_length must be at least 1, got n={n}, history_length={history_length}")
    frame = prepared.items()
    frame = frame[frame["has_content"]]
    prompts = (prompts or SENTENCE_PROMPTS).with_columns(prepared.manifest.get("text_columns") or [])
    texts = {it.item_id: prompts.prompt(it, None) for it in prompts.items_from_frame(frame, prepared.items_path)
             if it.has_text}
    histories = prepared.split_frame("train")[ITEM_SEQUENCE].tolist()
    windows = behaviour_windows(histories, texts, n, history_length, seed)
    if not windows:
        raise MolarDataError(
            prepared.split_path("train"), "no train history has two consecutive items with text: no stage-1 example"
        )
    return [
        Stage1Example("user_behaviour", separator.join(texts[i] for i in context), texts[target])
        for context, target in windows
    ]


@dataclass
class SentenceStage1Config:
    """Settings of :func:`finetune_sentence_encoder`; any field can also be passed to it as a keyword.

    ``temperature`` divides the cosine similarities (0.05 is sentence-transformers' default scale of 20);
    ``symmetric`` adds the positive -> query direction to the query -> positive InfoNCE."""

    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    symmetric: bool = True
    max_query_tokens: Optional[int] = None  # default: the model's max_seq_length; longer queries lose their oldest
    device: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        checks = {
            "batch_size": self.batch_size >= 2,  # in-batch negatives: one positive and at least one negative
            "temperature": math.isfinite(self.temperature) and self.temperature > 0,
            "learning_rate": math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "epochs": math.isfinite(self.epochs) and self.epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_query_tokens": self.max_query_tokens is None or self.max_query_tokens >= 4,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"stage-1 (sentence) setting out of range: {values}")


def in_batch_info_nce(
    queries, positives, temperature: float = 0.05, symmetric: bool = True, same_positive=None
):
    """InfoNCE over cosine similarities with the other rows' positives as negatives.

    ``same_positive`` (``[b, b]`` bool): pairs of rows whose positive is the same item; those off-diagonal
    entries are not used as negatives (they would be false negatives). ``symmetric`` averages the query ->
    positive and positive -> query losses."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(queries.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    logits = q @ p.T / temperature
    labels = torch.arange(len(q), device=q.device)
    if same_positive is not None:
        logits = logits.masked_fill(same_positive & ~torch.eye(len(q), dtype=torch.bool, device=q.device), -math.inf)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def _sentence_features(model, texts: Sequence[str], max_tokens: int, side: str, device) -> dict:
    """Tokenise like the encoder does, but keep the *last* tokens of an over-long query (``side="left"``)."""
    import torch

    tokenizer = model.tokenizer
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        features = model.preprocess(list(texts), processing_kwargs={"text": {"max_length": max_tokens}})
    finally:
        tokenizer.truncation_side = saved
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def finetune_sentence_encoder(
    base_model,
    examples: Sequence[Stage1Example],
    output_dir,
    config: Optional[SentenceStage1Config] = None,
    progress: bool = True,
    source: Optional[Dict[str, object]] = None,
    **overrides,
) -> Path:
    """Stage 1 for a sentence-transformers encoder (``None``: the packaged all-MiniLM-L6-v2): every weight
    is trained with in-batch InfoNCE between each example's query (``prompt``) and positive (``target``),
    both embedded by the model's own modules (mean pooling + normalisation for MiniLM), exactly as
    :class:`~merlin_molar.items.SentenceEncoder` embeds items. AdamW, cosine schedule with warm-up, gradient
    clipping at 1.0, bf16 autocast on GPU; seeded. Examples whose positive is the same item are not each
    other's negatives.

    ``output_dir`` is written atomically as a sentence-transformers model directory plus
    ``molar_stage1.json`` (settings, losses, ``source``: what the examples were built from);
    :func:`build_encoder` loads it as a sentence encoder and the item table's metadata records it.

        >>> examples = sentence_behaviour_examples(prepared, n=10_000, history_length=3)   # doctest: +SKIP
        >>> finetune_sentence_encoder(None, examples, "outputs/minilm-stage1", max_steps=200)  # doctest: +SKIP
    """
    c = replace(config or SentenceStage1Config(), **overrides)
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import get_cosine_schedule_with_warmup

    from merlin_molar.items.encoders import default_sentence_model_path

    base_model = base_model or default_sentence_model_path()
    kind = detect_kind(base_model)
    if kind != "sentence":
        raise ValueError(f"{base_model} is a {kind!r} model: use finetune() for LLM and vision-language backbones")
    examples = list(examples)
    empty = [i for i, ex in enumerate(examples) if not (ex.prompt.strip() and ex.target.strip())]
    if empty:
        raise MolarDataError("stage-1 examples", f"{len(empty)} example(s) have an empty query or positive, "
                                                 f"e.g. number {empty[0]}")
    if len(examples) < 2:
        raise MolarDataError("stage-1 examples", f"{len(examples)} example(s): in-batch negatives need at least 2")
    if any(ex.image for ex in examples):
        raise MolarDataError("stage-1 examples", "a sentence encoder reads text only; drop the image examples")

    c.device = c.device or default_device()
    on_gpu = str(c.device).startswith("cuda")
    torch.manual_seed(c.seed)
    model = SentenceTransformer(str(base_model), device=c.device)  # fp32 weights; bf16 autocast on GPU
    max_query = c.max_query_tokens or model.max_seq_length
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch_size = min(c.batch_size, len(examples))
    steps_per_epoch = len(examples) // batch_size
    total_steps = c.max_steps or max(1, math.ceil(steps_per_epoch * c.epochs))
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * total_steps), total_steps)
    losses: List[float] = []
    # full batches only: a short last batch would have too few negatives
    stream = _shuffled_batches(examples, batch_size, c.seed, full_only=True)
    started = time.perf_counter()
    with progress_bar(total=total_steps, desc="stage-1 contrastive (sentence)", unit="step",
                      disable=not progress) as bar:
        for _ in range(total_steps):
            batch = next(stream)
            queries = _sentence_features(model, [ex.prompt for ex in batch], max_query, "left", c.device)
            positives = _sentence_features(model, [ex.target for ex in batch], model.max_seq_length, "right",
                                           c.device)
            targets = [ex.target for ex in batch]
            same = torch.tensor([[a == b for b in targets] for a in targets], device=c.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                q = model(queries)["sentence_embedding"]
                p = model(positives)["sentence_embedding"]
            loss = in_batch_info_nce(q, p, c.temperature, c.symmetric, same)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)  # a log file gets a line per tenth only
            bar.update(1)
    seconds = time.perf_counter() - started

    model.eval()
    output_dir = Path(output_dir)
    base = Path(str(base_model))
    meta = {
        "kind": "sentence",
        "method": "contrastive",
        "base_model": str(base.resolve()) if base.exists() else str(base_model),
        "task": "user_behaviour: query (recent items' text) -> next item's text, in-batch InfoNCE",
        "examples": dict(Counter(e.task for e in examples)),
        "example": {"query": examples[0].prompt, "positive": examples[0].target},
        "source": source or {},
        "steps": total_steps,
        "seconds": round(seconds, 2),
        "losses": losses,
        "hyperparameters": {**asdict(c), "batch_size": batch_size, "max_query_tokens": max_query,
                            "device": str(c.device)},
    }
    with atomic_path(output_dir, is_dir=True) as tmp:
        model.save(str(tmp), create_model_card=False)
        (tmp / STAGE1_META).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)
    LOG.info("stage 1 (sentence): %d steps in %.0f s, loss %.4f -> %.4f, saved to %s", total_steps, seconds,
             losses[0], losses[-1], output_dir)
    return output_dir
