"""Export to a Triton model repository (no server): the serving workflow, the repository, request checks."""
import json

import numpy as np
import nvtabular as nvt
import pandas as pd
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from merlin_molar.data.workflow import ITEM_SEQUENCE
from merlin_molar.errors import MolarDataError
from merlin_molar.serving import MolarRequestError, export_triton, serving_workflow
from merlin_molar.serving.ops import check_histories, right_padded_window

TOP_K = 10  # as exported by the `repository` fixture (conftest.py)
MAX_BATCH = 16


def test_serving_workflow_encodes_raw_histories_exactly_like_training(ml100k_prepared, vocabulary):
    workflow = serving_workflow(nvt.Workflow.load(str(ml100k_prepared.workflow_path)))
    train = pd.read_parquet(ml100k_prepared.split_path("train") / "part_0.parquet", columns=[ITEM_SEQUENCE])
    raw = pd.DataFrame({ITEM_SEQUENCE: [vocabulary[np.asarray(s)].tolist() for s in train[ITEM_SEQUENCE]]})
    assert len(set(raw[ITEM_SEQUENCE].map(tuple))) > 100  # real, different histories
    encoded = workflow.transform(nvt.Dataset(raw)).to_ddf().compute()
    assert encoded[ITEM_SEQUENCE].map(list).tolist() == train[ITEM_SEQUENCE].map(list).tolist()


def test_serving_workflow_maps_unknown_ids_to_out_of_vocabulary(ml100k_prepared):
    # why the served graph validates ids first: Categorify silently encodes unknown ids as 2 (OOV)
    workflow = serving_workflow(nvt.Workflow.load(str(ml100k_prepared.workflow_path)))
    out = workflow.transform(nvt.Dataset(pd.DataFrame({ITEM_SEQUENCE: [[50, 10**9]]}))).to_ddf().compute()
    assert out[ITEM_SEQUENCE].iloc[0].tolist() == [3, 2]


def test_repository_layout_and_configs(repository, molar_saved):
    configs = {}
    for path in repository.glob("*/config.pbtxt"):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    assert set(configs) == {"molar", "0_transformworkflowtriton"}
    assert all(c.backend == "python" for c in configs.values())
    executor = configs["molar"]
    assert {(i.name, model_config_pb2.DataType.Name(i.data_type)) for i in executor.input} == {
        (f"{ITEM_SEQUENCE}__values", "TYPE_INT64"),
        (f"{ITEM_SEQUENCE}__offsets", "TYPE_INT32"),
    }
    assert {(o.name, model_config_pb2.DataType.Name(o.data_type), tuple(o.dims)) for o in executor.output} == {
        ("item_ids", "TYPE_INT64", (-1, TOP_K)),
        ("scores", "TYPE_FP32", (-1, TOP_K)),
    }
    model_py = (repository / "molar" / "1" / "model.py").read_text()
    assert "from merlin_molar.serving.executor_model import TritonPythonModel" in model_py
    copied = repository / "molar" / "1" / "ensemble" / "molar_model"
    assert (copied / "weights.pt").read_bytes() == (molar_saved / "weights.pt").read_bytes()
    manifest = json.loads((repository / "molar_serving.json").read_text())
    assert manifest["top_k"] == TOP_K and manifest["max_batch_size"] == MAX_BATCH


def test_export_refuses_bad_arguments(molar_saved, ml100k_prepared, repository, tmp_path):
    with pytest.raises(MolarDataError, match="top_k"):
        export_triton(molar_saved, ml100k_prepared.root, tmp_path / "r", top_k=0)
    with pytest.raises(MolarDataError, match="top_k"):
        export_triton(molar_saved, ml100k_prepared.root, tmp_path / "r", top_k=10**6)
    with pytest.raises(MolarDataError, match="not empty"):
        export_triton(molar_saved, ml100k_prepared.root, repository)
    with pytest.raises(MolarDataError, match="not a saved merlin-molar model|file not found"):
        export_triton(tmp_path, ml100k_prepared.root, tmp_path / "r")
    with pytest.raises(MolarDataError, match="prepare"):
        export_triton(molar_saved, tmp_path, tmp_path / "r")


KNOWN = np.array([50, 100, 258])


@pytest.mark.parametrize(
    "values, offsets, message",
    [
        ([50, 100], [0, 2, 2], r"empty history in row\(s\) \[1\]"),
        ([], [0], "no history"),
        ([50, 100], [1, 2], "must start at 0"),
        ([50, 7, 100, 8], [0, 2, 4], r"2 unknown item id\(s\) \[7, 8\] in row\(s\) \[0, 1\]"),
        ([50] * (MAX_BATCH + 1), list(range(MAX_BATCH + 2)), f"exceeds the maximum batch size {MAX_BATCH}"),
    ],
)
def test_check_histories_names_the_problem(values, offsets, message):
    with pytest.raises(MolarRequestError, match=message):
        check_histories(np.array(values, dtype=np.int64), np.array(offsets), KNOWN, MAX_BATCH)


def test_check_histories_accepts_good_rows():
    check_histories(np.array([50, 100, 258, 50]), np.array([0, 3, 4]), KNOWN, MAX_BATCH)


def test_right_padded_window_keeps_the_last_items():
    values = np.array([5, 6, 7, 8, 9, 10])
    out = right_padded_window(values, np.array([0, 1, 6]), max_length=3)
    assert out.tolist() == [[5, 0, 0], [8, 9, 10]]


def test_the_exported_graph_run_in_process_matches_the_model(molar_saved, ml100k_prepared, raw_histories, in_process):
    import torch
    from merlin.table import TensorTable

    from merlin_molar.serving import build_ensemble
    from merlin_molar.serving.client import history_tensors

    threads = torch.get_num_threads()
    ensemble = build_ensemble(molar_saved, ml100k_prepared.root, top_k=TOP_K, max_batch_size=MAX_BATCH)
    values, offsets = history_tensors(raw_histories)
    out = ensemble.transform(TensorTable({f"{ITEM_SEQUENCE}__values": values, f"{ITEM_SEQUENCE}__offsets": offsets}))
    want_ids, want_scores = in_process(raw_histories)
    np.testing.assert_array_equal(out["item_ids"].values, want_ids)
    np.testing.assert_allclose(out["scores"].values, want_scores, rtol=1e-5, atol=1e-5)
    # running the graph in a training process must leave that process's torch state alone
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
    with pytest.raises(MolarRequestError, match="unknown item id"):
        unknown = {f"{ITEM_SEQUENCE}__values": values + 10**6, f"{ITEM_SEQUENCE}__offsets": offsets}
        ensemble.transform(TensorTable(unknown))


def test_a_sasrec_model_exports_too(ml100k_prepared, tmp_path):
    import torch
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
