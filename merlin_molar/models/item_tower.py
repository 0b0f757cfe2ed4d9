"""The content item tower: the precomputed MIRM item table, frozen, behind a trainable projection.

It lives with the models, not in :mod:`merlin_molar.items`, because it is part of the trained network:
:mod:`merlin_molar.items` produces the frozen table offline (one MLLM pass over the catalogue), while this
tower's projection is learned together with the DUEG and scores items at training and serving time.

:class:`ContentItemEmbedding` replaces the item-id embedding table of a ``TabularSequenceFeatures`` input:
it holds the MIRM table as a frozen buffer and projects it to the LLM width. Its ``weight`` is the
projected table, so ``NextItemPredictionTask(weight_tying=True)`` scores items by content. IDs never
enter the LLM.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema, Tags

from merlin_molar.errors import MolarDataError, check_choice

ADAPTORS = ("linear", "moe")


class WhitenedMoEAdaptor(torch.nn.Module):
    """A mixture of parametric-whitening experts over frozen text vectors, as UniSRec's MoE adaptor:
    ``LayerNorm(sum_k g_k(x) (x - b_k) W_k)`` with a softmax gate ``g`` and dropout on the input vector.
    The gate starts uniform (zero weights), so training starts from the average of the experts."""

    def __init__(self, in_dim: int, dim: int, experts: int = 8, dropout: float = 0.2):
        super().__init__()
        if experts < 1:
            raise ValueError(f"adaptor_experts must be at least 1, got {experts}")
        self.dropout = torch.nn.Dropout(dropout)
        self.bias = torch.nn.Parameter(torch.zeros(experts, in_dim))
        self.weight = torch.nn.Parameter(torch.empty(experts, in_dim, dim).normal_(0.0, 0.02))
        self.gate = torch.nn.Linear(in_dim, experts, bias=False)
        torch.nn.init.zeros_(self.gate.weight)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        gates = torch.softmax(self.gate(x), dim=-1)  # [..., K]
        experts = torch.einsum("...d,kde->...ke", x, self.weight) - torch.einsum("kd,kde->ke", self.bias, self.weight)
        return self.norm((gates.unsqueeze(-1) * experts).sum(-2))


def content_adaptor(in_dim: int, dim: int, kind: str = "linear", experts: int = 8, dropout: float = 0.2):
    """The trainable map from the frozen MIRM vectors to the LLM width: ``"linear"`` (Linear + LayerNorm)
    or ``"moe"`` (:class:`WhitenedMoEAdaptor`)."""
    if kind == "linear":
        return torch.nn.Sequential(torch.nn.Linear(in_dim, dim), torch.nn.LayerNorm(dim))
    check_choice("content_adaptor", kind, ADAPTORS)
    return WhitenedMoEAdaptor(in_dim, dim, experts, dropout)


class ContentItemEmbedding(torch.nn.Module):
    """Frozen content item table -> trainable adaptor; usable as a T4Rec item embedding table.

    ``table`` is ``[item_cardinality, content_dim]`` in Categorify id order (row 0 = padding); ``adaptor``
    (with ``experts`` and ``dropout`` for ``"moe"``) is passed to :func:`content_adaptor`."""

    def __init__(self, table: torch.Tensor, dim: int, padding_idx: int = 0,
                 adaptor: Literal["linear", "moe"] = "linear", experts: int = 8, dropout: float = 0.2):
        super().__init__()
        if table.dim() != 2:
            raise MolarDataError("item table", f"expected a 2-D [items, dim] table, got shape {tuple(table.shape)}")
        if not torch.isfinite(table).all():
            raise MolarDataError("item table", "contains NaN or infinite values")
        self.register_buffer("table", table.detach().float().clone(), persistent=False)
        self.projection = content_adaptor(table.size(1), dim, adaptor, experts, dropout)
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
            raise MolarDataError(
                "item ids", f"id {int(ids.max())} is outside the item table ({self.num_embeddings} rows)"
            )
        out = self.projection(self.table[ids.long()])
        return out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)


def content_item_inputs(
    schema: Schema, item_table: torch.Tensor, d_model: int, max_length: Optional[int] = None, **adaptor
) -> tr.TabularSequenceFeatures:
    """A causal-masked ``TabularSequenceFeatures`` whose item embeddings come from the content table
    (``adaptor``: ``adaptor``, ``experts``, ``dropout`` of :class:`ContentItemEmbedding`)."""
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
    inputs.categorical_module.embedding_tables[item_col] = ContentItemEmbedding(item_table, d_model, **adaptor)
    return inputs
