"""Holding the latest items out at prepare time (``prepare --cold-items``), for the cold-start evaluation.

The cold items are the latest items to appear, by first interaction time. Their interactions are removed from
every history, except where one is a user's last interaction: there it stays as that user's test target.
NVTabular's Categorify is fitted on the warm interactions only, so the prepared vocabulary (and every model
trained on it) has never seen a cold item; in the test split a cold target is Categorify's out-of-vocabulary
id until the cold items are added with ``merlin-molar add-items --items PREPARED/cold_items.csv``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Tuple

import pandas as pd

from merlin_molar.errors import MolarDataError

COLD_ITEMS_FILE = "cold_items.csv"
COLD_TARGETS_FILE = "cold_targets.parquet"


COLD_ITEMS_FILE = "cold_items.csv"
COLD_TARGETS_FILE = "cold_targets.parquet"


def hold_out_items(interactions: pd.DataFrame, fraction: float, order_column: str) -> Tuple[pd.DataFrame, list]:
    """``(kept interactions, cold raw ids ordered by first appearance)``.

    The cold items are the ``ceil(fraction * items)`` items whose first interaction is the latest. A cold
    item's interaction is kept only where it is a user's last interaction (the test target)."""
    if not 0 < fraction < 1:
        raise MolarDataError("--cold-items", f"must be a fraction in (0, 1), got {fraction}")
    ordered = interactions.sort_values(["timestamp", order_column], kind="stable")
    first = ordered.drop_duplicates("item_id", keep="first")
    n_cold = int(math.ceil(fraction * len(first)))
    if n_cold >= len(first):
        raise MolarDataError("--cold-items", f"{fraction} would hold out every item")
    cold = first["item_id"].tolist()[-n_cold:]
    is_cold = interactions["item_id"].isin(set(cold))
    last_of_user = ordered.drop_duplicates("user_id", keep="last").index
    keep = ~is_cold | interactions.index.isin(last_of_user)
    return interactions[keep], cold


def write_cold_files(root: Path, raw_items: pd.DataFrame, cold: Sequence, test: pd.DataFrame, kept) -> dict:
    """Write ``cold_items.csv`` (content rows of the cold items, in first-appearance order: the file to give
    ``add-items``) and ``cold_targets.parquet`` (user_id, raw id of the cold test target)."""
    from merlin_molar.io import atomic_path

    by_id = raw_items.set_index("item_id")
    present = [i for i in cold if i in by_id.index]
    if not present:
        raise MolarDataError("--cold-items", "none of the held-out items has a row in the item table")
    rows = by_id.loc[present].reset_index()
    with atomic_path(root / COLD_ITEMS_FILE) as tmp:
        rows.to_csv(tmp, index=False)
    cold_set = set(cold)
    last = kept.sort_values(["timestamp", "interaction_order"], kind="stable").drop_duplicates("user_id", keep="last")
    targets = last[last["item_id"].isin(cold_set) & last["user_id"].isin(set(test["user_id"]))]
    targets = pd.DataFrame({"user_id": targets["user_id"].to_numpy(), "item_id_raw": targets["item_id"].to_numpy()})
    with atomic_path(root / COLD_TARGETS_FILE) as tmp:
        targets.sort_values("user_id").to_parquet(tmp, index=False)
    return {
        "cold_items": len(cold),
        "cold_items_with_content": len(present),
        "cold_target_users": int(len(targets)),
        "items_file": COLD_ITEMS_FILE,
        "targets_file": COLD_TARGETS_FILE,
    }
