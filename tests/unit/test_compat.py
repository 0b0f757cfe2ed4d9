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
