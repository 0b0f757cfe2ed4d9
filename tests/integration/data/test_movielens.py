"""The readers and the NVTabular workflow on the real MovieLens data in ../shared/data."""
from merlin_molar.data import prepare, read_dataset
from merlin_molar.ids import ITEM_SEQUENCE


def test_shared_ml1m_layout(ml1m_dir):
    raw = read_dataset(ml1m_dir)
    assert len(raw.interactions) == 1_000_209
    assert raw.interactions["user_id"].nunique() == 6040
    assert list(raw.interactions.columns) == ["user_id", "item_id", "timestamp"]
    assert raw.text_columns == ["clean_title", "year", "genres"]
    with_image = raw.items["image"].notna()
    assert with_image.sum() == 3256
    assert raw.items.loc[with_image, "image"].map(lambda p: p.startswith("/")).all()


def test_ml100k_prepared(ml100k_prepared):
    m = ml100k_prepared.manifest
    assert (m["users"], m["interactions"], m["items_interacted"]) == (943, 100_000, 1682)
    test = ml100k_prepared.split_frame("test")
    assert test[ITEM_SEQUENCE].map(len).max() == 20


def test_real_ml100k_histories_are_time_ordered(ml100k_dir, ml100k_prepared):
    # the raw file is not in time order within users; the workflow must sort each history by timestamp
    raw = read_dataset(ml100k_dir)
    times = raw.interactions.set_index(["user_id", "item_id"])["timestamp"]
    items = ml100k_prepared.items()
    decode = dict(zip(items["item_id"], items["item_id_raw"]))
    frame = ml100k_prepared.split_frame("test").set_index("user_id")
    for user in (1, 100, 500):
        seq = [decode[int(i)] for i in frame.loc[user, ITEM_SEQUENCE]]
        stamps = [times[(user, i)] for i in seq]
        assert stamps == sorted(stamps), user


def test_same_data_through_another_path_is_the_same_dataset(tmp_path, ml100k_dir, monkeypatch):
    out = tmp_path / "out"
    prepare(read_dataset(ml100k_dir), out, max_length=5)
    monkeypatch.chdir(ml100k_dir.parent)
    prepare(read_dataset("ml-100k"), out, max_length=5)  # relative path, same data: accepted
