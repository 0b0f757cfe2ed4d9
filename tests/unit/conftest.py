"""Unit-tier fixtures shared across areas: the cold-start prepared directory (data, items, models, cold_start)."""
import shutil

import pytest
import torch

from merlin_molar.data import load_prepared, prepare, read_dataset
from merlin_molar.items import embed_catalogue
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.molar import MolarConfig, molar_model


@pytest.fixture(scope="session")
def minilm():
    from merlin_molar.items import build_encoder

    return build_encoder(device="cpu")


@pytest.fixture(scope="session")
def cold_base(tmp_path_factory, tiny_dir, minilm):
    """Synthetic data prepared with 10% cold items, warm catalogue embedded with MiniLM (never mutated)."""
    root = tmp_path_factory.mktemp("cold") / "prepared"
    prepared = prepare(read_dataset(tiny_dir), root, max_length=20, cold_items=0.1)
    embed_catalogue(prepared, minilm, root / "item_table", progress=False)
    return prepared


@pytest.fixture
def cold(cold_base, tmp_path):
    """A private copy of the cold prepared dir that a test may extend."""
    root = tmp_path / "prepared"
    shutil.copytree(cold_base.root, root)
    return load_prepared(root)


def _tiny_molar(prepared, table, adaptor="moe"):
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20,
                         content_adaptor=adaptor)
    torch.manual_seed(0)
    return molar_model(prepared.schema, table, config).eval()


@pytest.fixture
def tiny_molar():
    """``tiny_molar(prepared, table, adaptor="moe")``: a small untrained Molar model in eval mode, seeded."""
    return _tiny_molar
