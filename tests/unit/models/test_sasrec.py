"""SASRec's inputs to GPT-2: positions counted back from the read-out item, embeddings scaled by sqrt(d); the
reference's layers as a block (``block="encoder"``); configs saved before these existed (synthetic data)."""
import math

import pytest
import torch

from merlin_molar.models.sasrec import SASRecConfig, SASRecEncoder, positions_from_last, sasrec_body, sasrec_model
from merlin_molar.persistence import load_model, save_model

SMALL = dict(d_model=16, n_layers=1, n_heads=1, dropout=0.1, max_length=20, block="gpt2")
LAST = dict(SMALL, positions="last")
ENCODER = dict(SMALL, n_layers=2, n_heads=2, block="encoder")


def test_positions_count_back_from_the_last_target():
    targets = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [0, 0, 4, 0, 0], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[7, 8, 9, 0, 0], [5, 6, 7, 8, 9], [7, 8, 9, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(positions_from_last(targets, max_length=10), expected)
    # rows longer than the position table (never from the prepared data) keep valid ids: the earliest get 0
    too_long = torch.ones(1, 5, dtype=torch.long)
    assert torch.equal(positions_from_last(too_long, max_length=3), torch.tensor([[0, 0, 0, 1, 2]]))


def gpt2_position_ids(body, ids, **mode):
    """The ``position_ids`` GPT-2 (or the encoder block's position table) receives when ``body`` runs on ``ids``
    (``training=`` / ``testing=``)."""
    seen = {}
    if isinstance(body[1], SASRecEncoder):
        hook = body[1].positions.register_forward_pre_hook(lambda m, args: seen.update(position_ids=args[0]))
    else:
        gpt2 = body[1].transformer
        hook = gpt2.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        body({"item_id-list": ids}, **mode)
    finally:
        hook.remove()
    return seen.get("position_ids")


def right_padded(lengths, width, cardinality):
    ids = torch.randint(3, cardinality, (len(lengths), width))
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids


@pytest.mark.parametrize("mode, read_out", [
    ({"training": True}, lambda n: torch.arange(n - 1)),  # every position with a next item
    ({"testing": True}, lambda n: torch.tensor([n - 2])),  # the last history item; the target is at n - 1
    ({}, lambda n: torch.tensor([n - 1])),  # inference: the whole sequence is the history
])
@pytest.mark.parametrize("options", [LAST, ENCODER], ids=["gpt2", "encoder"])
def test_the_read_out_item_sits_at_the_last_position_whatever_the_history_length(tiny_prepared, mode, read_out,
                                                                                  options):
    torch.manual_seed(0)
    body = sasrec_body(tiny_prepared.schema, SASRecConfig(**options)).eval()
    lengths = [3, 11, 20]
    positions = gpt2_position_ids(body, right_padded(lengths, 20, tiny_prepared.item_cardinality), **mode)
    for row, n in enumerate(lengths):
        rows = read_out(n)
        assert torch.equal(positions[row, rows], torch.arange(20 - len(rows), 20)), (mode, n, positions[row])


def test_gpt2_positions_count_from_the_first_item_by_default(tiny_prepared):
    body = sasrec_body(tiny_prepared.schema, SASRecConfig(**SMALL)).eval()
    assert gpt2_position_ids(body, right_padded([3, 20], 20, tiny_prepared.item_cardinality)) is None


@pytest.mark.parametrize("options", [LAST, SMALL, ENCODER], ids=["gpt2 last", "gpt2 start", "encoder"])
def test_a_history_gets_the_same_user_embedding_in_evaluation_and_in_inference(tiny_prepared, options):
    """Evaluation (``testing``) sees history + target and reads the history's last item; inference sees the history
    alone and reads its last item: both must see that item at the same position, as training does."""
    torch.manual_seed(0)
    body = sasrec_body(tiny_prepared.schema, SASRecConfig(**options)).eval()
    with_target = right_padded([6, 15], 20, tiny_prepared.item_cardinality)
    history = with_target.clone()
    history[0, 5], history[1, 14] = 0, 0
    with torch.no_grad():
        evaluated = body({"item_id-list": with_target}, testing=True)
        inferred = body({"item_id-list": history})
    torch.testing.assert_close(evaluated[0, 4], inferred[0, 4])
    torch.testing.assert_close(evaluated[1, 13], inferred[1, 13])


def test_items_at_the_same_distance_from_the_read_out_share_a_position(tiny_prepared):
    body = sasrec_body(tiny_prepared.schema, SASRecConfig(**LAST)).eval()
    ids = right_padded([4, 12], 20, tiny_prepared.item_cardinality)
    positions = gpt2_position_ids(body, ids)
    assert torch.equal(positions[0, :4], positions[1, 8:12])


def test_item_embeddings_reach_gpt2_scaled_by_sqrt_d(tiny_prepared):
    torch.manual_seed(0)
    config = SASRecConfig(**SMALL, scale_embeddings=True)
    body = sasrec_body(tiny_prepared.schema, config).eval()
    seen = {}
    handle = body[1].transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    ids = right_padded([5], 20, tiny_prepared.item_cardinality)
    body({"item_id-list": ids})
    handle.remove()
    table = body[0].categorical_module.item_embedding_table.weight
    torch.testing.assert_close(seen["inputs_embeds"][0, :5], table[ids[0, :5]] * math.sqrt(16))


def test_configs_saved_before_the_options_existed_keep_what_they_were_trained_with():
    from merlin_molar.models.molar import MolarConfig

    saved = SASRecConfig(**LAST, scale_embeddings=True).to_dict()
    del saved["positions"], saved["scale_embeddings"], saved["init"], saved["block"]  # as saved before they existed
    old = SASRecConfig.from_dict(saved)
    assert (old.positions, old.scale_embeddings, old.init, old.block) == ("start", False, "gpt2", "gpt2")
    molar = MolarConfig().to_dict()
    molar["sasrec"] = saved
    assert MolarConfig.from_dict(molar).sasrec == old
    assert MolarConfig(sasrec=SASRecConfig(**LAST).to_dict()).sasrec == SASRecConfig(**LAST)


@pytest.mark.parametrize("options", [dict(LAST, scale_embeddings=True), ENCODER], ids=["gpt2", "encoder"])
def test_a_saved_sasrec_reloads_with_identical_scores(tiny_prepared, tmp_path, options):
    torch.manual_seed(0)
    config = SASRecConfig(**options)
    model = sasrec_model(tiny_prepared.schema, config).eval()
    batch = {"item_id-list": right_padded([7, 20, 2], 20, tiny_prepared.item_cardinality)}
    directory = save_model(model, tmp_path / "model", "sasrec", config, tiny_prepared.schema)
    reloaded, _, reloaded_config, _ = load_model(directory)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), model(batch))
    assert reloaded_config == config


