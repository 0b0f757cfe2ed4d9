"""Each compatibility override: the upstream break it answers, and the behaviour it restores."""
import inspect

import dask
import transformers
from packaging.version import Version
from transformers import Trainer as HFTrainer
from transformers4rec.torch import Trainer as T4RecTrainer

from merlin_molar import compat

TRANSFORMERS = Version(transformers.__version__)


def test_apply_is_idempotent():
    before = T4RecTrainer.compute_loss
    compat.apply()
    compat._APPLIED = False
    compat.apply()
    assert T4RecTrainer.compute_loss is before


def test_dask_string_conversion_is_off():
    assert dask.config.get("dataframe.convert-string") is False


def test_sequence_summary_restored():
    import transformers.modeling_utils as mu

    if TRANSFORMERS >= Version("4.53"):
        from transformers.models.xlnet.modeling_xlnet import XLNetSequenceSummary

        assert mu.SequenceSummary is XLNetSequenceSummary
    import transformers4rec.torch.model.base  # noqa: F401  (fails at import without the override)


def test_trainer_signatures_match_the_modern_hf_trainer():
    if TRANSFORMERS >= Version("4.31"):
        assert not hasattr(HFTrainer, "_pad_across_processes")
        assert hasattr(T4RecTrainer, "_pad_across_processes")
    if TRANSFORMERS >= Version("4.46"):
        assert "num_items_in_batch" in inspect.signature(HFTrainer.compute_loss).parameters
        inspect.signature(T4RecTrainer.compute_loss).bind(None, None, None, num_items_in_batch=3)
    if TRANSFORMERS >= Version("4.47"):
        inspect.signature(T4RecTrainer.log).bind(None, {}, 0.0)
        inspect.signature(T4RecTrainer._save_checkpoint).bind(None, None, trial=None, metrics=None)


def test_a_run_resumes_from_a_checkpoint_written_with_other_stateful_callbacks(tiny_prepared, tmp_path):
    """transformers >= 4.41 looks every current stateful callback up in the resumed checkpoint's state and
    raised KeyError at the first save for one the checkpoint did not have (a checkpoint of an older
    merlin-molar, written with Hugging Face's own EarlyStoppingCallback)."""
    import json

    import torch

    from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
    from merlin_molar.training import EarlyStoppingAfter, TrainConfig, make_trainer

    def trainer(epochs):
        torch.manual_seed(0)
        model = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=16, n_layers=1))
        config = TrainConfig(epochs=epochs, early_stopping_patience=5, batch_size=64, logging_steps=1000)
        return make_trainer(model, tiny_prepared, tmp_path, config)

    trainer(1).train()
    (checkpoint,) = tmp_path.glob("checkpoint-*")
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    callbacks = state["stateful_callbacks"]
    assert callbacks["EarlyStoppingAfter"]["args"]["min_steps"] == EarlyStoppingAfter().min_steps
    callbacks["EarlyStoppingCallback"] = callbacks.pop("EarlyStoppingAfter")  # as an older version wrote it
    state_file.write_text(json.dumps(state))
    resumed = trainer(2)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # KeyError: 'EarlyStoppingAfter' without the override
    assert resumed.state.epoch == 2
    (latest,) = [c for c in tmp_path.glob("checkpoint-*") if c != checkpoint] or [checkpoint]
    saved = json.loads((latest / "trainer_state.json").read_text())["stateful_callbacks"]
    assert "EarlyStoppingAfter" in saved


def run_python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_overrides_apply_at_the_first_import_of_transformers4rec_whoever_imports_it():
    # the documented plugin pattern: merlin_molar first, then Transformers4Rec directly
    out = run_python(
        "import merlin_molar, sys\n"
        "assert 'transformers4rec.torch' not in sys.modules and 'torch' not in sys.modules\n"
        "import transformers4rec.torch as tr\n"
        "from importlib.machinery import SourceFileLoader\n"
        "assert merlin_molar.compat._APPLIED\n"
        "assert getattr(tr.Trainer.compute_loss, '_merlin_molar_compat', False)\n"
        "assert isinstance(tr.__spec__.loader, SourceFileLoader), tr.__spec__\n"
        "import dask\n"
        "print(dask.config.get('dataframe.convert-string'))\n"
    )
    assert out.strip() == "False"


def test_a_dask_imported_before_merlin_molar_is_patched_at_once():
    out = run_python("import dask, merlin_molar\nprint(dask.config.get('dataframe.convert-string'))")
    assert out.strip() == "False"


def test_the_rows_left_after_the_last_whole_batch_are_shuffled_too(tiny_prepared, tmp_path):
    """merlin-dataloader 23.08 shuffles only the whole batches of a chunk: the final, smaller batch of every
    epoch held the same rows (the file's last ones). Now each epoch's final batch is drawn like the others,
    and every row is still read exactly once per epoch."""
    from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
    from merlin_molar.training import TrainConfig, make_trainer

    model = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=16))
    trainer = make_trainer(model, tiny_prepared, tmp_path, TrainConfig(epochs=3, batch_size=128))
    loader = trainer.get_train_dataloader()
    users = tiny_prepared.manifest["users"]
    final_batches = []
    for epoch in range(3):
        trainer.state.epoch = epoch
        batches = [tuple(map(tuple, features["item_id-list"].tolist())) for features, _ in loader]
        assert [len(b) for b in batches] == [128] * (users // 128) + [users % 128]
        rows = [row for batch in batches for row in batch]
        assert len(set(rows)) == len(rows) == users  # every row once (the synthetic sequences are distinct)
        final_batches.append(frozenset(batches[-1]))
    assert len(set(final_batches)) == 3
