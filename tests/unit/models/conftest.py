"""Models-tier fixtures: a tiny pretrained decoder LLM, saved both as a Hugging Face directory and as a GGUF file
(the format of the packaged SmolLM2), to start the DUEG from without loading a 135M-parameter model."""
from types import SimpleNamespace

import pytest
import torch

from merlin_molar.items.testing import write_llama_gguf


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
    write_llama_gguf(root / "tiny-llama.gguf", model)
    model.save_pretrained(root / "hf")
    return SimpleNamespace(model=model, gguf=root / "tiny-llama.gguf", hf_dir=root / "hf")
