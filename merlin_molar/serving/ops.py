"""The merlin-systems operator that serves a saved merlin-molar model from Triton's Python backend.

The exported graph (see :func:`merlin_molar.serving.export_triton`) is one step, in one Triton model::

    raw histories  >> MolarRecommend  ->  item_ids (raw), scores

:class:`MolarRecommend` checks the request, encodes the raw item ids (integers or strings such as product
codes) with the fitted Categorify mapping of ``prepare`` (:class:`ItemCodec`: no separate NVTabular workflow
model, no second hop), runs the lean model (:mod:`merlin_molar.serving.lean`: precomputed tables, traced
user towers, one scoring matmul), excludes each history, takes the top-k and maps it back to raw ids.
Nothing is pickled: ``save_artifacts`` writes the vocabulary and the lean model next to the ensemble and
``load_artifacts`` reads them back.

Example::

    op = MolarRecommend("/path/to/saved/model", vocabulary, top_k=10, max_batch_size=256)
    graph = ["item_id-list"] >> op
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.serving.columns import ITEM_IDS, SCORES

VOCABULARY_FILE = "item_vocabulary.parquet"
LEAN_DIR = "lean"


class MolarRequestError(ValueError):
    """A serving request the model cannot answer; the message says which row and why."""


def _values_offsets(column):
    """``(values, offsets)`` of a list column, whether it arrives ragged or as a fixed ``[rows, n]`` array."""
    values = np.asarray(column.values)
    offsets = column.offsets
    if offsets is None:
        if values.ndim != 2:
            raise MolarRequestError(f"expected a list column, got an array of shape {values.shape}")
        rows, width = values.shape
        return values.reshape(-1), np.arange(rows + 1, dtype=np.int64) * width
    return values, np.asarray(offsets).astype(np.int64)


def _save_vocabulary(vocabulary: pd.Series, path: Path) -> None:
    pd.DataFrame({"item_id": vocabulary.values, "item_id_raw": vocabulary.index}).to_parquet(path, index=False)


def is_string_dtype(dtype) -> bool:
    return np.dtype(dtype).kind in "OSU"


def as_bytes(values) -> np.ndarray:
    """String ids as an object array of UTF-8 ``bytes``: what Triton's BYTES tensors hold."""
    return np.array([v if isinstance(v, bytes) else str(v).encode() for v in np.asarray(values).ravel()],
                    dtype=object).reshape(np.shape(values))


