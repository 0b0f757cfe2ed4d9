"""Issue 13's silent wrong results and dead ends, checked below the command line: duplicated rows, odd ids,
items without content, failed runs that must not block the corrected rerun."""
import json
import logging

import pandas as pd
import pytest

from merlin_molar.data import load_prepared, prepare, read_dataset
from merlin_molar.data.readers import validate_interactions
from merlin_molar.data.synthetic import synthetic_frames, write_synthetic_dataset
from merlin_molar.errors import MolarDataError
from merlin_molar.io import MANIFEST, claim_output_dir, rollback_on_failure


def test_exact_duplicates_are_dropped_and_reported_repeats_at_other_times_are_kept(caplog):
    inter, _ = synthetic_frames(n_users=20, n_items=30)
    inter = inter[["user_id", "item_id", "timestamp"]]
    repeat = inter.iloc[[0]].assign(timestamp=inter["timestamp"].iloc[0] + 500)  # a repeat purchase, later
    doubled = pd.concat([inter, inter, repeat], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        clean = validate_interactions(doubled, "interactions.csv")
    assert len(clean) == len(inter) + 1
    assert not clean.duplicated(["user_id", "item_id", "timestamp"]).any()
    assert f"interactions.csv: {len(inter)} duplicate (user_id, item_id, timestamp) row(s) dropped" in caplog.text


def test_a_fully_duplicated_dataset_prepares_exactly_like_the_original(tmp_path, caplog):
    data = write_synthetic_dataset(tmp_path / "data", n_users=40, n_items=30)
    doubled = write_synthetic_dataset(tmp_path / "doubled", n_users=40, n_items=30)
    rows = pd.read_csv(doubled / "interactions.csv")
    pd.concat([rows, rows]).to_csv(doubled / "interactions.csv", index=False)
    a = prepare(read_dataset(data), tmp_path / "a", max_length=10)
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        b = prepare(read_dataset(doubled), tmp_path / "b", max_length=10)
    assert f"{len(rows)} duplicate" in caplog.text
    for split in ("train", "valid", "test"):  # no test target leaks into its own history
        pd.testing.assert_frame_equal(a.split_frame(split), b.split_frame(split))
    assert a.manifest["interactions"] == b.manifest["interactions"] == len(rows)


def test_negative_and_mixed_ids_are_warned_about(caplog):
    frame = pd.DataFrame({"user_id": [1, 2, -3], "item_id": [10, -20, 30], "timestamp": [1, 2, 3]})
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        validate_interactions(frame, "negative.csv")
    assert "negative.csv: 1 negative user_id(s), e.g. [-3]" in caplog.text
    assert "negative.csv: 1 negative item_id(s), e.g. [-20]" in caplog.text
    caplog.clear()
    frame = pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": ["7", " x ", "9"], "timestamp": [1, 2, 3]})
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        validate_interactions(frame, "mixed.csv")
    assert "mixed.csv: 1 item_id(s) with blanks around them" in caplog.text
    assert "a mix of numeric and non-numeric item_ids" in caplog.text


@pytest.mark.parametrize("missing", [1, 15])
def test_items_without_content_are_reported_the_same_way_for_one_or_half(tmp_path, caplog, missing):
    data = write_synthetic_dataset(tmp_path / "data", n_users=40, n_items=30)
    items = pd.read_csv(data / "items.csv")
    dropped = items["item_id"].iloc[:missing].tolist()
    items.iloc[missing:].to_csv(data / "items.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="merlin_molar"):
        prepared = prepare(read_dataset(data), tmp_path / "out", max_length=10)
    interacted = prepared.manifest["items_interacted"]
    reported = [r.getMessage() for r in caplog.records if "zero content embedding" in r.getMessage()]
    assert len(reported) == 1
    assert f"{missing} of {interacted} interacted item(s) have no row in the item table" in reported[0]
    assert f"item_id {sorted(dropped)}" in reported[0]  # raw ids, not Categorify codes


def test_a_failed_prepare_leaves_nothing_and_the_corrected_rerun_works(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_users=40, n_items=30)
    with pytest.raises(MolarDataError, match="--k-core"):
        prepare(read_dataset(data), tmp_path / "out", max_length=10, k=10_000)
    assert not (tmp_path / "out").exists()
    prepared = prepare(read_dataset(data), tmp_path / "out", max_length=10, k=2)
    assert load_prepared(prepared.root).manifest["k_core"] == 2


def test_rollback_removes_what_a_failed_step_added_but_keeps_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with rollback_on_failure(out, keep_if_present=("checkpoints",)):
            claim_output_dir(out, {"config": 1})
            (out / "checkpoints").mkdir()
            raise RuntimeError("crash before the first checkpoint")
    assert not out.exists()
    with pytest.raises(RuntimeError):
        with rollback_on_failure(out, keep_if_present=("checkpoints",)):
            claim_output_dir(out, {"config": 1})
            (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
            (out / "checkpoints" / "checkpoint-5" / "weights").write_text("w")
            raise RuntimeError("interrupted after a checkpoint")
    assert (out / MANIFEST).is_file() and (out / "checkpoints" / "checkpoint-5" / "weights").is_file()


def test_a_manifest_left_by_a_killed_run_without_results_does_not_refuse_the_rerun(tmp_path):
    out = tmp_path / "run"
    claim_output_dir(out, {"config_sha": "first"})  # then SIGKILL: no rollback could run
    (out / "checkpoints").mkdir()  # created by the Trainer, still empty
    claim_output_dir(out, {"config_sha": "corrected"})
    assert '"corrected"' in (out / MANIFEST).read_text()
    (out / "metrics.json").write_text("{}")  # a finished run's result: now the directory is protected
    with pytest.raises(MolarDataError, match="differs in \\['config_sha'\\]"):
        claim_output_dir(out, {"config_sha": "third"})


def test_a_prepare_killed_half_way_does_not_refuse_the_corrected_rerun(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_users=40, n_items=30)
    raw = read_dataset(data)
    out = tmp_path / "out"
    finished = prepare(raw, out, max_length=10)
    manifest = finished.manifest
    unfinished = {k: manifest[k] for k in ("fingerprint", "max_length", "k_core", "stage")}
    (out / MANIFEST).write_text(json.dumps(unfinished))  # as claimed, before the final manifest
    (out / "test").rename(tmp_path / "gone")  # killed before the test split was written
    assert prepare(raw, out, max_length=12).max_length == 12
    with pytest.raises(MolarDataError, match="differs in \\['max_length'\\]"):  # a finished one is protected
        prepare(raw, out, max_length=10)
