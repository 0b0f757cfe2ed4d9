"""Export to a Triton model repository (no server): the one-hop encoding, the lean model, the repository,
request checks, and the exported graph run in-process."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from merlin_molar.data.workflow import item_id_mapping
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.serving import ItemCodec, LeanModel, MolarRequestError, export_lean, export_triton
from merlin_molar.serving.lean import length_buckets, right_padded_window
from merlin_molar.serving.ops import check_histories

TOP_K = 10  # as exported by the `repository` fixture (conftest.py)
MAX_BATCH = 16


def codec_of(prepared):
    return ItemCodec.from_vocabulary(item_id_mapping(prepared.load_workflow()))


@pytest.mark.parametrize("catalogue", ["int", "str"])
def test_one_hop_encoding_equals_the_training_workflow(catalogue, request):
    # the served step encodes raw ids itself: it must give exactly the ids the training workflow gave
    prepared = request.getfixturevalue({"int": "ml100k_prepared", "str": "coded_prepared"}[catalogue])
    vocabulary = request.getfixturevalue({"int": "vocabulary", "str": "coded_vocabulary"}[catalogue])
    train = pd.read_parquet(prepared.split_path("train") / "part_0.parquet", columns=[ITEM_SEQUENCE])
    encoded = np.concatenate(train[ITEM_SEQUENCE].map(np.asarray).tolist())
    assert len(np.unique(encoded)) > 100  # real, varied histories
    raw = vocabulary[encoded]
    if catalogue == "str":
        assert isinstance(raw[0], str) and len(raw[0]) == 10  # product codes such as B000001SOV
    codec = codec_of(prepared)
    np.testing.assert_array_equal(codec.encode(raw, np.array([0, len(raw)])), encoded)
    np.testing.assert_array_equal(codec.decode(encoded), raw if catalogue == "int" else [r.encode() for r in raw])


def test_unknown_ids_are_refused_by_name(ml100k_prepared, coded_prepared):
    with pytest.raises(MolarRequestError, match=r"2 unknown item id\(s\) \[999999, -5\] in row\(s\) \[1\]"):
        codec_of(ml100k_prepared).encode(np.array([50, 999999, 100, -5]), np.array([0, 1, 4]))
    with pytest.raises(MolarRequestError, match=r"1 unknown item id\(s\) \['B00004Z5M1'\] in row\(s\) \[0\]"):
        codec_of(coded_prepared).encode(np.array([b"B00004Z5M1"], dtype=object), np.array([0, 1]))
    with pytest.raises(MolarRequestError, match="item ids are strings, got int64"):
        codec_of(coded_prepared).encode(np.array([50]), np.array([0, 1]))
    with pytest.raises(MolarRequestError, match="item ids are integers"):
        codec_of(ml100k_prepared).encode(np.array([b"50"], dtype=object), np.array([0, 1]))


def test_length_buckets():
    assert length_buckets(20) == [8, 16, 20]
    assert length_buckets(50) == [8, 16, 32, 50]
    assert length_buckets(8) == [8] and length_buckets(5) == [5]


@pytest.mark.parametrize("catalogue", ["int", "str"])
def test_lean_model_scores_equal_the_saved_model(catalogue, request, tmp_path):
    """Precomputed tables + traced towers + one matmul == the Transformers4Rec forward, at every length."""
    from merlin_molar.persistence import load_model

    saved = request.getfixturevalue({"int": "molar_saved", "str": "coded_saved"}[catalogue])
    lean = LeanModel.load(export_lean(saved, tmp_path / "lean"))
    assert lean.mode == "fused" and lean.buckets == [8, 16, 20] and set(lean.towers) == {"content", "id"}
    model = load_model(saved)[0]
    n_items = lean.n_items
    generator = torch.Generator().manual_seed(0)
    for lengths in ([1], [5, 1, 8], [9, 16, 3], [20, 17], [13]):
        window = torch.zeros(len(lengths), 20, dtype=torch.long)
        for row, n in enumerate(lengths):
            window[row, :n] = torch.randint(3, n_items, (n,), generator=generator)
        with torch.no_grad():
            want = model({ITEM_SEQUENCE: window})
            got = lean.scores(window)
        got[:, :3] = float("-inf")  # the T4Rec forward masks reserved ids and the window (LeanModel.top_k does)
        got.scatter_(1, window, float("-inf"))
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.topk(got, TOP_K).indices, torch.topk(want, TOP_K).indices)


def test_repository_layout_and_configs(repository, molar_saved, tmp_path, ml100k_prepared):
    configs = {}
    for path in repository.glob("*/config.pbtxt"):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert set(configs) == {"molar"}  # one model: no NVTabular workflow model, one hop per request
    executor = configs["molar"]
    assert executor.backend == "python"
    assert {(i.name, model_config_pb2.DataType.Name(i.data_type)) for i in executor.input} == {
        (f"{ITEM_SEQUENCE}__values", "TYPE_INT64"),
        (f"{ITEM_SEQUENCE}__offsets", "TYPE_INT32"),
    }
    assert {(o.name, model_config_pb2.DataType.Name(o.data_type), tuple(o.dims)) for o in executor.output} == {
        ("item_ids", "TYPE_INT64", (-1, TOP_K)),
        ("scores", "TYPE_FP32", (-1, TOP_K)),
    }
    assert [(g.count, g.kind) for g in executor.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    model_py = (repository / "molar" / "1" / "model.py").read_text()
    assert "from merlin_molar.serving.executor_model import TritonPythonModel" in model_py
    lean = repository / "molar" / "1" / "ensemble" / "lean"
    assert {p.name for p in lean.iterdir()} == {"lean.json", "tables.safetensors", "content_tower.pt", "id_tower.pt"}
    manifest = json.loads((repository / "molar_serving.json").read_text())
    assert manifest["top_k"] == TOP_K and manifest["max_batch_size"] == MAX_BATCH
    assert manifest["item_ids"] == "int64" and manifest["instances"] == 1 and manifest["pin_cores"] is False
    assert executor.parameters["pin_cores"].string_value == "false"

    four = export_triton(molar_saved, ml100k_prepared.root, tmp_path / "four", instances=4, torch_threads=1)
    config = text_format.Parse((four / "molar" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(g.count, g.kind) for g in config.instance_group] == [(4, model_config_pb2.ModelInstanceGroup.KIND_CPU)]


def test_string_catalogue_repository(coded_repository):
    config = text_format.Parse((coded_repository / "molar" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    types = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in [*config.input, *config.output]}
    assert types == {f"{ITEM_SEQUENCE}__values": "TYPE_STRING", f"{ITEM_SEQUENCE}__offsets": "TYPE_INT32",
                     "item_ids": "TYPE_STRING", "scores": "TYPE_FP32"}
    assert [g.count for g in config.instance_group] == [2]
    assert config.parameters["pin_cores"].string_value == "true"
    manifest = json.loads((coded_repository / "molar_serving.json").read_text())
    assert manifest["pin_cores"] is True
    assert manifest["item_ids"] == "string" and manifest["inputs"][f"{ITEM_SEQUENCE}__values"] == "BYTES"


def test_export_refuses_bad_arguments(molar_saved, ml100k_prepared, repository, tmp_path):
    with pytest.raises(MolarDataError, match="top_k"):
        export_triton(molar_saved, ml100k_prepared.root, tmp_path / "r", top_k=0)
    with pytest.raises(MolarDataError, match="top_k"):
        export_triton(molar_saved, ml100k_prepared.root, tmp_path / "r", top_k=10**6)
    with pytest.raises(MolarDataError, match="instances"):
        export_triton(molar_saved, ml100k_prepared.root, tmp_path / "r", instances=0)
    with pytest.raises(MolarDataError, match="not empty"):
        export_triton(molar_saved, ml100k_prepared.root, repository)
    with pytest.raises(MolarDataError, match="not a saved merlin-molar model|file not found"):
        export_triton(tmp_path, ml100k_prepared.root, tmp_path / "r")
    with pytest.raises(MolarDataError, match="prepare"):
        export_triton(molar_saved, tmp_path, tmp_path / "r")


@pytest.mark.parametrize(
    "offsets, n_values, message",
    [
        ([0, 2, 2], 2, r"empty history in row\(s\) \[1\]"),
        ([0], 0, "no history"),
        ([1, 2], 2, "must start at 0"),
        ([0, 3, 2], 2, "increasing order"),
        ([0, 2, 3], 5, r"last offset \(3\) must match the number of values \(5\)"),
        (list(range(MAX_BATCH + 2)), MAX_BATCH + 1, f"exceeds the maximum batch size {MAX_BATCH}"),
    ],
)
def test_check_histories_names_the_problem(offsets, n_values, message):
    with pytest.raises(MolarRequestError, match=message):
        check_histories(np.array(offsets), n_values, MAX_BATCH)


def test_check_histories_accepts_good_rows():
    check_histories(np.array([0, 3, 4]), 4, MAX_BATCH)


def test_right_padded_window_keeps_the_last_items():
    values = np.array([5, 6, 7, 8, 9, 10])
    out = right_padded_window(values, np.array([0, 1, 6]), max_length=3)
    assert out.tolist() == [[5, 0, 0], [8, 9, 10]]


@pytest.mark.parametrize("catalogue", ["int", "str"])
def test_the_exported_graph_run_in_process_matches_the_model(catalogue, catalogues, request):
    from merlin.table import TensorTable

    from merlin_molar.serving import build_ensemble
    from merlin_molar.serving.client import decode_ids, history_tensors

    saved = request.getfixturevalue({"int": "molar_saved", "str": "coded_saved"}[catalogue])
    prepared = request.getfixturevalue({"int": "ml100k_prepared", "str": "coded_prepared"}[catalogue])
    histories, in_process = catalogues[catalogue]["histories"], catalogues[catalogue]["in_process"]
    threads = torch.get_num_threads()
    ensemble = build_ensemble(saved, prepared.root, top_k=TOP_K, max_batch_size=MAX_BATCH)
    values, offsets = history_tensors(histories)
    out = ensemble.transform(TensorTable({f"{ITEM_SEQUENCE}__values": values, f"{ITEM_SEQUENCE}__offsets": offsets}))
    want_ids, want_scores = in_process(histories)
    np.testing.assert_array_equal(decode_ids(out["item_ids"].values), want_ids)
    np.testing.assert_allclose(out["scores"].values, want_scores, rtol=1e-5, atol=1e-5)
    # running the graph in a training process must leave that process's torch state alone
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
    with pytest.raises(MolarRequestError, match="unknown item id"):
        unknown = values + 10**6 if catalogue == "int" else np.array([v + b"X" for v in values], dtype=object)
        ensemble.transform(TensorTable({f"{ITEM_SEQUENCE}__values": unknown, f"{ITEM_SEQUENCE}__offsets": offsets}))


def test_a_sasrec_model_exports_too(ml100k_prepared, tmp_path):
    from merlin.table import TensorTable

    from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
    from merlin_molar.persistence import save_model
    from merlin_molar.serving import build_ensemble

    torch.manual_seed(0)
    config = SASRecConfig(max_length=20, d_model=16)
    model = sasrec_model(ml100k_prepared.schema, config).eval()
    saved = save_model(model, tmp_path / "sasrec", "sasrec", config, ml100k_prepared.schema)
    repository = export_triton(saved, ml100k_prepared.root, tmp_path / "repo", top_k=5)
    assert json.loads((repository / "molar_serving.json").read_text())["model_kind"] == "sasrec"
    assert not (repository / "molar" / "1" / "ensemble" / "lean" / "content_tower.pt").exists()

    history = torch.tensor([[3, 4, 5] + [0] * 17])
    with torch.no_grad():
        want = torch.topk(model({ITEM_SEQUENCE: history}), 5, dim=-1)
    raw = pd.read_parquet(ml100k_prepared.items_path).set_index("item_id")["item_id_raw"]
    values = raw.loc[[3, 4, 5]].to_numpy()
    out = build_ensemble(saved, ml100k_prepared.root, top_k=5).transform(
        TensorTable({f"{ITEM_SEQUENCE}__values": values, f"{ITEM_SEQUENCE}__offsets": np.array([0, 3], np.int32)})
    )
    np.testing.assert_array_equal(out["item_ids"].values[0], raw.loc[want.indices[0].numpy()].to_numpy())
    np.testing.assert_allclose(out["scores"].values[0], want.values[0].numpy(), rtol=1e-5)
