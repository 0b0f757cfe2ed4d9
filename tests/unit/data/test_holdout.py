"""prepare --cold-items: the latest items held out, kept only as test targets, whatever the partitioning."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_molar.data import load_prepared, prepare, read_dataset
from merlin_molar.data.holdout import COLD_ITEMS_FILE, COLD_TARGETS_FILE
from merlin_molar.data.workflow import item_id_mapping
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE, OOV_ID
from merlin_molar.items.add_items import add_items


def test_cold_items_are_the_latest_to_appear_and_only_test_targets(cold_base, tiny_dir):
    raw = read_dataset(tiny_dir)
    inter = raw.interactions.assign(order=np.arange(len(raw.interactions)))
    first_seen = inter.sort_values(["timestamp", "order"]).drop_duplicates("item_id")["item_id"].tolist()
    cold_file = pd.read_csv(cold_base.root / COLD_ITEMS_FILE)
    n_cold = int(np.ceil(0.1 * len(first_seen)))
    assert cold_file["item_id"].tolist() == first_seen[-n_cold:]
    assert cold_base.manifest["cold_start"]["cold_items"] == n_cold

    mapping = item_id_mapping(cold_base.load_workflow())
    assert not set(cold_file["item_id"]) & set(mapping.index)  # Categorify never saw them
    assert cold_base.item_cardinality == 3 + len(first_seen) - n_cold
    for split in ("train", "valid"):
        codes = np.concatenate(cold_base.split_frame(split)[ITEM_SEQUENCE].map(np.asarray).tolist())
        assert (codes >= 3).all()  # no OOV: no cold interaction left in training or validation histories
    test = cold_base.split_frame("test").set_index("user_id")
    targets = pd.read_parquet(cold_base.root / COLD_TARGETS_FILE)
    assert len(targets) == cold_base.manifest["cold_start"]["cold_target_users"] > 0
    for user, raw_id in zip(targets["user_id"], targets["item_id_raw"]):
        seq = np.asarray(test.loc[user, ITEM_SEQUENCE])
        assert seq[-1] == OOV_ID and (seq[:-1] >= 3).all()
        last = inter[inter["user_id"] == user].sort_values(["timestamp", "order"])["item_id"].iloc[-1]
        assert last == raw_id
    warm_users = test.index.difference(targets["user_id"])
    assert all(np.asarray(test.loc[u, ITEM_SEQUENCE])[-1] >= 3 for u in warm_users)


def test_cold_hold_out_does_not_depend_on_partitioning(cold_base, tiny_dir, tmp_path):
    split = prepare(read_dataset(tiny_dir), tmp_path / "p2", max_length=20, cold_items=0.1, partitions=3)
    assert item_id_mapping(split.load_workflow()).equals(item_id_mapping(cold_base.load_workflow()))
    for name in ("train", "valid", "test"):
        a = split.split_frame(name).sort_values("user_id").reset_index(drop=True)
        b = cold_base.split_frame(name).sort_values("user_id").reset_index(drop=True)
        assert a["user_id"].tolist() == b["user_id"].tolist()
        assert [list(x) for x in a[ITEM_SEQUENCE]] == [list(x) for x in b[ITEM_SEQUENCE]]
    pd.testing.assert_frame_equal(pd.read_parquet(split.root / COLD_TARGETS_FILE),
                                  pd.read_parquet(cold_base.root / COLD_TARGETS_FILE))


def test_a_directory_prepared_at_a_relative_path_is_read_from_another_working_directory(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    from merlin_molar.data import prepare, read_dataset

    monkeypatch.chdir(tmp_path)
    prepare(read_dataset(tiny_dir), "prepared", max_length=5)
    want = item_id_mapping(load_prepared(Path("prepared")).load_workflow())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    workflow = load_prepared(tmp_path / "prepared").load_workflow()
    assert Path(workflow.output_schema[ITEM_SEQUENCE].properties["cat_path"]).is_file()
    pd.testing.assert_series_equal(item_id_mapping(workflow), want)


def test_a_prepared_directory_reads_its_own_vocabulary_from_anywhere(cold_base, tmp_path, monkeypatch):
    """The saved workflow records the vocabulary path prepare/add-items were given (here relative to their
    working directory): the prepared directory still works from another one, and after a move."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cold_base.root, "here/prepared")
    relative = load_prepared(Path("here/prepared"))
    add_items(relative, relative.root / COLD_ITEMS_FILE, progress=False)  # records catalogue/v2 relatively
    want = item_id_mapping(load_prepared(Path("here/prepared")).load_workflow())
    assert len(want) > len(item_id_mapping(cold_base.load_workflow()))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "here" / "prepared"), str(moved))
    pd.testing.assert_series_equal(item_id_mapping(load_prepared(moved).load_workflow()), want)
    (moved / "catalogue" / "v2" / "unique.item_id.parquet").unlink()
    with pytest.raises(MolarDataError, match="item vocabulary .* is missing"):
        load_prepared(moved).load_workflow()
