"""The stage-1 task mixtures built from the prepared data, shared by both fine-tuning families."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from merlin_molar.items.images import load_image
from merlin_molar.items.prompts import CUR_ITEM_TOKEN, ItemContent, ItemPromptBuilder

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


def shuffled_batches(examples: Sequence, batch_size: int, seed: int, full_only: bool = False):
    """Endless batches of ``examples``: a fresh seeded permutation per pass (``full_only`` drops each pass's
    short last batch)."""
    import torch

    order = torch.Generator().manual_seed(seed)
    last_start = len(examples) - batch_size + 1 if full_only else len(examples)
    while True:
        perm = torch.randperm(len(examples), generator=order).tolist()
        for start in range(0, last_start, batch_size):
            yield [examples[i] for i in perm[start : start + batch_size]]
