"""Molar (content DUEG + SASRec ID branch + MolarTask) inside the Transformers4Rec Trainer (synthetic data)."""
import pytest
import torch

from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.losses import symmetric_infonce
from merlin_molar.models.molar import MolarConfig, load_id_branch, molar_model
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.persistence import load_model, save_model
from merlin_molar.training import TrainConfig, evaluate, make_trainer

SASREC = dict(d_model=16, n_layers=1, n_heads=1, dropout=0.1, max_length=20)


def tiny_config(family="qwen2", **overrides):
    base = dict(llm=small_decoder_config(family, hidden_size=16, num_layers=1).to_dict(), sasrec=SASREC, max_length=20)
    return MolarConfig(**{**base, **overrides})


def content_table(data, dim=24):
    # random content vectors: these tests check wiring, gradients and persistence, not quality
    torch.manual_seed(0)
    return torch.randn(data.item_cardinality, dim)


def first_batch(trainer):
    return next(iter(trainer.get_eval_dataloader()))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_molar_trains_evaluates_and_reloads_identically(tiny_prepared, tmp_path, family):
    torch.manual_seed(0)
    config = tiny_config(family)
    table = content_table(tiny_prepared)
    model = molar_model(tiny_prepared.schema, table, config)
    trainer = make_trainer(model, tiny_prepared, tmp_path / "run", TrainConfig(epochs=1, batch_size=64))
    before = evaluate(trainer, tiny_prepared, "valid")
    trainer.train()
    after = evaluate(trainer, tiny_prepared, "valid")
    assert after["loss"] < before["loss"]
    assert set(after) >= {"ndcg@10", "recall@50"}

    saved = save_model(trainer.model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)
    reloaded, kind, _, _ = load_model(saved)
    inputs, _ = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(dict(inputs))
        got = reloaded(dict(inputs))
    assert kind == "molar"
    torch.testing.assert_close(got, expected)


def test_gradients_reach_trainable_parts_and_not_the_frozen_table(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    model = molar_model(tiny_prepared.schema, content_table(tiny_prepared), tiny_config(alpha=1.0))
    trainer = make_trainer(model, tiny_prepared, tmp_path, TrainConfig())
    inputs, targets = next(iter(trainer.get_train_dataloader()))
    model.train()
    model(inputs, targets=targets, training=True)["loss"].backward()
    body, task = model.heads[0].body, model.heads[0].prediction_task_dict["next-item"]
    content_table_module = body.content.inputs.categorical_module.item_embedding_table
    assert content_table_module.table.grad is None and not content_table_module.table.requires_grad
    assert all(p.grad.abs().sum() > 0 for p in content_table_module.projection.parameters())  # the adaptor
    assert all(p.grad is not None for p in body.content[1].llm.parameters() if p.requires_grad)
    assert task.align_head.weight.grad.abs().sum() > 0
    assert body.id_body.inputs.categorical_module.item_embedding_table.weight.grad.abs().sum() > 0


def test_frozen_id_branch_gets_no_gradient_but_shapes_the_content_side(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    sasrec = sasrec_model(tiny_prepared.schema, SASRecConfig(**SASREC))
    model = molar_model(tiny_prepared.schema, content_table(tiny_prepared), tiny_config(id_branch="frozen", alpha=1.0))
    load_id_branch(model, sasrec)
    trainer = make_trainer(model, tiny_prepared, tmp_path, TrainConfig())
    inputs, targets = next(iter(trainer.get_train_dataloader()))
    model.train()
    model(inputs, targets=targets, training=True)["loss"].backward()
    body = model.heads[0].body
    assert all(p.grad is None for p in body.id_body.parameters())
    assert body.content[1].llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_alignment_pulls_content_and_id_user_embeddings_together(tiny_prepared, tmp_path):
    torch.manual_seed(0)
    model = molar_model(tiny_prepared.schema, content_table(tiny_prepared), tiny_config(alpha=1.0))
    trainer = make_trainer(model, tiny_prepared, tmp_path, TrainConfig(epochs=2, batch_size=64, learning_rate=3e-3))
    task = model.heads[0].prediction_task_dict["next-item"]
    inputs, targets = first_batch(trainer)

    def alignment():
        model.eval()
        with torch.no_grad():
            content, ident = model.heads[0].body(dict(inputs), testing=True)
            mask = task.masking.masked_targets != 0
            return symmetric_infonce(task.align_head(content[mask]), ident[mask], task.temperature).item()

    start = alignment()
    trainer.train()
    end = alignment()
    assert end < start - 0.5, (start, end)


def test_content_only_and_id_only_scoring(tiny_prepared):
    torch.manual_seed(0)
    content_only = molar_model(tiny_prepared.schema, content_table(tiny_prepared), tiny_config(id_branch="none"))
    assert content_only.heads[0].body.id_body is None
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (3, 20))}
    with torch.no_grad():
        scores = content_only.eval()(batch)
    assert scores.shape == (3, tiny_prepared.item_cardinality)
    assert torch.isinf(scores[0, batch["item_id-list"][0]]).all()


