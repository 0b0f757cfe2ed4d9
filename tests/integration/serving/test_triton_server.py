"""The exported repositories on a real Triton server (the binary bundled in nvidia-pytriton), queried with
tritonclient over HTTP and gRPC on 127.0.0.1, for a catalogue with integer item ids (ml-100k) and one with
string ids (product codes): served top-k == in-process top-k of the saved model; bad requests get errors."""
import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from merlin_molar.serving import TritonServer
from merlin_molar.serving.client import connect, history_tensors, infer_inputs, recommend

PROTOCOLS = ["http", "grpc"]
CATALOGUES = ["int", "str"]


@pytest.fixture(scope="module")
def servers(catalogues):
    """One running server per catalogue (the string catalogue's repository has 2 instances)."""
    started = {}
    try:
        for name, catalogue in catalogues.items():
            started[name] = TritonServer(catalogue["repository"]).start()
        yield started
    finally:
        for server in started.values():
            server.stop()
    assert all(server.process is None for server in started.values())


@pytest.fixture(scope="module")
def clients(servers):
    return {
        (name, protocol): connect(server.http_url if protocol == "http" else server.grpc_url, protocol)
        for name, server in servers.items()
        for protocol in PROTOCOLS
    }


def assert_same_top_k(served, expected):
    (ids, scores), (want_ids, want_scores) = served, expected
    assert ids.dtype == want_ids.dtype and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_each_server_runs_one_model(servers, clients):
    for name in servers:
        index = {m["name"]: m.get("state") for m in clients[(name, "http")].get_model_repository_index()}
        assert index == {"molar": "READY"}  # no separate workflow model: one hop


@pytest.mark.parametrize("catalogue", CATALOGUES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_top_k_equals_in_process(clients, catalogues, catalogue, protocol):
    client, histories = clients[(catalogue, protocol)], catalogues[catalogue]["histories"]
    in_process = catalogues[catalogue]["in_process"]
    if catalogue == "str":
        assert all(isinstance(i, str) and i.startswith("B") for h in histories for i in h)
    batch = recommend(client, histories)
    assert batch[0].shape == (len(histories), 10)
    if catalogue == "str":
        assert isinstance(batch[0][0, 0], str) and len(batch[0][0, 0]) == 10  # product codes come back
    assert_same_top_k(batch, in_process(histories))
    assert len({tuple(row) for row in batch[0]}) > len(histories) // 2  # real, history-dependent answers
    for history in histories[:3]:
        assert_same_top_k(recommend(client, [history]), in_process([history]))


@pytest.mark.parametrize("catalogue", CATALOGUES)
def test_history_items_are_never_recommended(clients, catalogues, catalogue):
    histories = catalogues[catalogue]["histories"]
    ids, scores = recommend(clients[(catalogue, "http")], histories)
    for history, row in zip(histories, ids):
        assert not set(history) & set(row.tolist())
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()


def test_history_longer_than_the_window(clients, catalogues):
    raw_histories, in_process = catalogues["int"]["histories"], catalogues["int"]["in_process"]
    long = [raw_histories[0] + raw_histories[3] + raw_histories[8]]  # 52 real items, window is 20
    served = recommend(clients[("int", "grpc")], long)
    assert_same_top_k(served, in_process(long))
    assert not set(long[0]) & set(served[0][0].tolist())


def send(client, values, offsets):
    return client.infer("molar", infer_inputs(client, values, offsets))


def bad_requests(histories, max_batch_size, catalogue):
    good = histories[:2]
    values, offsets = history_tensors(good)
    unknown = [999999, good[1][0], -5] if catalogue == "int" else ["B00004Z5M1", good[1][0], "x"]
    unknown_message = (r"2 unknown item id\(s\) \[999999, -5\] in row\(s\) \[1\]" if catalogue == "int"
                       else r"2 unknown item id\(s\) \['B00004Z5M1', 'x'\] in row\(s\) \[1\]")
    wrong_kind = np.arange(len(values), dtype=np.int64) if catalogue == "str" else values.astype(np.float32)
    expects = "BYTES" if catalogue == "str" else "INT64"
    return {
        "empty history": (history_tensors([good[0], []]), r"empty history in row\(s\) \[1\]"),
        "unknown ids": (history_tensors([good[0], unknown]), unknown_message),
        "wrong dtype": ((wrong_kind, offsets), f"model 'molar' expects '{expects}'"),
        "wrong offsets dtype": ((values, offsets.astype(np.int64)), "'item_id-list__offsets' data-type is 'INT64'"),
        "wrong shape": ((values[:4].reshape(2, 2), offsets[:2]), r"Expected \[-1\], got \[2,2\]"),
        "offsets past the values": (
            (values, np.array([0, 3, len(values) + 5], np.int32)),
            r"malformed request: the last offset \(\d+\) must match the number of values",
        ),
        "decreasing offsets": ((values, np.array([0, 5, 3, len(values)], np.int32)), "increasing order"),
        "offsets not from 0": ((values, np.array([1, 3, len(values)], np.int32)), "must start at 0"),
        "oversized batch": (history_tensors([good[0][:1]] * (max_batch_size + 1)),
                            f"exceeds the maximum batch size {max_batch_size}"),
        "no rows": ((values[:0], np.zeros(1, np.int32)), "no history"),
    }


@pytest.mark.parametrize("catalogue", CATALOGUES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(clients, catalogues, catalogue, protocol):
    client, histories = clients[(catalogue, protocol)], catalogues[catalogue]["histories"]
    limits = json.loads((catalogues[catalogue]["repository"] / "molar_serving.json").read_text())
    good = histories[:2]
    expected = catalogues[catalogue]["in_process"](good)
    for name, ((bad_values, bad_offsets), message) in bad_requests(histories, limits["max_batch_size"],
                                                                    catalogue).items():
        with pytest.raises(InferenceServerException, match=message) as error:
            send(client, bad_values, bad_offsets)
        assert str(error.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (name, error.value)
        assert "Traceback" not in str(error.value), name
        assert_same_top_k(recommend(client, good), expected)  # the next good request is still answered
