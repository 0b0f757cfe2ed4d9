"""The exported repository on a real Triton server (the binary bundled in nvidia-pytriton), queried with
tritonclient over HTTP and gRPC on 127.0.0.1: served top-k == in-process top-k; bad requests get errors."""
import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from merlin_molar.serving import TritonServer
from merlin_molar.serving.client import connect, history_tensors, infer_inputs, recommend

PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository) as running:  # stopped on exit, also when a test fails
        yield running
    assert running.process is None


@pytest.fixture(scope="module")
def clients(server):
    return {"http": connect(server.http_url, "http"), "grpc": connect(server.grpc_url, "grpc")}


@pytest.fixture(scope="module")
def limits(repository):
    return json.loads((repository / "molar_serving.json").read_text())


def assert_same_top_k(served, expected):
    (ids, scores), (want_ids, want_scores) = served, expected
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_server_runs_both_models(server, clients):
    index = {m["name"]: m.get("state") for m in clients["http"].get_model_repository_index()}
    assert index == {"molar": "READY", "0_transformworkflowtriton": "READY"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_top_k_equals_in_process(clients, raw_histories, in_process, protocol):
    client = clients[protocol]
    batch = recommend(client, raw_histories)
    assert batch[0].shape == (len(raw_histories), 10)
    assert_same_top_k(batch, in_process(raw_histories))
    assert len({tuple(row) for row in batch[0]}) > len(raw_histories) // 2  # real, history-dependent answers
    for history in raw_histories[:3]:
        assert_same_top_k(recommend(client, [history]), in_process([history]))


def test_history_items_are_never_recommended(clients, raw_histories):
    ids, scores = recommend(clients["http"], raw_histories)
    for history, row in zip(raw_histories, ids):
        assert not set(history) & set(row.tolist())
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()


def test_history_longer_than_the_window(clients, raw_histories, in_process):
    long = [raw_histories[0] + raw_histories[3] + raw_histories[8]]  # 52 real items, window is 20
    served = recommend(clients["grpc"], long)
    assert_same_top_k(served, in_process(long))
    assert not set(long[0]) & set(served[0][0].tolist())


def send(client, values, offsets):
    return client.infer("molar", infer_inputs(client, values, offsets))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(
    clients, raw_histories, in_process, limits, protocol
):
    client = clients[protocol]
    good = raw_histories[:2]
    expected = in_process(good)
    values, offsets = history_tensors(good)
    too_many = history_tensors([raw_histories[0][:1]] * (limits["max_batch_size"] + 1))
    bad = {
        "empty history": (history_tensors([good[0], []]), r"empty history in row\(s\) \[1\]"),
        "unknown ids": (
            history_tensors([good[0], [999999, good[1][0], -5]]),
            r"2 unknown item id\(s\) \[999999, -5\] in row\(s\) \[1\]",
        ),
        "wrong dtype": ((values.astype(np.float32), offsets), "data-type is 'FP32', but model 'molar' expects 'INT64'"),
        "wrong offsets dtype": ((values, offsets.astype(np.int64)), "'item_id-list__offsets' data-type is 'INT64'"),
        "wrong shape": ((values[:4].reshape(2, 2), offsets[:2]), r"Expected \[-1\], got \[2,2\]"),
        "offsets past the values": (
            (values, np.array([0, 3, len(values) + 5], np.int32)),
            "malformed request: The last offset must match the length of the values",
        ),
        "decreasing offsets": ((values, np.array([0, 5, 3, len(values)], np.int32)), "increasing order"),
        "offsets not from 0": ((values, np.array([1, 3, len(values)], np.int32)), "must start at 0"),
        "oversized batch": (too_many, f"exceeds the maximum batch size {limits['max_batch_size']}"),
        "no rows": ((np.zeros(0, np.int64), np.zeros(1, np.int32)), "no history"),
    }
    for name, ((bad_values, bad_offsets), message) in bad.items():
        with pytest.raises(InferenceServerException, match=message) as error:
            send(client, bad_values, bad_offsets)
        assert str(error.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (name, error.value)
        assert "Traceback" not in str(error.value), name
        assert_same_top_k(recommend(client, good), expected)  # the next good request is still answered
