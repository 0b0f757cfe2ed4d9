"""Worker for tests/integration/distributed: run as ``python ddp_worker.py SPEC`` or under ``torchrun``.

SPEC is a JSON file: {"prepared": dir, "out": dir, "jobs": [...]}; every job runs in this process, in order,
and rank 0 writes ``<out>/<job name>.json``. Jobs:

* ``{"kind": "train", "name", "train_dir", "global_batch", "epochs", "save_steps", "resume"?}``: SASRec
  (dropout 0) trained through :func:`merlin_molar.training.make_trainer` on the parquet files of ``train_dir``
  read in file order (no shuffle) and sharded by the Merlin loader; writes per-step losses and the final
  weights (``<name>.pt``).
* ``{"kind": "eval", "name", "weights"}``: valid/test full-ranking metrics of saved weights through the
  Trainer's evaluation, plus the rows each process read from the default (shuffled) train loader and the
  valid loader.
* ``{"kind": "uneven", "name", "prepared"}``: :func:`make_trainer` on a prepared directory whose train
  split gives the processes different numbers of batches; records the refusal.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import merlin_molar  # noqa: F401  (compat layer before T4Rec)
from transformers import TrainerCallback
from transformers4rec.torch.utils.data_utils import MerlinDataLoader

from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.data import load_prepared
from merlin_molar.distributed import data_parallel_config, leave_process_group, world
from merlin_molar.errors import MolarDataError
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.training import TrainConfig, evaluate, make_trainer

MODEL = SASRecConfig(max_length=20, d_model=32, dropout=0.0)


class StepCounter(TrainerCallback):
    """Optimizer steps this process actually ran (a resumed run restores earlier steps' logs too)."""

    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def build_model(data):
    torch.manual_seed(0)
    return sasrec_model(data.schema, MODEL)


def rows_read(loader):
    """Every row a loader yields, as a tuple of its item ids."""
    rows = []
    for inputs, _ in loader:
        for seq in inputs[ITEM_SEQUENCE].tolist():
            rows.append(tuple(i for i in seq if i))
    return rows


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train(spec, job, data):
    config = data_parallel_config(
        TrainConfig(
            epochs=job["epochs"], learning_rate=job["learning_rate"], save_steps=job["save_steps"],
            logging_steps=1, seed=0, early_stopping_patience=0,  # step checkpoints, not per-epoch ones
        ),
        global_batch_size=job["global_batch"],
    )
    out = Path(spec["out"]) / job["name"]
    trainer = make_trainer(build_model(data), data, out, config)
    me = world()
    trainer.train_dataloader = MerlinDataLoader.from_schema(
        data.schema,
        job["train_dir"],
        config.batch_size,
        max_sequence_length=data.max_length,
        shuffle=False,
        global_rank=me.rank,
        global_size=me.size,
    )
    steps = StepCounter()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=job.get("resume"))
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    result = {
        "world_size": trainer.args.world_size,
        "per_device_batch": config.batch_size,
        "global_step": trainer.state.global_step,
        "steps_run": steps.count,
        "losses": {int(h["step"]): h["loss"] for h in history},
        "grad_norms": {int(h["step"]): h["grad_norm"] for h in history},
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
    }
    if me.is_main:
        torch.save(trainer.model.state_dict(), Path(spec["out"]) / f"{job['name']}.pt")
    return result


def evaluate_weights(spec, job, data):
    model = build_model(data)
    model.load_state_dict(torch.load(job["weights"], map_location="cpu", weights_only=True))
    trainer = make_trainer(model, data, Path(spec["out"]) / job["name"], TrainConfig(eval_batch_size=128))
    result = {
        "world_size": trainer.args.world_size,
        "valid": evaluate(trainer, data, "valid"),
        "test": evaluate(trainer, data, "test"),
    }
    result["train_rows_per_rank"] = gather_objects(rows_read(trainer.get_train_dataloader()))
    result["valid_rows_per_rank"] = gather_objects(rows_read(trainer.get_eval_dataloader()))
    return result


def refuse_uneven(spec, job, data):
    uneven = load_prepared(job["prepared"])
    try:
        make_trainer(build_model(uneven), uneven, Path(spec["out"]) / job["name"], TrainConfig(batch_size=64))
    except MolarDataError as err:
        return {"refused": str(err)}
    return {"refused": None}


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    data = load_prepared(spec["prepared"])
    for job in spec["jobs"]:
        result = {"train": train, "eval": evaluate_weights, "uneven": refuse_uneven}[job["kind"]](spec, job, data)
        if world().is_main:
            (Path(spec["out"]) / f"{job['name']}.json").write_text(json.dumps(result))
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
