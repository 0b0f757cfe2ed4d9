"""Stage 1 for a sentence encoder (``finetune_sentence_encoder``): contrastive history -> next item on the
training split. A randomly initialised tiny BERT (the packaged MiniLM's tokenizer, 2 layers of width 32)
behind sentence-transformers' mean pooling + normalisation stands in for MiniLM, so every test is fast."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_molar.cli import main
from merlin_molar.data import RawDataset, prepare
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.items import ItemContent, SentenceEncoder, Stage1Example, build_encoder
from merlin_molar.items.stage1 import (
    QUERY_SEPARATOR,
    SentenceStage1Config,
    finetune_sentence_encoder,
    in_batch_info_nce,
    sentence_behaviour_examples,
)
from merlin_molar.items.table import read_table_metadata
from merlin_molar.pipeline import embed_item_table

WIDTH = 32


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory):
    """A sentence-transformers directory: tiny random BERT + mean pooling + normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from merlin_molar.items.encoders import default_sentence_model_path

    root = tmp_path_factory.mktemp("tiny_sentence")
    tokenizer = AutoTokenizer.from_pretrained(str(default_sentence_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=WIDTH, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    body = Transformer(str(root / "hf"), max_seq_length=128)
    SentenceTransformer(modules=[body, Pooling(WIDTH, pooling_mode="mean"), Normalize()], device="cpu").save(
        str(root / "st"), create_model_card=False
    )
    return root / "st"


TOY_PAIRS = [("red apple", "crimson fruit"), ("blue ocean", "deep sea"), ("green forest", "tall trees"),
             ("yellow sun", "bright star"), ("white snow", "cold winter"), ("black night", "dark sky"),
             ("grey rain", "wet clouds"), ("orange fire", "hot flame")]


def toy_examples():
    return [Stage1Example("user_behaviour", q, p) for q, p in TOY_PAIRS]


@pytest.fixture(scope="module")
def toy_run(tiny_sentence_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "tuned"
    finetune_sentence_encoder(tiny_sentence_model, toy_examples(), out, max_steps=40, batch_size=8,
                              learning_rate=2e-3, warmup_ratio=0.0, temperature=0.1, progress=False,
                              source={"what": "toy"})
    return out


def test_loss_decreases_on_a_learnable_toy_task(toy_run, tiny_sentence_model):
    meta = json.loads((toy_run / "molar_stage1.json").read_text())
    losses = meta["losses"]
    assert meta["kind"] == "sentence" and meta["method"] == "contrastive" and meta["steps"] == len(losses) == 40
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), losses
    # and the tuned encoder retrieves each query's positive among the eight (the base one does not)
    tuned = SentenceEncoder(toy_run, device="cpu").model
    q, p = (tuned.encode([pair[i] for pair in TOY_PAIRS], convert_to_tensor=True) for i in (0, 1))
    assert ((q @ p.T).argmax(1) == torch.arange(len(TOY_PAIRS))).float().mean() >= 0.75
    assert meta["source"] == {"what": "toy"} and meta["hyperparameters"]["temperature"] == 0.1


def test_the_run_is_seeded(toy_run, tiny_sentence_model, tmp_path):
    again = finetune_sentence_encoder(tiny_sentence_model, toy_examples(), tmp_path / "again", max_steps=40,
                                      batch_size=8, learning_rate=2e-3, warmup_ratio=0.0, temperature=0.1,
                                      progress=False)
    first = json.loads((toy_run / "molar_stage1.json").read_text())["losses"]
    assert json.loads((again / "molar_stage1.json").read_text())["losses"] == pytest.approx(first, rel=1e-4)


def test_output_loads_with_build_encoder_and_embeds_the_catalogue(toy_run, tiny_sentence_model, small_prepared,
                                                                 tmp_path):
    encoder = build_encoder(toy_run, device="cpu")
    base = build_encoder(tiny_sentence_model, device="cpu")
    assert isinstance(encoder, SentenceEncoder) and encoder.dim == WIDTH
    described = encoder.describe()
    assert described["stage1"]["method"] == "contrastive"
    assert described["base_model"] == str(tiny_sentence_model.resolve())
    assert "stage1" not in base.describe()  # a plain model's description (and old tables' metadata) is unchanged
    items = [ItemContent(3, (("title", "red apple"),)), ItemContent(4, (("title", "deep sea"),))]
    vectors = encoder.encode(items).embeddings
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors - base.encode(items).embeddings).max() > 1e-3
    # the same mean pooling as the model card: the tokenizer was saved with right truncation
    assert encoder.model.tokenizer.truncation_side == "right"

    table = embed_item_table(small_prepared, tmp_path / "table", encoder=str(toy_run), device="cpu")
    metadata = read_table_metadata(table)
    assert metadata["encoder"]["name_or_path"] == str(toy_run)
    assert metadata["encoder"]["stage1"]["kind"] == "sentence"
    assert metadata["backbone"] == str(tiny_sentence_model.resolve()) and metadata["dim"] == WIDTH


def test_examples_are_train_windows_with_the_encoders_item_text(small_prepared):
    examples = sentence_behaviour_examples(small_prepared, n=200, history_length=3, seed=0)
    assert len(examples) == 200
    items = small_prepared.items().set_index("item_id")
    text = {i: f"clean_title: {r.clean_title}; year: {r.year}; genres: {r.genres}" for i, r in items.iterrows()}
    train = [[text[i] for i in h] for h in small_prepared.split_frame("train")[ITEM_SEQUENCE]]
    for ex in examples:
        window = ex.prompt.split(QUERY_SEPARATOR) + [ex.target]
        assert 2 <= len(window) <= 4
        assert any(h[i : i + len(window)] == window for h in train for i in range(len(h) - len(window) + 1)), window
    assert sentence_behaviour_examples(small_prepared, n=200, history_length=3, seed=0) == examples


def _leak_dataset(tmp_path):
    """Every user watches the shared items 1..6 in some order, then a validation and a test item of their own."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 21):
        order = list(rng.permutation(6) + 1) + [100 + user, 200 + user]
        rows += [(user, item, 1000 * user + t) for t, item in enumerate(order)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    ids = sorted(interactions["item_id"].unique())
    titles = [f"shared film {i}" if i < 100 else f"{'valid' if i < 200 else 'test'} target {i}" for i in ids]
    items = pd.DataFrame({"item_id": ids, "title": titles})
    return prepare(RawDataset(interactions, items, "leak-test", ["title"]), tmp_path / "prepared", max_length=20)


def test_validation_and_test_targets_never_reach_training(tmp_path):
    prepared = _leak_dataset(tmp_path)
    examples = sentence_behaviour_examples(prepared, n=500, history_length=10, seed=1)
    texts = [t for ex in examples for t in [ex.prompt, ex.target]]
    assert all("target" not in t for t in texts)
    assert {ex.target for ex in examples} <= {f"title: shared film {i}" for i in range(1, 7)}


def test_no_usable_history_is_a_clear_error(tmp_path):
    interactions = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [1, 2, 3, 2, 3, 1],
                                 "timestamp": [1, 2, 3, 1, 2, 3]})
    items = pd.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    prepared = prepare(RawDataset(interactions, items, "short", ["title"]), tmp_path / "p", max_length=5)
    with pytest.raises(MolarDataError, match="no train history has two consecutive items with text"):
        sentence_behaviour_examples(prepared, n=10)
    with pytest.raises(ValueError, match="history_length must be at least 1"):
        sentence_behaviour_examples(prepared, n=10, history_length=0)


def test_bad_examples_and_settings_are_refused_before_training(tiny_sentence_model, tmp_path):
    one = [Stage1Example("user_behaviour", "a", "b")]
    with pytest.raises(MolarDataError, match="in-batch negatives need at least 2"):
        finetune_sentence_encoder(tiny_sentence_model, one, tmp_path / "o", progress=False)
    with pytest.raises(MolarDataError, match="empty query or positive"):
        finetune_sentence_encoder(tiny_sentence_model, one + [Stage1Example("user_behaviour", "q", " ")],
                                  tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="batch_size=1"):
        SentenceStage1Config(batch_size=1)
    with pytest.raises(ValueError, match="temperature=0"):
        finetune_sentence_encoder(tiny_sentence_model, toy_examples(), tmp_path / "o", temperature=0)
    config_only = tmp_path / "llm"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="use finetune\\(\\) for LLM"):
        finetune_sentence_encoder(config_only, toy_examples(), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_failed_save_leaves_no_output(tiny_sentence_model, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    def broken_save(self, path, **kwargs):
        (Path(path) / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(SentenceTransformer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        finetune_sentence_encoder(tiny_sentence_model, toy_examples(), tmp_path / "o", max_steps=1, batch_size=4,
                                  progress=False)
    assert list(tmp_path.iterdir()) == []


def test_info_nce_ignores_other_rows_with_the_same_positive():
    q = torch.eye(4)[[0, 1, 2, 2]]
    p = q.clone()  # rows 2 and 3 share their positive
    same = torch.tensor([[a == b for b in [0, 1, 2, 2]] for a in [0, 1, 2, 2]])
    masked = in_batch_info_nce(q, p, temperature=0.05, same_positive=same)
    unmasked = in_batch_info_nce(q, p, temperature=0.05)
    assert float(masked) < 1e-6 < float(unmasked)
    one_way = in_batch_info_nce(q, torch.eye(4), temperature=0.05, symmetric=False)
    assert float(one_way) > 0


def test_cli_takes_the_sentence_path(tiny_sentence_model, small_prepared, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["finetune-items", "--prepared", str(small_prepared.root), "--base-model", str(tiny_sentence_model),
                 "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--examples-per-task", "20",
                 "--history-length", "2", "--temperature", "0.1", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "wrote stage-1 sentence encoder" in capsys.readouterr().out
    meta = json.loads((out / "molar_stage1.json").read_text())
    assert meta["steps"] == 2 and meta["examples"] == {"user_behaviour": 20}
    assert meta["source"]["history_length"] == 2 and meta["source"]["split"] == "train"
    assert meta["hyperparameters"]["temperature"] == 0.1 and meta["hyperparameters"]["batch_size"] == 4
    assert build_encoder(out, device="cpu").kind == "sentence"


@pytest.mark.parametrize("extra, option", [(["--method", "lora"], "--method"), (["--batch-size", "1"], "--batch-size"),
                                            (["--temperature", "0"], "--temperature"),
                                            (["--history-length", "0"], "--history-length")])
def test_cli_errors_name_the_option(tiny_sentence_model, small_prepared, tmp_path, capsys, extra, option):
    argv = ["finetune-items", "--prepared", str(small_prepared.root), "--base-model", str(tiny_sentence_model),
            "--output", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"merlin-molar finetune-items: error: {option}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_temperature_is_for_sentence_encoders_only(small_prepared, tmp_path, capsys):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert main(["finetune-items", "--prepared", str(small_prepared.root), "--base-model", str(llm),
                 "--output", str(tmp_path / "o"), "--temperature", "0.1"]) == 2
    assert "--temperature: applies to a sentence-encoder base model only" in capsys.readouterr().err
