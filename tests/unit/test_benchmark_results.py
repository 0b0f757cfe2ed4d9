"""Every committed benchmark result carries one provenance schema (what ran, from which commit, on what machine,
when), sits in the folder of the script that wrote it, and a superseded one names its replacement."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"
RESULT_FILES = sorted(p for p in RESULTS.rglob("*") if p.is_file())
JSONS = [p for p in RESULT_FILES if p.suffix == ".json"]


def name(path: Path) -> str:
    return str(path.relative_to(RESULTS))


def test_there_are_results_to_check():
    assert len(JSONS) > 40


@pytest.mark.parametrize("path", JSONS, ids=name)
def test_result_has_the_provenance_keys(path):
    result = json.loads(path.read_text())
    for key in ("command", "git_commit", "date"):
        assert isinstance(result.get(key), str) and result[key].strip(), f"{name(path)}: no {key!r}"
    assert isinstance(result.get("machine"), dict) and result["machine"], f"{name(path)}: no 'machine'"
    assert "git" not in result, f"{name(path)}: drifted key 'git' (use 'git_commit')"


@pytest.mark.parametrize("path", JSONS, ids=name)
def test_superseded_result_names_an_existing_replacement_and_why(path):
    result = json.loads(path.read_text())
    if "superseded_by" in result:
        assert (RESULTS / result["superseded_by"]).is_file(), f"{name(path)}: {result['superseded_by']} missing"
        assert result.get("superseded_reason"), f"{name(path)}: superseded without a reason"


def test_results_sit_in_the_folder_of_the_script_that_wrote_them():
    misplaced = [name(p) for p in RESULT_FILES
                 if p.parent.parent != RESULTS or not (BENCHMARKS / f"{p.parent.name}.py").is_file()]
    assert misplaced == []


def test_every_table_and_plot_has_its_result_json():
    orphans = [name(p) for p in RESULT_FILES if p.suffix != ".json" and not p.with_suffix(".json").is_file()]
    assert orphans == []


@pytest.fixture(scope="module")
def common():
    import importlib
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("common")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_write_result_writes_the_schema_and_refuses_a_drifted_key(common, tmp_path):
    path = common.write_result(tmp_path / "r.json", {"benchmark": "x", "machine": {"cpu_model": "test"}})
    result = json.loads(path.read_text())
    assert all(isinstance(result[k], str) and result[k] for k in ("command", "git_commit", "date"))
    assert result["machine"]["cpu_model"] == "test" and len(result["machine"]["load_average_at_end"]) == 3
    with pytest.raises(ValueError, match="git_commit"):
        common.write_result(tmp_path / "s.json", {"git": "abc", "machine": {}})
    assert common.result_path("quality", "q.json") == RESULTS / "quality" / "q.json"
