import subprocess
import sys

import pytest

from merlin_molar.cli import build_parser, main
from merlin_molar.errors import MolarDataError
from merlin_molar.pipeline import metrics_table, recommend, resolve_dataset, train
from merlin_molar.training import TrainConfig

COMMANDS = ["prepare", "embed-items", "add-items", "finetune-items", "train", "evaluate", "evaluate-cold-start",
            "recommend", "extend-model", "export", "quickstart"]


def test_every_subcommand_has_help(capsys):
    for command in [None, *COMMANDS]:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"] if command else ["--help"])
        assert done.value.code == 0
        assert "usage: merlin-molar" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "merlin_molar.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path, capsys):
    assert main(["prepare", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing: dataset directory not found" in err
    assert main(["evaluate", "--model-dir", str(tmp_path), "--prepared", str(tmp_path)]) == 2
    assert "--prepared" in (err := capsys.readouterr().err) and "no molar_manifest.json" in err


def test_options_from_a_config_file_and_flags_win(tmp_path, ml100k_dir, capsys):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(f"data: {ml100k_dir}\noutput: {tmp_path / 'from_file'}\nmax_length: 7\n")
    assert main(["prepare", "--config", str(cfg), "--max-length", "9"]) == 0
    assert "prepared 943 users" in capsys.readouterr().out
    from merlin_molar.data import load_prepared

    assert load_prepared(tmp_path / "from_file").max_length == 9
    bad = tmp_path / "bad.toml"
    bad.write_text('nonsense = 1\n')
    assert main(["prepare", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == f"merlin-molar prepare: error: --config {bad}: unknown option(s) ['nonsense']\n"


def test_the_installed_entry_point_prints_one_line_and_no_traceback(tmp_path):
    """The real process: exit status 2, one stderr line; ``--verbose`` adds the traceback."""
    command = [sys.executable, "-m", "merlin_molar.cli"]
    bad = ["train", "--prepared", str(tmp_path / "none"), "--output", str(tmp_path / "out"), "--epochs", "-1"]
    out = subprocess.run(command + bad, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "merlin-molar train: error: --epochs: must be greater than 0, got -1.0\n"
    assert not (tmp_path / "out").exists()
    model = tmp_path / "model"
    model.mkdir()
    (model / "molar_model.json").write_bytes(b"\x89garbage\xff")
    bad = ["evaluate", "--model-dir", str(model), "--prepared", str(tmp_path / "none")]
    out = subprocess.run(command + bad, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    out = subprocess.run(command + ["--verbose", *bad], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("merlin-molar evaluate: error: ")


def test_parser_lists_the_quickstart_data_sources():
    help_text = build_parser()._subparsers._group_actions[0].choices["quickstart"].format_help()
    assert "MOLAR_DATA" in help_text


def test_resolve_dataset_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.delenv("MOLAR_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("merlin_molar.pipeline.Path.exists", lambda self: False)
    with pytest.raises(MolarDataError, match="pass --data DIR"):
        resolve_dataset(None, download=False)


@pytest.fixture(scope="module")
def sasrec_run(ml100k_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    result = train(ml100k_prepared, "sasrec", out, {"d_model": 16, "n_layers": 1}, TrainConfig(epochs=1, save_steps=0))
    return result, out


def test_train_writes_model_and_metrics_and_refuses_a_foreign_run_dir(sasrec_run, ml100k_prepared):
    result, out = sasrec_run
    assert (out / "model" / "weights.pt").exists() and (out / "metrics.json").exists()
    table = metrics_table({"SASRec": result})
    assert "SASRec" in table and "N@10" in table
    with pytest.raises(MolarDataError, match="different dataset or configuration"):
        train(ml100k_prepared, "sasrec", out, {"d_model": 32, "n_layers": 1}, TrainConfig(epochs=1, save_steps=0))


def test_recommend_excludes_history_and_rejects_bad_histories(sasrec_run, ml100k_prepared):
    result, _ = sasrec_run
    recs = recommend(result["model_dir"], ml100k_prepared, [["50", "181", "100"]], top_k=5)
    assert len(recs) == 5 and not set(recs["item_id"].astype(str)) & {"50", "181", "100"}
    assert recs["title"].str.len().gt(0).all()
    with pytest.raises(MolarDataError, match="is empty"):
        recommend(result["model_dir"], ml100k_prepared, [[]])
    with pytest.raises(MolarDataError, match=r"unknown item id\(s\) \['999999'\]"):
        recommend(result["model_dir"], ml100k_prepared, [["50", "999999"]])