def test_unknown_positions_and_init_fail_at_construction():
    with pytest.raises(ValueError, match="positions must be one of"):
        SASRecConfig(positions="end", block="gpt2")
    with pytest.raises(ValueError, match="init must be one of"):
        SASRecConfig(init="xavier", block="gpt2")


def test_torch_init_starts_gpt2_where_pytorchs_encoder_layer_starts():
    """``init="torch"``: each GPT-2 weight drawn from the distribution of its nn.TransformerEncoderLayer
    counterpart (GPT-2's Conv1D weights are [in, out]); the default keeps GPT-2's N(0, 0.02)."""
    from merlin_molar.models.sasrec import sasrec_transformer

    torch.manual_seed(0)
    d, ffn = 64, 256
    gpt2 = sasrec_transformer(SASRecConfig(d_model=d, init="torch", block="gpt2")).transformer
    reference = torch.nn.TransformerEncoderLayer(d, 1, ffn, 0.2, batch_first=True, norm_first=True)
    pairs = [(gpt2.h[0].attn.c_attn.weight.T, reference.self_attn.in_proj_weight),
             (gpt2.h[0].attn.c_proj.weight.T, reference.self_attn.out_proj.weight),
             (gpt2.h[0].mlp.c_fc.weight.T, reference.linear1.weight),
             (gpt2.h[0].mlp.c_proj.weight.T, reference.linear2.weight),
             (gpt2.h[1].mlp.c_fc.bias, reference.linear1.bias)]
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape
        bound = float(theirs.abs().max())  # uniform draws: the bound, as sampled
        assert float(ours.abs().max()) <= bound * 1.01 and float(ours.std()) == pytest.approx(float(theirs.std()),
                                                                                                 rel=0.05)
    assert not gpt2.h[0].attn.c_attn.bias.any() and not gpt2.h[0].attn.c_proj.bias.any()
    default = sasrec_transformer(SASRecConfig(d_model=d, block="gpt2")).transformer
    assert float(default.h[0].mlp.c_fc.weight.std()) == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("options", [dict(LAST, scale_embeddings=True), ENCODER], ids=["gpt2", "encoder"])
