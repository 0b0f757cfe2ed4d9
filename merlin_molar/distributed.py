"""Scale-out on the ecosystem's own engines: Dask for the NVTabular workflow, ``torchrun`` for training.

Preprocessing runs the unchanged NVTabular workflow on a ``dask.distributed`` cluster through Merlin's own
client support (:class:`merlin.core.utils.Distributed`)::

    from merlin_molar.distributed import dask_cluster

    with dask_cluster(n_workers=8):                                   # LocalCluster (CPU) / LocalCUDACluster (GPU)
        prepare(raw, "prepared", max_length=200, partitions=32)
    with dask_cluster(scheduler_address="tcp://scheduler:8786"):    # a cluster started elsewhere
        prepare(raw, "prepared", max_length=200, partitions=256)

The output is identical to the single-process run whatever the number of workers or partitions.

Training is data parallel through the Transformers4Rec / Hugging Face Trainer (DDP, gloo on CPU, NCCL on
GPUs); launch the same script with ``torchrun --nproc_per_node=N script.py``. :func:`data_parallel_config`
keeps the global batch of a single-process run, and passes Trainer options such as ``deepspeed=`` or
``fsdp=`` through to ``TrainingArguments``. The Merlin loader gives process ``r`` the ``r``-th contiguous
block of a split's partitions; :func:`check_launch` refuses launches that would silently run unsharded or
hang on unequal shards, and :func:`gathered_evaluation_loop` makes the full-ranking metrics of ``N``
processes exactly those of one.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional

import dask
import torch
from distributed import WorkerPlugin
from merlin.core.utils import Distributed

from merlin_molar.errors import MolarDataError
from merlin_molar.ids import USER_INDEX

LOG = logging.getLogger(__name__)

# Applied in every Dask worker: dask 2024.12 + pandas 2 would otherwise turn list columns held in pandas
# frames into strings (see merlin_molar.compat), and a worker started by `dask worker` does not inherit the
# client's configuration.
WORKER_DASK_CONFIG: Dict[str, object] = {"dataframe.convert-string": False}


class DaskConfigPlugin(WorkerPlugin):
    """Sets :data:`WORKER_DASK_CONFIG` on every worker of a cluster, including workers that join later."""

    name = "merlin-molar-dask-config"

    def __init__(self, config: Optional[Dict[str, object]] = None):
        self.config = dict(WORKER_DASK_CONFIG if config is None else config)

    def setup(self, worker) -> None:
        dask.config.set(self.config)


def configure_workers(client) -> None:
    """Register :class:`DaskConfigPlugin` with ``client``'s cluster (idempotent)."""
    client.register_plugin(DaskConfigPlugin())


@contextmanager
def dask_cluster(
    n_workers: Optional[int] = None,
    *,
    scheduler_address: Optional[str] = None,
    cluster_type: Optional[str] = None,
    **cluster_options,
) -> Iterator[Distributed]:
    """Run the NVTabular work inside the block on a Dask cluster.

    Without ``scheduler_address`` a local cluster is started for the block and closed after it:
    ``cluster_type="cpu"`` is ``distributed.LocalCluster`` (one thread per worker unless
    ``threads_per_worker`` is given), ``"cuda"`` is ``dask_cuda.LocalCUDACluster`` (one worker per visible
    GPU; options such as ``rmm_pool_size="20GB"`` or ``protocol="ucx"`` go through ``cluster_options``).
    Merlin picks ``"cuda"`` when cuDF and a GPU are present. With ``scheduler_address`` the block uses that
    running cluster and leaves it running. Either way the workers get :data:`WORKER_DASK_CONFIG`.

    Local clusters start worker processes: call this under ``if __name__ == "__main__":`` in scripts.
    """
    client = None
    if scheduler_address:
        from distributed import Client

        client = Client(scheduler_address)
        context = Distributed(client=client)
    else:
        from merlin.core.compat import HAS_GPU

        cluster_type = cluster_type or ("cuda" if HAS_GPU else "cpu")
        if n_workers is not None:
            cluster_options["n_workers"] = n_workers
        if cluster_type == "cpu":
            cluster_options.setdefault("threads_per_worker", 1)
        cluster_options.setdefault("silence_logs", logging.ERROR)
        context = Distributed(cluster_type=cluster_type, force_new=True, **cluster_options)
    cluster = None if client is not None else context.client.cluster
    try:
        configure_workers(context.client)
        yield context
    finally:
        context.deactivate()
        if client is not None:
            client.close()
        if cluster is not None:
            # Client(cluster).close() leaves the cluster it was handed running
            cluster.close()


@dataclass(frozen=True)
class World:
    """This process's place in a ``torchrun`` launch."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """From ``torch.distributed`` when it is initialised, else from torchrun's environment
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), local, torch.distributed.get_world_size())
    return World(int(os.environ.get("RANK", 0)), local, int(os.environ.get("WORLD_SIZE", 1)))


