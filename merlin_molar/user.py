"""DUEG, the Dynamic User Embedding Generator: an LLM over a user's history of content item embeddings.

Two pieces, both plain Transformers4Rec building blocks:

* :class:`ContentItemEmbedding` replaces the item-id embedding table of a ``TabularSequenceFeatures``
  input: it holds the precomputed multimodal item table (MIRM output) as a frozen buffer and projects it
  to the LLM width. Its ``weight`` is the projected table, so ``NextItemPredictionTask(weight_tying=True)``
  scores items by content. IDs never enter the LLM.
* :class:`MolarBlock` is a body block that runs a Hugging Face decoder (any ``AutoModel`` base model:
  Qwen2, Llama, ...; random init from a config or pretrained from a path; optional LoRA via peft) over
  the sequence as ``inputs_embeds`` and returns the causal per-position user embeddings. It drops in
  where ``TransformerBlock`` goes::

      inputs = content_item_inputs(schema, item_table, d_model=llm_config.hidden_size)
      body = tr.SequentialBlock(inputs, MolarBlock(llm_config))
      model = tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True), inputs=inputs))
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema, Tags
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers4rec.torch.block.base import BlockBase

from merlin_molar.errors import MolarDataError

LLMSpec = Union[str, dict, PretrainedConfig, PreTrainedModel]


class ContentItemEmbedding(torch.nn.Module):
    """Frozen content item table -> trainable projection; usable as a T4Rec item embedding table.

    ``table`` is ``[item_cardinality, content_dim]`` in Categorify id order (row 0 = padding)."""

    def __init__(self, table: torch.Tensor, dim: int, padding_idx: int = 0):
        super().__init__()
        if table.dim() != 2:
            raise MolarDataError("item table", f"expected a 2-D [items, dim] table, got shape {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise MolarDataError("item table", "contains NaN or infinite values")
        self.register_buffer("table", table.detach().float().clone(), persistent=False)
        self.projection = torch.nn.Sequential(torch.nn.Linear(table.size(1), dim), torch.nn.LayerNorm(dim))
        self.num_embeddings, self.embedding_dim = table.size(0), dim
        self.padding_idx = padding_idx
        self._cached_weight = None

    @property
    def weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training:
            self._cached_weight = None
            return self.projection(self.table)
        # Evaluation scores every batch against the whole projected table: project it once, and again
        # only when the projection's parameters change (their version counters move on every update).
        key = tuple(p._version for p in self.projection.parameters()) + (self.table.device,)
        if getattr(self, "_cached_key", None) != key or self._cached_weight is None:
            self._cached_weight, self._cached_key = self.projection(self.table), key
        return self._cached_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and int(ids.max()) >= self.num_embeddings:
            raise MolarDataError("item ids", f"id {int(ids.max())} is outside the item table ({self.num_embeddings} rows)")
        out = self.projection(self.table[ids.long()])
        return out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)


def content_item_inputs(
    schema: Schema, item_table: torch.Tensor, d_model: int, max_length: Optional[int] = None
) -> tr.TabularSequenceFeatures:
    """A causal-masked ``TabularSequenceFeatures`` whose item embeddings come from the content table."""
    item_col = schema.select_by_tag(Tags.ITEM_ID).column_names
    if len(item_col) != 1:
        raise MolarDataError("schema", f"expected exactly one ITEM_ID column, found {item_col}")
    item_col = item_col[0]
    cardinality = schema[item_col].int_domain.max + 1
    if item_table.size(0) != cardinality:
        raise MolarDataError(
            "item table", f"has {item_table.size(0)} rows but the schema's item id domain has {cardinality}"
        )
    inputs = tr.TabularSequenceFeatures.from_schema(
        schema.select_by_name([item_col]),
        max_sequence_length=max_length,
        aggregation="concat",
        masking="causal",
        embedding_dim_default=d_model,
    )
    inputs.categorical_module.embedding_tables[item_col] = ContentItemEmbedding(item_table, d_model)
    return inputs


def build_llm(spec: LLMSpec, attn_implementation: str = "sdpa", torch_dtype=None) -> PreTrainedModel:
    """A Hugging Face base decoder (no LM head) from a config, a config dict, a model, or a path/hub id."""
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
        model = AutoModel.from_pretrained(spec, attn_implementation=attn_implementation, torch_dtype=torch_dtype)
    if hasattr(model, "get_decoder") and not hasattr(model.config, "hidden_size"):
        model = model.get_decoder()
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
        a local path / hub id of a pretrained model (its base model is used; word embeddings are unused).
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
    ):
        super().__init__()
        model = build_llm(llm)
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
