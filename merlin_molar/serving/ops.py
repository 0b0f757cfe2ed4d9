"""merlin-systems operators for serving a saved merlin-molar model from Triton's Python backend.

The exported graph (see :func:`merlin_molar.serving.export_triton`) is::

    raw history  >> ValidateHistory >> TransformWorkflow(serving workflow) >> MolarTopK  ->  item_ids, scores

Both operators run in-process inside merlin-systems' executor model; the workflow runs in its own
Python-backend model (merlin-systems calls it over BLS). Neither operator pickles a model or a
vocabulary: ``save_artifacts`` writes them next to the ensemble and ``load_artifacts`` reads them back
(the model through :func:`merlin_molar.persistence.load_model`).

Example::

    validate = ValidateHistory("item_id-list", vocabulary, max_batch_size=256)
    topk = MolarTopK("/path/to/saved/model", vocabulary, top_k=10)
    graph = ["item_id-list"] >> validate >> TransformWorkflow(workflow) >> topk
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from merlin_molar.data.workflow import FIRST_ITEM_ID, ITEM_SEQUENCE

VOCABULARY_FILE = "item_vocabulary.parquet"
MODEL_DIR = "molar_model"
ITEM_IDS = "item_ids"
SCORES = "scores"


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


def _load_vocabulary(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


class ValidateHistory(BaseOperator):
    """Reject requests the model cannot answer, before the workflow encodes them.

    Checks, per request: at least one and at most ``max_batch_size`` histories, no empty history, and every
    raw item id known to the fitted Categorify vocabulary (an unknown id would be encoded as Categorify's
    out-of-vocabulary id 2, whose embedding was never trained). The message names the rows and ids.

    ``vocabulary`` maps raw item id -> encoded id (:func:`merlin_molar.data.workflow.item_id_mapping`).
    """

    def __init__(self, column: str, vocabulary: Optional[pd.Series] = None, max_batch_size: int = 256):
        super().__init__()
        self.column = column
        self.max_batch_size = int(max_batch_size)
        self._vocabulary = vocabulary
        self._known = None if vocabulary is None else np.sort(np.asarray(vocabulary.index))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_vocabulary", "_known")}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        _save_vocabulary(self._vocabulary, Path(artifact_path) / VOCABULARY_FILE)

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if not artifact_path:  # merlin.dag.Graph calls this with "" while building: keep the in-memory state
            return
        self._known = np.sort(_load_vocabulary(Path(artifact_path) / VOCABULARY_FILE)["item_id_raw"].to_numpy())

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None) -> Schema:
        return input_schema

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    def transform(self, col_selector: ColumnSelector, transformable):
        if self.column not in transformable.columns:
            raise MolarRequestError(f"the request has no {self.column!r} input")
        values, offsets = _values_offsets(transformable[self.column])
        check_histories(values, offsets, self._known, self.max_batch_size)
        return transformable


def check_histories(values: np.ndarray, offsets: np.ndarray, known: np.ndarray, max_batch_size: int) -> None:
    """Raise :class:`MolarRequestError` for an empty or oversized batch, empty histories or unknown ids."""
    rows = len(offsets) - 1
    if rows < 1:
        raise MolarRequestError("the request holds no history (0 rows)")
    if offsets[0] != 0:
        raise MolarRequestError(f"malformed request: the offsets must start at 0, got {int(offsets[0])}")
    if rows > max_batch_size:
        raise MolarRequestError(f"batch of {rows} histories exceeds the maximum batch size {max_batch_size}")
    lengths = np.diff(offsets)
    empty = np.flatnonzero(lengths <= 0)
    if len(empty):
        raise MolarRequestError(f"empty history in row(s) {empty[:10].tolist()}: every row needs at least one item")
    pos = np.searchsorted(known, values).clip(max=len(known) - 1)
    unknown = known[pos] != values
    if unknown.any():
        bad_rows = np.unique(np.repeat(np.arange(rows), lengths)[unknown])
        bad_ids = pd.unique(values[unknown])
        raise MolarRequestError(
            f"{len(bad_ids)} unknown item id(s) {bad_ids[:10].tolist()} in row(s) {bad_rows[:10].tolist()}: "
            "they are not in the vocabulary the model was trained with"
        )


class MolarTopK(BaseOperator):
    """History -> user embedding -> top-k items (history excluded) for a saved merlin-molar model.

    Input: the encoded ``item_id-list`` column from the serving workflow (ragged). Each history keeps its
    last ``max_length`` items (the model's window, as in training), right-padded with 0. Every item of the
    request's history is excluded from the ranking, also the ones older than the window. Outputs:
    ``item_ids`` (raw ids, ``[rows, top_k]``) and ``scores`` (float32, ``[rows, top_k]``), best first.

    ``torch_threads`` is torch's intra-op thread count in the serving process (0 keeps torch's default, one
    per core). The default 1: when the server's processes and other work share the cores, more threads
    oversubscribe them and each OpenMP barrier waits for a descheduled thread (measured on 2 busy cores:
    batch 1 took ~8 ms with 1 thread, ~350-580 ms with 2). Raise it on dedicated cores for large batches.
    """

    def __init__(
        self, model_path=None, vocabulary: Optional[pd.Series] = None, top_k: int = 10, torch_threads: int = 1
    ):
        super().__init__()
        self.model_path = None if model_path is None else str(model_path)
        self.top_k = int(top_k)
        self.torch_threads = int(torch_threads)
        self._vocabulary = vocabulary
        self._raw_ids = None
        self._model = None
        self.max_length = None
        self.raw_dtype = None if vocabulary is None else np.asarray(vocabulary.index).dtype

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_vocabulary", "_raw_ids", "_model")}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        target = Path(artifact_path) / MODEL_DIR
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.model_path, target)
        _save_vocabulary(self._vocabulary, Path(artifact_path) / VOCABULARY_FILE)

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if not artifact_path:  # merlin.dag.Graph calls this with "" while building; load lazily instead
            return
        import torch

        # only here, in the serving process: in-process use of the graph leaves the caller's threads alone
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        self._load(Path(artifact_path) / MODEL_DIR, _load_vocabulary(Path(artifact_path) / VOCABULARY_FILE))

    def _load(self, model_dir: Path, vocab: pd.DataFrame) -> None:
        from merlin_molar.persistence import load_model

        self._model, _, config, _ = load_model(model_dir)
        self.max_length = int(config.max_length)
        raw = np.zeros(int(vocab["item_id"].max()) + 1, dtype=vocab["item_id_raw"].dtype)
        raw[vocab["item_id"].to_numpy()] = vocab["item_id_raw"].to_numpy()
        self._raw_ids = raw

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None) -> Schema:
        shape = (None, self.top_k)
        return Schema(
            [
                ColumnSchema(ITEM_IDS, dtype=self.raw_dtype, dims=shape, tags=[Tags.ITEM_ID]),
                ColumnSchema(SCORES, dtype=np.float32, dims=shape),
            ]
        )

    def transform(self, col_selector: ColumnSelector, transformable):
        import torch

        if self._model is None:  # in-process use of the graph, without an export
            vocab = pd.DataFrame({"item_id": self._vocabulary.values, "item_id_raw": self._vocabulary.index})
            self._load(Path(self.model_path), vocab)
        values, offsets = _values_offsets(transformable[ITEM_SEQUENCE])
        if (values < FIRST_ITEM_ID).any():
            # ValidateHistory runs first; this only fires if the graph was rebuilt without it.
            raise MolarRequestError("the encoded history holds reserved ids (padding / null / out-of-vocabulary)")
        lengths = np.diff(offsets)
        batch = right_padded_window(values, offsets, self.max_length)
        with torch.inference_mode():  # local: never switch autograd off for the whole process
            scores = self._model({ITEM_SEQUENCE: torch.from_numpy(batch)})
            rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
            scores[rows, torch.from_numpy(values.astype(np.int64))] = float("-inf")
            top_scores, top_ids = torch.topk(scores, k=self.top_k, dim=-1)
        return type(transformable)(
            {
                ITEM_IDS: self._raw_ids[top_ids.numpy()],
                SCORES: top_scores.numpy().astype(np.float32),
            }
        )


def right_padded_window(values: np.ndarray, offsets: np.ndarray, max_length: int) -> np.ndarray:
    """``[rows, max_length]`` int64: each row's last ``max_length`` items, right-padded with 0."""
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_length)
    pos = np.arange(max_length)
    src = (offsets[1:] - keep)[:, None] + pos[None, :]
    inside = pos[None, :] < keep[:, None]
    gathered = values[np.where(inside, src, 0).clip(max=max(len(values) - 1, 0))] if len(values) else src * 0
    return np.where(inside, gathered, 0).astype(np.int64)