class ItemCodec:
    """Raw item id <-> encoded id, with the fitted Categorify mapping (:func:`~merlin_molar.data.workflow.
    item_id_mapping`: the vocabulary file the training workflow wrote, so encoded ids are the training ones).

    Integer catalogues look up int64 ids; string catalogues (product codes) look up UTF-8 ``bytes``, the form
    Triton's BYTES tensors arrive in, and answer with ``bytes`` too. Unknown ids are refused, never encoded as
    Categorify's out-of-vocabulary id (its embedding was never trained).

    Lookups are per request, so they avoid pandas: integer ids are found with ``np.searchsorted`` in the sorted
    raw ids, string ids in a dict that holds every id both as ``bytes`` and as ``str`` (in-process callers
    send ``str``), so neither kind is converted first."""

    def __init__(self, raw_ids, encoded_ids):
        raw_ids, encoded_ids = np.asarray(raw_ids), np.asarray(encoded_ids, dtype=np.int64)
        self.strings = is_string_dtype(raw_ids.dtype)
        keys = as_bytes(raw_ids) if self.strings else raw_ids.astype(np.int64)
        if len(pd.unique(keys)) != len(keys):
            raise ValueError("the item vocabulary holds duplicate raw ids")
        self.encoded = encoded_ids
        self.raw = np.zeros(int(encoded_ids.max()) + 1, dtype=object if self.strings else np.int64)
        self.raw[encoded_ids] = keys
        if self.strings:
            self._lookup = {key: int(code) for key, code in zip(keys, encoded_ids)}
            for key, code in zip(keys, encoded_ids):
                try:
                    self._lookup.setdefault(key.decode(), int(code))
                except UnicodeDecodeError:
                    pass
        else:
            order = np.argsort(keys, kind="stable")
            self._sorted, self._sorted_codes = keys[order], encoded_ids[order]

    @classmethod
    def from_vocabulary(cls, vocabulary: pd.Series) -> "ItemCodec":
        return cls(np.asarray(vocabulary.index), vocabulary.to_numpy())

    @classmethod
    def load(cls, path) -> "ItemCodec":
        vocab = pd.read_parquet(path)
        return cls(vocab["item_id_raw"].to_numpy(), vocab["item_id"].to_numpy())

    @property
    def raw_dtype(self):
        return np.dtype(object) if self.strings else np.dtype(np.int64)

    def _codes(self, values: np.ndarray) -> np.ndarray:
        """Encoded ids, -1 for unknown ones."""
        if self.strings:
            get = self._lookup.get
            codes = np.fromiter((get(v, -1) for v in values.ravel()), dtype=np.int64, count=values.size)
            missing = np.flatnonzero(codes < 0)
            if len(missing):  # not bytes or str as stored (e.g. numpy bytes_, numbers in an object array)
                codes[missing] = [get(k, -1) for k in as_bytes(values.ravel()[missing])]
            return codes
        keys = values.astype(np.int64, copy=False)
        if not len(self._sorted):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, keys).clip(max=len(self._sorted) - 1)
        return np.where(self._sorted[pos] == keys, self._sorted_codes[pos], -1)

    def encode(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Encoded ids of a ragged batch's raw ids; :class:`MolarRequestError` names unknown ids and their rows."""
        if self.strings:
            if not is_string_dtype(values.dtype):
                raise MolarRequestError(f"this model's item ids are strings, got {values.dtype} values")
        elif not np.issubdtype(values.dtype, np.integer):
            raise MolarRequestError(f"this model's item ids are integers, got {values.dtype} values")
        codes = self._codes(values)
        unknown = codes < 0
        if unknown.any():
            keys = as_bytes(values) if self.strings else values.astype(np.int64, copy=False)
            rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            bad_rows = np.unique(rows[unknown])
            bad_ids = pd.unique(keys[unknown])
            shown = [b.decode(errors="replace") for b in bad_ids[:10]] if self.strings else bad_ids[:10].tolist()
            raise MolarRequestError(
                f"{len(bad_ids)} unknown item id(s) {shown} in row(s) {bad_rows[:10].tolist()}: "
                "they are not in the vocabulary the model was trained with"
            )
        return codes

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        return self.raw[encoded]


def check_histories(offsets: np.ndarray, n_values: int, max_batch_size: int) -> None:
    """Raise :class:`MolarRequestError` for an empty or oversized batch, malformed offsets or empty histories."""
    rows = len(offsets) - 1
    if rows == 1 and max_batch_size >= 1:  # one history (most requests): the same checks on Python ints
        start, end = int(offsets[0]), int(offsets[1])
        if start != 0:
            raise MolarRequestError(f"malformed request: the offsets must start at 0, got {start}")
        if end < 0:
            raise MolarRequestError("malformed request: the offsets must be in increasing order")
        if end != n_values:
            raise MolarRequestError(
                f"malformed request: the last offset ({end}) must match the number of values ({n_values})"
            )
        if end == 0:
            raise MolarRequestError("empty history in row(s) [0]: every row needs at least one item")
        return
    if rows < 1:
        raise MolarRequestError("the request holds no history (0 rows)")
    if offsets[0] != 0:
        raise MolarRequestError(f"malformed request: the offsets must start at 0, got {int(offsets[0])}")
    if rows > max_batch_size:
        raise MolarRequestError(f"batch of {rows} histories exceeds the maximum batch size {max_batch_size}")
    lengths = np.diff(offsets)
    if (lengths < 0).any():
        raise MolarRequestError("malformed request: the offsets must be in increasing order")
    if offsets[-1] != n_values:
        raise MolarRequestError(
            f"malformed request: the last offset ({int(offsets[-1])}) must match the number of values ({n_values})"
        )
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise MolarRequestError(f"empty history in row(s) {empty[:10].tolist()}: every row needs at least one item")


PIN_CORES = "pin_cores"  # the model config parameter written by export_triton(pin_cores=...)


def pinned_core(instance_name: str, cores) -> int:
    """The core Triton instance ``instance_name`` (``<group>_<index>``, e.g. ``molar_0_1``) binds itself to:
    the ``index``-th of ``cores`` (the CPUs the server may use), modulo their number."""
    cores = sorted(cores)
    index = instance_name.rsplit("_", 1)[-1]
    if not cores or not index.isdigit():
        raise ValueError(f"cannot pin Triton instance {instance_name!r} to one of the cores {cores}")
    return cores[int(index) % len(cores)]


class MolarRecommend(BaseOperator):
    """Raw histories -> top-k raw item ids and scores, in one step (see the module docstring).

    Input: the raw ``item_id-list`` column (ragged; int64 ids or strings). Each history keeps its last
    ``max_length`` items (the model's window, as in training); every item of the history is excluded from
    the answer, also the ones older than the window. Outputs ``item_ids`` (raw ids, ``[rows, top_k]``) and
    ``scores`` (float32, ``[rows, top_k]``), best first. Requests with no rows, more than ``max_batch_size``
    rows, malformed offsets, an empty history or unknown ids raise :class:`MolarRequestError`.

    ``torch_threads`` is torch's intra-op thread count in the serving process (0 keeps torch's default, one
    per core); it is set in ``load_artifacts`` only, so in-process use leaves the caller's torch alone. With
    ``N`` Triton instances on ``C`` cores, keep ``N * torch_threads <= C`` (the default 1 thread per instance
    and one instance per core): oversubscribed cores make each OpenMP barrier wait for a descheduled thread
    (measured on 2 busy cores: batch 1 took ~8 ms with 1 thread, ~350-580 ms with 2).
    """

    def __init__(
        self,
        model_path=None,
        vocabulary: Optional[pd.Series] = None,
        top_k: int = 10,
        max_batch_size: int = 256,
        torch_threads: int = 1,
    ):
        super().__init__()
        self.model_path = None if model_path is None else str(model_path)
        self.top_k = int(top_k)
        self.max_batch_size = int(max_batch_size)
        self.torch_threads = int(torch_threads)
        self._vocabulary = vocabulary
        self._codec = None if vocabulary is None else ItemCodec.from_vocabulary(vocabulary)
        self._lean = None
        self.raw_dtype = None if self._codec is None else self._codec.raw_dtype

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_vocabulary", "_codec", "_lean")}

    def __setstate__(self, state):
        self.__dict__.update(state, _vocabulary=None, _codec=None, _lean=None)

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        from merlin_molar.serving.lean import export_lean

        target = Path(artifact_path) / LEAN_DIR
        if target.exists():
            shutil.rmtree(target)
        export_lean(self.model_path, target)
        _save_vocabulary(self._vocabulary, Path(artifact_path) / VOCABULARY_FILE)

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if not artifact_path:  # merlin.dag.Graph calls this with "" while building; load lazily instead
            return
        import torch

        from merlin_molar.serving.lean import LeanModel

        # only here, in the serving process: in-process use of the graph leaves the caller's threads alone
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        self._codec = ItemCodec.load(Path(artifact_path) / VOCABULARY_FILE)
        self._lean = LeanModel.load(Path(artifact_path) / LEAN_DIR)

    def _load_in_process(self) -> None:
        """In-process use of the graph, without an export: the same lean model, built in a temporary directory."""
        from merlin_molar.serving.lean import LeanModel, export_lean

        with tempfile.TemporaryDirectory(prefix="molar-lean-") as tmp:
            self._lean = LeanModel.load(export_lean(self.model_path, tmp))

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None) -> Schema:
        shape = (None, self.top_k)
        return Schema(
            [
                ColumnSchema(ITEM_IDS, dtype=str if self._is_strings() else np.int64, dims=shape, tags=[Tags.ITEM_ID]),
                ColumnSchema(SCORES, dtype=np.float32, dims=shape),
            ]
        )

    def _is_strings(self) -> bool:
        return self.raw_dtype is not None and is_string_dtype(self.raw_dtype)

    def transform(self, col_selector: ColumnSelector, transformable):
        if ITEM_SEQUENCE not in transformable.columns:
            raise MolarRequestError(f"the request has no {ITEM_SEQUENCE!r} input")
        values, offsets = _values_offsets(transformable[ITEM_SEQUENCE])
        item_ids, scores = self.recommend(values, offsets)
        return type(transformable)({ITEM_IDS: item_ids, SCORES: scores})

    def recommend(self, values: np.ndarray, offsets: np.ndarray):
        """``(raw item ids, scores)``, each ``[rows, top_k]``, for a ragged batch of raw histories."""
        if self._lean is None:
            self._load_in_process()
        check_histories(offsets, len(values), self.max_batch_size)
        encoded = self._codec.encode(values, offsets)
        top_scores, top_ids = self._lean.top_k(encoded, offsets, self.top_k)
        return self._codec.decode(top_ids), top_scores.astype(np.float32, copy=False)
