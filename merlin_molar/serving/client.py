"""Query an exported repository with ``tritonclient`` over HTTP or gRPC.

Example::

    from merlin_molar.serving.client import connect, recommend
    client = connect("127.0.0.1:8000", "http")
    item_ids, scores = recommend(client, [[50, 258, 100], [181]], model_name="molar")   # raw ids in and out
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from merlin_molar.data.workflow import ITEM_SEQUENCE
from merlin_molar.serving.ops import ITEM_IDS, SCORES

PROTOCOLS = ("http", "grpc")


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


def connect(url: str, protocol: str = "http", **kwargs):
    """A ``tritonclient`` ``InferenceServerClient`` for ``url`` (``host:port``)."""
    return _module(protocol).InferenceServerClient(url, **kwargs)


def history_tensors(histories: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Ragged request tensors: all raw item ids concatenated (int64) and ``rows + 1`` offsets (int32)."""
    lengths = [len(h) for h in histories]
    values = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if histories else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return values.astype(np.int64), offsets


def infer_inputs(client, values: np.ndarray, offsets: np.ndarray):
    """``InferInput`` objects for the two request tensors, of the client's protocol, with the arrays' own dtypes
    (so a test can send a wrong dtype or shape on purpose)."""
    from tritonclient.utils import np_to_triton_dtype

    module = _module("grpc" if "grpc" in type(client).__module__ else "http")
    inputs = []
    for name, array in ((f"{ITEM_SEQUENCE}__values", values), (f"{ITEM_SEQUENCE}__offsets", offsets)):
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def recommend(client, histories: Sequence[Sequence[int]], model_name: str = "molar") -> Tuple[np.ndarray, np.ndarray]:
    """Top-k ``(item_ids, scores)``, each ``[rows, top_k]``, for raw-id histories. Errors raise
    ``tritonclient.utils.InferenceServerException`` with the server's message."""
    values, offsets = history_tensors(histories)
    result = client.infer(model_name, infer_inputs(client, values, offsets))
    return result.as_numpy(ITEM_IDS), result.as_numpy(SCORES)
