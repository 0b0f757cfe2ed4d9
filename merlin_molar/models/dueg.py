"""DUEG, the Dynamic User Embedding Generator: an LLM over a user's history of content item embeddings.

:class:`MolarBlock` is a body block that runs a Hugging Face decoder (any ``AutoModel`` base model:
  Qwen2, Llama, ...; random init from a config, or pretrained: the packaged SmolLM2, a GGUF file, a
  directory or hub id, optionally cut to its first layers; optional LoRA via peft) over
  the sequence as ``inputs_embeds`` and returns the causal per-position user embeddings. It drops in
  where ``TransformerBlock`` goes::

      from merlin_molar.models.item_tower import content_item_inputs

      inputs = content_item_inputs(schema, item_table, d_model=llm_config.hidden_size)
      body = tr.SequentialBlock(inputs, MolarBlock(llm_config))
      model = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True), inputs=inputs))
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers4rec.torch.block.base import BlockBase

from merlin_molar.errors import MolarDataError

LLMSpec = Union[str, dict, PretrainedConfig, PreTrainedModel]


def load_pretrained_llm(name, attn_implementation: str = "sdpa", dtype=torch.float32) -> PreTrainedModel:
    """The base model (no LM head) of a pretrained decoder LLM, in ``dtype`` (float32: the DUEG trains in it and
    autocasts to bf16 on CUDA; a GGUF file is dequantised to it).

    ``name``: ``"smollm2"`` (SmolLM2-135M-Instruct, packaged), a GGUF file, or a Hugging Face model directory
    or hub id. A damaged GGUF file or a model that is not a decoder-only LLM raises :class:`MolarDataError`
    naming it: the DUEG needs causal attention, which an encoder (BERT, ...) would silently lack."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from merlin_molar.items.encoders import check_gguf, is_gguf, pretrained_location, resolve_encoder_name

    path = str(Path(resolve_encoder_name(name)).expanduser())
    if is_gguf(path):
        check_gguf(path)
    else:
        config = AutoConfig.from_pretrained(path)
        if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.model_type in
                MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)):
            raise MolarDataError(name, f"architecture {config.model_type!r} is not a decoder-only LLM (e.g. llama, "
                                       "qwen2): the DUEG needs causal attention")
    return AutoModel.from_pretrained(**pretrained_location(path), dtype=dtype, attn_implementation=attn_implementation)


def keep_first_layers(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """``model`` (a base decoder) with only its first ``layers`` decoder layers, its config saying so."""
    decoder_layers = getattr(model, "layers", None)
    if not isinstance(decoder_layers, torch.nn.ModuleList):
        raise ValueError(f"llm_layers: {type(model).__name__} has no list of decoder layers to keep the first of")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(decoder_layers):
        raise ValueError(f"llm_layers must be between 1 and {len(decoder_layers)} (the LLM's layers), got {layers!r}")
    model.layers = decoder_layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def build_llm(spec: LLMSpec, attn_implementation: str = "sdpa", dtype=torch.float32,
              layers: Optional[int] = None) -> PreTrainedModel:
    """A Hugging Face base decoder (no LM head) from a config, a config dict, a model, or a pretrained one
    (:func:`load_pretrained_llm`: ``"smollm2"``, a GGUF file, a directory or hub id); ``layers`` keeps only
    its first decoder layers (None: all)."""
    if isinstance(spec, PreTrainedModel):
        model = spec
    elif isinstance(spec, PretrainedConfig):
        spec._attn_implementation = attn_implementation
        model = AutoModel.from_config(spec)
    elif isinstance(spec, dict):
        config = dict(spec)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        config._attn_implementation = attn_implementation
        model = AutoModel.from_config(config)
    else:
        model = load_pretrained_llm(spec, attn_implementation, dtype)
    if hasattr(model, "get_decoder") and not hasattr(model.config, "hidden_size"):
        model = model.get_decoder()
    if layers is not None:
        model = keep_first_layers(model, layers)
    # The DUEG reads inputs_embeds only: drop the word embedding table (the paper removes it too; for
    # Qwen2-1.5B it is 233M parameters). A frozen one-row table keeps HF/peft helpers working.
    words = model.get_input_embeddings()
    if words is not None and words.num_embeddings > 1:
        model.set_input_embeddings(torch.nn.Embedding(1, words.embedding_dim).requires_grad_(False))
    return model


def small_decoder_config(
    family: str = "qwen2", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, max_positions: int = 512
) -> PretrainedConfig:
    """A small randomly initialised decoder config (CPU runs and tests). The word embedding table is unused
    (the DUEG reads ``inputs_embeds``), so the vocabulary is kept tiny."""
    common = dict(
        vocab_size=8,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    if family not in ("qwen2", "llama", "mistral", "qwen3"):
        raise ValueError(f"unknown decoder family {family!r}")
    return AutoConfig.for_model(family, **common)


class MolarBlock(BlockBase):
    """The DUEG: an LLM over item embeddings, returning per-position content user embeddings.

    Parameters
    ----------
    llm: a ``PretrainedConfig`` (random init), a config dict with ``model_type``, a ``PreTrainedModel``, or
        a pretrained decoder: ``"smollm2"`` (packaged), a GGUF file, a local directory or hub id (its base model
        is used, in float32; word embeddings are unused).
    layers: keep only the first ``layers`` decoder layers (None: all), e.g. 2 of SmolLM2's 30 on a CPU.
    lora: an optional ``peft.LoraConfig``; the LLM is wrapped with ``task_type="FEATURE_EXTRACTION"`` so
        that ``inputs_embeds`` reaches it.
    user_token: the paper's ``[User]`` token. A learned embedding is placed after every history position
        (``x_1, U, x_2, U, ...``), and the hidden state at each ``U`` is that prefix's user embedding, so
        causal training still predicts the next item at every position (costs 2x sequence length).
    mixed_precision: run the LLM under bf16 autocast on CUDA (T4Rec casts inputs to fp32).
    """

    def __init__(
        self,
        llm: LLMSpec,
        lora=None,
        user_token: bool = False,
        mixed_precision: bool = True,
        gradient_checkpointing: bool = False,
        layers: Optional[int] = None,
    ):
        super().__init__()
        model = build_llm(llm, layers=layers)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if lora is not None:
            from peft import get_peft_model

            lora.task_type = "FEATURE_EXTRACTION"
            model = get_peft_model(model, lora)
        self.llm = model
        self.hidden_size = model.config.hidden_size
        self.user_token = torch.nn.Parameter(torch.randn(self.hidden_size) * 0.02) if user_token else None
        self.mixed_precision = mixed_precision

    def _autocast(self, device: torch.device):
        if self.mixed_precision and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, inputs_embeds: torch.Tensor, training: bool = False, testing: bool = False, **kwargs):
        x = inputs_embeds
        batch, length, _ = x.shape
        if self.user_token is not None:
            user = self.user_token.to(x.dtype).expand(batch, length, -1)
            x = torch.stack([x, user], dim=2).reshape(batch, 2 * length, -1)
        llm_dtype = next(self.llm.parameters()).dtype
        with self._autocast(x.device):
            hidden = self.llm(inputs_embeds=x.to(llm_dtype)).last_hidden_state
        if self.user_token is not None:
            hidden = hidden[:, 1::2]
        return hidden.float()

    def forward_output_size(self, input_size):
        return torch.Size([input_size[0], input_size[1], self.hidden_size])
