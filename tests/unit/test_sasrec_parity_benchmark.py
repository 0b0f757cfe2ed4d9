"""benchmarks/sasrec_parity.py's bookkeeping (no training): the reference's command line and output, the project's
result, the summary and its ratios, and --resume."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("sasrec_parity")
    finally:
        sys.path.remove(str(BENCHMARKS))


def metrics(ndcg):
    return {"ndcg@10": ndcg, "recall@10": 2 * ndcg, "ndcg@20": 1.2 * ndcg, "recall@20": 3 * ndcg}


def test_the_reference_is_found_beside_the_checkout_and_run_with_the_rule(parity, tmp_path):
    assert parity.REFERENCE == BENCHMARKS.parent.parent / "shared" / "reference" / "ref_sasrec.py"
    command = parity.reference_command(Path("ref.py"), Path("data"), tmp_path / "o.json", max_length=200, epochs=300,
                                       seed=2, threads=1, eval_every=5, patience=8, python="py")
    assert command == ["py", "ref.py", "data", str(tmp_path / "o.json"), "--maxlen", "200", "--epochs", "300",
                       "--seed", "2", "--threads", "1", "--eval-every", "5", "--patience", "8"]


def test_reference_output_becomes_a_run_record(parity):
    log = [{"epoch": 5, "valid_ndcg@10": 0.05}, {"epoch": 10, "valid_ndcg@10": 0.07},
           {"epoch": 15, "valid_ndcg@10": 0.06}]
    record = parity.reference_result({"log": log, "valid": metrics(0.07), "test": metrics(0.1), "wall_s": 30.0})
    assert (record["epochs"], record["best_epoch"], record["seconds_per_epoch"]) == (15, 10, 2.0)
    assert record["valid_ndcg@10_by_epoch"] == {"5": 0.05, "10": 0.07, "15": 0.06}


def test_a_resumed_project_run_is_timed_over_the_epochs_it_trained(parity):
    key = parity.VALID_KEY
    history = [{"epoch": 5.0, "step": 40, key: 0.05}, {"epoch": 10.0, "step": 80, key: 0.07},
               {"epoch": 10.0, "step": 80, "train_runtime": 1.0}]
    result = {"log_history": history, "valid": {**metrics(0.07), "loss": 5.0}, "test": metrics(0.1),
              "best_epoch": 10.0, "train_seconds": 50.0, "resumed_from": None}
    fresh = parity.project_result(result)
    assert (fresh["epochs"], fresh["seconds_per_epoch"]) == (10, 5.0)
    assert "loss" not in fresh["valid"] and fresh["valid_ndcg@10_by_epoch"] == {"5": 0.05, "10": 0.07}
    resumed = parity.project_result({**result, "train_seconds": 25.0, "resumed_from": "run/checkpoints/checkpoint-40"})
    assert (resumed["resumed_from_epoch"], resumed["seconds_per_epoch"]) == (5, 5.0)


def record(ndcg, seconds):
    return {"valid": metrics(ndcg), "test": metrics(ndcg), "seconds_per_epoch": seconds, "epochs": 50,
            "best_epoch": 30}


def test_summary_pairs_the_seeds_both_models_finished(parity):
    runs = {"project": {0: record(0.099, 10.0), 1: record(0.097, 12.0), 2: record(0.5, 1.0)},
            "reference": {0: record(0.1, 11.0), 1: record(0.1, 11.0)}}
    summary = parity.summarise(runs)
    assert summary["project"]["seeds"] == [0, 1, 2]
    assert summary["project"]["test"]["ndcg@10"]["mean"] == pytest.approx((0.099 + 0.097 + 0.5) / 3)
    ratio = summary["project_over_reference"]
    assert ratio["seeds"] == [0, 1]  # seed 2 has no reference run yet
    assert ratio["test_ndcg@10"] == pytest.approx(0.98)
    assert ratio["seconds_per_epoch"] == pytest.approx(1.0)
    assert all(ratio["targets_met"].values())
    assert [r["model"] for r in parity.rows(summary)] == ["project", "reference"]
    assert "project_over_reference" not in parity.summarise({"project": runs["project"], "reference": {}})


def test_finished_runs_are_kept_only_with_resume(parity, tmp_path, monkeypatch):
    data = tmp_path / "ml-tiny"
    data.mkdir()
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    workdir = tmp_path / "work"
    for model in parity.MODELS:
        path = parity.run_path(workdir / "ml-tiny_L20", model, 0)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record(0.1, 1.0)))
    monkeypatch.setattr(parity, "result_path", lambda benchmark, name: tmp_path / "results" / benchmark / name)
    argv = ["--dataset", str(data), "--max-length", "20", "--seeds", "0", "--workdir", str(workdir),
            "--reference", str(data / "interactions.csv")]
    with pytest.raises(SystemExit, match="holds 2 finished run"):
        parity.main(argv)
    monkeypatch.setattr(parity, "prepared_data", lambda *a: None)  # nothing left to train: no data needed
    parity.main([*argv, "--resume"])
    written = json.loads((tmp_path / "results" / "sasrec_parity" / "sasrec_parity_ml-tiny_L20.json").read_text())
    assert written["summary"]["project_over_reference"]["test_ndcg@10"] == pytest.approx(1.0)
    assert {"command", "git_commit", "machine", "date"} <= set(written)


def test_summary_only_gathers_finished_runs_and_trains_nothing(parity, tmp_path, monkeypatch):
    """Two invocations ran the models side by side; --summary-only writes the result from what they finished
    (here: both seeds of the reference, seed 0 of the project) and never starts the missing run."""
    data = tmp_path / "ml-tiny"
    data.mkdir()
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    workdir = tmp_path / "work"
    for model, seed in (("project", 0), ("reference", 0), ("reference", 1)):
        path = parity.run_path(workdir / "ml-tiny_L20", model, seed)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record(0.1, 1.0)))

    def no_training(*args):
        raise AssertionError("--summary-only trained a run")

    monkeypatch.setattr(parity, "run_project", no_training)
    monkeypatch.setattr(parity, "run_reference", no_training)
    monkeypatch.setattr(parity, "prepared_data", no_training)
    monkeypatch.setattr(parity, "result_path", lambda benchmark, name: tmp_path / "results" / benchmark / name)
    argv = ["--dataset", str(data), "--max-length", "20", "--seeds", "0,1", "--workdir", str(workdir),
            "--reference", str(data / "interactions.csv"), "--summary-only", "--suffix", "_partial"]
    parity.main([*argv, "--note", "ran beside one other job"])
    result = tmp_path / "results" / "sasrec_parity" / "sasrec_parity_ml-tiny_L20_partial.json"
    written = json.loads(result.read_text())
    assert written["note"] == "ran beside one other job"
    assert (written["summary"]["project"]["seeds"], written["summary"]["reference"]["seeds"]) == ([0], [0, 1])
    assert written["summary"]["project_over_reference"]["seeds"] == [0]
    with pytest.raises(SystemExit, match="holds no finished run"):
        parity.main([*argv[:7], str(tmp_path / "empty"), *argv[8:]])


def test_timing_alternates_which_model_runs_first(parity):
    assert parity.timing_order(3) == [(0, "project"), (0, "reference"), (1, "reference"), (1, "project"),
                                      (2, "project"), (2, "reference")]


def test_timing_runs_each_model_for_exactly_the_epochs_asked_and_writes_the_ratio(parity, tmp_path, monkeypatch,
                                                                                  capsys):
    data = tmp_path / "ml-tiny"
    data.mkdir()
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    calls = []

    def fake_run(model, seconds):
        def run(args, _data, seed, round_dir):
            calls.append((model, args.epochs, args.patience, seed, round_dir.name))
            return {"epochs": args.epochs, "seconds_per_epoch": seconds}
        return run

    monkeypatch.setattr(parity, "prepared_data", lambda *a: None)
    monkeypatch.setattr(parity, "run_project", fake_run("project", 9.0))
    monkeypatch.setattr(parity, "run_reference", fake_run("reference", 10.0))
    monkeypatch.setattr(parity, "result_path", lambda benchmark, name: tmp_path / "results" / benchmark / name)
    argv = ["--dataset", str(data), "--max-length", "20", "--seeds", "3", "--workdir", str(tmp_path / "work"),
            "--reference", str(data / "interactions.csv"), "--timing-epochs", "10", "--eval-every", "5"]
    parity.main(argv)
    # never stopped early: patience outlasts the 2 validations of 10 epochs
    assert calls == [("project", 10, 3, 3, "round0"), ("reference", 10, 3, 3, "round0"),
                     ("reference", 10, 3, 3, "round1"), ("project", 10, 3, 3, "round1")]
    written = json.loads((tmp_path / "results" / "sasrec_parity" / "sasrec_parity_ml-tiny_L20_timing.json").read_text())
    assert written["summary"]["project_over_reference"] == {"seconds_per_epoch": pytest.approx(0.9), "target_met": True}
    assert [r["model"] for r in written["runs"]] == ["project", "reference", "reference", "project"]
    assert all("load_average_before" in r for r in written["runs"])

    monkeypatch.setattr(parity, "run_project", lambda *a: {"epochs": 7, "seconds_per_epoch": 1.0})
    with pytest.raises(SystemExit, match="trained 7 epochs, not 10"):
        parity.main(argv)
    for bad, message in ((["--timing-epochs", "7"], "multiple of --eval-every"),
                         (["--timing-epochs", "10", "--models", "project"], "runs both models")):
        with pytest.raises(SystemExit):
            parity.parse_args([*argv[:10], *bad])
        assert message in capsys.readouterr().err
