"""Molar as one Transformers4Rec model: content branch (MolarBlock over the MIRM table) + ID branch
(SASRec over item ids) -> MolarTask (next-item loss + post-alignment).

Example::

    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=64).to_dict())
    model = molar_model(prepared.schema, item_table, config)        # a tr.Model
    trainer = make_trainer(model, prepared, "runs/molar", TrainConfig(epochs=5))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema
from transformers4rec.torch.block.base import BlockBase

from merlin_molar.models.dueg import MolarBlock, small_decoder_config
from merlin_molar.models.item_tower import content_item_inputs
from merlin_molar.models.sasrec import SASRecConfig, sasrec_body
from merlin_molar.models.task import MolarTask


@dataclass
class MolarConfig:
    """Everything needed to rebuild a Molar model (saved next to its weights).

    ``llm`` is a HF config dict (with ``model_type``; random init) or a local path / hub id (pretrained).
    ``id_branch``: ``"joint"`` (trained with its own next-item loss), ``"frozen"`` (load pretrained SASRec
    weights with :func:`load_id_branch`, kept fixed) or ``"none"`` (content only, no alignment).
    """

    llm: object = field(default_factory=lambda: small_decoder_config().to_dict())
    lora: Optional[dict] = None  # peft.LoraConfig kwargs, e.g. {"r": 8, "lora_alpha": 16, "target_modules": [...]}
    user_token: bool = False
    id_branch: str = "joint"
    sasrec: dict = field(default_factory=lambda: SASRecConfig().to_dict())
    rec_loss: str = "ce"
    alpha: float = 0.1
    temperature: float = 0.1
    id_weight: float = 0.5
    align_positions: str = "last"
    num_negatives: int = 512
    max_length: int = 200

    def to_dict(self):
        return asdict(self)


class MolarBody(BlockBase):
    """Runs the content branch and the ID branch on the same inputs; returns ``(content, id)``."""

    def __init__(self, content: tr.SequentialBlock, id_body: Optional[tr.SequentialBlock] = None):
        super().__init__()
        self.content = content
        self.id_body = id_body

    @property
    def inputs(self):
        return self.content.inputs

    def forward(self, inputs, training=False, testing=False, **kwargs):
        content = self.content(inputs, training=training, testing=testing)
        if self.id_body is None:
            return (content,)
        return (content, self.id_body(inputs, training=training, testing=testing))

    def output_size(self, input_size=None):
        return self.content.output_size()

    def forward_output_size(self, input_size):
        return self.content.output_size()


def molar_model(schema: Schema, item_table: torch.Tensor, config: Optional[MolarConfig] = None) -> tr.Model:
    config = config or MolarConfig()
    lora = None
    if config.lora:
        from peft import LoraConfig

        lora = LoraConfig(**config.lora)
    block = MolarBlock(config.llm, lora=lora, user_token=config.user_token)
    inputs = content_item_inputs(schema, item_table, block.hidden_size, config.max_length)
    content = tr.SequentialBlock(inputs, block)

    id_body = None
    if config.id_branch != "none":
        sasrec = SASRecConfig(**{**config.sasrec, "max_length": config.max_length})
        id_body = sasrec_body(schema, sasrec)
        if config.id_branch == "frozen":
            id_body.requires_grad_(False)
    task = MolarTask(
        rec_loss=config.rec_loss,
        alpha=config.alpha if id_body is not None else 0.0,
        temperature=config.temperature,
        id_weight=config.id_weight if id_body is not None else 0.0,
        train_id_branch=config.id_branch == "joint",
        align_positions=config.align_positions,
        num_negatives=config.num_negatives,
    )
    body = MolarBody(content, id_body)
    head = tr.Head(body, task, inputs=inputs)
    if id_body is not None:
        task.attach_id_branch(id_body.inputs, block.hidden_size)
    return tr.Model(head)


def load_id_branch(model: tr.Model, sasrec: tr.Model) -> None:
    """Copy a trained SASRec's body (item embeddings + transformer) into Molar's ID branch."""
    body = model.heads[0].body
    if body.id_body is None:
        raise ValueError("this Molar model has no ID branch (id_branch='none')")
    body.id_body.load_state_dict(sasrec.heads[0].body.state_dict())
