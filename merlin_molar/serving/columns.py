"""The served model's output columns (what the client reads back)."""

ITEM_IDS = "item_ids"
SCORES = "scores"
