"""Saving and loading trained models without cloudpickle.

A saved model is a directory::

    molar_model.json       kind ("sasrec" | "gru4rec" | "molar"), its config, the package version and model
                           format that wrote it (a newer one is refused), the sha256 of every other file and of
                           its own content (``description_sha256``; all verified by load_model) and, when saved
                           by ``train``, the fingerprint of the prepared data's item id mapping (checked by
                           evaluate / recommend / export)
    schema.json            the Merlin schema the model was built from
    item_table.safetensors the frozen content item table (Molar only)
    weights.pt             the whole state dict, a pretrained DUEG's weights (frozen under LoRA) included
    adapter/               peft LoRA adapters (when LoRA is on), loadable on their own with peft

Reloading rebuilds the model from its config and loads the weights, so predictions are identical. A Molar
model whose DUEG started from a pretrained LLM is saved with that LLM's architecture in place of its name
(:func:`~merlin_molar.models.molar.saved_config`), so reloading reads no pretrained file. (Models saved before
that recorded the name, and for LoRA only the adapters: their base LLM is read from the name again.)
Directories are written atomically.
"""
from __future__ import annotations

import hashlib
import json
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
from merlin_molar.models.molar import MolarConfig, molar_model, saved_config
from merlin_molar.version import __version__

MODEL_FILE = "molar_model.json"
MODEL_FORMAT = 1  # the layout of a saved model; raise it when a change makes older versions misread new models
DESCRIPTION_SHA = "description_sha256"
REMEDY = "re-train the model or restore its directory from a backup"


def _description_digest(meta: dict) -> str:
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != DESCRIPTION_SHA}, default=str))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_model_description(path: Path, meta: dict) -> None:
    """Write ``molar_model.json`` with the format version and the checksum of its own content."""
    meta = {**meta, "format": MODEL_FORMAT, "merlin_molar": __version__}
    write_json(Path(path), {**meta, DESCRIPTION_SHA: _description_digest(meta)})


def _release(version: str, path: Path):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)).release[:2]
    except InvalidVersion:
        raise MolarDataError(path, f"merlin_molar: {version!r} is not a version number") from None


def read_model_description(model_dir) -> dict:
    """``molar_model.json`` of a saved model, checked: a JSON object, unchanged since it was saved (when it
    records its checksum), and written by a format and a (major.minor) package version this one can read."""
    path = Path(model_dir) / MODEL_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise MolarDataError(path, "not a merlin-molar model description")
    if DESCRIPTION_SHA in meta and meta[DESCRIPTION_SHA] != _description_digest(meta):
        raise MolarDataError(path, f"checksum mismatch: the file was changed since the model was saved; {REMEDY}")
    fmt = meta.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise MolarDataError(path, f"format: {fmt!r} is not a model format number")
    if fmt > MODEL_FORMAT:
        raise MolarDataError(path, f"saved in model format {fmt}, newer than the format {MODEL_FORMAT} this "
                                   f"merlin-molar {__version__} reads: upgrade merlin-molar to load it")
    written = meta.get("merlin_molar")
    if written is not None and _release(written, path) > _release(__version__, path):
        raise MolarDataError(path, f"saved by merlin-molar {written}, newer than this one "
                                   f"({__version__}): upgrade merlin-molar to load it")
    return meta


def _config_of(kind: str, values, path: Path):
    """The model config recorded in ``molar_model.json``; an unknown or mistyped key names the file."""
    from dataclasses import fields

    cls = ID_MODELS[kind].config if kind in ID_MODELS else MolarConfig
    if not isinstance(values, dict):
        raise MolarDataError(path, "config: not a JSON object of model options")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise MolarDataError(path, f"config: unknown key(s) {unknown} for a {kind} model (the file was edited, "
                                   "or written by another version of merlin-molar)")
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as e:
        raise MolarDataError(path, f"config: not a valid {kind} configuration ({e})") from None


def _reads_pretrained_llm(config: MolarConfig) -> bool:
    """A config saved before models were self-contained: its DUEG is rebuilt from the pretrained name."""
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
                # the DUEG's word embeddings are a frozen one-row stand-in: none to save (and peft would look for
                # the base model's config to tell)
                model.heads[0].body.content[1].llm.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
            config = saved_config(config, model)
        torch.save(state, tmp / "weights.pt")
        write_model_description(
            tmp / MODEL_FILE,
            {
                **(extra or {}),
                "kind": kind,
                "config": config.to_dict(),
                "saved_at": datetime.now(timezone.utc).isoformat(),
                "sha256": file_checksums(tmp),
            },
        )
    return path


def load_model(path) -> tuple:
    """Returns ``(model, kind, config, schema)``."""
    path = Path(path)
    meta = read_model_description(path)
    if "sha256" in meta:  # models saved before checksums were recorded are loaded unchecked
        verify_checksums(path, meta["sha256"], REMEDY)
    schema_file = path / "schema.json"
    if not schema_file.is_file():
        raise MolarDataError(schema_file, "file not found (not a saved merlin-molar model?)")
    try:
        schema = TensorflowMetadata.from_json(schema_file.read_text()).to_merlin_schema()
    except Exception as e:
        raise MolarDataError(schema_file, f"not a readable model schema ({type(e).__name__})") from None
    kind = meta.get("kind")
    if kind in ID_MODELS:
        config = _config_of(kind, meta.get("config"), path / MODEL_FILE)
        model = ID_MODELS[kind].model(schema, config)
    elif kind == "molar":
        config = _config_of(kind, meta.get("config"), path / MODEL_FILE)
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
    strict = not (kind == "molar" and config.lora and _reads_pretrained_llm(config))
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
