"""Training glue: Transformers4Rec's own Trainer on the prepared splits, full-ranking evaluation.

The Trainer is ``transformers4rec.torch.Trainer`` (a Hugging Face Trainer), so checkpointing, resume,
logging, mixed precision and ``torchrun`` data parallelism come from there.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
import transformers4rec.torch as tr
from merlin.io import Dataset
from merlin.schema import Schema, Tags
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback
from transformers4rec.config.trainer import T4RecTrainingArguments

from merlin_molar.data.workflow import EVALUATED_SPLITS, PreparedData
from merlin_molar.distributed import GatheredEvaluation, check_launch
from merlin_molar.evaluation import EarlierItems, summarise
from merlin_molar.ids import USER_INDEX
from merlin_molar.progress import SparseProgressCallback, interactive

LOG = logging.getLogger(__name__)


# The Trainer's key for validation NDCG@10 (T4Rec names task metrics "<task>/<metric>_at_<k>").
BEST_MODEL_METRIC = "/next-item/ndcg_at_10"
# Early stopping never ends a run before this many optimizer steps. A small dataset has few steps per epoch
# (MovieLens-100K: 8 at batch 128), and with the earlier rule (validation every epoch, patience 10) the
# plateau Molar's content tower goes through early on outlasted the patience: at length 200 it stopped at step
# 176 (epoch 22) with validation NDCG@10 0.068 (with the floor: 0.106), where the same recipe at length 50 had
# come through a 6-epoch plateau after step 112 and went on to 0.097. 400 steps is 50 ML-100K epochs, 8 ML-1M
# epochs; the current rule's 40 epochs without a better validation cover that plateau too.
EARLY_STOPPING_MIN_STEPS = 400


@dataclass
class TrainConfig:
    """Trainer settings. With ``early_stopping_patience > 0`` (the default) the model is evaluated on the
    validation split (and checkpointed) after every ``eval_every``-th epoch and after the last one; training
    stops after ``early_stopping_patience`` such validations without a better NDCG@10 (but not before
    ``EARLY_STOPPING_MIN_STEPS`` optimizer steps), and the best validation's weights are restored: ``epochs`` is
    then a maximum. A resumed run keeps its count (the checkpoint holds it) and restarts from the last
    validated epoch.

    The default, every 5 epochs with patience 8, gives up after 40 epochs without a gain, counted in epochs
    whatever the dataset's size; it is the plain PyTorch reference SASRec's rule
    (``benchmarks/sasrec_parity.py``). The earlier rule (every epoch, patience 10) stopped the project's SASRec
    on ML-100K at length 200 at epochs 59-79 (best 49-69, validation NDCG@10 0.097-0.101), while the
    reference's rose from 0.099 at epoch 50 to 0.1225 at epoch 130: a validation over 943 users moves by up to
    0.005 from one epoch to the next, so 10 epochs without a new best come early. Validating every epoch also
    cost 5 times the evaluations and checkpoints."""

    epochs: float = 200
    early_stopping_patience: int = 8
    eval_every: int = 5
    batch_size: int = 128
    eval_batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.98
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 5.0
    seed: int = 42
    bf16: bool = False
    save_steps: int = 0
    logging_steps: int = 50
    extra: Dict = field(default_factory=dict)


def training_arguments(output_dir, config: TrainConfig, max_length: int) -> T4RecTrainingArguments:
    """``config.extra`` holds any other ``TrainingArguments`` (deepspeed, fsdp, ...) and overrides these."""
    defaults = dict(
        output_dir=str(output_dir),
        max_sequence_length=max_length,
        data_loader_engine="merlin",
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta2=config.adam_beta2,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        logging_steps=config.logging_steps,
        report_to=[],
        dataloader_drop_last=False,
        compute_metrics_each_n_steps=1,
        disable_tqdm=not interactive(),
        # without CUDA, Hugging Face joins a torchrun process group (gloo) only with use_cpu=True
        use_cpu=not torch.cuda.is_available(),
    )
    if config.early_stopping_patience > 0:
        defaults.update(
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=1,
            load_best_model_at_end=True,
            metric_for_best_model=BEST_MODEL_METRIC,
            greater_is_better=True,
            # a resumed run keeps counting patience where the checkpoint left off, so it stops at the epoch
            # the uninterrupted run would have (Hugging Face's default restarts the count at 0)
            restore_callback_states_from_checkpoint=True,
        )
    return T4RecTrainingArguments(**{**defaults, **config.extra})


class EarlyStoppingAfter(EarlyStoppingCallback):
    """Hugging Face's early stopping (``patience`` evaluations without a better metric), which does not stop
    a run before ``min_steps`` optimizer steps: at the first evaluation from then on, it stops if the last
    ``patience`` evaluations brought no improvement."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0,
                 min_steps: Optional[int] = None):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.min_steps = EARLY_STOPPING_MIN_STEPS if min_steps is None else min_steps

    def state(self) -> dict:  # what Hugging Face saves in a checkpoint and rebuilds the callback from
        saved = super().state()
        saved["args"]["min_steps"] = self.min_steps
        return saved

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        stop_already_requested = control.should_training_stop  # e.g. max_steps reached: never cancelled here
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if state.global_step < self.min_steps:
            control.should_training_stop = stop_already_requested


