"""The lean inference path: a saved model reduced to what a request needs, precomputed at export.

Transformers4Rec's ``Model.forward`` at inference runs the input blocks, masking, the body, the head and a
history mask, and re-projects nothing per request only because of a cache. For serving, :func:`export_lean`
precomputes everything that does not depend on the request:

* the **input tables**: the projected content table (MIRM table through the trained projection, the content
  tower's item embeddings) and the ID branch's item-id embeddings;
* the **scoring table**: the item side of the scoring, ready for one matmul (for ``infonce`` scoring
  normalised and multiplied by the learned scale; for a fused Molar the content and ID tables side by side);
* the **user towers** (the DUEG LLM, the ID model's transformer or GRU) as TorchScript, traced once per sequence-length
  bucket (8, 16, 32, ... up to ``max_length``) into one module, so weights are stored once.

Per request :class:`LeanModel` then looks up the input rows of each history window, runs the traced user
towers on the smallest bucket that holds the longest window (the towers are causal and windows are
right-padded, so the padding after a history's last item never changes its user embedding), takes each
row's last position and scores every item with one matmul. The scores are those of the saved model's own
forward (checked by the tests), without Transformers4Rec, Python-level Hugging Face code or the merlin DAG
in the loop.

Files written by :func:`export_lean` (a directory)::

    lean.json            kind, max_length, buckets, scoring mode, id_weight, table shapes
    tables.safetensors   content_inputs [items, d_c], id_inputs [items, d_id], scoring [items, d] (unless
                         scoring uses an input table as it is: lean.json names it)
    content_tower.pt     TorchScript, methods l8, l16, ...: [batch, L, d_c] -> [batch, L, d_c]  (Molar)
    id_tower.pt          TorchScript, same for the ID model (SASRec, GRU4Rec, or Molar's ID branch)
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from merlin_molar.cold_start import OOV_ID
from merlin_molar.models.task import scores_with_new_items

LEAN_FILE = "lean.json"
TABLES_FILE = "tables.safetensors"
TOWER_FILES = {"content": "content_tower.pt", "id": "id_tower.pt"}
FIRST_BUCKET = 8
FIRST_ITEM_ID = 3  # as merlin_molar.data.workflow (Categorify's reserved ids 0-2)


def length_buckets(max_length: int) -> List[int]:
    """8, 16, 32, ... below ``max_length``, then ``max_length`` itself."""
    buckets, b = [], FIRST_BUCKET
    while b < max_length:
        buckets.append(b)
        b *= 2
    return buckets + [int(max_length)]


class _HiddenStates(torch.nn.Module):
    """A Hugging Face base model as ``inputs_embeds -> last_hidden_state`` (GPT-2 of the SASRec branch)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds).last_hidden_state


