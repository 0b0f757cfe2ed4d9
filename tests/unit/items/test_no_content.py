"""Items without content (no text and no image) are reported once, with raw ids, whether one item or half
of the catalogue lacks it, and get zero rows in the item table (issue 13)."""
import logging

import numpy as np
import pytest

from merlin_molar.data import RawDataset, prepare
from merlin_molar.items import embed_catalogue, load_item_table, read_table_metadata


@pytest.mark.parametrize("empty", [1, 20])
def test_items_without_content_are_reported_alike_and_embedded_as_zero(tmp_path, small_raw, minilm, caplog, empty):
    items = small_raw.items.copy()
    blank = sorted(items["item_id"].tolist())[:empty]
    rows = items["item_id"].isin(blank)
    for column in small_raw.text_columns:
        items.loc[rows, column] = ""
    items.loc[rows, "image"] = None
    raw = RawDataset(small_raw.interactions, items, small_raw.source + "#blank", small_raw.text_columns)
    prepared = prepare(raw, tmp_path / "prepared", max_length=20)
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        embed_catalogue(prepared, minilm, tmp_path / "table", progress=False)
    reports = [r.getMessage() for r in caplog.records if "zero content embedding" in r.getMessage()]
    assert len(reports) == 1
    total = prepared.manifest["items_interacted"]
    assert f"{empty} of {total} interacted item(s) have no content" in reports[0]
    assert f"item_id {blank}" in reports[0]  # the raw ids of the input, not Categorify codes
    table = load_item_table(tmp_path / "table", prepared).numpy()
    codes = prepared.items().set_index("item_id_raw").loc[blank, "item_id"].to_numpy()
    assert np.all(table[codes] == 0)
    assert sorted(read_table_metadata(tmp_path / "table")["no_content_ids"]) == sorted(codes.tolist())


def test_an_item_whose_only_content_is_an_unreadable_image_is_reported_like_the_others(tmp_path, small_raw, vlm,
                                                                                       broken_images, caplog):
    items = small_raw.items.copy()
    target = sorted(items["item_id"].tolist())[0]
    row = items["item_id"] == target
    for column in small_raw.text_columns:
        items.loc[row, column] = ""
    items.loc[row, "image"] = broken_images["corrupt"]  # a VLM would read the image, but it is not one
    raw = RawDataset(small_raw.interactions, items, small_raw.source + "#imageonly", small_raw.text_columns)
    prepared = prepare(raw, tmp_path / "prepared", max_length=20)
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        embed_catalogue(prepared, vlm, tmp_path / "table", batch_size=16, progress=False)
    reports = [r.getMessage() for r in caplog.records if "zero content embedding" in r.getMessage()]
    assert len(reports) == 1 and f"item_id {[target]}" in reports[0]