class EvaluateEveryEpochs(TrainerCallback):
    """Validation, and the checkpoint that goes with it, only after every ``every``-th epoch and after the last
    one (the Trainer's ``eval_strategy="epoch"`` validates after each)."""

    def __init__(self, every: int):
        self.every = every

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) % self.every and state.global_step < state.max_steps:
            control.should_evaluate = control.should_save = False
        return control


class EpochSeed:
    """``seed_fn`` for the Merlin loader: the shuffle of epoch ``e`` is seeded with ``seed + e``.

    The Merlin loader shuffles with NumPy's global RNG at the start of every epoch, so a run resumed in
    the middle of an epoch would otherwise see that epoch in another order than the uninterrupted run."""

    def __init__(self, trainer: tr.Trainer, seed: int):
        self.trainer, self.seed = trainer, seed

    def __call__(self) -> int:
        return self.seed + math.floor((self.trainer.state.epoch or 0.0) + 1e-6)


class Trainer(GatheredEvaluation, tr.Trainer):
    """Transformers4Rec's Trainer with a training data order that depends only on (seed, epoch), and
    evaluation gathered across processes (:func:`merlin_molar.distributed.gathered_evaluation_loop`) that
    masks each user's whole history: ``earlier_items`` maps an evaluation split's path to its
    earlier-items table (:class:`merlin_molar.evaluation.EarlierItems`), whose key column the evaluation
    loader then reads too."""

    def __init__(self, *args, earlier_items: Optional[Dict[str, Path]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.earlier_items = dict(earlier_items or {})
        self._earlier_tables: Dict[Path, EarlierItems] = {}  # read once, not at every validation

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.train_dataloader is None:
            loader.dataset.seed_fn = EpochSeed(self, self.args.seed)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        # Transformers4Rec's loader reads eval_dataset_or_path whatever eval_dataset says
        table_path = self.earlier_items.get(str(self.eval_dataset_or_path))
        if self.eval_dataloader is not None or table_path is None:
            return super().get_eval_dataloader(eval_dataset)
        if not Path(table_path).is_file():
            LOG.warning("%s: missing, so the evaluation masks only the last max_length items of each history "
                        "(the directory was prepared before evaluations masked whole histories): run `merlin-molar "
                        "prepare` again to mask the whole history", table_path)
            return super().get_eval_dataloader(eval_dataset)
        split_schema = Dataset(str(self.eval_dataset_or_path), engine="parquet").schema
        key = split_schema[USER_INDEX].with_tags([Tags.CATEGORICAL])  # the loader reads tagged columns only
        model_schema = self.schema
        self.schema = model_schema + Schema([key])
        try:
            loader = super().get_eval_dataloader(eval_dataset)
        finally:
            self.schema = model_schema
        if table_path not in self._earlier_tables:
            self._earlier_tables[table_path] = EarlierItems.read(table_path)
        loader.earlier_items = self._earlier_tables[table_path]
        return loader


def make_trainer(model: tr.Model, data: PreparedData, output_dir, config: TrainConfig) -> tr.Trainer:
    args = training_arguments(output_dir, config, data.max_length)
    trainer = Trainer(
        model=model,
        args=args,
        schema=data.schema,
        train_dataset_or_path=str(data.split_path("train")),
        eval_dataset_or_path=str(data.split_path("valid")),
        test_dataset_or_path=str(data.split_path("test")),
        compute_metrics=True,
        earlier_items={str(data.split_path(s)): data.earlier_items_path(s) for s in EVALUATED_SPLITS},
    )
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(SparseProgressCallback())
    if config.early_stopping_patience > 0:
        trainer.add_callback(EarlyStoppingAfter(config.early_stopping_patience))
        if config.eval_every > 1:
            trainer.add_callback(EvaluateEveryEpochs(config.eval_every))
    check_launch(trainer)
    return trainer


def evaluate(trainer: tr.Trainer, data: PreparedData, split: str) -> Dict[str, float]:
    """Full-ranking metrics on ``valid`` or ``test`` through the Trainer's evaluation loop."""
    trainer.eval_dataset_or_path = str(data.split_path(split))
    try:
        metrics = trainer.evaluate(metric_key_prefix=split)
    finally:
        trainer.eval_dataset_or_path = str(data.split_path("valid"))
    return summarise(metrics, split)

