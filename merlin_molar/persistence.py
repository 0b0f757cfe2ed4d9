"""Saving and loading trained models without cloudpickle.

A saved model is a directory::

    molar_model.json       kind ("sasrec" | "gru4rec" | "molar"), its config, package versions, the sha256 of
                           every other file (verified by load_model) and, when saved by ``train``, the
                           fingerprint of the prepared data's item id mapping (checked by evaluate / recommend /
                           export)
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

from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, file_checksums, read_json, verify_checksums, write_json
from merlin_molar.models.catalogue import extend_catalogue
from merlin_molar.models.id_models import ID_MODELS
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.version import __version__


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
                "merlin_molar": __version__,
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
    if kind in ID_MODELS:
        config = ID_MODELS[kind].config(**meta["config"])
        model = ID_MODELS[kind].model(schema, config)
    elif kind == "molar":
        config = MolarConfig.from_dict(meta["config"])
        table_file = path / "item_table.safetensors"
        if not table_file.is_file():
            raise MolarDataError(table_file, "file not found (the saved model is incomplete)")
        try:
            table = load_file(str(table_file))["table"]
        except Exception as e:
            raise MolarDataError(table_file, f"not a readable item table ({type(e).__name__})") from None
        extension = meta.get("catalogue_extension")
        if extension:  # items added after training: rebuild the trained model, then extend it (no new weights)
            trained = int(extension["trained_items"])
            model = molar_model(with_item_cardinality(schema, trained), table[:trained], config)
        else:
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
    if kind == "molar" and meta.get("catalogue_extension"):
        # saved before the prior, the imputed scoring or the tempering existed: scored as it was then
        # (prior 0, "quantile", temperature 1)
        extension = meta["catalogue_extension"]
        extend_catalogue(model, kind, table, extension.get("new_item_scoring", "quantile"),
                         float(extension.get("new_item_prior", 0.0)),
                         float(extension.get("new_item_temperature", 1.0)))
    return model.eval(), kind, config, schema


def with_item_cardinality(schema: Schema, cardinality: int) -> Schema:
    """``schema`` with its ITEM_ID column's domain (and embedding cardinality) set to ``cardinality`` ids."""
    from merlin.schema import Tags

    col = schema.select_by_tag(Tags.ITEM_ID).first
    properties = dict(col.properties)
    properties["domain"] = {**properties.get("domain", {}), "min": 0, "max": int(cardinality) - 1}
    if "embedding_sizes" in properties:
        properties["embedding_sizes"] = {**properties["embedding_sizes"], "cardinality": int(cardinality)}
    return Schema([col.with_properties(properties) if c.name == col.name else c for c in schema])
