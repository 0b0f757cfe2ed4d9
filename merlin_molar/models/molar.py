"""Molar as one Transformers4Rec model: content branch (MolarBlock over the MIRM table) + ID branch
(an ID-based sequential model over item ids: SASRec or GRU4Rec) -> MolarTask (next-item loss + post-alignment).

Example::

    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=64).to_dict())
    model = molar_model(prepared.schema, item_table, config)        # a tr.Model
    trainer = make_trainer(model, prepared, "runs/molar", TrainConfig(epochs=5))
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional, Tuple, Union

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema
from transformers4rec.torch.block.base import BlockBase

from merlin_molar.errors import check_choice
from merlin_molar.models.dueg import MolarBlock, small_decoder_config
from merlin_molar.models.gru4rec import GRU4RecConfig
from merlin_molar.models.id_models import ID_MODELS
from merlin_molar.models.item_tower import ADAPTORS, content_item_inputs
from merlin_molar.models.losses import REC_LOSSES
from merlin_molar.models.sasrec import SASRecConfig
from merlin_molar.models.task import MolarTask

ID_BRANCHES = ("joint", "frozen", "none")
ALIGN_POSITIONS = ("last", "all")
# the post-alignment weight when none is given, by ID branch (see MolarConfig)
DEFAULT_ALPHA = {"frozen": 0.0, "joint": 0.1, "none": 0.0}


@dataclass
class MolarConfig:
    """Everything needed to rebuild a Molar model (saved next to its weights; round-trips through JSON).

    ``llm`` is a HF config dict (with ``model_type``; random init) or a pretrained decoder LLM: ``"smollm2"``
    (SmolLM2-135M-Instruct, packaged with the install), a GGUF file, or a Hugging Face directory / hub id. Its
    word embeddings are dropped (the DUEG reads the content item tower's vectors), the rest starts from the
    pretrained weights, in float32. ``llm_layers`` keeps only the first N decoder layers (None: all; e.g. 2 of
    SmolLM2's 30 to fit a CPU, a variant to name as such). ``lora`` (peft ``LoraConfig`` kwargs) freezes the
    LLM's weights and trains low-rank adapters instead. A saved model is self-contained: :func:`saved_config`
    replaces a pretrained ``llm`` by the architecture it was built with (its weights are in the state dict)
    and records the name in ``llm_source``, so loading never reads the pretrained file again.
    ``id_branch``: ``"joint"`` (trained with its own next-item loss), ``"frozen"`` (load a pretrained ID
    model's weights with :func:`load_id_branch`, kept fixed) or ``"none"`` (content only, no alignment).
    ``id_model`` names the ID branch's architecture, ``"sasrec"`` or ``"gru4rec"``, built from the config
    field of that name (``sasrec`` / ``gru4rec``; the other is ignored). Configs saved before ``id_model``
    existed hold only ``sasrec`` and load as a SASRec branch. Its output width (``d_model``) may differ
    from the DUEG's: the alignment projects content user embeddings to it.
    ``id_weight`` fuses the two scores; after training it is chosen on the validation split from
    ``id_weight_grid`` (an empty grid keeps ``id_weight``).
    ``alpha`` weighs the paper's post-alignment loss (content vs ID user embeddings, symmetric InfoNCE at
    ``temperature``). Left unset it follows the ID branch, as measured: 0 with a frozen branch (the
    recommended recipe; alignment at 0.1 was level with none on ML-1M and ML-100K at length 200 and behind
    it on ML-100K at length 50 and the sparse proxy, the ``molar_align`` rows of
    ``benchmarks/results/quality/quality_*.json``), 0.1 with a joint one (its only comparison, one ML-100K seed
    in ``molar_ml100k.json``, had alignment ahead), 0 without one.
    ``content_adaptor`` maps the frozen item table into the DUEG: ``"moe"`` (default, a whitened mixture of
    ``adaptor_experts`` adaptors, ahead of ``"linear"`` on every seed of both quality regimes,
    ``benchmarks/results/quality/quality_*.json``) or ``"linear"``; configs saved without the field load as linear.
    """

    llm: Union[str, dict] = field(default_factory=lambda: small_decoder_config().to_dict())
    llm_layers: Optional[int] = None  # keep the first N decoder layers of the LLM (None: all)
    llm_source: Optional[str] = None  # the pretrained weights a saved model's DUEG started from (a record only)
    lora: Optional[dict] = None  # peft.LoraConfig kwargs, e.g. {"r": 8, "lora_alpha": 16, "target_modules": [...]}
    user_token: bool = False
    id_branch: Literal["joint", "frozen", "none"] = "joint"
    id_model: Literal["sasrec", "gru4rec"] = "sasrec"
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    rec_loss: Literal["ce", "infonce", "bce"] = "ce"
    alpha: Optional[float] = None  # None: DEFAULT_ALPHA of the id_branch
    temperature: float = 0.1
    id_weight: float = 0.5
    id_weight_grid: Tuple[float, ...] = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
    align_positions: Literal["last", "all"] = "last"
    content_adaptor: Literal["linear", "moe"] = "moe"
    adaptor_experts: int = 8
    adaptor_dropout: float = 0.2
    max_align_rows: int = 4096
    num_negatives: int = 512
    max_length: int = 200

    def __post_init__(self):
        check_choice("id_branch", self.id_branch, ID_BRANCHES)
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA[self.id_branch]
        check_choice("rec_loss", self.rec_loss, REC_LOSSES)
        check_choice("align_positions", self.align_positions, ALIGN_POSITIONS)
        check_choice("id_model", self.id_model, tuple(ID_MODELS))
        for name, spec in ID_MODELS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, spec.config(**getattr(self, name)))
        check_choice("content_adaptor", self.content_adaptor, ADAPTORS)
        if not isinstance(self.llm, (str, dict)):
            raise ValueError(f"llm must be a config dict (with model_type) or a path / hub id, got {type(self.llm)}")
        if isinstance(self.llm, dict):
            self.llm = json.loads(json.dumps(self.llm))  # as saved: JSON keys (HF reads id2label keys back as ints)
        if self.llm_layers is not None and (isinstance(self.llm_layers, bool) or not isinstance(self.llm_layers, int)
                                            or self.llm_layers < 1):
            raise ValueError(f"llm_layers must be a whole number of at least 1 (or None: all), got {self.llm_layers!r}")
        self.id_weight_grid = tuple(float(w) for w in self.id_weight_grid)
        if not all(0.0 <= w <= 1.0 for w in (self.id_weight, *self.id_weight_grid)):
            raise ValueError("id_weight and id_weight_grid values must lie in [0, 1]")

    @property
    def id_config(self):
        """The config of the ID branch's model (``self.sasrec`` or ``self.gru4rec``, as ``id_model`` says)."""
        return getattr(self, self.id_model)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MolarConfig":
        values = dict(values)
        # a config saved before the field existed was trained with the linear adaptor, the only one then
        values.setdefault("content_adaptor", "linear")
        for name, spec in ID_MODELS.items():  # each ID config with its own defaults for fields it was saved without
            if isinstance(values.get(name), dict):
                values[name] = spec.config.from_dict(values[name])
        return cls(**values)


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
    block = MolarBlock(config.llm, lora=lora, user_token=config.user_token, layers=config.llm_layers)
    inputs = content_item_inputs(
        schema, item_table, block.hidden_size, config.max_length,
        adaptor=config.content_adaptor, experts=config.adaptor_experts, dropout=config.adaptor_dropout,
    )
    content = tr.SequentialBlock(inputs, block)

    id_body = None
    if config.id_branch != "none":
        id_config = replace(config.id_config, max_length=config.max_length)
        id_body = ID_MODELS[config.id_model].body(schema, id_config)
        if config.id_branch == "frozen":
            id_body.requires_grad_(False)
    task = MolarTask(
        rec_loss=config.rec_loss,
        alpha=config.alpha if id_body is not None else 0.0,
        temperature=config.temperature,
        id_weight=config.id_weight if id_body is not None else 0.0,
        train_id_branch=config.id_branch == "joint",
        align_positions=config.align_positions,
        max_align_rows=config.max_align_rows,
        num_negatives=config.num_negatives,
    )
    body = MolarBody(content, id_body)
    head = tr.Head(body, task, inputs=inputs)
    if id_body is not None:
        task.attach_id_branch(id_body.inputs, block.hidden_size)
    return tr.Model(head)


def saved_config(config: MolarConfig, model: tr.Model) -> MolarConfig:
    """``config`` as it is saved next to ``model``'s weights: a pretrained ``llm`` (a name or path) becomes the
    architecture the DUEG was built with (layers kept, as a config dict) and the name moves to ``llm_source``,
    so the saved model rebuilds without the pretrained file, and its state dict holds the weights."""
    if not isinstance(config.llm, str):
        return config
    llm = model.heads[0].body.content[1].llm
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under LoRA: the peft-wrapped model
    architecture = base.config.to_dict()
    architecture.pop("_name_or_path", None)  # where it was read from: recorded in llm_source
    return replace(config, llm=architecture, llm_source=config.llm)


def load_id_branch(model: tr.Model, id_model: tr.Model) -> None:
    """Copy a trained ID model's body (item embeddings + transformer or GRU) into Molar's ID branch, which
    must have been built with the same architecture (``MolarConfig.id_model`` and its config)."""
    body = model.heads[0].body
    if body.id_body is None:
        raise ValueError("this Molar model has no ID branch (id_branch='none')")
    body.id_body.load_state_dict(id_model.heads[0].body.state_dict())
