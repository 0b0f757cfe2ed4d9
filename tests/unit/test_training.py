"""SASRec through the Transformers4Rec Trainer on the synthetic dataset: train, evaluate, checkpoint, reload."""
import pytest
import torch
import transformers4rec.torch as tr

from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.training import TrainConfig, evaluate, make_trainer


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sasrec")
    model = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=32))
    untrained = evaluate(make_trainer(model, tiny_prepared, out / "untrained", TrainConfig()), tiny_prepared, "valid")
    trainer = make_trainer(model, tiny_prepared, out, TrainConfig(epochs=6, save_steps=20, batch_size=64))
    trainer.train()
    return trainer, untrained, out


def test_training_beats_the_untrained_model(trained, tiny_prepared):
    trainer, untrained, _ = trained
    valid = evaluate(trainer, tiny_prepared, "valid")
    assert set(valid) == {"loss", "ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50"}
    assert valid["loss"] < untrained["loss"]
    assert valid["ndcg@10"] > untrained["ndcg@10"] + 0.03
    assert valid["ndcg@10"] <= valid["ndcg@20"] <= valid["ndcg@50"]


def test_test_split_evaluates_every_user(trained, tiny_prepared):
    trainer, _, _ = trained
    trainer.eval_dataset_or_path = str(tiny_prepared.split_path("test"))
    out = trainer.evaluation_loop(trainer.get_eval_dataloader(), "test", metric_key_prefix="test")
    assert out.num_samples == tiny_prepared.manifest["users"]
    trainer.eval_dataset_or_path = str(tiny_prepared.split_path("valid"))


def test_checkpoint_reload_gives_identical_metrics(trained, tiny_prepared):
    trainer, _, out = trained
    checkpoint = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert (checkpoint / "pytorch_model.bin").exists()  # not safetensors: tied item weights
    trainer._save_checkpoint(trainer.model, trial=None)
    final = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    expected = evaluate(trainer, tiny_prepared, "test")

    torch.manual_seed(123)
    fresh = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=32))
    reloaded = make_trainer(fresh, tiny_prepared, out / "reload", TrainConfig())
    reloaded.load_model_trainer_states_from_checkpoint(str(final), model=fresh)
    assert evaluate(reloaded, tiny_prepared, "test") == expected


def test_resume_from_checkpoint_continues_training(trained, tiny_prepared):
    trainer, _, out = trained
    first = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    model = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=32))
    resumed = make_trainer(model, tiny_prepared, out / "resumed", TrainConfig(epochs=3, batch_size=64))
    resumed.train(resume_from_checkpoint=str(first))
    assert resumed.state.global_step == trainer.state.global_step


def test_inference_returns_top_k_without_history(trained, tiny_prepared):
    trainer, _, _ = trained
    model = trainer.model.eval()
    batch = next(iter(trainer.get_eval_dataloader()))[0]
    with torch.no_grad():
        scores = model(batch)
    seqs = batch["item_id-list"]
    assert seqs.dim() == 2  # padded by the merlin dataloader
    assert scores.shape == (seqs.size(0), tiny_prepared.item_cardinality)
    for row, history in zip(scores, seqs):
        assert torch.isinf(row[history[history > 0]]).all()
        assert torch.isfinite(row[3:]).sum() == tiny_prepared.item_cardinality - 3 - history.gt(0).sum()
    assert isinstance(model, tr.Model)


def test_early_stopping_stops_and_keeps_the_best_epoch(tiny_prepared, tmp_path, monkeypatch):
    from merlin_molar.pipeline import train

    monkeypatch.setattr("merlin_molar.training.EARLY_STOPPING_MIN_STEPS", 0)  # patience alone decides
    config = TrainConfig(epochs=40, early_stopping_patience=2, eval_every=1, batch_size=64, learning_rate=0.02,
                         logging_steps=1000)
    result = train(tiny_prepared, "sasrec", tmp_path / "run", {"d_model": 16, "n_layers": 1}, config)
    curve = [(h["epoch"], h["eval_/next-item/ndcg_at_10"]) for h in result["log_history"]
             if "eval_/next-item/ndcg_at_10" in h]
    best_epoch, best = max(curve, key=lambda c: c[1])
    assert curve[-1][0] < 40, "early stopping never stopped"
    assert curve[-1][0] - best_epoch == 2  # stopped after `patience` epochs without improvement
    assert result["best_epoch"] == best_epoch
    assert result["valid"]["ndcg@10"] == pytest.approx(best, abs=1e-6)  # the best epoch's weights were restored