def leave_process_group(wait_for_peers: bool = True) -> None:
    """Destroy the default process group if this process is in one (under ``torchrun`` the Hugging Face Trainer
    joins it and never leaves it). A process that exits while still in a gloo group can abort at interpreter
    shutdown, after its work is done ("terminate called without an active exception", SIGABRT, exit -6), and so
    fail a finished launch: pytorch/pytorch#190489, seen here with torch 2.13 in the two-node test (once in eight
    runs of it on 2026-12-02). ``wait_for_peers`` first meets the other ranks at a barrier, so that none tears the
    group down while a peer still uses it; pass False after an error, when the peers may never get there."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def per_device_batch_size(
    global_batch_size: int, world_size: Optional[int] = None, gradient_accumulation_steps: int = 1
) -> int:
    """The per-process batch that makes ``world_size`` processes step with ``global_batch_size`` sequences."""
    size = world().size if world_size is None else int(world_size)
    shards = size * int(gradient_accumulation_steps)
    if global_batch_size < shards or global_batch_size % shards:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by {size} process(es) x "
            f"{gradient_accumulation_steps} accumulation step(s)"
        )
    return global_batch_size // shards


def data_parallel_config(
    config, global_batch_size: Optional[int] = None, world_size: Optional[int] = None, **trainer_options
):
    """``config`` (a :class:`merlin_molar.training.TrainConfig`) for this launch.

    * the per-device batch becomes ``global_batch_size / (processes x gradient_accumulation_steps)``
      (default: ``config.batch_size`` is the global batch), so 2 x 64 steps like 1 x 128;
    * ``trainer_options`` are Hugging Face ``TrainingArguments`` passed through unchanged, e.g.
      ``ddp_backend="nccl"``, ``ddp_find_unused_parameters=False``, ``deepspeed="ds_zero2.json"`` (needs the
      ``deepspeed`` package), ``fsdp="full_shard auto_wrap"`` with ``fsdp_config={...}``.
    """
    extra = {**config.extra, **trainer_options}
    accumulation = int(extra.get("gradient_accumulation_steps", 1))
    batch = per_device_batch_size(global_batch_size or config.batch_size, world_size, accumulation)
    return replace(config, batch_size=batch, extra=extra)


def _all_gather_int(value: int, device) -> List[int]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [int(value)]
    local = torch.tensor([int(value)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, local)
    return [int(t.item()) for t in out]


def check_launch(trainer) -> None:
    """Refuse launches that would run without sharding or hang.

    * ``torchrun`` started ``WORLD_SIZE`` processes but the Trainer did not join them (on a machine without
      CUDA, Hugging Face needs ``use_cpu=True`` for gloo): every process would train on all the data alone;
    * processes get different numbers of training batches per epoch: DDP would wait forever for the process
      that ran out of batches.
    """
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != trainer.args.world_size:
        raise RuntimeError(
            f"torchrun started {launched} processes but the Trainer runs as {trainer.args.world_size} "
            "(without CUDA the Hugging Face Trainer joins a process group only with use_cpu=True)"
        )
    if trainer.args.world_size == 1 or trainer.train_dataset_or_path is None and trainer.train_dataloader is None:
        return
    steps = _all_gather_int(len(trainer.get_train_dataloader()), trainer.args.device)
    if len(set(steps)) > 1:
        raise MolarDataError(
            trainer.train_dataset_or_path,
            f"the {len(steps)} processes get {steps} training batches per epoch, so DDP would hang at the end "
            "of the epoch: write the split with a number of equal partitions divisible by the process count, "
            "or set dataloader_drop_last=True with shards of equal size",
        )


def gathered_evaluation_loop(trainer, dataloader, metric_key_prefix: str = "eval"):
    """Full-ranking evaluation of ``trainer.model``, gathered across processes; returns an ``EvalLoopOutput``.

    Each process evaluates its shard (the Merlin loader gives rank ``r`` the ``r``-th contiguous block of the
    split's partitions) and feeds the model's own T4Rec ranking metrics. Their state is the per-user metric
    rows, a torchmetrics ``cat`` state that torchmetrics all-gathers in rank order at ``compute()``: the
    rows of all processes in file order, as in one process, so the means are bit-identical.
    Transformers4Rec's own loop gathers labels and losses after every batch, which fails as soon as the
    processes' last batches differ in size, and keeps every [users x items] score matrix on the host;
    this loop does neither. The loss is the row-weighted mean of the batch losses. A loader that carries
    ``earlier_items`` (:meth:`merlin_molar.training.Trainer.get_eval_dataloader`) also reads each row's
    ``user_index``, and the users' items older than the window are masked before the metrics see the scores.
    """
    from transformers.trainer_pt_utils import find_batch_size
    from transformers.trainer_utils import EvalLoopOutput
    from transformers4rec.torch.trainer import process_metrics

    model = trainer.model
    model.eval()
    model.reset_metrics()
    trainer.callback_handler.eval_dataloader = dataloader
    device = trainer.args.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    earlier = getattr(dataloader, "earlier_items", None)
    for inputs in dataloader:
        batch = find_batch_size(inputs)
        user_index = inputs[0].pop(USER_INDEX) if earlier is not None else None
        loss, predictions, labels, _ = trainer.prediction_step(model, inputs, prediction_loss_only=False, testing=True)
        if earlier is not None:
            predictions = earlier.mask(predictions, user_index, labels)
        model.calculate_metrics(predictions, labels)
        loss_sum += loss.double() * batch
        rows += batch
        trainer.control = trainer.callback_handler.on_prediction_step(trainer.args, trainer.state, trainer.control)

    counts = _all_gather_int(rows, device)
    if min(counts) == 0:
        # torchmetrics cannot gather an empty metric state next to non-empty ones
        raise MolarDataError(
            getattr(dataloader, "paths_or_dataset", "evaluation data"),
            f"processes got {counts} evaluation rows: every process needs at least one partition",
        )
    if len(counts) > 1:
        torch.distributed.all_reduce(loss_sum)
    metrics = process_metrics(model.compute_metrics(mode=metric_key_prefix), prefix=metric_key_prefix + "_/")
    metrics[f"{metric_key_prefix}_/loss"] = (loss_sum / sum(counts)).item()
    return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=sum(counts))


class GatheredEvaluation:
    """Trainer mixin: evaluation (not prediction) through :func:`gathered_evaluation_loop`."""

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if description == "Prediction" or not self.compute_metrics:
            return super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        return gathered_evaluation_loop(self, dataloader, metric_key_prefix)
