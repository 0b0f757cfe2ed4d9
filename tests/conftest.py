"""Shared by both tiers: offline Hugging Face, the compatibility layer, and a small synthetic dataset."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import merlin_molar  # noqa: E402,F401  (applies the compatibility layer before tests import T4Rec)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A synthetic csv-layout dataset (300 users, 120 items, genre-coloured images)."""
    from merlin_molar.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "data", images=True)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_dir):
    """The synthetic dataset through the real NVTabular workflow, max length 20."""
    from merlin_molar.data import prepare, read_dataset

    return prepare(read_dataset(tiny_dir), tmp_path_factory.mktemp("tiny") / "prepared", max_length=20)
