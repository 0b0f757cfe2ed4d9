"""Faults: a training process killed mid-epoch resumes to the same final metrics; writes are atomic."""
import json
import subprocess
import sys
import textwrap

import pytest

from merlin_molar.io import atomic_path

TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys
    import merlin_molar
    import merlin_molar.pipeline as pipeline
    from merlin_molar.data import load_prepared
    from merlin_molar.training import TrainConfig
    from transformers import TrainerCallback

    prepared, out, mode = load_prepared(sys.argv[1]), sys.argv[2], sys.argv[3]

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 20:          # mid-way through epoch 2 (15 steps per epoch)
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill":
        make = pipeline.make_trainer
        def make_and_arm(*a, **k):
            trainer = make(*a, **k)
            trainer.add_callback(KillAfterCheckpoint())
            return trainer
        pipeline.make_trainer = make_and_arm
    result = pipeline.train(prepared, "sasrec", out, {"d_model": 16, "n_layers": 1},
                            TrainConfig(epochs=2, batch_size=64, save_steps=5, seed=7, early_stopping_patience=0),
                            resume=mode == "resume")
    print("RESULT " + json.dumps({"test": result["test"], "resumed_from": result["resumed_from"]}))
    """
)


def run(prepared_dir, out, mode):
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN, str(prepared_dir), str(out), mode], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, (json.loads(lines[-1][7:]) if lines else None), proc.stderr


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_metrics(ml100k_prepared, tmp_path):
    code, uninterrupted, err = run(ml100k_prepared.root, tmp_path / "full", "train")
    assert code == 0, err[-2000:]
    code, killed, _ = run(ml100k_prepared.root, tmp_path / "killed", "kill")
    assert code == -9 and killed is None  # SIGKILL: no cleanup, no final save
    assert not (tmp_path / "killed" / "model").exists()
    code, resumed, err = run(ml100k_prepared.root, tmp_path / "killed", "resume")
    assert code == 0, err[-2000:]
    assert resumed["resumed_from"].endswith("checkpoint-20")
    assert resumed["test"] == uninterrupted["test"]


def test_atomic_path_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    final = tmp_path / "table.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole"


def test_atomic_directory_replace_keeps_the_old_copy_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(final, is_dir=True) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("crash")
    assert (final / "weights").read_text() == "v1"
