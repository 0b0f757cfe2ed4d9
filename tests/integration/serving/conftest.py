"""Shared serving fixtures: a briefly trained tiny Molar on real ml-100k (integer item ids) and on the synthetic
catalogue with product-code item ids (strings), their Triton exports, and reference top-k from the saved model."""
import numpy as np
import pandas as pd
import pytest
import torch

from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.persistence import load_model, save_model
from merlin_molar.training import TrainConfig, make_trainer

TOP_K = 10
MAX_BATCH = 16


def train_tiny_molar(prepared, out):
    torch.manual_seed(0)
    config = MolarConfig(
        llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
        sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.1, max_length=20),
        max_length=20,
    )
    table = torch.randn(prepared.item_cardinality, 24)
    trainer = make_trainer(molar_model(prepared.schema, table, config), prepared, out / "run",
                           TrainConfig(epochs=1, batch_size=128, logging_steps=1000))
    trainer.train()
    return save_model(trainer.model, out / "model", "molar", config, prepared.schema, table)


@pytest.fixture(scope="session")
def molar_saved(ml100k_prepared, tmp_path_factory):
    return train_tiny_molar(ml100k_prepared, tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def repository(molar_saved, ml100k_prepared, tmp_path_factory):
    from merlin_molar.serving import export_triton

    path = tmp_path_factory.mktemp("triton") / "repository"
    return export_triton(molar_saved, ml100k_prepared.root, path, top_k=TOP_K, max_batch_size=MAX_BATCH)


def raw_of_encoded(prepared):
    """encoded id -> raw id, from the prepared item table (written by prepare, independent of the export)."""
    items = pd.read_parquet(prepared.items_path, columns=["item_id", "item_id_raw"])
    strings = items["item_id_raw"].dtype == object
    raw = np.full(prepared.item_cardinality, "", dtype=object) if strings else np.zeros(
        prepared.item_cardinality, dtype=np.int64)
    raw[items["item_id"].to_numpy()] = items["item_id_raw"].to_numpy()
    return raw


@pytest.fixture(scope="session")
def vocabulary(ml100k_prepared):
    return raw_of_encoded(ml100k_prepared)


def histories_of(prepared, vocabulary):
    """Real histories in raw ids (test split), cut to varied lengths 1..20."""
    test = pd.read_parquet(prepared.split_path("test") / "part_0.parquet", columns=[ITEM_SEQUENCE])
    encoded = test[ITEM_SEQUENCE].head(12).tolist()
    lengths = [20, 1, 7, 13, 3, 20, 11, 2, 19, 5, 16, 9]
    return [vocabulary[np.asarray(seq)[-n:]].tolist() for seq, n in zip(encoded, lengths)]


@pytest.fixture(scope="session")
def raw_histories(ml100k_prepared, vocabulary):
    return histories_of(ml100k_prepared, vocabulary)


@pytest.fixture(scope="session")
def in_process(molar_saved, vocabulary):
    return reference_top_k(molar_saved, vocabulary)


def reference_top_k(model_dir, vocabulary):
    """Top-k of the saved model's own (Transformers4Rec) forward run in this process: the reference the
    served answers must equal."""
    model, _, config, _ = load_model(model_dir)
    to_encoded = {raw: enc for enc, raw in enumerate(vocabulary) if enc >= 3}

    def top_k(raw_histories, k=TOP_K):
        batch = torch.zeros(len(raw_histories), config.max_length, dtype=torch.long)
        full = []
        for row, history in enumerate(raw_histories):
            encoded = [to_encoded[i] for i in history]
            window = encoded[-config.max_length:]
            batch[row, : len(window)] = torch.tensor(window)
            full.append(encoded)
        with torch.no_grad():
            scores = model({ITEM_SEQUENCE: batch})
        for row, encoded in enumerate(full):  # the served model also excludes items older than the window
            scores[row, encoded] = float("-inf")
        values, ids = torch.topk(scores, k, dim=-1)
        return vocabulary[ids.numpy()], values.numpy()

    return top_k


# A catalogue with string item ids: the synthetic dataset with product codes (e.g. B000001SOV) as ids.
@pytest.fixture(scope="session")
def coded_prepared(tmp_path_factory):
    from merlin_molar.data import prepare, read_dataset
    from merlin_molar.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("coded")
    raw = read_dataset(write_synthetic_dataset(root / "data", string_ids=True))
    return prepare(raw, root / "prepared", max_length=20)


@pytest.fixture(scope="session")
def coded_saved(coded_prepared, tmp_path_factory):
    return train_tiny_molar(coded_prepared, tmp_path_factory.mktemp("coded-model"))


@pytest.fixture(scope="session")
def coded_vocabulary(coded_prepared):
    return raw_of_encoded(coded_prepared)


@pytest.fixture(scope="session")
def coded_repository(coded_saved, coded_prepared, tmp_path_factory):
    from merlin_molar.serving import export_triton

    path = tmp_path_factory.mktemp("triton-coded") / "repository"
    # 2 instances, each pinned to a core: the real server then runs the pinning path of the executor model
    return export_triton(coded_saved, coded_prepared.root, path, top_k=TOP_K, max_batch_size=MAX_BATCH,
                         instances=2, pin_cores=True)


@pytest.fixture(scope="session")
def catalogues(repository, raw_histories, in_process, coded_repository, coded_saved, coded_prepared,
               coded_vocabulary):
    """Both catalogues, by name: repository, real raw-id histories, the in-process reference top-k."""
    return {
        "int": dict(repository=repository, histories=raw_histories, in_process=in_process),
        "str": dict(repository=coded_repository, histories=histories_of(coded_prepared, coded_vocabulary),
                    in_process=reference_top_k(coded_saved, coded_vocabulary)),
    }
