"""Stage 1 for sentence encoders: the behaviour task made contrastive (history text -> next item text, in-batch
InfoNCE through the model's own pooling)."""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path
from merlin_molar.items.encoders import (
    STAGE1_META,
    default_device,
    detect_kind,
)
from merlin_molar.items.prompts import ItemPromptBuilder
from merlin_molar.items.stage1.tasks import (
    Stage1Example,
    behaviour_windows,
    shuffled_batches,
)
from merlin_molar.progress import progress_bar

LOG = logging.getLogger(__name__)


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
    stream = shuffled_batches(examples, batch_size, c.seed, full_only=True)
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