def test_early_stopping_does_not_stop_before_its_minimum_number_of_steps(tiny_prepared, tmp_path, monkeypatch):
    """Patience counts epochs; a dataset with few steps per epoch still trains at least
    ``EARLY_STOPPING_MIN_STEPS`` steps, then stops at the first epoch whose last ``patience`` brought nothing."""
    from merlin_molar.pipeline import train

    config = TrainConfig(epochs=40, early_stopping_patience=2, eval_every=1, batch_size=64, learning_rate=0.02,
                         logging_steps=1000)

    def run(name, min_steps):
        monkeypatch.setattr("merlin_molar.training.EARLY_STOPPING_MIN_STEPS", min_steps)
        result = train(tiny_prepared, "sasrec", tmp_path / name, {"d_model": 16, "n_layers": 1}, config)
        return [(h["epoch"], h["step"], h["eval_/next-item/ndcg_at_10"]) for h in result["log_history"]
                if "eval_/next-item/ndcg_at_10" in h], result

    free, _ = run("free", 0)
    steps_per_epoch = free[0][1]
    floor = free[-1][1] + 3 * steps_per_epoch  # past where patience alone stopped
    curve, result = run("floor", floor)
    assert curve[-1][0] < 40, "early stopping never stopped"
    assert curve[-1][1] >= floor  # not before the minimum
    if curve[-2][1] >= floor:  # an epoch past the minimum that did not stop: one of its last 2 epochs improved
        assert max(c[2] for c in curve[-3:-1]) > max(c[2] for c in curve[:-3])
    best_epoch, best = max(((c[0], c[2]) for c in curve), key=lambda c: c[1])
    assert curve[-1][0] - best_epoch >= 2
    assert result["valid"]["ndcg@10"] == pytest.approx(best, abs=1e-6)


class Interrupted(Exception):
    """Raised by a test callback to stop training the way a kill would."""


def frozen_sasrec_trainer(prepared, output_dir, epochs: int, eval_every: int):
    """A small seeded SASRec trainer with learning rate 0 (no validation after the first improves) and a
    patience no run reaches: the resume tests interrupt and rerun it."""
    torch.manual_seed(0)
    model = sasrec_model(prepared.schema, SASRecConfig(max_length=20, d_model=16, n_layers=1))
    config = TrainConfig(epochs=epochs, early_stopping_patience=50, eval_every=eval_every, batch_size=64,
                         learning_rate=0.0, logging_steps=1000)
    return make_trainer(model, prepared, output_dir, config)


