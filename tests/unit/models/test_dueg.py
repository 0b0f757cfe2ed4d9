import pytest
import torch
import transformers4rec.torch as tr
from peft import LoraConfig

from merlin_molar.errors import MolarDataError
from merlin_molar.models.dueg import MolarBlock, small_decoder_config
from merlin_molar.models.item_tower import ContentItemEmbedding, WhitenedMoEAdaptor, content_item_inputs


@pytest.fixture(scope="module")
def schema(tiny_prepared):
    return tiny_prepared.schema


def item_table(n, dim=12, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_content_item_embedding_is_a_frozen_table_with_a_trainable_projection():
    emb = ContentItemEmbedding(item_table(10), dim=6)
    assert "table" not in dict(emb.named_parameters())
    ids = torch.tensor([[3, 4, 0]])
    out = emb(ids)
    assert out.shape == (1, 3, 6) and torch.all(out[0, 2] == 0)
    torch.testing.assert_close(out[0, :2], emb.weight[[3, 4]])
    out.sum().backward()
    assert emb.projection[0].weight.grad is not None
    with pytest.raises(MolarDataError, match="outside the item table"):
        emb(torch.tensor([[10]]))
    with pytest.raises(MolarDataError, match="NaN"):
        ContentItemEmbedding(torch.full((3, 2), float("nan")), 4)


def test_moe_adaptor_mixes_whitened_experts_and_trains():
    torch.manual_seed(0)
    adaptor = WhitenedMoEAdaptor(12, 6, experts=3, dropout=0.0)
    x = item_table(5)
    with torch.no_grad():
        adaptor.gate.weight.normal_()
        adaptor.bias.normal_()
    gates = torch.softmax(x @ adaptor.gate.weight.T, -1)
    mixed = sum(gates[:, k : k + 1] * ((x - adaptor.bias[k]) @ adaptor.weight[k]) for k in range(3))
    torch.testing.assert_close(adaptor(x), adaptor.norm(mixed), rtol=1e-5, atol=1e-5)
    adaptor(x).pow(2).sum().backward()
    for p in (adaptor.weight, adaptor.bias, adaptor.gate.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_moe_content_embedding_drops_out_only_in_training():
    emb = ContentItemEmbedding(item_table(10), dim=6, adaptor="moe", experts=4, dropout=0.5)
    ids = torch.tensor([[3, 4]])
    emb.eval()
    torch.testing.assert_close(emb(ids), emb(ids))
    torch.testing.assert_close(emb(ids)[0], emb.weight[[3, 4]])
    emb.train()
    torch.manual_seed(0)
    assert not torch.allclose(emb(ids), emb(ids))
    with pytest.raises(ValueError, match="content_adaptor"):
        ContentItemEmbedding(item_table(10), dim=6, adaptor="mlp")


def test_table_rows_must_match_the_schema(schema):
    with pytest.raises(MolarDataError, match="rows but the schema"):
        content_item_inputs(schema, item_table(10), 16)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_molar_block_drops_in_where_transformer_block_goes(schema, tiny_prepared, family):
    torch.manual_seed(0)
    config = small_decoder_config(family, hidden_size=16, num_layers=1)
    inputs = content_item_inputs(schema, item_table(tiny_prepared.item_cardinality), 16, max_length=20)
    body = tr.SequentialBlock(inputs, MolarBlock(config))
    model = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True), inputs=inputs))
    batch = {"item_id-list": torch.randint(3, tiny_prepared.item_cardinality, (4, 20))}
    batch["item_id-list"][1, 10:] = 0
    out = model(batch, training=True)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    llm = body[1].llm
    assert all(p.grad is not None for p in llm.layers[0].parameters())
    assert inputs.categorical_module.item_embedding_table.projection[0].weight.grad is not None


