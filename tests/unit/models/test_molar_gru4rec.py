"""Molar with GRU4Rec as its ID branch (``MolarConfig.id_model="gru4rec"``): joint and frozen, an ID width
different from the DUEG's, persistence, and configs saved before ``id_model`` existed."""
import json

import pytest
import torch

from merlin_molar.errors import MolarDataError
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.gru4rec import GRU4RecConfig, GRULayers, gru4rec_model
from merlin_molar.models.molar import MolarConfig, load_id_branch, molar_model
from merlin_molar.persistence import load_model, save_model
from merlin_molar.training import TrainConfig, make_trainer

GRU4REC = dict(d_model=24, n_layers=1, dropout=0.1, max_length=20)  # the DUEG below is 16 wide


def gru_config(**overrides):
    llm = small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict()
    return MolarConfig(**{"llm": llm, "id_model": "gru4rec", "gru4rec": GRU4REC, "max_length": 20, **overrides})


def content_table(data, dim=24):
    torch.manual_seed(0)
    return torch.randn(data.item_cardinality, dim)


def test_molar_builds_a_gru_id_branch_of_its_own_width(tiny_prepared):
    torch.manual_seed(0)
    model = molar_model(tiny_prepared.schema, content_table(tiny_prepared), gru_config())
    body, task = model.heads[0].body, model.heads[0].prediction_task_dict["next-item"]
    assert isinstance(body.id_body[1].module, GRULayers)
    assert task.align_head.weight.shape == (24, 16)  # content (16) -> ID width (24)
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (3, 20))}
    with torch.no_grad():
        content, ident = body.eval()(batch)
        scores = model.eval()(batch)
    assert content.shape == (3, 20, 16) and ident.shape == (3, 20, 24)
    assert scores.shape == (3, tiny_prepared.item_cardinality)


def test_joint_gru_branch_learns_and_reloads_identically(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    config = gru_config(alpha=1.0)
    table = content_table(tiny_prepared)
    model = molar_model(tiny_prepared.schema, table, config)
    trainer = make_trainer(model, tiny_prepared, tmp_path / "run", TrainConfig(epochs=1, batch_size=64))
    inputs, targets = next(iter(trainer.get_train_dataloader()))
    model.train()
    model(inputs, targets=targets, training=True)["loss"].backward()
    gru = model.heads[0].body.id_body[1].module.gru
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gru.parameters())
    model.zero_grad()
    before = {k: v.clone() for k, v in model.heads[0].body.id_body.state_dict().items()}
    trainer.train()
    after = model.heads[0].body.id_body.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # joint: the branch trains

    saved = save_model(trainer.model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)
    reloaded, kind, reloaded_config, _ = load_model(saved)
    assert kind == "molar" and reloaded_config.id_model == "gru4rec" and reloaded_config.gru4rec.d_model == 24
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (4, 20))}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), trainer.model.eval()(batch))


def test_molar_takes_over_a_trained_gru4rec_as_its_frozen_id_branch(tiny_prepared, tmp_path):
    from merlin_molar.pipeline import embed_item_table, train

    config = TrainConfig(epochs=1, batch_size=64, early_stopping_patience=0, logging_steps=1000)
    gru = train(tiny_prepared, "gru4rec", tmp_path / "gru4rec", {"d_model": 24, "n_layers": 2}, config)
    table = embed_item_table(tiny_prepared, tmp_path / "table", batch_size=64)
    molar_options = {"llm": gru_config().llm, "id_weight_grid": [0.0, 1.0]}
    molar = train(tiny_prepared, "molar", tmp_path / "molar", molar_options, config, item_table_path=table,
                  init_id_branch_from=gru["model_dir"])
    model, _, molar_config, _ = load_model(molar["model_dir"])
    assert (molar_config.id_branch, molar_config.id_model) == ("frozen", "gru4rec")
    assert (molar_config.gru4rec.d_model, molar_config.gru4rec.n_layers) == (24, 2)  # the saved model's own
    trained_gru = load_model(gru["model_dir"])[0].heads[0].body.state_dict()
    id_branch = model.heads[0].body.id_body.state_dict()
    assert set(trained_gru) == set(id_branch)
    assert all(torch.equal(trained_gru[k], id_branch[k]) for k in trained_gru)  # frozen: unchanged by training
    if molar["fusion"]["id_weight"] == 1.0:  # ID only: exactly the GRU4Rec's ranking
        assert molar["test"]["ndcg@10"] == pytest.approx(gru["test"]["ndcg@10"], abs=1e-6)


def test_a_gru4rec_does_not_load_into_a_sasrec_branch(tiny_prepared):
    torch.manual_seed(0)
    sasrec_branch = molar_model(tiny_prepared.schema, content_table(tiny_prepared), gru_config(id_model="sasrec"))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_id_branch(sasrec_branch, gru4rec_model(tiny_prepared.schema, GRU4RecConfig(**GRU4REC)))


def test_init_id_branch_refuses_a_molar_model(tiny_prepared, tmp_path):
    from merlin_molar.pipeline import id_branch_options

    config = gru_config()
    table = content_table(tiny_prepared)
    saved = save_model(molar_model(tiny_prepared.schema, table, config), tmp_path / "m", "molar", config,
                       tiny_prepared.schema, table)
    with pytest.raises(MolarDataError, match=r"holds a 'molar' model, not an ID model \(sasrec or gru4rec\)"):
        id_branch_options(saved)


def test_molar_models_saved_before_id_model_existed_still_load(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    sasrec = dict(d_model=16, n_layers=1, n_heads=2, dropout=0.1, max_length=20)
    config = MolarConfig(llm=gru_config().llm, sasrec=sasrec, max_length=20)
    table = content_table(tiny_prepared)
    model = molar_model(tiny_prepared.schema, table, config).eval()
    saved = save_model(model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)
    meta_file = saved / "molar_model.json"
    meta = json.loads(meta_file.read_text())
    for key in ("id_model", "gru4rec"):  # what an older version wrote: only the SASRec config
        del meta["config"][key]
    del meta["description_sha256"]  # nor a checksum of the description itself
    meta_file.write_text(json.dumps(meta))
    reloaded, _, old_config, _ = load_model(saved)
    assert old_config.id_model == "sasrec" and old_config.sasrec.n_heads == 2
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (2, 20))}
    with torch.no_grad():
        assert torch.equal(reloaded(batch), model(batch))


def test_bad_id_model_choices_are_refused():
    from merlin_molar.validation import check_model_options

    with pytest.raises(ValueError, match=r"id_model must be one of \['gru4rec', 'sasrec'\]"):
        MolarConfig(id_model="lstm")
    with pytest.raises(MolarDataError, match=r"id_model must be one of \['gru4rec', 'sasrec'\]"):
        check_model_options("molar", {"id_model": "lstm"})
    with pytest.raises(MolarDataError, match=r"unknown key\(s\) \['n_heads'\] for --model gru4rec"):
        check_model_options("molar", {"id_model": "gru4rec", "gru4rec": {"n_heads": 2}})
    with pytest.raises(MolarDataError, match="gru4rec must be a JSON object"):
        check_model_options("molar", {"gru4rec": 3})
