"""Every override that makes Transformers4Rec 23.12 / Merlin 23.08 run on the project's pinned stack.

Merlin's last releases declare ``transformers<4.31`` and ``pandas<1.6``; the project runs them next to
transformers 4.57, torch 2.13, numpy 2, pandas 2.3 and dask 2024.12 (see ``requirements/``). Each override
below is guarded by a feature check (it does nothing where upstream still works), names the upstream
version where the break appeared, and has a test in ``tests/unit/test_compat.py`` that fails without it.

:func:`apply` is idempotent. Importing :mod:`merlin_molar` calls :func:`install`, which imports nothing heavy: it
applies the overrides at the first import of ``transformers4rec.torch`` (and the dask one at the first import of
``dask``), whoever imports it, so ``import merlin_molar, transformers4rec.torch`` works and
``import merlin_molar.serving.client`` loads neither torch nor Transformers4Rec.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import random
import sys

_APPLIED = False
LOG = logging.getLogger(__name__)


def _patch_dask_string_conversion() -> None:
    # dask >= 2023.7 with pandas 2: nvt.Dataset(pandas frame holding a list column) turns every list into a
    # string like "[np.int64(138), ...]"; Categorify then encodes one code per row and nothing fails.
    import dask

    if dask.config.get("dataframe.convert-string", None) is not False:
        dask.config.set({"dataframe.convert-string": False})


def _patch_sequence_summary() -> None:
    # transformers 4.53 removed transformers.modeling_utils.SequenceSummary, which
    # transformers4rec.torch.model.base imports at module level; XLNet kept the identical class.
    import transformers.modeling_utils as modeling_utils

    if not hasattr(modeling_utils, "SequenceSummary"):
        from transformers.models.xlnet.modeling_xlnet import XLNetSequenceSummary

        modeling_utils.SequenceSummary = XLNetSequenceSummary


def _patch_trainer() -> None:
    import numpy as np
    import torch
    from transformers import Trainer as HFTrainer
    from transformers4rec.torch import trainer as t4r_trainer

    T4RecTrainer = t4r_trainer.Trainer

    # transformers 4.31 removed Trainer._pad_across_processes (T4Rec's evaluation_loop calls it).
    if not hasattr(HFTrainer, "_pad_across_processes") and "_pad_across_processes" not in vars(T4RecTrainer):

        def _pad_across_processes(self, tensor, pad_index=-100):
            return self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_index)

        T4RecTrainer._pad_across_processes = _pad_across_processes

    # transformers 4.35 removed Trainer.use_amp / use_cuda_amp, so T4Rec's _use_cuda_amp property raises
    # AttributeError in evaluate. Mixed precision now lives in accelerate, which wraps model.forward in
    # autocast when the Trainer prepares the model, so T4Rec's own torch.cuda.amp block is not needed.
    if not hasattr(HFTrainer, "use_amp") and not hasattr(HFTrainer, "use_cuda_amp"):
        T4RecTrainer._use_cuda_amp = property(lambda self: False)

    # transformers 4.46 passes compute_loss(..., num_items_in_batch=...); T4Rec's signature lacks it.
    original_compute_loss = T4RecTrainer.compute_loss
    if not getattr(original_compute_loss, "_merlin_molar_compat", False):

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return original_compute_loss(self, model, inputs, return_outputs=return_outputs)

        compute_loss._merlin_molar_compat = True
        T4RecTrainer.compute_loss = compute_loss

    # transformers 4.47 calls log(logs, start_time) and defines _save_checkpoint(model, trial) without
    # the `metrics` argument that T4Rec's _save_model_and_checkpoint passes.
    original_log = T4RecTrainer.log
    if not getattr(original_log, "_merlin_molar_compat", False):

        def log(self, logs, start_time=None):
            return original_log(self, logs)

        log._merlin_molar_compat = True
        T4RecTrainer.log = log

    # transformers 4.41 (stateful callbacks): _save_checkpoint looks up every current stateful callback by
    # class name in the state loaded from the checkpoint it resumed from, so a run resumed with a callback
    # that checkpoint did not have (one written by an older merlin-molar, whose early stopping was Hugging
    # Face's own class) dies with a KeyError at its first save. Such a callback starts a fresh entry instead.
    if "_save_checkpoint" not in vars(T4RecTrainer):

        def _save_checkpoint(self, model, trial, metrics=None):
            from transformers.trainer_callback import ExportableState

            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
            return HFTrainer._save_checkpoint(self, model, trial)

        T4RecTrainer._save_checkpoint = _save_checkpoint

    # transformers 4.35 saves safetensors by default, which refuses the tied item-embedding / output
    # weights of a weight-tied T4Rec model; T4Rec's own reload reads pytorch_model.bin anyway.
    original_init = T4RecTrainer.__init__
    if not getattr(original_init, "_merlin_molar_compat", False):

        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if getattr(self.args, "save_safetensors", False):
                self.args.save_safetensors = False

        __init__._merlin_molar_compat = True
        T4RecTrainer.__init__ = __init__

    # torch 2.6 made torch.load(weights_only=True) the default: T4Rec's reload of the RNG state (numpy
    # arrays) fails; and it restores CUDA RNG states for every saved device even when the device count
    # differs (or there is no GPU at all).
    original_load = T4RecTrainer.load_model_trainer_states_from_checkpoint
    if not getattr(original_load, "_merlin_molar_compat", False):

        def load_model_trainer_states_from_checkpoint(self, checkpoint_path, model=None):
            if model is None:
                import cloudpickle

                with open(os.path.join(checkpoint_path, "t4rec_model_class.pkl"), "rb") as f:
                    model = cloudpickle.load(f)
            self.model = model
            weights = torch.load(
                os.path.join(checkpoint_path, "pytorch_model.bin"), map_location="cpu", weights_only=True
            )
            self.model.load_state_dict(weights)
            rng_file = os.path.join(checkpoint_path, "rng_state.pth")
            if os.path.exists(rng_file):
                state = torch.load(rng_file, weights_only=False)
                random.setstate(state["python"])
                np.random.set_state(state["numpy"])
                torch.random.set_rng_state(state["cpu"])
                cuda_states = state.get("cuda")
                if cuda_states is not None and torch.cuda.is_available():
                    if not isinstance(cuda_states, (list, tuple)):
                        cuda_states = [cuda_states]
                    if len(cuda_states) == torch.cuda.device_count():
                        torch.cuda.random.set_rng_state_all(cuda_states)
                    else:
                        LOG.warning(
                            "Checkpoint %s has CUDA RNG states for %d devices but %d are visible; "
                            "CUDA RNG not restored.",
                            checkpoint_path,
                            len(cuda_states),
                            torch.cuda.device_count(),
                        )

        load_model_trainer_states_from_checkpoint._merlin_molar_compat = True
        T4RecTrainer.load_model_trainer_states_from_checkpoint = load_model_trainer_states_from_checkpoint


class _AlreadyImported(importlib.abc.Loader):
    """Loads a module that is already imported: the import statement gets it as it is, its own spec restored."""

    def __init__(self, module):
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec


class _ApplyOnFirstImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that, at the first import of a module in ``patches``, imports it the normal way,
    applies its overrides, and hands the patched module to the import statement that asked for it."""

    def __init__(self, patches):
        self.patches = dict(patches)

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.pop(fullname, None)
        if patch is None:
            return None
        if not self.patches and self in sys.meta_path:
            sys.meta_path.remove(self)
        patch()  # imports ``fullname`` the normal way (this finder no longer answers for it), then patches it
        module = sys.modules[fullname]
        # the import system reads the spec back from the module it now finds in sys.modules
        module.__spec__ = importlib.machinery.ModuleSpec(fullname, _AlreadyImported(module))
        return module.__spec__


