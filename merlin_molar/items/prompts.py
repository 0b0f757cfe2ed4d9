"""Item prompts: one prompt per item from its text fields and (optionally) its image.

The default template is the Molar paper's MIRM prompt; the embedding is read at the appended
``[Cur_Item]`` special token::

    >>> from merlin_molar.items import ItemPromptBuilder, ItemContent
    >>> builder = ItemPromptBuilder(text_columns=["clean_title", "year"])
    >>> item = ItemContent(3, (("clean_title", "Toy Story"), ("year", "1995")), image=None)
    >>> builder.item_text(item)
    'clean_title: Toy Story; year: 1995'
    >>> builder.prompt(item, image_placeholder=None)
    'Compress the text into embedding. Item information: clean_title: Toy Story; year: 1995. [Cur_Item]'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from merlin_molar.errors import MolarDataError

CUR_ITEM_TOKEN = "[Cur_Item]"
DEFAULT_TEMPLATE = (
    "Compress the text and image into embedding. Item information: {text}. Item Image: {image}. " + CUR_ITEM_TOKEN
)
DEFAULT_TEXT_ONLY_TEMPLATE = "Compress the text into embedding. Item information: {text}. " + CUR_ITEM_TOKEN
# how an item text longer than the encoder's token budget is shortened (recorded in the encoder's description,
# so a table embedded under another rule is neither reused nor extended with rows made under this one)
TEXT_FIT = "fields in order; over the token budget the longest values are cut to one common length"


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() != ""


@dataclass(frozen=True)
class ItemContent:
    """What an encoder sees of one item: its id, its non-empty text fields in order, its image path."""

    item_id: int
    fields: Tuple[Tuple[str, str], ...]
    image: Optional[str] = None

    @property
    def has_text(self) -> bool:
        return bool(self.fields)


@dataclass(frozen=True)
class ItemPromptBuilder:
    """Turns item rows into prompts.

    ``text_columns``: which fields go into the text and in what order (``None``: the dataset's own text
    columns, from the prepared manifest). ``template`` is used for items with an image and must hold
    ``{text}`` and ``{image}`` (the backbone's image placeholder is put there); ``text_only_template``
    for items without one (or whose image could not be read).
    """

    text_columns: Optional[Tuple[str, ...]] = None
    template: str = DEFAULT_TEMPLATE
    text_only_template: str = DEFAULT_TEXT_ONLY_TEMPLATE
    field_template: str = "{name}: {value}"
    field_separator: str = "; "

    def __post_init__(self):
        if self.text_columns is not None:
            object.__setattr__(self, "text_columns", tuple(self.text_columns))
        if "{text}" not in self.text_only_template:
            raise ValueError(f"text_only_template must contain '{{text}}': {self.text_only_template!r}")
        if "{image}" not in self.template:
            raise ValueError(f"template must contain '{{image}}': {self.template!r}")

    def with_columns(self, text_columns: Sequence[str]) -> "ItemPromptBuilder":
        """This builder with ``text_columns`` filled in where it was left open."""
        if self.text_columns is not None:
            return self
        return ItemPromptBuilder(
            tuple(text_columns), self.template, self.text_only_template, self.field_template, self.field_separator
        )

    def item_text(self, item: ItemContent) -> str:
        return self.field_separator.join(self.field_template.format(name=n, value=v) for n, v in item.fields)

    def fitted_text(self, item: ItemContent, tokenizer, budget: Optional[int]) -> str:
        """:meth:`item_text`, at most ``budget`` tokens of ``tokenizer`` long (``None``: no limit).

        A text over the budget keeps every field in its place; the values longer than a common length are cut
        to it, the longest first, and the shorter ones stay whole. So a long description in the first column
        of a product catalogue cannot push the title and brand after it out of the encoder's window, as
        cutting the joined text at the end would. A text within the budget is returned unchanged."""
        text = self.item_text(item)
        if budget is None or not item.fields:
            return text

        def count(s: str) -> int:
            return len(tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"])

        total = count(text)
        if total <= budget:
            return text
        ids = [tokenizer(value, add_special_tokens=False, verbose=False)["input_ids"] for _, value in item.fields]
        room = budget - (total - sum(len(x) for x in ids))  # what the names and separators leave for values
        for _ in range(4):  # token counts of the parts do not add up exactly: shrink by the overshoot
            cap = _common_length([len(x) for x in ids], room)
            fields = tuple((name, value if len(x) <= cap else tokenizer.decode(x[:cap]).strip())
                           for (name, value), x in zip(item.fields, ids))
            text = self.item_text(replace(item, fields=fields))
            total = count(text)
            if total <= budget:
                break
            room -= total - budget
        return text  # a last overshoot of a few tokens is cut at the end by the encoder's own truncation

    def prompt(self, item: ItemContent, image_placeholder: Optional[str], text: Optional[str] = None) -> str:
        """The prompt for ``item``; the image template only where ``image_placeholder`` is given."""
        text = self.item_text(item) if text is None else text
        if image_placeholder is None:
            return self.text_only_template.format(text=text)
        return self.template.format(text=text, image=image_placeholder)

    def items_from_frame(self, frame: pd.DataFrame, source="item table") -> List[ItemContent]:
        """One :class:`ItemContent` per row (``item_id`` column; ``image`` column optional).

        A row with neither text nor an image path is bad input: :class:`MolarDataError`."""
        if "item_id" not in frame:
            raise MolarDataError(source, f"missing column 'item_id'; found {list(frame.columns)}")
        columns = self.text_columns
        if columns is None:
            raise ValueError("text_columns is not set: call with_columns(...) or pass text_columns")
        missing = [c for c in columns if c not in frame]
        if missing:
            raise MolarDataError(source, f"missing text column(s) {missing}; found {list(frame.columns)}")
        images = frame["image"].tolist() if "image" in frame else [None] * len(frame)
        out, empty = [], []
        for item_id, image, values in zip(frame["item_id"].tolist(), images, frame[list(columns)].itertuples(False)):
            fields = tuple((c, str(v).strip()) for c, v in zip(columns, values) if _present(v))
            image = str(image) if _present(image) else None
            if not fields and image is None:
                empty.append(item_id)
            out.append(ItemContent(int(item_id), fields, image))
        if empty:
            raise MolarDataError(
                source, f"{len(empty)} item(s) have neither text nor an image, e.g. item_id {empty[:5]}"
            )
        return out

    def describe(self) -> Dict[str, object]:
        return {
            "text_columns": list(self.text_columns) if self.text_columns is not None else None,
            "template": self.template,
            "text_only_template": self.text_only_template,
            "field_template": self.field_template,
            "field_separator": self.field_separator,
        }


def _common_length(lengths: Sequence[int], room: int) -> int:
    """The largest ``c >= 1`` with ``sum(min(length, c)) <= room`` (1 where even that does not fit)."""
    lengths, used = sorted(lengths), 0
    for i, length in enumerate(lengths):
        left = len(lengths) - i
        if used + length * left > room:
            return max(1, (room - used) // left)
        used += length
    return lengths[-1] if lengths else 1


SENTENCE_PROMPTS = ItemPromptBuilder(text_only_template="{text}")
"""Sentence encoders embed the plain item text (no instruction, no special token)."""
