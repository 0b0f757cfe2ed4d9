"""The ID-based sequential models, by name: what ``train --model NAME`` trains on its own and what Molar's ID
branch can be (``MolarConfig.id_model``). Every entry has the same inputs (causal item-id embeddings), a body
returning per-position user embeddings ``[batch, length, d_model]`` and the same weight-tied full-ranking
next-item task, so training, evaluation, saving, ``recommend`` and serving treat them alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from merlin_molar.models.gru4rec import GRU4RecConfig, gru4rec_body, gru4rec_model
from merlin_molar.models.sasrec import SASRecConfig, sasrec_body, sasrec_model


@dataclass(frozen=True)
class IDModel:
    title: str  # for messages: "SASRec"
    config: type
    body: Callable  # (schema, config) -> tr.SequentialBlock
    model: Callable  # (schema, config) -> tr.Model


ID_MODELS: Dict[str, IDModel] = {
    "sasrec": IDModel("SASRec", SASRecConfig, sasrec_body, sasrec_model),
    "gru4rec": IDModel("GRU4Rec", GRU4RecConfig, gru4rec_body, gru4rec_model),
}
