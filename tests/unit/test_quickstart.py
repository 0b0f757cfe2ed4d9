"""The quickstart compares its seed with the committed multi-seed result measured under the same rule."""
from merlin_molar import quickstart
from merlin_molar.io import read_json


def test_the_committed_multi_seed_result_is_found_and_summarised():
    assert quickstart.QUALITY_RESULT.is_file(), quickstart.QUALITY_RESULT
    note = quickstart.seed_spread_note()
    assert note.startswith("multi-seed benchmark (quality_ml100k.json") and "sasrec" in note and "molar" in note


def test_the_quickstart_trains_with_the_rule_its_reference_result_was_measured_with():
    # quality_ml100k.json predates TrainConfig.eval_every: its runs validated every epoch, patience 10
    assert quickstart.EARLY_STOPPING == {"eval_every": 1, "early_stopping_patience": 10}
    measured_with = read_json(quickstart.QUALITY_RESULT)["train_config"]
    assert "eval_every" not in measured_with and measured_with["early_stopping_patience"] == 10
