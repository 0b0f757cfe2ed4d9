"""Saving and loading trained models without cloudpickle.

A saved model is a directory::

    molar_model.json       kind ("sasrec" | "molar"), its config, package versions, the sha256 of every other
                           file (verified by load_model) and, when saved by ``train``, the fingerprint of the
                           prepared data's item id mapping (checked by evaluate / recommend / export)
    schema.json            the Merlin schema the model was built from
    item_table.safetensors the frozen content item table (Molar only)
    weights.pt             state dict (for LoRA on a pretrained LLM: everything except the frozen base LLM)
    adapter/               peft LoRA adapters (when LoRA is on), loadable on their own with peft

Reloading rebuilds the model from its config and loads the weights, so predictions are identical.
Directories are written atomically.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers4rec.torch as tr
from merlin.schema import Schema
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from safetensors.torch import load_file, save_file

import merlin_molar
from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, file_checksums, read_json, verify_checksums, write_json
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model


def _is_pretrained_llm(config: MolarConfig) -> bool:
    return isinstance(config.llm, str)


def save_model(
    model: tr.Model, path, kind: str, config, schema: Schema, item_table: torch.Tensor = None, extra: dict = None
) -> Path:
    """``extra``: more keys for ``molar_model.json`` (``train`` records the prepared data's id mapping)."""
    path = Path(path)
    state = model.state_dict()
    with atomic_path(path, is_dir=True) as tmp:
        (tmp / "schema.json").write_text(TensorflowMetadata.from_merlin_schema(schema).to_json())
        if kind == "molar":
            save_file({"table": item_table.detach().float().contiguous().cpu()}, str(tmp / "item_table.safetensors"))
            if config.lora:
                llm = model.heads[0].body.content[1].llm
                llm.save_pretrained(str(tmp / "adapter"))
                if _is_pretrained_llm(config):
                    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                    state = {k: v for k, v in state.items() if ".llm." not in k or k in trainable}
        torch.save(state, tmp / "weights.pt")
        write_json(
            tmp / "molar_model.json",
            {
                **(extra or {}),
                "kind": kind,
                "config": config.to_dict(),
                "merlin_molar": merlin_molar.__version__,
                "saved_at": datetime.now(timezone.utc).isoformat(),
                "sha256": file_checksums(tmp),
            },
        )
    return path


def load_model(path) -> tuple:
    """Returns ``(model, kind, config, schema)``."""
    path = Path(path)
    meta = read_json(path / "molar_model.json")
    if not isinstance(meta, dict):
        raise MolarDataError(path / "molar_model.json", "not a merlin-molar model description")
    if "sha256" in meta:  # models saved before checksums were recorded are loaded unchecked
        verify_checksums(path, meta["sha256"], "re-train the model or restore its directory from a backup")
    schema_file = path / "schema.json"
    if not schema_file.is_file():
        raise MolarDataError(schema_file, "file not found (not a saved merlin-molar model?)")
    try:
        schema = TensorflowMetadata.from_json(schema_file.read_text()).to_merlin_schema()
    except Exception as e:
        raise MolarDataError(schema_file, f"not a readable model schema ({type(e).__name__})") from None
    kind = meta.get("kind")
    if kind == "sasrec":
        config = SASRecConfig(**meta["config"])
        model = sasrec_model(schema, config)
    elif kind == "molar":
        config = MolarConfig(**meta["config"])
        table_file = path / "item_table.safetensors"
        if not table_file.is_file():
            raise MolarDataError(table_file, "file not found (the saved model is incomplete)")
        try:
            table = load_file(str(table_file))["table"]
        except Exception as e:
            raise MolarDataError(table_file, f"not a readable item table ({type(e).__name__})") from None
        model = molar_model(schema, table, config)
    else:
        raise MolarDataError(path / "molar_model.json", f"unknown model kind {kind!r}")
    weights = path / "weights.pt"
    if not weights.is_file():
        raise MolarDataError(weights, "file not found (the saved model is incomplete)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MolarDataError(weights, f"not a readable weights file ({type(e).__name__})") from None
    strict = not (kind == "molar" and config.lora and _is_pretrained_llm(config))
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if unexpected or (not strict and any(".llm." not in k for k in missing)):
        raise MolarDataError(path / "weights.pt", f"weights do not match the model (unexpected {unexpected[:3]})")
    return model.eval(), kind, config, schema