def install() -> None:
    """Apply the overrides when the packages they patch are first imported (now, for those already imported)."""
    patches = {}
    if "dask" in sys.modules:
        _patch_dask_string_conversion()
    else:
        patches["dask"] = _patch_dask_string_conversion
    if "transformers4rec.torch" in sys.modules:
        apply()
    else:
        patches["transformers4rec.torch"] = apply
    if patches and not any(isinstance(f, _ApplyOnFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ApplyOnFirstImport(patches))


def apply() -> None:
    """Apply every override once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_dask_string_conversion()
    _patch_sequence_summary()
    _patch_trainer()
    _patch_dataloader_global_rank()
    _patch_cpu_ddp_optimizer_resume()
    _patch_dataloader_remainder_shuffle()
    _APPLIED = True


def _patch_dataloader_global_rank() -> None:
    # transformers4rec 23.12 (and every release with DDP support before it) hands args.local_rank to the
    # Merlin loader as its global_rank: on more than one node, processes with the same local rank read the
    # same shard and the shards of the higher global ranks are never read. Its get_*_dataloader methods read
    # self.local_rank for nothing else, so it becomes the global rank (args.process_index); the loader's
    # device stays self.device, the local rank.
    import inspect

    from transformers4rec.torch import trainer as t4r_trainer

    T4RecTrainer = t4r_trainer.Trainer
    try:
        broken = "global_rank=self.local_rank" in inspect.getsource(T4RecTrainer.get_train_dataloader)
    except (OSError, TypeError):
        broken = True
    original_init = T4RecTrainer.__init__
    if not broken or getattr(original_init, "_merlin_molar_global_rank", False):
        return

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.args.local_rank != -1:
            self.local_rank = self.args.process_index

    __init__._merlin_molar_global_rank = True
    T4RecTrainer.__init__ = __init__


def _cpu_index_map_location_fails() -> bool:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location=torch.device("cpu", 0), weights_only=True)
    except RuntimeError:
        return True
    return False


def _patch_cpu_ddp_optimizer_resume() -> None:
    # Under a torchrun launch without CUDA, accelerate (seen with 1.15) gives each process the device "cpu:0"
    # and transformers (4.57) loads the optimizer state of a resumed checkpoint with map_location=args.device
    # whenever world_size > 1; torch.load only knows "cpu", so every multi-process CPU resume fails with
    # "don't know how to restore data location ... (tagged with cpu:0)". Same loading, with "cpu".
    from transformers import Trainer as HFTrainer
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
    from transformers.trainer_pt_utils import reissue_pt_warnings
    from transformers4rec.torch import trainer as t4r_trainer

    T4RecTrainer = t4r_trainer.Trainer
    original = HFTrainer._load_optimizer_and_scheduler
    if getattr(T4RecTrainer._load_optimizer_and_scheduler, "_merlin_molar_compat", False):
        return
    if not _cpu_index_map_location_fails():
        return

    def _load_optimizer_and_scheduler(self, checkpoint):
        import warnings

        import torch

        device = self.args.device
        if (
            checkpoint is None
            or device.type != "cpu"
            or device.index is None
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME))
            or not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME))
        ):
            return original(self, checkpoint)
        self.optimizer.load_state_dict(
            torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
        )
        with warnings.catch_warnings(record=True) as caught_warnings:
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        reissue_pt_warnings(caught_warnings)

    _load_optimizer_and_scheduler._merlin_molar_compat = True
    T4RecTrainer._load_optimizer_and_scheduler = _load_optimizer_and_scheduler


def _remainder_left_unshuffled(chunk_logic) -> bool:
    import inspect

    try:
        source = inspect.getsource(chunk_logic)
    except (OSError, TypeError):
        return False
    split, shuffle = source.find("get_batch_div_chunk("), source.find("shuffle_df(")
    return 0 <= split < shuffle


def _patch_dataloader_remainder_shuffle() -> None:
    # merlin-dataloader 23.08's ChunkQueue.chunk_logic splits each loaded chunk into whole batches and a remainder
    # (the rows after the last whole batch) and shuffles only the whole batches. The last chunk's remainder
    # becomes the epoch's final batch unshuffled: with a training split that fits in one chunk (MovieLens-100K:
    # 943 users, batch 128) the final batch of every epoch holds the same 47 users (the file's last rows), so one
    # optimizer step in eight trains on them alone for the whole run. Shuffle the chunk before the split.
    from merlin.dataloader.loader_base import ChunkQueue
    from merlin.io import shuffle_df

    original = ChunkQueue.get_batch_div_chunk
    if getattr(original, "_merlin_molar_compat", False) or not _remainder_left_unshuffled(ChunkQueue.chunk_logic):
        return

    def get_batch_div_chunk(self, chunks, batch_size):
        if self.shuffle and len(chunks) > batch_size:
            chunks = shuffle_df(chunks)
        return original(self, chunks, batch_size)

    get_batch_div_chunk._merlin_molar_compat = True
    ChunkQueue.get_batch_div_chunk = get_batch_div_chunk
