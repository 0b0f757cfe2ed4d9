import numpy as np
import pandas as pd
import pytest
from merlin.schema import Tags

from merlin_molar.data import load_prepared, prepare
from merlin_molar.data.readers import RawDataset
from merlin_molar.data.workflow import k_core
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import EARLIER_ITEMS, FIRST_ITEM_ID, ITEM_SEQUENCE, USER_INDEX


def toy_raw(n_users=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = 3 + u  # lengths 3..8
        items = rng.choice(np.arange(100, 112), size=n, replace=False)
        times = rng.permutation(np.arange(n)) * 10 + u  # shuffled rows: the workflow must sort by time
        rows += [(u, int(i), int(t)) for i, t in zip(items, times)]
    rows.append((99, 100, 1))  # a user with too short a history is dropped
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(100, 113), "title": [f"t{i}" for i in range(13)], "image": None})
    return RawDataset(inter, items, "toy", ["title"])


def expected_splits(raw, max_length):
    inter = raw.interactions.sort_values(["user_id", "timestamp"])
    seqs = inter.groupby("user_id")["item_id"].apply(list)
    seqs = seqs[seqs.map(len) >= 3]
    return {
        "train": seqs.map(lambda s: s[:-2][-max_length:]),
        "valid": seqs.map(lambda s: s[:-1][-max_length:]),
        "test": seqs.map(lambda s: s[-max_length:]),
    }


@pytest.fixture(scope="module")
def toy_prepared(tmp_path_factory):
    raw = toy_raw()
    return raw, prepare(raw, tmp_path_factory.mktemp("toy") / "out", max_length=4)


def test_leave_one_out_splits_match_a_plain_reference(toy_prepared):
    raw, data = toy_prepared
    items = data.items()
    decode = dict(zip(items["item_id"], items["item_id_raw"]))
    for split, expected in expected_splits(raw, 4).items():
        frame = data.split_frame(split).set_index("user_id").sort_index()
        assert list(frame.index) == list(expected.index), split
        got = frame[ITEM_SEQUENCE].map(lambda s: [decode[int(i)] for i in s])
        assert got.tolist() == expected.tolist(), split


def test_earlier_items_hold_the_history_older_than_each_evaluated_window(toy_prepared):
    raw, data = toy_prepared
    items = data.items()
    decode = dict(zip(items["item_id"], items["item_id_raw"]))
    inter = raw.interactions.sort_values(["user_id", "timestamp"])
    histories = inter.groupby("user_id")["item_id"].apply(list)
    for split, cut in (("valid", -2), ("test", -1)):
        frame = data.split_frame(split).sort_values("user_id")
        earlier = pd.read_parquet(data.earlier_items_path(split)).set_index(USER_INDEX)[EARLIER_ITEMS]
        assert sorted(frame[USER_INDEX]) == list(range(len(frame))) == sorted(earlier.index)
        for user, key, window in zip(frame["user_id"], frame[USER_INDEX], frame[ITEM_SEQUENCE]):
            seen = histories[user][:cut]  # what the reference masks: the whole history before the target
            got = [decode[int(i)] for i in earlier[key]] + [decode[int(i)] for i in window[:-1]]
            assert got == seen, (split, user)
    assert any(len(v) for v in pd.read_parquet(data.earlier_items_path("test"))[EARLIER_ITEMS])


def test_list_column_is_not_stringified_by_dask(toy_prepared):
    # dask 2024.12 + pandas 2 turns list columns handed over in pandas frames into strings unless
    # compat switches off "dataframe.convert-string"; Categorify then gives one code per row.
    raw, data = toy_prepared
    seqs = data.split_frame("test")[ITEM_SEQUENCE]
    assert all(isinstance(s, (list, np.ndarray)) for s in seqs)
    flat = np.concatenate(seqs.to_numpy())
    assert flat.min() >= FIRST_ITEM_ID and flat.max() < data.item_cardinality
    expected_items = {i for s in expected_splits(raw, 4)["test"] for i in s}
    assert len(np.unique(flat)) == len(expected_items)


def test_schema_tags_and_item_table_order(toy_prepared):
    _, data = toy_prepared
    col = data.schema[ITEM_SEQUENCE]
    assert data.schema.select_by_tag(Tags.ITEM_ID).column_names == [ITEM_SEQUENCE]
    assert {Tags.LIST, Tags.CATEGORICAL} <= set(col.tags)
    assert col.properties["value_count"]["max"] == 4
    assert col.int_domain.max == data.item_cardinality - 1
    items = data.items()
    assert items["item_id"].tolist() == list(range(FIRST_ITEM_ID, data.item_cardinality))
    assert items["has_content"].all()
    assert 112 not in set(items["item_id_raw"])  # never interacted: not in the ranking catalogue


def test_rerun_into_same_directory_is_allowed_but_other_data_is_refused(tmp_path):
    raw = toy_raw()
    prepare(raw, tmp_path / "out", max_length=4)
    prepare(raw, tmp_path / "out", max_length=4)
    with pytest.raises(MolarDataError, match="different dataset or configuration"):
        prepare(toy_raw(seed=1), tmp_path / "out", max_length=4)
    with pytest.raises(MolarDataError, match="max_length"):
        prepare(raw, tmp_path / "out", max_length=5)


def test_load_prepared_reports_what_is_missing(tmp_path):
    with pytest.raises(MolarDataError, match="molar_manifest.json: missing"):
        load_prepared(tmp_path)


def test_k_core_is_iterative(tmp_path):
    inter = pd.DataFrame(
        {"user_id": [1, 1, 1, 2, 2, 3], "item_id": [10, 11, 12, 10, 11, 12], "timestamp": range(6)}
    )
    # item 12 has 2 interactions; dropping user 3 (1 interaction) leaves it with 1, so it goes too.
    out = k_core(inter, 2, cat_path=str(tmp_path))
    assert sorted(out["item_id"].unique()) == [10, 11]
    assert sorted(out["user_id"].unique()) == [1, 2]
