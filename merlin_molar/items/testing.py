"""Randomly initialised Qwen-family backbones built offline, for tests and benchmarks.

No hub download works on the project's machines, so the MLLM code paths run on real Hugging Face model
classes and processors with random weights: a byte-level BPE tokenizer trained here with the
``tokenizers`` library (carrying the Qwen special tokens), the real ``Qwen2VLImageProcessor``, and a
config of any size. Everything is saved with ``save_pretrained`` so encoders load it like a checkpoint.

    >>> from merlin_molar.items.testing import save_random_backbone
    >>> path = save_random_backbone("/tmp/tiny-qwen2-vl", "qwen2_vl", corpus=["Toy Story (1995)"])  # doctest: +SKIP
    >>> bad = save_tiny_gguf("/tmp/clip.gguf", "clip")  # a GGUF file of an architecture transformers cannot load
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PROMPT_WORDS = "Compress the text and image into embedding. Item information: title genres year Item Image:"


def train_qwen_tokenizer(corpus: Iterable[str], vocab_size: int = 600):
    """A ``Qwen2TokenizerFast`` with a byte-level BPE trained on ``corpus`` and Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([PROMPT_WORDS, *corpus], trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
TINY_VISION = dict(depth=2, hidden_size=32, num_heads=4)

# Qwen2-VL-2B-Instruct's published shapes (config.json of the release), used for the GPU benchmark.
QWEN2_VL_2B_TEXT = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)


def qwen_vl_config(model_type: str, tokenizer, text: Dict = TINY_TEXT, vision: Dict = TINY_VISION):
    """A ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` whose special-token ids come from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(text)
    text.setdefault("vocab_size", len(tokenizer))
    text.setdefault("max_position_embeddings", 2048)
    text.setdefault("tie_word_embeddings", True)
    # mrope splits each head's rotary half into temporal / height / width sections (Qwen2-VL: 16/24/24 of 64)
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    spatial = half // 4 * 3 // 2
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [half - 2 * spatial, spatial, spatial]}
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **vision)
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if model_type == "qwen2_vl":
        vision.setdefault("embed_dim", vision["hidden_size"])
        vision.setdefault("mlp_ratio", 2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
    if model_type == "qwen2_5_vl":
        vision.setdefault("out_hidden_size", text["hidden_size"])
        vision.setdefault("intermediate_size", 2 * vision["hidden_size"])
        vision.setdefault("fullatt_block_indexes", [vision["depth"] - 1])
        vision.setdefault("window_size", 112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    raise ValueError(f"unknown Qwen-VL model type {model_type!r}")


def image_processor(max_pixels: int = 448 * 448):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)


def qwen_vl_processor(model_type: str, tokenizer, max_pixels: int = 448 * 448):
    """The model's real processor class (image-only where torchvision is missing, see ``processors``)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    from merlin_molar.items.processors import image_only_processor_class

    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[model_type]
    try:
        return cls(image_processor=image_processor(max_pixels), tokenizer=tokenizer)
    except TypeError:  # no torchvision: no video processor can exist
        return image_only_processor_class(cls)(image_processor=image_processor(max_pixels), tokenizer=tokenizer)


def save_random_backbone(
    path,
    model_type: str,
    corpus: Iterable[str] = (),
    seed: int = 0,
    text: Optional[Dict] = None,
    vision: Optional[Dict] = None,
    vocab_size: int = 600,
    device: str = "cpu",
    dtype=None,
) -> Path:
    """Build and ``save_pretrained`` a random model of ``model_type`` (``qwen2_vl``, ``qwen2_5_vl``,
    ``qwen2`` or ``llama``) with its tokenizer/processor into ``path``; returns ``path``. Big shapes are
    best built with ``device="cuda", dtype=torch.bfloat16``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, Qwen2Config

    path = Path(path)
    tokenizer = train_qwen_tokenizer(corpus, vocab_size)
    torch.manual_seed(seed)
    build = {"dtype": dtype} if dtype is not None else {}
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        config = qwen_vl_config(model_type, tokenizer, text or TINY_TEXT, vision or TINY_VISION)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, **build)
        qwen_vl_processor(model_type, tokenizer).save_pretrained(str(path))
    else:
        config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[model_type]
        sizes = dict(text or TINY_TEXT)
        config = config_cls(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048, **sizes)
        if model_type == "llama":
            config.pad_token_id = tokenizer.pad_token_id
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **build)
        tokenizer.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return path


def save_tiny_gguf(path, architecture: str = "llama", context_length: int = 64) -> Path:
    """A GGUF file with ``architecture``'s header keys and one small tensor (no tokenizer): enough for
    transformers to read its config, for tests of how a GGUF file of the wrong kind, or a damaged one, is told."""
    import gguf
    import numpy as np

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(context_length)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((100, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(weight, n_head: int):
    """llama.cpp's row order for a llama q/k projection (transformers undoes it when it loads a GGUF file)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def save_llama_gguf(hf_dir, path) -> Path:
    """Write the llama model and byte-level BPE tokenizer saved in ``hf_dir`` (e.g. by
    :func:`save_random_backbone` with ``model_type="llama"``) as one float32 GGUF file (:func:`write_llama_gguf`),
    so that ``from_pretrained(..., gguf_file=...)`` reads back the same model and tokenizer: a small stand-in for
    a packaged GGUF LLM such as SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    if model.config.model_type != "llama":
        raise ValueError(f"{hf_dir} holds a {model.config.model_type!r} model, not a llama")
    return write_llama_gguf(path, model, AutoTokenizer.from_pretrained(str(hf_dir)), name="tiny-llama")


def write_llama_gguf(path, model, tokenizer=None, name: str = None) -> Path:
    """Write a llama ``model`` (``LlamaModel`` or ``LlamaForCausalLM``): its config, float32 weights and, when
    given, its byte-level BPE ``tokenizer``, as one GGUF file laid out the way llama.cpp's converter does it."""
    import json

    import gguf
    import numpy as np

    path, config = Path(path), model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    if name:
        writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        vocab = [token for token, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
        special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(vocab)
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_bos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    prefix = "" if hasattr(model, "lm_head") else "model."  # the map knows the causal-LM's parameter names
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.detach().float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(names.get_name(prefix + key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