@pytest.mark.parametrize("mode", [{"testing": True}, {}])
def test_molar_id_branch_prepares_its_inputs_like_the_sasrec_it_takes_over(tiny_prepared, mode, options):
    from merlin_molar.models.dueg import small_decoder_config
    from merlin_molar.models.molar import MolarConfig, load_id_branch, molar_model

    torch.manual_seed(0)
    config = SASRecConfig(**options)
    sasrec = sasrec_model(tiny_prepared.schema, config).eval()
    molar_config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                               sasrec=config.to_dict(), max_length=20, id_branch="frozen")
    molar = molar_model(tiny_prepared.schema, torch.randn(tiny_prepared.item_cardinality, 24), molar_config).eval()
    load_id_branch(molar, sasrec)
    ids = right_padded([6, 20], 20, tiny_prepared.item_cardinality)
    id_body = molar.heads[0].body.id_body
    with torch.no_grad():
        expected = sasrec.heads[0].body({"item_id-list": ids}, **mode)
        got = id_body({"item_id-list": ids}, **mode)
    if config.block == "gpt2":
        assert (id_body[1].prepare_module.positions, id_body[1].prepare_module.scale) == ("last", 4.0)
    else:
        assert isinstance(id_body[1], SASRecEncoder)
    torch.testing.assert_close(got, expected)


def test_the_gpt2_sasrec_has_the_state_dict_of_models_saved_before_the_options(tiny_prepared):
    """Models saved before the input options must load strictly and train alike: the masking is registered once,
    under the block, and sits where it did in the parameter order."""
    names = list(sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, block="gpt2")).state_dict())
    assert not any("prepare_module.masking" in n for n in names)
    after_transformer = max(i for i, n in enumerate(names) if n.startswith("heads.0.body.1.prepare_module.transformer"))
    assert names[after_transformer + 1] == "heads.0.body.1.masking.masked_item_embedding"
    aligned = list(sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, block="gpt2",
                                                                   positions="last")).state_dict())
    assert "heads.0.body.1.prepare_module.masking.masked_item_embedding" in aligned  # it reads the targets


@pytest.mark.parametrize("option", [{"positions": "last"}, {"scale_embeddings": True}, {"init": "torch"}])
def test_the_gpt2_options_are_refused_with_the_encoder_block(option):
    with pytest.raises(ValueError, match="apply to block='gpt2' only"):
        SASRecConfig(**ENCODER, **option)
    with pytest.raises(ValueError, match="block must be one of"):
        SASRecConfig(**{**SMALL, "block": "lstm"})


def test_the_encoder_block_is_the_reference_sasrec_layers(tiny_prepared):
    """Item embeddings x sqrt(d) plus the position counted from the read-out item, then PyTorch's pre-norm
    TransformerEncoder with a causal mask and a final LayerNorm: recomputed here by hand, in evaluation mode."""
    torch.manual_seed(0)
    body = sasrec_body(tiny_prepared.schema, SASRecConfig(**ENCODER)).eval()
    block = body[1]
    layer = block.encoder.layers[0]
    assert (layer.norm_first, layer.linear1.out_features, layer.dropout.p) == (True, 64, 0.1)
    ids = right_padded([4, 20], 20, tiny_prepared.item_cardinality)
    with torch.no_grad():
        got = body({"item_id-list": ids})
        table = body[0].categorical_module.item_embedding_table.weight
        want = []
        for row, n in enumerate([4, 20]):
            h = table[ids[row, :n]] * math.sqrt(16) + block.positions.weight[20 - n:]
            for layer in block.encoder.layers:
                a = layer.norm1(h)[None]
                causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
                h = h + layer.self_attn(a, a, a, attn_mask=causal, need_weights=False)[0][0]
                h = h + layer.linear2(torch.nn.functional.gelu(layer.linear1(layer.norm2(h))))
            want.append(block.norm(h)[-1])
    torch.testing.assert_close(got[0, 3], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 19], want[1], rtol=1e-5, atol=1e-5)


def test_the_encoder_block_trains_under_the_next_item_task(tiny_prepared):
    """A few optimizer steps of the full SASRec model on one batch lower its loss (training mode: dropout on)."""
    torch.manual_seed(0)
    model = sasrec_model(tiny_prepared.schema, SASRecConfig(**ENCODER))
    ids = right_padded([6, 12, 20, 9], 20, tiny_prepared.item_cardinality)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model({"item_id-list": ids}, training=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_the_default_block_is_the_encoder():
    assert SASRecConfig().block == "encoder"
