"""GRU4Rec (Hidasi et al., 2016) as Transformers4Rec building blocks: a second ID-based sequential model.

The inputs, the masking and the task are SASRec's (:mod:`merlin_molar.models.sasrec`): item-id embeddings
of width ``d_model`` from ``TabularSequenceFeatures`` with causal (``clm``) masking, and the weight-tied
full-ranking next-item task. Only the sequence layer differs: instead of a ``TransformerBlock``, a
``torch.nn.GRU`` wrapped in ``tr.Block``, the way Transformers4Rec builds its RNN bodies
(``tr.Block(torch.nn.GRU(...), [None, max_length, d_model])`` in its examples). The wrapped module runs the
GRU batch-first and returns only the per-position outputs, so the body yields ``[batch, length, d_model]``
user embeddings exactly like SASRec's and can serve as Molar's ID branch. A GRU is causal by construction and
sequences are right-padded, so the padding after a history's last item never changes its user embedding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema

from merlin_molar.models.sasrec import full_ranking_model, item_id_inputs


@dataclass
class GRU4RecConfig:
    d_model: int = 64
    n_layers: int = 1
    dropout: float = 0.2
    max_length: int = 200

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a history and a target), got {self.max_length}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GRU4RecConfig":
        return cls(**values)


class GRULayers(torch.nn.Module):
    """Dropout on the input embeddings, then a batch-first ``torch.nn.GRU`` (hidden size = input size);
    returns the outputs at every position, ``inputs_embeds [b, L, d] -> [b, L, d]`` (the final hidden state
    that ``torch.nn.GRU`` also returns is dropped: the task reads every position)."""

    def __init__(self, d_model: int, n_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.gru = torch.nn.GRU(
            d_model, d_model, num_layers=n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )

    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        outputs, _ = self.gru(self.dropout(inputs_embeds))
        return outputs


def gru4rec_body(schema: Schema, config: Optional[GRU4RecConfig] = None) -> tr.SequentialBlock:
    """Item-id inputs >> GRU: per-position ID user embeddings ``[batch, length, d_model]``."""
    config = config or GRU4RecConfig()
    inputs = item_id_inputs(schema, config)
    gru = GRULayers(config.d_model, config.n_layers, config.dropout)
    gru = tr.Block(gru, [None, config.max_length, config.d_model])
    return tr.SequentialBlock(inputs, gru)


def gru4rec_model(schema: Schema, config: Optional[GRU4RecConfig] = None) -> tr.Model:
    """GRU4Rec with weight-tied full-softmax cross-entropy at every position and full-ranking evaluation (the
    same task as :func:`merlin_molar.models.sasrec.sasrec_model`)."""
    return full_ranking_model(gru4rec_body(schema, config or GRU4RecConfig()))