class _Bucketed(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


def _bucketed(tower: torch.nn.Module, buckets: List[int]) -> torch.nn.Module:
    """The tower with one method per bucket (``l8``, ``l16``, ...) so that ``torch.jit.trace_module`` traces
    every bucket into one module that shares the weights."""
    cls = type("BucketedTower", (_Bucketed,), {f"l{b}": _Bucketed.forward for b in buckets})
    return cls(tower)


def _trace_tower(tower: torch.nn.Module, width: int, buckets: List[int]) -> torch.jit.ScriptModule:
    module = _bucketed(tower, buckets).eval()
    examples = {f"l{b}": (torch.randn(1, b, width),) for b in buckets}
    with torch.no_grad(), warnings.catch_warnings():
        # Hugging Face's shape checks become constants of each bucket's trace: intended (one trace per length)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace_module(module, examples, check_trace=False, strict=False)


def _id_tower(layer) -> torch.nn.Module:
    """An ID body's sequence layer as ``inputs_embeds -> per-position user embeddings``: the HF model inside
    SASRec's ``TransformerBlock``, or GRU4Rec's GRU inside its ``tr.Block``."""
    import transformers4rec.torch as tr

    from merlin_molar.models.gru4rec import GRULayers

    if isinstance(layer, tr.TransformerBlock):
        return _HiddenStates(layer.transformer)
    if isinstance(layer, tr.Block) and isinstance(layer.module, GRULayers):
        return layer.module
    raise NotImplementedError(f"the lean path cannot trace an ID branch of type {type(layer).__name__}")


def _model_parts(model, kind: str) -> Dict:
    """The trained pieces of a loaded merlin-molar model that inference needs."""
    from merlin_molar.models.id_models import ID_MODELS

    head = model.heads[0]
    task = next(iter(head.prediction_task_dict.values()))
    if task.task_block is not None:
        raise NotImplementedError("the lean path does not support a prediction-task block")
    parts = {"task": task}
    if kind in ID_MODELS:
        inputs, layer = head.body[0], head.body[1]
        parts["id_table"] = inputs.categorical_module.embedding_tables[_item_column(inputs)].weight
        parts["id_tower"] = _id_tower(layer)
        return parts
    content, id_body = head.body.content, head.body.id_body
    embedding = content[0].categorical_module.embedding_tables[_item_column(content[0])]
    parts["content_table"] = embedding.projection(embedding.table)
    parts["content_tower"] = content[1]  # MolarBlock: inputs_embeds -> per-position user embeddings
    if id_body is not None:
        parts["id_table"] = id_body[0].categorical_module.embedding_tables[_item_column(id_body[0])].weight
        parts["id_tower"] = _id_tower(id_body[1])
    return parts


def _item_column(inputs) -> str:
    (name,) = list(inputs.categorical_module.embedding_tables.keys())
    return name


def _scoring_side(loss, table: torch.Tensor):
    """``(normalise_users, item side)`` of ``loss.logits(users, table)`` as one matmul ``users' @ side.T``."""
    from merlin_molar.models.losses import SampledInfoNCELoss

    if isinstance(loss, SampledInfoNCELoss):
        return True, loss.scale() * F.normalize(table, dim=-1)
    return False, table


def export_lean(model_dir, output_dir) -> Path:
    """Precompute tables and trace the user towers of the saved model in ``model_dir`` into ``output_dir``."""
    from safetensors.torch import save_file

    from merlin_molar.models.id_models import ID_MODELS
    from merlin_molar.persistence import load_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, kind, config, _ = load_model(model_dir)
    max_length = int(config.max_length)
    buckets = length_buckets(max_length)
    tables, meta = {}, {"kind": kind, "max_length": max_length, "buckets": buckets}
    with torch.no_grad():
        parts = _model_parts(model, kind)
        task = parts["task"]
        if kind in ID_MODELS:
            meta["mode"] = "id"
            meta["temperature"] = float(task.softmax_temperature or 0.0)
            meta["normalise_id"] = False
            tables["id_inputs"] = parts["id_table"]
            tables["scoring"] = parts["id_table"]
        else:
            has_id = "id_tower" in parts and task.id_weight > 0
            n_items = parts["content_table"].size(0)
            known = parts["id_table"].size(0) if has_id else n_items
            extended = known < n_items  # items added after training (extend-model): scored as the task does
            mode = "content" if not has_id else ("id" if task.id_weight >= 1 and not extended else "fused")
            meta.update(mode=mode, id_weight=float(task.id_weight), temperature=0.0)
            if extended:
                meta.update(known_items=int(known), new_item_scoring=task.new_item_scoring,
                            new_item_prior=float(task.new_item_prior))
            sides = []
            if mode in ("content", "fused"):
                tables["content_inputs"] = parts["content_table"]
                meta["normalise_content"], side = _scoring_side(task.content_loss, parts["content_table"])
                sides.append(side)
            if mode in ("id", "fused"):
                tables["id_inputs"] = parts["id_table"]
                meta["normalise_id"], side = _scoring_side(task.id_loss, parts["id_table"])
                if extended:
                    # the ID branch reads a new item as the OOV id, and has no score for it (zero rows)
                    new = n_items - known
                    oov = parts["id_table"][OOV_ID].expand(new, -1)
                    tables["id_inputs"] = torch.cat([parts["id_table"], oov])
                    side = torch.cat([side, side.new_zeros(new, side.size(1))])
                sides.append(side)
            tables["scoring"] = torch.cat(sides, dim=1)
        for name in ("content", "id"):
            if f"{name}_inputs" in tables:
                width = tables[f"{name}_inputs"].size(1)
                _trace_tower(parts[f"{name}_tower"], width, buckets).save(str(output_dir / TOWER_FILES[name]))
                meta[f"{name}_dim"] = int(width)
    meta["items"] = int(tables["scoring"].size(0))
    for name in ("content_inputs", "id_inputs"):  # scoring with the input table itself: store it once
        if name in tables and tables["scoring"] is tables[name]:
            meta["scoring_table"] = name
            del tables["scoring"]
    save_file({k: v.detach().float().contiguous() for k, v in tables.items()}, str(output_dir / TABLES_FILE))
    (output_dir / LEAN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return output_dir


class LeanModel:
    """Encoded history windows -> scores of every item, from an :func:`export_lean` directory.

    Example::

        lean = LeanModel.load("repo/molar/1/ensemble/lean")
        scores = lean.scores(window)            # window: [batch, max_length] int64, right-padded with 0
        top_scores, top_ids = lean.top_k(values, offsets, k=10)   # encoded ragged histories
    """

    def __init__(self, meta: dict, tables: Dict[str, torch.Tensor], towers: Dict[str, torch.jit.ScriptModule]):
        self.meta = meta
        self.max_length = int(meta["max_length"])
        self.buckets = [int(b) for b in meta["buckets"]]
        self.mode = meta["mode"]
        self.id_weight = float(meta.get("id_weight", 1.0))
        self.temperature = float(meta.get("temperature") or 0.0)
        self.content_inputs = tables.get("content_inputs")
        self.id_inputs = tables.get("id_inputs")
        self.scoring = tables[meta.get("scoring_table", "scoring")]
        self.towers = towers
        self.n_items = self.scoring.size(0)
        self._methods = {
            name: {b: getattr(tower, f"l{b}") for b in self.buckets} for name, tower in towers.items()
        }

    @classmethod
    def load(cls, directory, warm_up: int = 3) -> "LeanModel":
        """Load an :func:`export_lean` directory; ``warm_up`` calls per bucket let TorchScript's profiling
        executor specialise every bucket now rather than on the first requests that reach it."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / LEAN_FILE).read_text())
        tables = load_file(str(directory / TABLES_FILE))
        towers = {
            name: torch.jit.load(str(directory / file), map_location="cpu").eval()
            for name, file in TOWER_FILES.items()
            if (directory / file).exists()
        }
        lean = cls(meta, tables, towers)
        with torch.no_grad():
            for bucket in lean.buckets:
                for batch in (1, 2):
                    window = torch.full((batch, bucket), FIRST_ITEM_ID if lean.n_items > 3 else 0)
                    for _ in range(warm_up):
                        lean.scores(window)
        return lean

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        return self.buckets[-1]

    def _users(self, name: str, table: torch.Tensor, ids: torch.Tensor, rows, last, normalise: bool):
        hidden = self._methods[name][ids.size(1)](table[ids])
        users = hidden[rows, last]
        return F.normalize(users, dim=-1) if normalise else users

    def scores(self, window: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[batch, n_items]`` scores for right-padded encoded windows ``[batch, <= max_length]``."""
        if lengths is None:
            lengths = (window != 0).sum(dim=1)
        bucket = self.bucket(int(lengths.max()))
        ids = window[:, :bucket]
        if ids.size(1) < bucket:
            ids = F.pad(ids, (0, bucket - ids.size(1)))
        rows = torch.arange(ids.size(0))
        last = (lengths - 1).clamp(min=0)
        meta = self.meta
        if self.mode == "fused":
            content = self._users("content", self.content_inputs, ids, rows, last, meta["normalise_content"])
            ident = self._users("id", self.id_inputs, ids, rows, last, meta["normalise_id"])
            # one matmul: [[content, 0], [0, id]] @ [content side | id side].T -> both score sets
            batch, width = ids.size(0), content.size(1)
            users = torch.zeros(2 * batch, self.scoring.size(1))
            users[:batch, :width] = content
            users[batch:, width:] = ident
            both = users @ self.scoring.t()
            known = meta.get("known_items")
            if known:  # items added after training: scored by the same function as MolarTask
                content_logp = torch.log_softmax(both[:batch], -1)
                id_logp = torch.log_softmax(both[batch:, :known], -1)
                return scores_with_new_items(content_logp, id_logp, self.id_weight, meta["new_item_scoring"],
                                             float(meta.get("new_item_prior", 0.0)))
            return (1 - self.id_weight) * torch.log_softmax(both[:batch], -1) + self.id_weight * torch.log_softmax(
                both[batch:], -1
            )
        if self.mode == "content":
            users = self._users("content", self.content_inputs, ids, rows, last, meta["normalise_content"])
        else:
            users = self._users("id", self.id_inputs, ids, rows, last, meta.get("normalise_id", False))
        scores = users @ self.scoring.t()
        return scores / self.temperature if self.temperature else scores

    def top_k(self, values: np.ndarray, offsets: np.ndarray, k: int):
        """Top-k ``(scores, encoded ids)`` for encoded ragged histories; each row keeps its last ``max_length``
        items, and every item of its history (also older ones) and the reserved ids 0-2 are excluded."""
        from merlin_molar.serving.ops import right_padded_window

        lengths = np.diff(offsets)
        window = torch.from_numpy(right_padded_window(values, offsets, self.max_length))
        with torch.no_grad():  # not inference_mode: TorchScript modules refuse inference tensors
            scores = self.scores(window, torch.from_numpy(np.minimum(lengths, self.max_length)))
            scores[:, :FIRST_ITEM_ID] = float("-inf")
            rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
            scores[rows, torch.from_numpy(values.astype(np.int64))] = float("-inf")
            top_scores, top_ids = torch.topk(scores, k=k, dim=-1)
        return top_scores.numpy(), top_ids.numpy()
