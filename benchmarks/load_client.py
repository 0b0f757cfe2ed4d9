"""One client process of benchmarks/serving_load.py: sends its share of requests to the server, checks each
answer, and reports latencies and outcomes. Imports only numpy and tritonclient (a spawned process starts fast).

Each planned request is ``(kind, values, offsets, expect)``: ``kind`` is ``"good"`` or the name of a bad
request; ``expect`` is, for a good request, ``None`` or the in-process ``(ids, scores)`` it must equal, and for
a bad one the text its error message must contain.
"""
from __future__ import annotations

import time

import numpy as np

OUTCOMES = ("ok", "expected_error", "unexpected_error", "mismatch", "lost")


def _inputs(module, values, offsets):
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, array in (("item_id-list__values", values), ("item_id-list__offsets", offsets)):
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def check_answer(ids, scores, values, offsets, top_k, expect, catalogue_ids):
    """``None`` if the answer is right, else what is wrong."""
    rows = len(offsets) - 1
    if ids is None or scores is None or ids.shape != (rows, top_k) or scores.shape != (rows, top_k):
        return f"shape {None if ids is None else ids.shape}, expected {(rows, top_k)}"
    if not np.isfinite(scores).all() or (np.diff(scores, axis=1) > 0).any():
        return "scores not finite or not sorted"
    for row in range(rows):
        history = set(values[offsets[row]:offsets[row + 1]].tolist())
        if history & set(ids[row].tolist()):
            return f"row {row} recommends an item of its own history"
    if not np.isin(ids, catalogue_ids).all():
        return "an id outside the catalogue"
    if expect is not None:
        want_ids, want_scores = expect
        if not np.array_equal(ids, want_ids):
            return "ids differ from in-process"
        if not np.allclose(scores, want_scores, rtol=1e-5, atol=1e-5):
            return "scores differ from in-process"
    return None


def run_client(url, protocol, plan, top_k, catalogue_ids, start_at, timeout_s, max_seconds, model="molar"):
    """Send ``plan`` back to back (from ``start_at``, a ``time.time()``), bounded by ``max_seconds``. Returns a
    dict: per-request latency seconds, batch size, kind and outcome, and the first messages of each outcome."""
    if protocol == "grpc":
        import tritonclient.grpc as module

        client = module.InferenceServerClient(url)
        call = dict(client_timeout=timeout_s)
    else:
        import tritonclient.http as module

        client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        call = {}
    from tritonclient.utils import InferenceServerException

    catalogue_ids = np.asarray(catalogue_ids)
    records, notes = [], {}
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.monotonic() + max_seconds
    began = time.time()
    for kind, values, offsets, expect in plan:
        if time.monotonic() > deadline:
            break
        inputs = _inputs(module, values, offsets)
        start = time.perf_counter()
        try:
            result = client.infer(model, inputs, **call)
            latency = time.perf_counter() - start
            ids, scores = result.as_numpy("item_ids"), result.as_numpy("scores")
            if kind != "good":
                outcome, note = "unexpected_error", f"{kind}: answered instead of refused"
            else:
                problem = check_answer(ids, scores, values, offsets, top_k, expect, catalogue_ids)
                outcome, note = ("ok", None) if problem is None else ("mismatch", problem)
        except InferenceServerException as exc:
            latency = time.perf_counter() - start
            message, status = str(exc), str(exc.status())
            timed_out = "Deadline" in message or "timed out" in message.lower() or "DEADLINE" in status
            if timed_out:
                outcome, note = "lost", f"{kind}: {message[:200]}"
            elif kind != "good" and expect in message and status in ("400", "StatusCode.INVALID_ARGUMENT"):
                outcome, note = "expected_error", None
            else:
                outcome, note = "unexpected_error", f"{kind}: [{status}] {message[:300]}"
        except Exception as exc:  # noqa: BLE001  (a broken connection is counted, the loop goes on)
            latency = time.perf_counter() - start
            outcome, note = "lost", f"{kind}: {type(exc).__name__}: {str(exc)[:200]}"
        records.append((latency, len(offsets) - 1, kind, outcome))
        if note is not None and len(notes.setdefault(outcome, [])) < 5:
            notes[outcome].append(note)
    ended = time.time()
    client.close()
    return {"records": records, "notes": notes, "planned": len(plan), "began": began, "ended": ended}
