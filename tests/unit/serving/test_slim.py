"""The slim tower forwards (merlin_molar.serving.slim) against the Hugging Face modules they replace: the
same last-position outputs (eager and TorchScript, ragged and full batches) for GPT-2 variants and every
covered decoder family, and ``None`` for what they do not cover."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, GPT2Config, GPT2Model

from merlin_molar.models.dueg import MolarBlock
from merlin_molar.serving.slim import SlimDecoder, SlimPreNorm, slim_tower

LENGTH = 12


def _check(slim, reference, width, lengths=(LENGTH, 5, 1)):
    """slim(x, last) == reference(x)[row, last] for a ragged batch, and for a full one with last=None."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(lengths), LENGTH, width, generator=generator)
    last = torch.tensor(lengths) - 1
    scripted = torch.jit.script(slim)
    with torch.no_grad():
        full = reference(x)
        want = full[torch.arange(len(lengths)), last]
        for module in (slim, scripted):
            torch.testing.assert_close(module(x, last), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(module(x, None), full[:, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(module(x[:1, :3], None), reference(x[:1, :3])[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(activation_function="gelu", n_head=1),  # as Transformers4Rec builds SASRec's
    dict(activation_function="gelu_new", n_head=2),
    dict(activation_function="relu", n_head=4, scale_attn_by_inverse_layer_idx=True),
    dict(activation_function="gelu", n_head=2, n_layer=1),
])
def test_slim_gpt2_equals_the_hugging_face_module(options):
    torch.manual_seed(0)
    config = GPT2Config(**{"n_embd": 16, "n_layer": 2, "n_positions": LENGTH, "vocab_size": 1, **options})
    model = GPT2Model(config).eval()
    slim = slim_tower("gpt2", model, LENGTH)
    assert isinstance(slim, SlimPreNorm)
    _check(slim, lambda x: model(inputs_embeds=x).last_hidden_state, 16)


def _decoder_config(family, **options):
    common = dict(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    config = AutoConfig.for_model(family, **{**common, **options})
    config._attn_implementation = "sdpa"
    return config


def _randomised(block):
    """Norm weights and biases away from their initial 1 / 0, so that a wrong or missing one shows."""
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name or name.endswith(".bias") or "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return block.eval()


@pytest.mark.parametrize("family, options", [
    ("qwen2", {}),
    ("qwen2", {"num_key_value_heads": 4, "rope_theta": 1e6}),
    ("llama", {"attention_bias": True}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("mistral", {"sliding_window": None, "hidden_act": "gelu"}),
    ("qwen3", {"head_dim": 16}),
    ("qwen2", {"num_hidden_layers": 1}),
])
def test_slim_decoder_equals_the_dueg(family, options):
    torch.manual_seed(0)
    block = _randomised(MolarBlock(_decoder_config(family, **options), mixed_precision=False))
    slim = slim_tower("dueg", block, LENGTH)
    assert isinstance(slim, SlimDecoder)
    _check(slim, block, 32)


def test_slim_decoder_with_the_user_token_and_lora():
    from peft import LoraConfig

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    block = _randomised(MolarBlock(_decoder_config("qwen2"), lora=lora, user_token=True, mixed_precision=False))
    slim = slim_tower("dueg", block, LENGTH)
    assert isinstance(slim, SlimDecoder) and slim.has_user_token
    _check(slim, block, 32)
    assert any("lora_" in name for name, _ in block.named_parameters())  # the model itself is left as it was


@pytest.mark.parametrize("family, options", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}),
    ("mistral", {"sliding_window": 4}),
    ("qwen2", {"hidden_act": "tanh"}),
])
def test_slim_decoder_declines_what_it_does_not_cover(family, options):
    block = MolarBlock(_decoder_config(family, **options), mixed_precision=False)
    assert slim_tower("dueg", block, LENGTH) is None


def test_slim_gpt2_declines_reordered_attention():
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=1, reorder_and_upcast_attn=True))
    assert slim_tower("gpt2", model, LENGTH) is None


def test_an_unsupported_decoder_type_is_declined():
    block = MolarBlock(AutoModel.from_config(AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=1)))
    assert slim_tower("dueg", block, LENGTH) is None
