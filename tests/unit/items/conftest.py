"""Fixtures for the MIRM tests: a slice of the synthetic catalogue with images (plus one missing and one
corrupt image), prepared by the real NVTabular workflow, and tiny random Qwen-family backbones saved to disk."""
from pathlib import Path

import pandas as pd
import pytest

from merlin_molar.data import RawDataset, prepare, read_dataset

N_ITEMS = 40
N_USERS = 60


@pytest.fixture(scope="session")
def catalogue_raw(tiny_dir):
    return read_dataset(tiny_dir)


def _slice(raw: RawDataset) -> RawDataset:
    """The N_ITEMS most interacted items that have an image, and N_USERS users' interactions with them."""
    with_poster = raw.items.loc[raw.items["image"].notna(), "item_id"]
    inter = raw.interactions[raw.interactions["item_id"].isin(with_poster)]
    top = inter["item_id"].value_counts().index[:N_ITEMS]
    inter = inter[inter["item_id"].isin(top)]
    users = inter["user_id"].drop_duplicates().iloc[:N_USERS]
    inter = inter[inter["user_id"].isin(users)].reset_index(drop=True)
    items = raw.items[raw.items["item_id"].isin(top)].reset_index(drop=True)
    return RawDataset(inter, items, raw.source + "#slice", list(raw.text_columns))


@pytest.fixture(scope="session")
def broken_images(tmp_path_factory):
    """A path that does not exist and a file that is not an image."""
    corrupt = tmp_path_factory.mktemp("images") / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body" * 4)
    return {"missing": "/nonexistent/poster.jpg", "corrupt": str(corrupt)}


@pytest.fixture(scope="session")
def small_raw(catalogue_raw, broken_images):
    """The slice, with the posters of its two least rated items replaced by a missing and a corrupt file."""
    raw = _slice(catalogue_raw)
    least = raw.interactions["item_id"].value_counts().index[-2:]
    items = raw.items.copy()
    items.loc[items["item_id"] == least[0], "image"] = broken_images["missing"]
    items.loc[items["item_id"] == least[1], "image"] = broken_images["corrupt"]
    return RawDataset(raw.interactions, items, raw.source, raw.text_columns)


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory, small_raw):
    return prepare(small_raw, tmp_path_factory.mktemp("small") / "prepared", max_length=20)


@pytest.fixture(scope="session")
def broken_image_ids(small_prepared, small_raw, broken_images):
    """Encoded ids of the items whose image is missing / corrupt."""
    items = small_prepared.items()
    return {
        kind: int(items.loc[items["image"] == path, "item_id"].iloc[0]) for kind, path in broken_images.items()
    }


@pytest.fixture(scope="session")
def small_prepared_no_images(tmp_path_factory, small_raw):
    items = small_raw.items.copy()
    items["image"] = None
    raw = RawDataset(small_raw.interactions, items, small_raw.source + "#noimages", small_raw.text_columns)
    return prepare(raw, tmp_path_factory.mktemp("small_noimg") / "prepared", max_length=20)


@pytest.fixture(scope="session")
def remapped_prepared(tmp_path_factory, small_raw):
    """Same items (same cardinality) but a different Categorify mapping: the least rated item becomes the
    most rated one."""
    inter = small_raw.interactions
    rare = inter["item_id"].value_counts().index[-1]
    extra = inter[inter["item_id"] != rare].drop_duplicates("user_id").copy()
    extra["item_id"] = rare
    extra["timestamp"] = extra["timestamp"] + 1
    raw = RawDataset(pd.concat([inter, extra], ignore_index=True), small_raw.items, small_raw.source + "#remap",
                     small_raw.text_columns)
    return prepare(raw, tmp_path_factory.mktemp("remapped") / "prepared", max_length=20)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory, catalogue_raw):
    """Tiny random backbones saved with save_pretrained: {model_type: path}."""
    from merlin_molar.items.testing import save_random_backbone

    root = tmp_path_factory.mktemp("backbones")
    corpus = catalogue_raw.items["title"].astype(str).tolist()[:500]
    return {t: save_random_backbone(root / t, t, corpus=corpus) for t in ("qwen2_vl", "qwen2_5_vl", "qwen2", "llama")}


@pytest.fixture(scope="session")
def minilm():
    from merlin_molar.items import build_encoder

    return build_encoder(device="cpu")


@pytest.fixture(scope="session")
def vlm(backbones):
    from merlin_molar.items import build_encoder

    return build_encoder(backbones["qwen2_vl"], device="cpu")


@pytest.fixture(scope="session")
def poster_paths(tiny_dir) -> list:
    return sorted(str(p) for p in (Path(tiny_dir) / "images").glob("*.png"))[:4]


@pytest.fixture(scope="session")
def efficientnet():
    from merlin_molar.items import build_encoder

    return build_encoder("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="session")
def minilm_efficientnet():
    from merlin_molar.items import build_encoder

    return build_encoder("minilm+efficientnet-lite0", device="cpu")


@pytest.fixture(scope="session")
def small_prepared_some_posters(tmp_path_factory, small_raw, broken_images):
    """The slice, its two least rated items without any poster (no image path: a missing modality)."""
    items = small_raw.items.copy()
    items.loc[items["image"].isin(list(broken_images.values())), "image"] = None
    raw = RawDataset(small_raw.interactions, items, small_raw.source + "#someposters", small_raw.text_columns)
    return prepare(raw, tmp_path_factory.mktemp("small_some") / "prepared", max_length=20)
