"""Saved models made to score the catalogue as it is now (items added with ``add-items`` since training)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from safetensors.torch import load_file, save_file

from merlin_molar.cold_start.prior import estimate_new_item_prior
from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, file_checksums
from merlin_molar.models.catalogue import extend_catalogue, trained_cardinality
from merlin_molar.persistence import (
    MODEL_FILE,
    load_model,
    read_model_description,
    with_item_cardinality,
    write_model_description,
)


def model_for_catalogue(
    model, kind: str, prepared, item_table_path=None, new_item_scoring: str = "imputed", new_item_prior="auto",
    new_item_temperature: float = None,
):
    """``model`` ready to score ``prepared``'s current catalogue: unchanged when it was trained on it, extended
    with the prepared item table when items were added since (``add-items``). ``new_item_prior``: a number,
    or ``"auto"`` (default) for :func:`estimate_new_item_prior` on ``prepared``'s validation split (one
    inference pass over it; ``extend-model`` does it once and saves the result with the model)."""
    cardinality = prepared.item_cardinality
    trained = trained_cardinality(model, kind)
    if trained == cardinality:
        return model
    if trained > cardinality:
        raise MolarDataError(prepared.root, f"has {cardinality} item ids, fewer than the model's {trained}")
    if kind != "molar":
        extend_catalogue(model, kind, None)  # raises the clear ID-model error
    from merlin_molar.items import load_item_table

    path = Path(item_table_path) if item_table_path else prepared.root / "item_table"
    prior = 0.0
    if new_item_prior == "auto":
        prior = estimate_new_item_prior(model, prepared, new_item_scoring=new_item_scoring, item_table=path,
                                        new_item_temperature=new_item_temperature)["prior"]
    elif new_item_prior is not None:
        prior = float(new_item_prior)
    return extend_catalogue(model, kind, load_item_table(path, prepared), new_item_scoring, prior,
                            new_item_temperature)


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

    from merlin_molar.items import item_id_fingerprint, load_item_table
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    if new_item_temperature is None:
        new_item_temperature = NEW_ITEM_TEMPERATURE

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    model, kind, config, schema = load_model(model_dir)
    meta = read_model_description(model_dir)
    trained = int((meta.get("catalogue_extension") or {}).get("trained_items", 0)) or None
    if kind != "molar":
        extend_catalogue(model, kind, None)  # raises: only Molar's content tower can score new items
    table = load_item_table(Path(item_table) if item_table else Path(prepared.root) / "item_table", prepared)
    if kind == "molar" and trained is None:
        trained = int(load_file(str(model_dir / "item_table.safetensors"))["table"].size(0))
    extend_catalogue(model, kind, table, new_item_scoring, 0.0, new_item_temperature)  # checks the table
    estimate = None
    if new_item_prior == "auto":
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
        write_model_description(tmp / MODEL_FILE, {
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
