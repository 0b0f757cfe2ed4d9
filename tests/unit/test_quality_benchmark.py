"""benchmarks/quality.py's bookkeeping (no training): the GRU4Rec variants take their frozen ID branch from the
same seed's gru4rec run, and the summary's ratio stays relative to SASRec."""
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCHMARKS))


def result(ndcg):
    metrics = {"ndcg@10": ndcg, "recall@10": 2 * ndcg, "ndcg@20": ndcg, "recall@20": 2 * ndcg}
    return {"valid": metrics, "test": metrics, "train_seconds": 1.0}


@pytest.fixture
def train_calls(quality, monkeypatch):
    """quality.train replaced by a recorder: ``(kind, run dir name, item table, ID branch)`` of each run."""
    calls = []

    def fake_train(prepared, kind, run_dir, options, config, item_table_path=None, init_id_branch_from=None,
                   resume=False):
        assert resume  # an interrupted run continues from its checkpoint
        calls.append((kind, Path(run_dir).name, item_table_path, init_id_branch_from))
        (Path(run_dir) / "model").mkdir(parents=True)
        return result(0.1)

    monkeypatch.setattr(quality, "train", fake_train)
    return calls


def test_molar_gru4rec_takes_its_id_branch_from_the_same_seeds_gru4rec(quality, tmp_path, train_calls):
    quality.run_one(None, "table", "molar_gru4rec", 3, tmp_path / "molar_gru4rec-seed3", None)
    assert train_calls == [
        ("gru4rec", "gru4rec-seed3", None, None),  # trained first, since it was missing
        ("molar", "molar_gru4rec-seed3", "table", tmp_path / "gru4rec-seed3" / "model"),
    ]
    assert quality.VARIANTS["gru4rec"][0] == "gru4rec" and quality.VARIANTS["molar"][2] == "sasrec"


def test_ratio_column_is_relative_to_sasrec(quality):
    runs = {"sasrec": {0: result(0.10), 1: result(0.20)}, "gru4rec": {0: result(0.05), 1: result(0.30)},
            "molar_gru4rec": {0: result(0.12), 1: result(0.22)}}
    summary = quality.summarise(runs)
    assert summary["gru4rec"]["test_ndcg@10_ratio_to_sasrec"]["per_seed"] == pytest.approx({0: 0.5, 1: 1.5})
    assert summary["molar_gru4rec"]["test_ndcg@10_ratio_to_sasrec"]["per_seed"] == pytest.approx({0: 1.2, 1: 1.1})
    # without sasrec among the variants: the SASRec runs found in the work directory
    alone = quality.summarise({"gru4rec": runs["gru4rec"]}, baseline=runs["sasrec"])
    assert alone["gru4rec"]["test_ndcg@10_ratio_to_sasrec"]["mean"] == pytest.approx(1.0)
    assert "test_ndcg@10_ratio_to_sasrec" not in quality.summarise({"gru4rec": runs["gru4rec"]})["gru4rec"]
    assert "| gru4rec | 2 |" in quality.markdown("d", summary)


def test_a_finished_prepare_is_reused_only_for_the_same_data_and_length(quality, tiny_dir, tiny_prepared, tmp_path):
    from merlin_molar.data import read_dataset

    raw = read_dataset(tiny_dir)
    assert quality.finished_prepare(tiny_prepared.root, raw, 20).root == tiny_prepared.root
    assert quality.finished_prepare(tiny_prepared.root, raw, 10) is None  # another length
    fewer = quality.RawDataset(raw.interactions.iloc[1:], raw.items, raw.source, list(raw.text_columns))
    assert quality.finished_prepare(tiny_prepared.root, fewer, 20) is None  # other interactions
    assert quality.finished_prepare(tmp_path / "nothing", raw, 20) is None
    import shutil

    from merlin_molar.data import load_prepared
    from merlin_molar.io import read_json, write_json

    old = tmp_path / "before_earlier_items"  # prepared before the evaluation masked whole histories
    shutil.copytree(tiny_prepared.root, old)
    shutil.rmtree(old / "earlier")
    manifest = read_json(old / "molar_manifest.json")
    manifest["sha256"] = {k: v for k, v in manifest["sha256"].items() if not k.startswith("earlier/")}
    write_json(old / "molar_manifest.json", manifest)
    assert load_prepared(old).root == old
    assert quality.finished_prepare(old, raw, 20) is None