@pytest.mark.parametrize("user_token", [False, True])
def test_user_embeddings_are_causal(user_token):
    torch.manual_seed(0)
    block = MolarBlock(small_decoder_config(hidden_size=16, num_layers=2), user_token=user_token).eval()
    x = torch.randn(2, 6, 16)
    y = x.clone()
    y[:, 4] += 1.0
    with torch.no_grad():
        a, b = block(x), block(y)
    assert a.shape == (2, 6, 16)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_lora_trains_only_adapters_and_still_reads_inputs_embeds():
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    block = MolarBlock(small_decoder_config(hidden_size=16, num_layers=1), lora=lora)
    trainable = [n for n, p in block.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert not torch.allclose(block(x), block(x + 1))


def test_projected_table_is_cached_during_evaluation_and_refreshed_after_an_update():
    emb = ContentItemEmbedding(item_table(10), dim=6).eval()
    with torch.no_grad():
        first = emb.weight
        assert emb.weight is first  # projected once per evaluation
        emb.projection[0].bias.add_(1.0)  # an optimizer step changes the parameter's version
        second = emb.weight
    assert second is not first and not torch.allclose(second, first)
    emb.train()
    assert emb.weight.requires_grad  # training always projects afresh, with gradients


def first_layers_of(model, layers: int):
    """An independent reference: a fresh model of ``layers`` layers loaded with ``model``'s first ones."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    reference = type(model)(config).eval()
    missing, _ = reference.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return reference


@pytest.mark.parametrize("source", ["gguf", "hf_dir"])
@pytest.mark.parametrize("layers", [None, 2])
def test_a_pretrained_dueg_starts_from_the_files_weights(tiny_llama, source, layers):
    block = MolarBlock(str(getattr(tiny_llama, source)), layers=layers, mixed_precision=False).eval()
    kept = layers or 3
    llm = block.llm
    assert len(llm.layers) == kept and llm.config.num_hidden_layers == kept
    assert all(p.dtype == torch.float32 for p in llm.parameters())  # a GGUF file is dequantised to float32
    assert llm.get_input_embeddings().num_embeddings == 1  # the word embedding table is dropped
    expected = {k: v for k, v in tiny_llama.model.state_dict().items() if k != "embed_tokens.weight"
                and not any(k.startswith(f"layers.{i}.") for i in range(kept, 3))}
    got = {k: v for k, v in llm.state_dict().items() if k != "embed_tokens.weight"}
    assert got.keys() == expected.keys()
    for key, weight in expected.items():  # q/k come back un-permuted from the GGUF layout
        torch.testing.assert_close(got[key], weight, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = first_layers_of(tiny_llama.model, kept)(inputs_embeds=x).last_hidden_state
        torch.testing.assert_close(block(x), reference)


@pytest.mark.parametrize("layers", [0, 4, True, 1.5])
def test_llm_layers_must_lie_within_the_llm(tiny_llama, layers):
    with pytest.raises(ValueError, match=r"llm_layers must be between 1 and 3 \(the LLM's layers\)"):
        MolarBlock(str(tiny_llama.hf_dir), layers=layers)


def test_lora_on_a_pretrained_dueg_freezes_its_weights(tiny_llama):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    block = MolarBlock(str(tiny_llama.gguf), lora=lora, layers=2, mixed_precision=False)
    trainable = {n for n, p in block.llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = block.llm.get_base_model()
    assert len(base.layers) == 2
    torch.testing.assert_close(base.layers[1].self_attn.v_proj.base_layer.weight,
                               tiny_llama.model.layers[1].self_attn.v_proj.weight, rtol=0, atol=0)
    x = torch.randn(1, 5, 16)
    block(x).sum().backward()
    assert all(p.grad is None for n, p in block.llm.named_parameters() if "lora_" not in n)


def test_bad_pretrained_llms_are_told_by_name(tmp_path, tiny_llama):
    from transformers import BertConfig, BertModel

    from merlin_molar.items.testing import save_tiny_gguf

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_llama.gguf.read_bytes()[:2000])
    with pytest.raises(MolarDataError, match="cut.gguf: truncated or damaged GGUF file"):
        MolarBlock(str(cut))
    with pytest.raises(MolarDataError, match="clip.gguf: architecture 'clip'"):
        MolarBlock(str(save_tiny_gguf(tmp_path / "clip.gguf", "clip")))
    BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path / "bert")
    with pytest.raises(MolarDataError, match="architecture 'bert' is not a decoder-only LLM"):
        MolarBlock(str(tmp_path / "bert"))  # bidirectional: the user embedding at t would see the items after t
