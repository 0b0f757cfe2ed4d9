"""A catalogue keyed by product codes (string item ids) through every step of the command line: prepare,
embed-items, train, recommend, export --instances 2, then the real server and the client: the served answer
for a history of raw string ids equals the `recommend` command's answer."""
import json

import numpy as np
import pandas as pd

from merlin_molar.cli import main
from merlin_molar.data.synthetic import write_synthetic_dataset
from merlin_molar.pipeline import recommend as recommend_in_process
from merlin_molar.serving import TritonServer
from merlin_molar.serving.client import connect, recommend

TINY_MOLAR = {
    "llm": {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1},
    "sasrec": {"d_model": 16, "n_layers": 1},
}


def test_string_ids_through_the_cli_and_the_server(tmp_path, capsys):
    from merlin_molar.data import load_prepared

    data = write_synthetic_dataset(tmp_path / "data", string_ids=True)
    prepared_dir, run, repo = tmp_path / "prepared", tmp_path / "run", tmp_path / "repo"
    assert main(["prepare", "--data", str(data), "--output", str(prepared_dir), "--max-length", "20"]) == 0
    assert main(["embed-items", "--prepared", str(prepared_dir)]) == 0
    assert main(["train", "--prepared", str(prepared_dir), "--model", "molar", "--item-table",
                 str(prepared_dir / "item_table"), "--output", str(run), "--epochs", "1",
                 "--model-options", json.dumps(TINY_MOLAR)]) == 0
    prepared = load_prepared(prepared_dir)
    items = pd.read_parquet(prepared.items_path)
    assert items["item_id_raw"].map(lambda c: isinstance(c, str) and len(c) == 10).all()
    test = pd.read_parquet(prepared.split_path("test") / "part_0.parquet")
    raw_of = dict(zip(items["item_id"], items["item_id_raw"]))
    history = [raw_of[i] for i in test["item_id-list"].iloc[0][:-1]]
    capsys.readouterr()
    assert main(["recommend", "--model-dir", str(run / "model"), "--prepared", str(prepared_dir),
                 "--history", ",".join(history), "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    expected = recommend_in_process(run / "model", prepared, [history], top_k=5)
    assert all(code in printed for code in expected["item_id"])

    assert main(["export", "--model-dir", str(run / "model"), "--prepared", str(prepared_dir),
                 "--repository", str(repo), "--top-k", "5", "--instances", "2"]) == 0
    assert "2 instance(s)" in capsys.readouterr().out
    assert main(["export", "--model-dir", str(run / "model"), "--prepared", str(prepared_dir),
                 "--repository", str(tmp_path / "r2"), "--instances", "0"]) == 2
    assert "merlin-molar export: error: instances: must be at least 1" in capsys.readouterr().err

    with TritonServer(repo) as server:
        ids, scores = recommend(connect(server.grpc_url, "grpc"), [history])
    assert ids.dtype == object and ids[0].tolist() == expected["item_id"].tolist()
    np.testing.assert_allclose(scores[0], expected["score"].to_numpy(), rtol=1e-5, atol=1e-5)