def test_bf16_runs_are_paired_with_the_fp32_run_of_the_same_variant_and_seed(quality, tmp_path):
    from merlin_molar.io import write_json

    for seed, ndcg in ((0, 0.10), (1, 0.20)):  # no fp32 run of seed 2
        (tmp_path / f"molar-seed{seed}").mkdir()
        write_json(tmp_path / f"molar-seed{seed}" / "metrics.json", result(ndcg))
    paired = quality.bf16_over_fp32({"molar": {0: result(0.11), 1: result(0.18), 2: result(0.5)},
                                     "sasrec": {0: result(0.1)}}, tmp_path)
    assert list(paired) == ["molar"]  # no fp32 sasrec run at all
    assert paired["molar"]["seeds"] == [0, 1]
    assert paired["molar"]["ratio"]["per_seed"] == pytest.approx({0: 1.1, 1: 0.9})
    assert paired["molar"]["fp32_test_ndcg@10"]["mean"] == pytest.approx(0.15)


def test_molar_stage1_reads_the_stage1_table_and_the_same_seeds_sasrec(quality, tmp_path, train_calls):
    tables = {"original": "table", "stage1": "table_stage1"}
    table = tables[quality.VARIANT_TABLES.get("molar_stage1", "original")]
    quality.run_one(None, table, "molar_stage1", 1, tmp_path / "molar_stage1-seed1", None)
    assert train_calls == [
        ("sasrec", "sasrec-seed1", None, None),
        ("molar", "molar_stage1-seed1", "table_stage1", tmp_path / "sasrec-seed1" / "model"),
    ]
    assert quality.VARIANTS["molar_stage1"] == quality.VARIANTS["molar_align"]  # the recipe it was measured with


def saved_molar_run(run_dir, **config):
    from merlin_molar.io import write_json
    from merlin_molar.models.molar import MolarConfig

    write_json(run_dir / "model" / "molar_model.json", {"config": MolarConfig(**config).to_dict()})
    return run_dir


def test_a_finished_run_is_reported_only_under_the_variant_it_is(quality, tmp_path):
    aligned = saved_molar_run(tmp_path / "a", id_branch="frozen", alpha=0.1)
    quality.check_finished_run(aligned, "molar_align")
    with pytest.raises(SystemExit, match="not variant 'molar'.*alpha"):  # a run made before alpha's default was 0
        quality.check_finished_run(aligned, "molar")
    quality.check_finished_run(saved_molar_run(tmp_path / "b", id_branch="frozen", alpha=0.0), "molar")
    # content only has no ID branch to align with: its alpha does not matter
    quality.check_finished_run(saved_molar_run(tmp_path / "c", id_branch="none", alpha=0.1), "content_only")


def test_each_encoder_variant_is_the_molar_recipe_on_its_own_table(quality):
    for variant, table in quality.VARIANT_TABLES.items():
        if table in quality.ENCODER_TABLES:
            assert quality.VARIANTS[variant] == quality.VARIANTS["molar"]
    assert sorted(quality.ENCODER_TABLES.values()) == ["efficientnet-lite0", "minilm+efficientnet-lite0", "smollm2",
                                                       "smollm2+efficientnet-lite0"]


def test_an_encoder_table_is_embedded_once_and_recorded_with_its_join_and_time(quality, tiny_prepared, tmp_path):
    import shutil

    from merlin_molar.data import load_prepared

    shutil.copytree(tiny_prepared.root, tmp_path / "prepared")
    prepared = load_prepared(tmp_path / "prepared")
    path = quality.encoder_table(prepared, prepared.root / "item_table_images", "minilm+efficientnet-lite0")
    record = quality.table_record("minilm_images", path)
    assert record["kind"] == "multimodal" and record["fusion"] == "whiten"
    assert record["dim"] == 384 + 1280 and record["items_with_image"] > 0
    timing = record["embedding"]
    assert timing["items"] == record["items_embedded"] and timing["seconds_per_item"] > 0 and not timing["reused"]
    again = quality.encoder_table(prepared, path, "minilm+efficientnet-lite0")  # the same plan: reused, not redone
    assert quality.table_record("minilm_images", again)["embedding"] == timing


