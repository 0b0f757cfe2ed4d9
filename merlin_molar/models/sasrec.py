"""ID-based sequential models as Transformers4Rec building blocks.

SASRec (Kang & McAuley, 2018) is a causal, pre-norm transformer over item-id embeddings trained to
predict the next item at every position. In Transformers4Rec terms it is a ``TabularSequenceFeatures``
input with causal (``clm``) masking, a sequence block and a weight-tied next-item head. The sequence block is
either a GPT-2 ``TransformerBlock`` (pre-norm, learned positions; its inputs prepared by :class:`SASRecPrepare`)
or :class:`SASRecEncoder`, SASRec's own layers on PyTorch's ``nn.TransformerEncoder``. :func:`sasrec_body`
returns the body so it can serve as the ID branch of Molar's post-alignment; :func:`sasrec_model` adds the
full-ranking next-item task.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema, Tags
from transformers4rec.torch.block.base import BlockBase
from transformers4rec.torch.block.transformer import TransformerPrepare

from merlin_molar.models.task import FullRankingNextItemTask

POSITIONS = ("last", "start")
# what a config saved without these fields was trained with
LEGACY = {"positions": "start", "scale_embeddings": False, "init": "gpt2", "block": "gpt2"}
INITS = ("gpt2", "torch")
BLOCKS = ("gpt2", "encoder")


@dataclass
class SASRecConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    max_length: int = 200
    # "start": GPT-2's positions, counted from the first item; "last": counted back from the read-out item, as a
    # left-padded SASRec has them. Measured on ML-100K at length 200 (benchmarks/results/sasrec_parity/
    # screening_ml100k.md; one seed, 40 epochs), "last" gained nothing: "start" stays the default.
    positions: str = "start"
    # item embeddings x sqrt(d_model) before the positions are added (the reference's scaling); measured slower
    # to learn in the same screening, so off by default. Both options are served by `export` (the slim GPT-2
    # tower prepares its inputs the same way)
    scale_embeddings: bool = False
    # the transformer layers' initial weights: "gpt2" (Hugging Face's GPT-2 init: N(0, 0.02), residual projections
    # 0.02/sqrt(2 n_layers)) or "torch" (what PyTorch's own layers start from, as the reference SASRec built on
    # nn.TransformerEncoder does: Xavier-uniform query/key/value, Kaiming-uniform feed-forward and output
    # projections). Only the start of training differs; the model and its serving are the same. Screened for
    # issue 28 (benchmarks/results/sasrec_screening/, one seed): faster early, no better by epoch 100 (0.0987
    # against the default's 0.1016), so the default stays "gpt2"
    init: str = "gpt2"
    # the sequence block: "encoder" (:class:`SASRecEncoder`: SASRec's own layers, which fix what the three options
    # above choose: positions from the read-out item, embeddings x sqrt(d_model), PyTorch's initialisation;
    # unlike GPT-2's MLP they also drop out after the feed-forward activation) or "gpt2" (T4Rec's GPT-2 block,
    # the default before issue 28, to which the options above apply). On ML-100K at length 200 (seed 0) the
    # encoder tracks the plain PyTorch reference SASRec, while GPT-2 trails it from epoch 40 on
    # (benchmarks/results/sasrec_screening/); benchmarks/sasrec_parity.py measures it against the reference
    block: str = "encoder"

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        gpt2_options = {k: getattr(self, k) for k in ("positions", "scale_embeddings", "init")
                        if getattr(self, k) != LEGACY[k]}
        if self.block == "encoder" and gpt2_options:
            raise ValueError(f"{', '.join(gpt2_options)} apply to block='gpt2' only; block='encoder' fixes them")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a history and a target), got {self.max_length}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SASRecConfig":
        """A saved config; one saved before ``positions`` / ``scale_embeddings`` / ``init`` / ``block`` existed
        was trained with GPT-2, its positions, unscaled embeddings and its initialisation."""
        return cls(**{**LEGACY, **values})


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




def positions_from_last(targets: torch.Tensor, max_length: int, padding_idx: int = 0) -> torch.Tensor:
    """GPT-2 ``position_ids`` counted back from each row's read-out position: the last position with a target
    (``targets``: the masking's ``masked_targets``, ``[batch, length]``) gets ``max_length - 1``, the one before
    it ``max_length - 2``, and so on; positions after it (padding, or an evaluated target) get 0.

    Sequences are right-padded, so GPT-2's own positions (0 at the first item) put the item a prediction is read
    from at a different position in every row; counted from the end, as in a left-padded SASRec, it is always
    at the same one, whatever the history's length."""
    length = targets.size(1)
    index = torch.arange(length, device=targets.device)
    has_target = targets != padding_idx
    last = torch.where(has_target, index, torch.full_like(index, -1)).max(dim=1, keepdim=True).values
    positions = max_length - 1 - (last - index)
    return torch.where((index <= last) & (positions >= 0), positions, torch.zeros_like(positions))


class CausalPrepare(TransformerPrepare):
    """Pass embeddings straight to GPT-2, which applies its own causal mask.

    T4Rec's default GPT2Prepare adds a lower-triangular ``head_mask`` that repeats the causal mask and,
    since transformers 4.36, forces the slow eager attention path instead of SDPA."""

    def forward(self, inputs_embeds):
        return {"inputs_embeds": inputs_embeds}


class SASRecPrepare(CausalPrepare):
    """SASRec's inputs for GPT-2: item embeddings times ``scale`` (``sqrt(d_model)`` in :func:`sasrec_transformer`)
    and, with ``positions="last"``, positions counted back from the read-out item (:func:`positions_from_last`;
    reads the targets of the block's causal masking)."""

    def __init__(self, transformer, masking=None, scale: float = 1.0, positions: str = "start"):
        super().__init__(transformer, masking)
        self.scale, self.positions = scale, positions

    def forward(self, inputs_embeds):
        prepared = {"inputs_embeds": inputs_embeds * self.scale if self.scale != 1.0 else inputs_embeds}
        if self.positions == "last":
            if self.masking is None or self.masking.masked_targets is None:
                raise ValueError("positions='last' needs the causal masking of the item-id inputs")
            prepared["position_ids"] = positions_from_last(
                self.masking.masked_targets, self.transformer.config.n_positions, self.masking.padding_idx
            )
        return prepared


@torch.no_grad()
def torch_init(gpt2) -> None:
    """Re-initialise a GPT-2's transformer layers as PyTorch initialises ``nn.TransformerEncoderLayer``: the
    query/key/value projection Xavier-uniform with zero bias, the attention output projection Kaiming-uniform
    (bound 1/sqrt(fan_in)) with zero bias, the feed-forward layers Kaiming-uniform with uniform biases. GPT-2's
    ``Conv1D`` weights are ``[in, out]``, the transpose of ``nn.Linear``'s. Positions and layer norms keep GPT-2's."""
    for block in gpt2.h:
        attention, mlp = block.attn, block.mlp
        torch.nn.init.xavier_uniform_(attention.c_attn.weight.T)
        torch.nn.init.zeros_(attention.c_attn.bias)
        for layer, zero_bias in ((attention.c_proj, True), (mlp.c_fc, False), (mlp.c_proj, False)):
            bound = layer.weight.shape[0] ** -0.5
            torch.nn.init.uniform_(layer.weight, -bound, bound)
            if zero_bias:
                torch.nn.init.zeros_(layer.bias)
            else:
                torch.nn.init.uniform_(layer.bias, -bound, bound)


def sasrec_transformer(config: SASRecConfig, masking=None) -> tr.TransformerBlock:
    gpt2 = tr.GPT2Config.build(
        d_model=config.d_model,
        n_head=config.n_heads,
        n_layer=config.n_layers,
        total_seq_length=config.max_length,
        dropout=config.dropout,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
    prepare = functools.partial(SASRecPrepare, scale=scale, positions=config.positions)
    block = tr.TransformerBlock(gpt2, prepare_module=prepare)
    if config.init == "torch":
        torch_init(block.transformer)
    # attached after construction, as before the options existed: given to the constructor, T4Rec also
    # registers the masking under the prepare module, which adds a state-dict key (models saved before would
    # not load) and moves its parameter in the optimizer's order (training no longer reproduces them)
    block.masking = masking
    if config.positions == "last":  # the only setting that reads the masking's targets
        block.prepare_module.masking = masking
    return block


class SASRecEncoder(BlockBase):
    """SASRec's own layers as a Transformers4Rec block: the item embeddings times ``sqrt(d_model)`` plus learned
    positions counted back from the read-out item (:func:`positions_from_last`), dropout, PyTorch's pre-norm
    ``nn.TransformerEncoder`` (GELU, a ``4 d_model`` feed-forward with dropout after its activation and after its
    output, causal attention) and a final LayerNorm, with PyTorch's initialisation. These are the layers of the
    plain PyTorch SASRec that issue 28 measures the project against (``benchmarks/sasrec_parity.py``).

    It reads the targets of the item-id inputs' causal masking for the positions (training: every position with
    a next item; evaluation: the history's last item; inference: the last item)."""

    def __init__(self, config: SASRecConfig, masking):
        super().__init__()
        d = config.d_model
        layer = torch.nn.TransformerEncoderLayer(d, config.n_heads, 4 * d, config.dropout, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.positions = torch.nn.Embedding(config.max_length, d)
        torch.nn.init.normal_(self.positions.weight, std=0.02)
        self.norm = torch.nn.LayerNorm(d)
        self.dropout = torch.nn.Dropout(config.dropout)
        self.scale = math.sqrt(d)
        # the inputs own the masking: held here without registering it again as a submodule (state dict)
        self.__dict__["masking"] = masking

    def forward(self, inputs_embeds, training=False, testing=False, **kwargs):
        targets = self.masking.masked_targets if self.masking is not None else None
        if targets is None:
            raise ValueError("SASRecEncoder needs the causal masking of the item-id inputs")
        positions = positions_from_last(targets, self.positions.num_embeddings, self.masking.padding_idx)
        h = self.dropout(inputs_embeds * self.scale + self.positions(positions))
        length = h.size(1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=h.device), diagonal=1)
        return self.norm(self.encoder(h, mask=causal, is_causal=True))

    def forward_output_size(self, input_size):
        return input_size


def sasrec_body(schema: Schema, config: Optional[SASRecConfig] = None) -> tr.SequentialBlock:
    """Item-id inputs >> causal transformer: per-position ID user embeddings ``[batch, length, d_model]``."""
    config = config or SASRecConfig()
    inputs = item_id_inputs(schema, config)
    if config.block == "encoder":
        return tr.SequentialBlock(inputs, SASRecEncoder(config, inputs.masking))
    transformer = sasrec_transformer(config, inputs.masking)
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