def test_a_resumed_run_keeps_its_early_stopping_count(tiny_prepared, tmp_path):
    """The patience count and the step floor come back from the checkpoint, so a resumed run stops where the
    uninterrupted one would have."""
    import json

    from transformers import TrainerCallback

    from merlin_molar.training import EarlyStoppingAfter

    class InterruptAfterEpoch4(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.epoch >= 4:
                raise Interrupted

    def trainer():
        return frozen_sasrec_trainer(tiny_prepared, tmp_path, epochs=6, eval_every=1)

    first = trainer()
    first.add_callback(InterruptAfterEpoch4())
    with pytest.raises(Interrupted):
        first.train()
    (stopper,) = [c for c in first.callback_handler.callbacks if isinstance(c, EarlyStoppingAfter)]
    assert stopper.early_stopping_patience_counter == 3  # lr 0: no epoch after the first improves
    last = max(tmp_path.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    saved = json.loads((last / "trainer_state.json").read_text())["stateful_callbacks"]["EarlyStoppingAfter"]
    assert saved["attributes"]["early_stopping_patience_counter"] == 3
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(last))
    (restored,) = [c for c in resumed.callback_handler.callbacks if isinstance(c, EarlyStoppingAfter)]
    assert restored.early_stopping_patience_counter == 5  # 3 from the checkpoint, then epochs 5 and 6
    assert restored.min_steps == stopper.min_steps


def test_the_step_floor_holds_back_only_its_own_stop():
    """Before ``min_steps`` the callback withdraws its own patience stop, never one another part of the Trainer
    asked for (the end of ``max_steps``)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from merlin_molar.training import BEST_MODEL_METRIC, EarlyStoppingAfter

    args = TrainingArguments(output_dir="unused", eval_strategy="epoch", load_best_model_at_end=True,
                             metric_for_best_model=BEST_MODEL_METRIC, save_strategy="epoch", report_to=[])
    stopper = EarlyStoppingAfter(1, min_steps=100)
    state = TrainerState(global_step=10, best_metric=0.5)
    for requested_before in (False, True):
        control = TrainerControl(should_training_stop=requested_before)
        stopper.on_evaluate(args, state, control, {f"eval_{BEST_MODEL_METRIC}": 0.1})  # no improvement
        assert stopper.early_stopping_patience_counter >= 1
        assert control.should_training_stop is requested_before
    state.global_step = 100
    control = TrainerControl()
    stopper.on_evaluate(args, state, control, {f"eval_{BEST_MODEL_METRIC}": 0.1})
    assert control.should_training_stop  # from the floor on, patience decides


def test_eval_every_validates_every_nth_epoch_and_patience_counts_validations(tiny_prepared, tmp_path, monkeypatch):
    from merlin_molar.pipeline import train

    monkeypatch.setattr("merlin_molar.training.EARLY_STOPPING_MIN_STEPS", 0)
    config = TrainConfig(epochs=7, early_stopping_patience=50, eval_every=3, batch_size=64, logging_steps=1000)
    result = train(tiny_prepared, "sasrec", tmp_path / "run", {"d_model": 16, "n_layers": 1}, config)
    epochs = [h["epoch"] for h in result["log_history"] if "eval_/next-item/ndcg_at_10" in h]
    assert epochs == [3, 6, 7]  # and after the last epoch
    assert result["best_epoch"] in epochs

    torch.manual_seed(0)
    model = sasrec_model(tiny_prepared.schema, SASRecConfig(max_length=20, d_model=16, n_layers=1))
    config = TrainConfig(epochs=40, early_stopping_patience=2, eval_every=2, batch_size=64, learning_rate=0.0,
                         logging_steps=1000)
    trainer = make_trainer(model, tiny_prepared, tmp_path / "stalled", config)
    trainer.train()
    epochs = [h["epoch"] for h in trainer.state.log_history if "eval_/next-item/ndcg_at_10" in h]
    assert epochs == [2, 4, 6]  # lr 0: nothing after the first validation improves; 2 validations later it stops


def test_a_run_validating_every_few_epochs_resumes_from_its_last_validation(tiny_prepared, tmp_path):
    """With ``eval_every`` > 1 checkpoints exist only at validated epochs: an interrupted run resumes from the last
    one, keeps its patience count, and validates at the same epochs as an uninterrupted run."""
    from transformers import TrainerCallback

    from merlin_molar.training import EarlyStoppingAfter

    class InterruptInEpoch5(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            if state.epoch >= 4:
                raise Interrupted

    def trainer():
        return frozen_sasrec_trainer(tiny_prepared, tmp_path, epochs=8, eval_every=2)

    first = trainer()
    first.add_callback(InterruptInEpoch5())
    with pytest.raises(Interrupted):
        first.train()
    last = max(tmp_path.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert first.state.log_history[-1]["epoch"] == 4  # validated at epochs 2 and 4, then interrupted
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(last))
    epochs = [h["epoch"] for h in resumed.state.log_history if "eval_/next-item/ndcg_at_10" in h]
    assert epochs == [2, 4, 6, 8]
    (stopper,) = [c for c in resumed.callback_handler.callbacks if isinstance(c, EarlyStoppingAfter)]
    assert stopper.early_stopping_patience_counter == 3  # lr 0: validations at epochs 4, 6 and 8 bring nothing


@pytest.fixture(scope="module")
def short_window(tiny_dir, tmp_path_factory):
    """The synthetic data (histories of 6-12 items) prepared with windows of 5: most users have older items."""
    from merlin_molar.data import prepare, read_dataset

    return prepare(read_dataset(tiny_dir), tmp_path_factory.mktemp("short") / "prepared", max_length=5)


def captured_evaluation(trainer, prepared, split, monkeypatch):
    """``(metrics, [(scores, targets)] per batch in file order)`` of one evaluation through the Trainer."""
    batches = []
    calculate = trainer.model.calculate_metrics
    monkeypatch.setattr(trainer.model, "calculate_metrics",
                        lambda scores, labels: (batches.append((scores, labels)), calculate(scores, labels))[1])
    metrics = evaluate(trainer, prepared, split)
    monkeypatch.undo()
    return metrics, batches


@pytest.mark.parametrize("split, cut", [("valid", -2), ("test", -1)])
def test_evaluation_masks_the_whole_history_not_only_the_window(short_window, tiny_dir, tmp_path, monkeypatch,
                                                                 split, cut):
    from merlin_molar.data import read_dataset
    from merlin_molar.data.workflow import item_id_mapping
    from merlin_molar.ids import FIRST_ITEM_ID

    torch.manual_seed(0)
    model = sasrec_model(short_window.schema, SASRecConfig(max_length=5, d_model=16, n_layers=1))
    trainer = make_trainer(model, short_window, tmp_path / "run", TrainConfig())
    whole, batches = captured_evaluation(trainer, short_window, split, monkeypatch)

    raw = read_dataset(tiny_dir).interactions.sort_values("timestamp", kind="stable")
    encode = item_id_mapping(short_window.load_workflow())
    histories = raw.groupby("user_id")["item_id"].apply(lambda s: [int(encode[i]) for i in s])
    users = short_window.split_frame(split)["user_id"].tolist()  # the evaluation reads the file in this order
    scores = torch.cat([s for s, _ in batches])
    targets = torch.cat([t for _, t in batches])
    assert len(users) == len(scores) == short_window.manifest["users"]
    older = 0
    for row, target, user in zip(scores, targets, users):
        history = histories[user]
        assert int(target) == history[cut]
        masked = set(torch.nonzero(torch.isinf(row)).flatten().tolist()) - set(range(FIRST_ITEM_ID))
        assert masked == set(history[:cut]) - {history[cut]}, user
        older += len(history[:cut]) > 4
    assert older > len(users) / 2  # most rows had items older than the window to mask

    trainer.earlier_items = {}  # a Trainer that knows no earlier-items table masks the window alone
    window, window_batches = captured_evaluation(trainer, short_window, split, monkeypatch)
    window_scores = torch.cat([s for s, _ in window_batches])
    finite = torch.isfinite(scores)
    assert torch.equal(scores[finite], window_scores[finite])  # the extra masking changes nothing else
    assert torch.isinf(scores).sum() > torch.isinf(window_scores).sum()
    assert whole["ndcg@10"] >= window["ndcg@10"] and whole["recall@50"] >= window["recall@50"]


def test_a_directory_prepared_before_the_earlier_items_table_masks_the_window_and_says_so(
        short_window, tmp_path, caplog):
    import shutil

    from merlin_molar.data import load_prepared

    root = tmp_path / "old"
    shutil.copytree(short_window.root, root)
    old = load_prepared(root)
    shutil.rmtree(root / "earlier")
    torch.manual_seed(0)
    model = sasrec_model(old.schema, SASRecConfig(max_length=5, d_model=16, n_layers=1))
    trainer = make_trainer(model, old, tmp_path / "run", TrainConfig())
    with caplog.at_level("WARNING"):
        metrics = evaluate(trainer, old, "test")
    assert "masks only the last max_length items" in caplog.text
    assert 0 <= metrics["ndcg@10"] <= 1


def test_each_earlier_items_table_is_read_once_however_often_the_trainer_evaluates(short_window, tmp_path,
                                                                                   monkeypatch):
    from merlin_molar import training

    reads = []
    read = training.EarlierItems.read
    monkeypatch.setattr(training.EarlierItems, "read", lambda path: (reads.append(path), read(path))[1])
    torch.manual_seed(0)
    model = sasrec_model(short_window.schema, SASRecConfig(max_length=5, d_model=16, n_layers=1))
    trainer = make_trainer(model, short_window, tmp_path / "run", TrainConfig())
    first = evaluate(trainer, short_window, "valid")
    assert evaluate(trainer, short_window, "valid") == first
    evaluate(trainer, short_window, "test")
    assert sorted(reads) == sorted(short_window.earlier_items_path(s) for s in ("valid", "test"))
