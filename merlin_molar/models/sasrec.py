"""ID-based sequential models as Transformers4Rec building blocks.

SASRec (Kang & McAuley, 2018) is a causal, pre-norm transformer over item-id embeddings trained to
predict the next item at every position. In Transformers4Rec terms it is a ``TabularSequenceFeatures``
input with causal (``clm``) masking, a GPT-2 ``TransformerBlock`` (pre-norm, learned positions) and a
weight-tied next-item head. :func:`sasrec_body` returns the body so it can serve as the ID branch of
Molar's post-alignment; :func:`sasrec_model` adds the full-ranking next-item task.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema, Tags
from transformers4rec.torch.block.transformer import TransformerPrepare

from merlin_molar.models.task import FullRankingNextItemTask


@dataclass
class SASRecConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    max_length: int = 200

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a history and a target), got {self.max_length}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SASRecConfig":
        return cls(**values)


def item_id_inputs(schema: Schema, config) -> tr.TabularSequenceFeatures:
    """Item-id embeddings of width ``config.d_model`` (std d^-0.5) with causal masking, for sequences of up to
    ``config.max_length`` items (the inputs of every ID model: SASRec, GRU4Rec)."""
    std = config.d_model**-0.5
    item_col = schema.select_by_tag(Tags.ITEM_ID).column_names[0]
    return tr.TabularSequenceFeatures.from_schema(
        schema,
        max_sequence_length=config.max_length,
        aggregation="concat",
        masking="causal",
        embedding_dim_default=config.d_model,
        embeddings_initializers={item_col: lambda w: torch.nn.init.normal_(w, 0.0, std)},
    )


class CausalPrepare(TransformerPrepare):
    """Pass embeddings straight to GPT-2, which applies its own causal mask.

    T4Rec's default GPT2Prepare adds a lower-triangular ``head_mask`` that repeats the causal mask and,
    since transformers 4.36, forces the slow eager attention path instead of SDPA."""

    def forward(self, inputs_embeds):
        return {"inputs_embeds": inputs_embeds}


def sasrec_transformer(config: SASRecConfig) -> tr.TransformerBlock:
    gpt2 = tr.GPT2Config.build(
        d_model=config.d_model,
        n_head=config.n_heads,
        n_layer=config.n_layers,
        total_seq_length=config.max_length,
        dropout=config.dropout,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    return tr.TransformerBlock(gpt2, prepare_module=CausalPrepare)


def sasrec_body(schema: Schema, config: Optional[SASRecConfig] = None) -> tr.SequentialBlock:
    """Item-id inputs >> causal transformer: per-position ID user embeddings ``[batch, length, d_model]``."""
    config = config or SASRecConfig()
    inputs = item_id_inputs(schema, config)
    transformer = sasrec_transformer(config)
    transformer.masking = inputs.masking
    return tr.SequentialBlock(inputs, transformer)


def sasrec_model(schema: Schema, config: Optional[SASRecConfig] = None) -> tr.Model:
    """SASRec with weight-tied full-softmax cross-entropy at every position and full-ranking evaluation."""
    return full_ranking_model(sasrec_body(schema, config or SASRecConfig()))


def full_ranking_model(body: tr.SequentialBlock) -> tr.Model:
    """An ID body (item-id inputs >> sequence layer) under the weight-tied full-ranking next-item task."""
    # softmax_temperature=0 skips T4Rec's division of the [positions, items] logits by the default
    # temperature 1.0: same loss, one full pass over the largest tensor less (~14% of a CPU step on ML-1M).
    task = FullRankingNextItemTask(weight_tying=True, softmax_temperature=0)
    head = tr.Head(body, task, inputs=body.inputs)
    return tr.Model(head)