def test_a_finished_pretrained_dueg_run_is_recognised_by_the_name_it_started_from(quality, tmp_path):
    """A saved model keeps the DUEG's architecture in ``llm`` and the pretrained name in ``llm_source``."""
    from merlin_molar.io import write_json
    from merlin_molar.models.molar import MolarConfig

    options = quality.VARIANTS["molar_dueg_smollm2_l2"][1]
    saved = MolarConfig(**{**options, "llm": {"model_type": "llama", "num_hidden_layers": 2}}, id_branch="frozen",
                        llm_source="smollm2")
    (tmp_path / "model").mkdir()
    write_json(tmp_path / "model" / "molar_model.json", {"config": saved.to_dict()})
    quality.check_finished_run(tmp_path, "molar_dueg_smollm2_l2")
    with pytest.raises(SystemExit, match="is not variant 'molar'.*'llm': \\('smollm2', 'random init'\\)"):
        quality.check_finished_run(tmp_path, "molar")  # the default DUEG's run is another variant


@pytest.fixture(scope="module")
def parity_style_sasrec_runs(tiny_prepared, tmp_path_factory):
    """Two finished SASRec runs laid out as sasrec_parity.py leaves them (<dir>/seed<N>/run), trained with its
    config: a TrainConfig given an int epochs, where quality.py's --max-epochs is a float."""
    from merlin_molar.pipeline import train
    from merlin_molar.training import TrainConfig

    root = tmp_path_factory.mktemp("parity") / "project"
    for seed in (0, 1):
        config = TrainConfig(seed=seed, epochs=2, early_stopping_patience=8, eval_every=5, logging_steps=10_000)
        train(tiny_prepared, "sasrec", root / f"seed{seed}" / "run", {}, config)
    return root


def test_a_finished_run_of_another_benchmark_is_taken_in_only_if_it_is_the_run_this_one_would_make(
        quality, tiny_prepared, parity_style_sasrec_runs, tmp_path, monkeypatch):
    import argparse
    import json

    args = argparse.Namespace(max_epochs=2.0, bf16=False)
    source = parity_style_sasrec_runs / "seed0" / "run"
    run_dir = tmp_path / "runs" / "sasrec-seed0"
    run_dir.parent.mkdir()
    assert quality.import_run(source, run_dir, tiny_prepared, "sasrec", quality.train_config(args, 0))
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((source / "metrics.json").read_text())
    assert (run_dir / "model" / "weights.pt").is_file() and not (run_dir / "checkpoints").exists()
    assert quality.imported_source(run_dir) == str(source.resolve())
    assert quality.run_one(tiny_prepared, None, "sasrec", 0, run_dir, None)["test"]  # finished: not trained

    elsewhere = tmp_path / "runs" / "sasrec-seed1"
    for wrong, match in ((quality.train_config(args, 0), "not the run sasrec-seed0"),  # seed 1's run
                         (quality.train_config(argparse.Namespace(max_epochs=3.0, bf16=False), 1), "not the run")):
        with pytest.raises(SystemExit, match=match):
            quality.import_run(parity_style_sasrec_runs / "seed1" / "run", elsewhere, tiny_prepared, "sasrec",
                               wrong)
        assert not elsewhere.exists()
    with pytest.raises(SystemExit, match="only an ID model"):
        quality.import_run(source, elsewhere, tiny_prepared, "molar", quality.train_config(args, 0))
    assert not quality.import_run(tmp_path / "nothing", elsewhere, tiny_prepared, "sasrec",
                                  quality.train_config(args, 1))


def test_quality_trains_no_sasrec_it_has_taken_in_and_its_result_says_where_they_came_from(
        quality, tiny_prepared, parity_style_sasrec_runs, tmp_path, monkeypatch):
    import json

    def no_training(*args, **kwargs):
        raise AssertionError("a SASRec run that was taken in was trained again")

    monkeypatch.setitem(quality.DATASETS, "tiny", {"source": "tiny", "max_length": tiny_prepared.max_length,
                                                   "last_n": None})
    monkeypatch.setattr(quality, "prepared_dataset", lambda *args: (tiny_prepared, {"original": None}))
    monkeypatch.setattr(quality, "train", no_training)
    monkeypatch.setattr(quality, "result_path", lambda benchmark, name: tmp_path / "results" / name)
    monkeypatch.setattr(quality, "table_record", lambda name, path: {})
    (tmp_path / "results").mkdir()
    quality.main(["--datasets", "tiny", "--variants", "sasrec", "--seeds", "0,1", "--max-epochs", "2",
                  "--workdir", str(tmp_path / "work"), "--sasrec-runs-from", str(parity_style_sasrec_runs)])
    written = json.loads((tmp_path / "results" / "quality_tiny.json").read_text())
    assert written["runs_taken_in"] == {f"sasrec-seed{s}": str((parity_style_sasrec_runs / f"seed{s}" / "run")
                                                                 .resolve()) for s in (0, 1)}
    assert written["summary"]["sasrec"]["seeds"] == 2
