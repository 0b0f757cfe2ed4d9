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

import merlin_molar
from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, file_checksums, read_json, verify_checksums, write_json
from merlin_molar.models.id_models import ID_MODELS
from merlin_molar.models.molar import MolarConfig, molar_model


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
        from merlin_molar.cold_start import extend_catalogue

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


def extend_saved_model(
    model_dir, prepared, output_dir, item_table=None, new_item_scoring: str = "imputed", new_item_prior="auto",
    new_item_temperature: float = None,
) -> Path:
    """Write ``output_dir``: the saved Molar model of ``model_dir`` made to score ``prepared``'s current catalogue
    (items added with ``add-items`` since training), with no retraining. The weights are copied unchanged;
    the item table is the extended one, checked to start with the model's own table byte for byte; the
    saved schema has the new item cardinality, so ``export`` and ``load_model`` see the extended catalogue.
    ``new_item_prior`` (``"auto"``: :func:`merlin_molar.cold_start.estimate_new_item_prior` on the
    validation split, or a number) is saved with it, and so are ``new_item_scoring`` and
    ``new_item_temperature`` (default :data:`merlin_molar.models.task.NEW_ITEM_TEMPERATURE`), so every later
    load, ``recommend`` and the exported server score the new items alike. ID-only models (SASRec, GRU4Rec)
    are refused."""
    import shutil

    from merlin_molar.cold_start import extend_catalogue
    from merlin_molar.items import item_id_fingerprint, load_item_table
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    if new_item_temperature is None:
        new_item_temperature = NEW_ITEM_TEMPERATURE

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    model, kind, config, schema = load_model(model_dir)
    meta = read_json(model_dir / "molar_model.json")
    trained = int((meta.get("catalogue_extension") or {}).get("trained_items", 0)) or None
    if kind != "molar":
        extend_catalogue(model, kind, None)  # raises: only Molar's content tower can score new items
    table = load_item_table(Path(item_table) if item_table else Path(prepared.root) / "item_table", prepared)
    if kind == "molar" and trained is None:
        trained = int(load_file(str(model_dir / "item_table.safetensors"))["table"].size(0))
    extend_catalogue(model, kind, table, new_item_scoring, 0.0, new_item_temperature)  # checks the table
    estimate = None
    if new_item_prior == "auto":
        from merlin_molar.cold_start import estimate_new_item_prior

        estimate = estimate_new_item_prior(model, prepared, new_item_scoring=new_item_scoring, item_table=table,
                                           new_item_temperature=new_item_temperature)
        new_item_prior = estimate["prior"]
    new_item_prior = float(new_item_prior or 0.0)
    catalogue = prepared.manifest.get("catalogue", {})
    with atomic_path(output_dir, is_dir=True) as tmp:
        shutil.copy2(model_dir / "weights.pt", tmp / "weights.pt")
        if (model_dir / "adapter").exists():
            shutil.copytree(model_dir / "adapter", tmp / "adapter")
        save_file({"table": table.detach().float().contiguous().cpu()}, str(tmp / "item_table.safetensors"))
        (tmp / "schema.json").write_text(
            TensorflowMetadata.from_merlin_schema(with_item_cardinality(schema, table.size(0))).to_json()
        )
        fingerprint = item_id_fingerprint(prepared)
        write_json(tmp / "molar_model.json", {
            **meta,
            "sha256": file_checksums(tmp),  # the extended table and schema, not the source model's
            "id_mapping_fingerprint": fingerprint,
            "catalogue_extension": {
                "trained_items": trained,
                "items": int(table.size(0)),
                "new_item_scoring": new_item_scoring,
                "new_item_prior": new_item_prior,
                "new_item_temperature": float(new_item_temperature),
                **({"new_item_prior_estimate": estimate} if estimate else {}),
                "catalogue_version": catalogue.get("version", 1),
                "id_mapping_fingerprint": fingerprint,
                "source_model": str(model_dir.resolve()),
                "extended_at": datetime.now(timezone.utc).isoformat(),
            },
        })
    return output_dir
