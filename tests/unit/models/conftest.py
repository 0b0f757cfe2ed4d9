"""Models-tier fixtures: a tiny pretrained decoder LLM, saved both as a Hugging Face directory and as a GGUF file
(the format of the packaged SmolLM2), to start the DUEG from without loading a 135M-parameter model."""
from types import SimpleNamespace

import pytest
import torch

from merlin_molar.items.testing import llama_cpp_permute

# Hugging Face Llama module -> llama.cpp GGUF tensor name (what transformers' GGUF loader maps back)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def save_llama_gguf(path, model) -> None:
    """Write a ``LlamaModel``'s config and float32 weights as a GGUF file, as llama.cpp's converter lays them out."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if key == "embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "norm.weight":
            name = "output_norm.weight"
        else:  # layers.<i>.<module>.weight
            _, index, *module, leaf = key.split(".")
            module = ".".join(module)
            name = f"blk.{index}.{GGUF_NAMES[module]}.{leaf}"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(name, array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random 3-layer ``LlamaModel`` (hidden 16, 4 heads, 2 KV heads: grouped-query attention as SmolLM2)
    and where it is saved: ``gguf`` (one file) and ``hf_dir`` (``save_pretrained``). Never mutate ``model``."""
    from transformers import LlamaConfig, LlamaModel

    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    model = LlamaModel(config).eval()
    save_llama_gguf(root / "tiny-llama.gguf", model)
    model.save_pretrained(root / "hf")
    return SimpleNamespace(model=model, gguf=root / "tiny-llama.gguf", hf_dir=root / "hf")
