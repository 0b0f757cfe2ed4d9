"""GRU4Rec, the second ID model, on the synthetic dataset: through `train` (the T4Rec Trainer, evaluation,
save with checksums), reload, `recommend`, causality, and the CLI's choice of it."""
import pytest
import torch

from merlin_molar.errors import MolarDataError
from merlin_molar.models.gru4rec import GRU4RecConfig, GRULayers, gru4rec_body, gru4rec_model
from merlin_molar.persistence import load_model, save_model
from merlin_molar.training import TrainConfig, evaluate, make_trainer

GRU4REC = {"d_model": 32, "n_layers": 1, "dropout": 0.1}


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory):
    """An untrained GRU4Rec's validation metrics, then `train --model gru4rec` (8 epochs, no early stopping; a GRU
    starts slower than SASRec, hence the higher learning rate)."""
    from merlin_molar.pipeline import train

    out = tmp_path_factory.mktemp("gru4rec")
    torch.manual_seed(0)
    untrained = gru4rec_model(tiny_prepared.schema, GRU4RecConfig(max_length=20, **GRU4REC))
    before = evaluate(make_trainer(untrained, tiny_prepared, out / "untrained", TrainConfig()), tiny_prepared, "valid")
    config = TrainConfig(epochs=8, batch_size=64, learning_rate=3e-3, early_stopping_patience=0, logging_steps=1000)
    result = train(tiny_prepared, "gru4rec", out / "run", dict(GRU4REC), config)
    return before, result


def test_gru4rec_trains_through_the_pipeline_and_beats_the_untrained_model(trained):
    before, result = trained
    assert result["kind"] == "gru4rec"
    assert result["valid"]["loss"] < before["loss"]
    assert result["valid"]["ndcg@10"] > before["ndcg@10"] + 0.03, (before, result["valid"])
    assert result["test"]["ndcg@10"] <= result["test"]["ndcg@20"] <= result["test"]["ndcg@50"]


def test_saved_gru4rec_reloads_with_its_config_and_identical_metrics(trained, tiny_prepared):
    from merlin_molar.pipeline import evaluate_saved

    _, result = trained
    model, kind, config, _ = load_model(result["model_dir"])  # verifies the recorded sha256 of every file
    assert kind == "gru4rec" and config == GRU4RecConfig(max_length=20, **GRU4REC)
    assert isinstance(model.heads[0].body[1].module, GRULayers)
    assert evaluate_saved(result["model_dir"], tiny_prepared, "test") == pytest.approx(result["test"], abs=1e-6)


def test_recommend_with_a_gru4rec_excludes_the_history(trained, tiny_prepared):
    from merlin_molar.pipeline import recommend

    _, result = trained
    raw = tiny_prepared.items()["item_id_raw"].astype(str).tolist()
    history = raw[:5]
    top = recommend(result["model_dir"], tiny_prepared, [history], top_k=10)
    assert len(top) == 10 and not set(top["item_id"].astype(str)) & set(history)
    assert top["score"].is_monotonic_decreasing


def test_save_then_load_gives_identical_scores(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    config = GRU4RecConfig(d_model=16, n_layers=2, dropout=0.3, max_length=20)
    model = gru4rec_model(tiny_prepared.schema, config).eval()
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (4, 20))}
    batch["item_id-list"][1, 7:] = 0  # a right-padded history
    saved = save_model(model, tmp_path / "model", "gru4rec", config, tiny_prepared.schema)
    reloaded, kind, reloaded_config, _ = load_model(saved)
    with torch.no_grad():
        expected, got = model(batch), reloaded(batch)
    assert kind == "gru4rec" and reloaded_config == config
    assert torch.equal(got, expected)
    assert torch.isinf(got[0, batch["item_id-list"][0]]).all()  # history masked, as SASRec's task does


def test_gru4rec_body_is_causal_and_per_position(tiny_prepared):
    torch.manual_seed(0)
    body = gru4rec_body(tiny_prepared.schema, GRU4RecConfig(d_model=16, max_length=20)).eval()
    ids = torch.randint(3, tiny_prepared.item_cardinality, (2, 20))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(3, tiny_prepared.item_cardinality, (2, 10))
    with torch.no_grad():
        a, b = body({"item_id-list": ids}), body({"item_id-list": changed})
    assert a.shape == (2, 20, 16)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # later items never reach earlier positions
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gru4rec_refuses_items_added_after_training(tiny_prepared):
    from merlin_molar.models.catalogue import extend_catalogue

    model = gru4rec_model(tiny_prepared.schema, GRU4RecConfig(d_model=16, max_length=20))
    with pytest.raises(MolarDataError, match="GRU4Rec model has no embedding for items added after training"):
        extend_catalogue(model, "gru4rec", None)


@pytest.mark.parametrize("values, message", [
    ({"max_length": 1}, "max_length must be at least 2"),
    ({"n_layers": 0}, "n_layers must be at least 1"),
])
def test_bad_gru4rec_configs_fail_at_construction(values, message):
    with pytest.raises(ValueError, match=message):
        GRU4RecConfig(**values)


def test_cli_offers_gru4rec_as_a_model(capsys):
    from merlin_molar.cli import main

    with pytest.raises(SystemExit) as exit_help:
        main(["train", "--help"])
    assert exit_help.value.code == 0
    assert "{sasrec,gru4rec,molar}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_bad:
        main(["train", "--prepared", "p", "--output", "o", "--model", "gru5rec"])
    assert exit_bad.value.code == 2
    assert "invalid choice: 'gru5rec'" in capsys.readouterr().err


def test_cli_checks_gru4rec_model_options(tiny_prepared, tmp_path, capsys):
    from merlin_molar.cli import main

    argv = ["train", "--prepared", str(tiny_prepared.root), "--model", "gru4rec", "--output", str(tmp_path / "o")]
    assert main([*argv, "--model-options", '{"n_heads": 2}']) == 2
    assert "unknown key(s) ['n_heads'] for --model gru4rec" in capsys.readouterr().err
    assert main([*argv, "--model-options", '{"dropout": 1.5}']) == 2
    assert "dropout must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
