"""Query an exported repository with ``tritonclient`` over HTTP or gRPC.

Example::

    from merlin_molar.serving.client import connect, recommend
    client = connect("127.0.0.1:8000", "http")
    item_ids, scores = recommend(client, [[50, 258, 100], [181]], model_name="molar")   # raw ids in and out
    item_ids, scores = recommend(client, [["B00004Z5M1", "B000001SOV"]])   # a catalogue with string ids

Integer ids travel as INT64 tensors, string ids (product codes) as BYTES tensors of UTF-8; the answer's ids
come back in the request's kind (``int64`` array, or object array of ``str``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.serving.columns import ITEM_IDS, SCORES

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


def history_tensors(histories: Sequence[Sequence]) -> Tuple[np.ndarray, np.ndarray]:
    """Ragged request tensors: all raw item ids concatenated and ``rows + 1`` offsets (int32). Integer ids
    give int64 values; string ids (``str`` or ``bytes``) give an object array of UTF-8 ``bytes`` (BYTES)."""
    lengths = [len(h) for h in histories]
    flat = [item for history in histories for item in history]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    if any(isinstance(item, (str, bytes, np.str_, np.bytes_)) for item in flat):
        values = np.array([i if isinstance(i, bytes) else str(i).encode() for i in flat], dtype=object)
    else:
        values = np.asarray(flat, dtype=np.int64).reshape(-1)
    return values, offsets


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


def recommend(client, histories: Sequence[Sequence], model_name: str = "molar") -> Tuple[np.ndarray, np.ndarray]:
    """Top-k ``(item_ids, scores)``, each ``[rows, top_k]``, for raw-id histories (integer or string ids).
    String ids come back as an object array of ``str``. Errors raise
    ``tritonclient.utils.InferenceServerException`` with the server's message."""
    values, offsets = history_tensors(histories)
    result = client.infer(model_name, infer_inputs(client, values, offsets))
    return decode_ids(result.as_numpy(ITEM_IDS)), result.as_numpy(SCORES)


def decode_ids(item_ids: np.ndarray) -> np.ndarray:
    """BYTES ids (object array of ``bytes``) as an object array of ``str``; integer ids unchanged."""
    if item_ids.dtype != object:
        return item_ids
    return np.array([i.decode() if isinstance(i, bytes) else i for i in item_ids.ravel()],
                    dtype=object).reshape(item_ids.shape)