def test_fusion_weight_is_chosen_on_validation(tiny_prepared, tmp_path):
    from merlin_molar.pipeline import select_id_weight

    config = TrainConfig(epochs=2, batch_size=64, early_stopping_patience=0, logging_steps=1000)
    options = {**tiny_config().to_dict(), "id_weight_grid": [0.0, 0.5, 1.0]}
    model = molar_model(tiny_prepared.schema, content_table(tiny_prepared), MolarConfig(**options))
    trainer = make_trainer(model, tiny_prepared, tmp_path / "run", config)
    trainer.train()
    fusion = select_id_weight(trainer, tiny_prepared, [0.0, 0.5, 1.0])
    by_weight = fusion["valid_ndcg@10_by_weight"]
    assert set(by_weight) == {0.0, 0.5, 1.0}
    assert by_weight[fusion["id_weight"]] == max(by_weight.values())
    assert len(set(by_weight.values())) > 1  # content-only, fused and ID-only rank differently
    assert trainer.model.heads[0].prediction_task_dict["next-item"].id_weight == fusion["id_weight"]
    assert evaluate(trainer, tiny_prepared, "valid")["ndcg@10"] == pytest.approx(by_weight[fusion["id_weight"]])


def test_molar_takes_over_a_trained_sasrec_as_its_frozen_id_branch(tiny_prepared, tmp_path):
    from merlin_molar.pipeline import embed_item_table, train

    config = TrainConfig(epochs=1, batch_size=64, early_stopping_patience=0, logging_steps=1000)
    sasrec_options = {"d_model": 24, "n_layers": 1, "n_heads": 2}
    sasrec = train(tiny_prepared, "sasrec", tmp_path / "sasrec", sasrec_options, config)
    table = embed_item_table(tiny_prepared, tmp_path / "table", batch_size=64)
    molar_options = {"llm": tiny_config().llm, "id_weight_grid": [0.0, 1.0]}
    molar = train(tiny_prepared, "molar", tmp_path / "molar", molar_options, config, item_table_path=table,
                  init_id_branch_from=sasrec["model_dir"])
    model, _, molar_config, _ = load_model(molar["model_dir"])
    assert molar_config.id_branch == "frozen"
    assert molar_config.alpha == 0.0  # the recommended recipe trains without the alignment loss
    assert model.heads[0].prediction_task_dict["next-item"].alpha == 0.0
    assert (molar_config.sasrec.d_model, molar_config.sasrec.n_heads) == (24, 2)
    trained_sasrec = load_model(sasrec["model_dir"])[0].heads[0].body.state_dict()
    id_branch = model.heads[0].body.id_body.state_dict()
    assert all(torch.equal(trained_sasrec[k], id_branch[k]) for k in trained_sasrec)  # frozen: unchanged
    if molar["fusion"]["id_weight"] == 1.0:  # ID only: exactly the SASRec's ranking
        assert molar["test"]["ndcg@10"] == pytest.approx(sasrec["test"]["ndcg@10"], abs=1e-6)


def test_the_moe_adaptor_is_the_default_and_old_configs_keep_the_linear_one():
    assert MolarConfig().content_adaptor == "moe"
    assert MolarConfig.from_dict(MolarConfig().to_dict()).content_adaptor == "moe"
    saved_before_the_choice = MolarConfig(content_adaptor="linear").to_dict()
    del saved_before_the_choice["content_adaptor"]  # as a model saved by merlin-molar before the field existed
    assert MolarConfig.from_dict(saved_before_the_choice).content_adaptor == "linear"


def test_alpha_follows_the_id_branch_unless_given():
    assert MolarConfig(id_branch="frozen").alpha == 0.0  # measured: alignment did not help a frozen branch
    assert MolarConfig().alpha == MolarConfig(id_branch="joint").alpha == 0.1  # one seed had it ahead there
    assert MolarConfig(id_branch="none").alpha == 0.0  # nothing to align with
    assert MolarConfig(id_branch="frozen", alpha=0.3).alpha == 0.3
    saved = MolarConfig(id_branch="frozen").to_dict()
    assert saved["alpha"] == 0.0 and MolarConfig.from_dict(saved).alpha == 0.0  # saved resolved, not as None
    assert MolarConfig.from_dict(MolarConfig(id_branch="joint").to_dict()).alpha == 0.1


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_a_pretrained_dueg_is_saved_self_contained(tiny_prepared, tiny_llama, tmp_path, lora):
    import shutil

    gguf = tmp_path / "weights" / "tiny-llama.gguf"
    gguf.parent.mkdir()
    shutil.copy(tiny_llama.gguf, gguf)
    torch.manual_seed(0)
    config = tiny_config(llm=str(gguf), llm_layers=2, lora=lora)
    table = content_table(tiny_prepared)
    model = molar_model(tiny_prepared.schema, table, config)
    llm = model.heads[0].body.content[1].llm
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    trainer = make_trainer(model, tiny_prepared, tmp_path / "run", TrainConfig(epochs=1, batch_size=64))
    trainer.train()
    changed = {n for n, p in llm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and (lora is None or all("lora_" in n for n in changed))

    saved = save_model(trainer.model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)
    shutil.rmtree(gguf.parent)  # loading must not read the pretrained file again
    reloaded, _, saved_config, _ = load_model(saved)
    assert saved_config.llm_source == str(gguf) and saved_config.llm_layers == 2
    assert saved_config.llm["model_type"] == "llama" and saved_config.llm["num_hidden_layers"] == 2
    assert config.llm == str(gguf)  # the caller's config is left as it was
    assert (saved / "adapter").is_dir() == (lora is not None)
    inputs, _ = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(dict(inputs)), trainer.model(dict(inputs)), rtol=0, atol=0)


def test_llm_layers_is_a_positive_whole_number():
    assert MolarConfig().llm_layers is None
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="llm_layers must be a whole number of at least 1"):
            MolarConfig(llm_layers=bad)
