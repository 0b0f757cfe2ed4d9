"""The end-to-end steps, raw data to recommendations, as plain functions (the CLI and quickstart call these).

    prepare_dataset -> embed_item_table -> train (sasrec | gru4rec | molar) -> evaluate / recommend -> export
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, Optional, Sequence

import pandas as pd
import torch
from transformers import EarlyStoppingCallback

from merlin_molar.data import PreparedData, prepare, read_dataset
from merlin_molar.errors import MolarDataError
from merlin_molar.io import claim_output_dir, locked_output_dir, rollback_on_failure, write_json
from merlin_molar.models.id_models import ID_MODELS
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.persistence import load_model, read_model_description, save_model
from merlin_molar.training import TrainConfig, evaluate, make_trainer
from merlin_molar.validation import check_checkpoint, check_model_matches, check_train_config, loading

LOG = logging.getLogger(__name__)
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
DATA_ENV = "MOLAR_DATA"


def resolve_dataset(path: Optional[str] = None, download: bool = True) -> Path:
    """Where the quickstart's data comes from: ``path``; else ``$MOLAR_DATA``; else ``../shared/data/ml-100k``
    beside the checkout; else a cached or freshly downloaded MovieLens-100K (GroupLens) when the network
    allows; otherwise an error that says exactly what to pass."""
    if path:
        return Path(path).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
    if beside.exists():
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merlin-molar" / "ml-100k"
    if (cache / "u.data").exists():
        return cache
    if download:
        try:
            return download_movielens_100k(cache)
        except OSError as e:
            LOG.warning("could not download %s: %s", ML100K_URL, e)
    raise MolarDataError(
        "quickstart data",
        "no dataset found: pass --data DIR (a MovieLens directory: interactions.csv + items.csv, ratings.dat + "
        f"movies.dat, or u.data + u.item) or set {DATA_ENV}=DIR; downloading {ML100K_URL} failed or was disabled",
    )


def download_movielens_100k(cache: Path) -> Path:
    cache.parent.mkdir(parents=True, exist_ok=True)
    archive = cache.parent / "ml-100k.zip.part"
    LOG.info("downloading %s", ML100K_URL)
    with urllib.request.urlopen(ML100K_URL, timeout=30) as response, open(archive, "wb") as f:
        shutil.copyfileobj(response, f)
    with zipfile.ZipFile(archive) as z:
        z.extractall(cache.parent)
    archive.unlink()
    return cache


def prepare_dataset(
    data, output_dir, max_length: int = 200, k_core: int = 0, fmt: str = "auto", text_columns=None,
    cold_items: float = 0.0,
) -> PreparedData:
    raw = read_dataset(data, fmt, text_columns)
    with locked_output_dir(output_dir, "prepare"), rollback_on_failure(output_dir):
        # a failed prepare leaves nothing that refuses the corrected rerun
        return prepare(raw, output_dir, max_length=max_length, k=k_core, cold_items=cold_items)


def embed_item_table(prepared: PreparedData, output_path=None, encoder: Optional[str] = None, details=None,
                     **kwargs) -> Path:
    """Embed ``prepared``'s catalogue into the item table at ``output_path`` (default PREPARED/item_table);
    ``details`` (a dict), when given, receives what the run did (``result``: the ``CatalogueResult``)."""
    from merlin_molar.items import build_encoder, embed_catalogue

    output_path = Path(output_path or prepared.root / "item_table")
    encoder_options = ("kind", "device", "image_size", "template", "fusion")
    encoder_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in encoder_options}
    with loading("--encoder", encoder or "the default encoder"):
        built = build_encoder(encoder, **encoder_kwargs)
    result = embed_catalogue(prepared, built, output_path, **kwargs)
    if details is not None:
        details["result"] = result
    return output_path


def _dataclass_from(cls, values: Optional[dict]):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def model_config(kind: str, prepared: PreparedData, model_options: Optional[dict]):
    """The config dataclass of ``kind`` from ``model_options``, its ``max_length`` the prepared data's by default."""
    options = dict(model_options or {})
    options.setdefault("max_length", prepared.max_length)
    if kind in ID_MODELS:
        return _dataclass_from(ID_MODELS[kind].config, options)
    if kind == "molar":
        return _dataclass_from(MolarConfig, options)
    raise ValueError(f"unknown model kind {kind!r}: choose one of {sorted([*ID_MODELS, 'molar'])}")


def build_model(kind: str, prepared: PreparedData, model_options: Optional[dict], item_table_path=None):
    """``(model, config, item_table)`` for ``kind`` in ``sasrec`` | ``gru4rec`` | ``molar``."""
    if kind != "molar":
        config = model_config(kind, prepared, model_options)  # an unknown kind raises here
        return ID_MODELS[kind].model(prepared.schema, config), config, None
    from merlin_molar.items import load_item_table

    if item_table_path is None:
        raise MolarDataError("train", "a Molar model needs --item-table (run `merlin-molar embed-items` first)")
    table = load_item_table(item_table_path, prepared)
    config = model_config(kind, prepared, model_options)
    return molar_model(prepared.schema, table, config), config, table


def run_identity(prepared: PreparedData, kind: str, model_options: Optional[dict], train_config: TrainConfig,
                 item_table_path=None) -> dict:
    """What :func:`train` records of a run in its output directory's manifest (the data's fingerprint, the
    model and training settings' hash), computed without building the model: a finished run with this
    identity is the run these arguments would make."""
    config = model_config(kind, prepared, model_options)
    return _run_identity(prepared, kind, config, train_config, item_table_path)


def _run_identity(prepared: PreparedData, kind: str, config, train_config: TrainConfig, item_table_path) -> dict:
    payload = json.dumps(
        {"model": config.to_dict(), "train": asdict(train_config), "item_table": str(item_table_path)},
        sort_keys=True,
        default=str,
    )
    return {
        "stage": "train",
        "kind": kind,
        "dataset_fingerprint": prepared.manifest["fingerprint"],
        "max_length": prepared.max_length,
        "config_sha": hashlib.sha256(payload.encode()).hexdigest()[:16],
    }


def model_provenance(prepared) -> dict:
    """What a saved model records of the prepared data it was trained on (``save_model``'s ``extra``), so that
    evaluate / recommend / export can check a model and a prepared directory belong together."""
    from merlin_molar.items.table import item_id_fingerprint

    return {
        "id_mapping_fingerprint": item_id_fingerprint(prepared),
        "prepared": str(Path(prepared.root).resolve()),
        "prepared_max_length": prepared.max_length,
    }


def train(
    prepared: PreparedData,
    kind: str,
    output_dir,
    model_options: Optional[dict] = None,
    train_config: Optional[TrainConfig] = None,
    item_table_path=None,
    resume: Optional[bool] = None,
    init_id_branch_from=None,
) -> Dict:
    """Train with the T4Rec Trainer, evaluate on valid and test, save the model under ``output_dir/model``.

    Checkpoints go to ``output_dir/checkpoints``. ``resume``: None (default) continues from the last one when
    ``output_dir`` holds checkpoints of this same run (same data and options; an interrupted run is simply run
    again), True the same but warns when there is none, False starts over and removes them. An output
    directory that belongs to another dataset or configuration is refused, and so is one another run holds.

    ``init_id_branch_from`` (a saved SASRec or GRU4Rec model directory) is the recommended Molar recipe, the
    paper's post-alignment setting: the trained ID model becomes Molar's ID branch, with its own architecture
    (``id_model`` and its config) and, unless ``model_options`` say otherwise, frozen (``id_branch="frozen"``).
    The alignment loss itself is off there (``alpha`` 0) unless ``model_options`` give it (see ``MolarConfig``)."""
    output_dir = Path(output_dir)
    train_config = train_config or TrainConfig()
    check_train_config(train_config)
    torch.manual_seed(train_config.seed)
    if kind == "molar" and init_id_branch_from:
        model_options = {**id_branch_options(init_id_branch_from), **(model_options or {})}
    with loading("--model-options", json.dumps(model_options or {}), "cannot build the model from them"):
        model, config, table = build_model(kind, prepared, model_options, item_table_path)
    # one run at a time; a run that fails before its first checkpoint leaves nothing behind (its manifest included)
    with locked_output_dir(output_dir, "train"), rollback_on_failure(output_dir, keep_if_present=("checkpoints",)):
        claim_output_dir(output_dir, _run_identity(prepared, kind, config, train_config, item_table_path))
        return _train_claimed(
            prepared, kind, output_dir, model, config, table, train_config, resume, init_id_branch_from
        )


def id_branch_options(model_dir) -> dict:
    """Molar options that take over a saved ID model (SASRec, GRU4Rec) as the (frozen) ID branch."""
    with loading("--init-id-branch", model_dir, "is not a saved ID model directory"):
        meta = read_model_description(model_dir)
    kind = meta.get("kind")
    if kind not in ID_MODELS:
        raise MolarDataError(
            "--init-id-branch", f"{model_dir} holds a {kind!r} model, not an ID model ({' or '.join(ID_MODELS)})"
        )
    return {"id_branch": "frozen", "id_model": kind, kind: ID_MODELS[kind].config.from_dict(meta["config"]).to_dict()}


def _train_claimed(prepared, kind, output_dir, model, config, table, train_config, resume, init_id_branch_from):
    from transformers.trainer_utils import get_last_checkpoint

    if init_id_branch_from:
        from merlin_molar.models.molar import load_id_branch

        with loading("--init-id-branch", init_id_branch_from, "cannot initialise the ID branch from it"):
            load_id_branch(model, load_model(init_id_branch_from)[0])
    checkpoints = output_dir / "checkpoints"
    if resume is False and checkpoints.exists():
        shutil.rmtree(checkpoints)  # --restart: no checkpoint of the earlier run is left to resume from by mistake
    trainer = make_trainer(model, prepared, checkpoints, train_config)
    last = get_last_checkpoint(str(checkpoints)) if resume is not False and checkpoints.exists() else None
    if resume and last is None:
        LOG.warning("--resume: no checkpoint in %s: starting from scratch", checkpoints)
    if last is not None:
        check_checkpoint(last)
        if resume is None:
            LOG.warning("%s holds checkpoints of this same run: continuing from %s (--restart starts over)",
                        output_dir, Path(last).name)
    task = trainer.model.heads[0].prediction_task_dict["next-item"]
    if kind == "molar" and config.id_branch == "frozen":
        # Only the content tower learns: early-stop it on its own validation NDCG@10 (a fused score at a fixed
        # weight can stall while the content tower is still weak), then fuse with the weight chosen below.
        task.id_weight = 0.0
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    if kind == "molar":
        task.id_weight = config.id_weight
    seconds = time.perf_counter() - start
    trainer.remove_callback(EarlyStoppingCallback)  # it reads only the Trainer's own per-epoch evaluations
    result = {
        "kind": kind,
        "train_seconds": seconds,
        "resumed_from": last,
        "best_epoch": _best_epoch(trainer),
    }
    if kind == "molar" and config.id_branch != "none" and config.id_weight_grid:
        result["fusion"] = select_id_weight(trainer, prepared, config.id_weight_grid)
        config.id_weight = result["fusion"]["id_weight"]
    result.update({
        "valid": evaluate(trainer, prepared, "valid"),
        "test": evaluate(trainer, prepared, "test"),
        "log_history": trainer.state.log_history,
    })
    model_dir = save_model(trainer.model, output_dir / "model", kind, config, prepared.schema, table,
                           model_provenance(prepared))
    result["model_dir"] = str(model_dir)
    write_json(output_dir / "metrics.json", {k: v for k, v in result.items() if k != "log_history"})
    return result


def _best_epoch(trainer) -> Optional[float]:
    """The epoch whose weights the Trainer restored (early stopping), or None without early stopping."""
    best = trainer.state.best_model_checkpoint
    if best is None:
        return None
    step = int(Path(best).name.split("-")[-1])
    return next((h["epoch"] for h in trainer.state.log_history if h.get("step") == step and "epoch" in h), None)


def select_id_weight(trainer, prepared: PreparedData, grid: Sequence[float]) -> Dict:
    """Choose Molar's fusion weight on the validation split (never on test): the grid value with the best
    validation NDCG@10 (ties go to the smaller weight); the task keeps it, and the saved config records it."""
    task = trainer.model.heads[0].prediction_task_dict["next-item"]
    scores = {}
    for weight in grid:
        task.id_weight = float(weight)
        scores[float(weight)] = evaluate(trainer, prepared, "valid")["ndcg@10"]
    best = max(scores, key=lambda w: (scores[w], -w))
    task.id_weight = best
    return {"id_weight": best, "valid_ndcg@10_by_weight": scores}


def evaluate_saved(model_dir, prepared: PreparedData, split: str = "test", batch_size: int = 256) -> Dict[str, float]:
    check_model_matches(model_dir, prepared)
    model, _, _, _ = load_model(model_dir)
    with tempfile.TemporaryDirectory(prefix="molar-eval-") as scratch:  # nothing is written into model_dir
        trainer = make_trainer(model, prepared, scratch, TrainConfig(eval_batch_size=batch_size))
        return evaluate(trainer, prepared, split)


def recommend(
    model_dir, prepared: PreparedData, histories: Sequence[Sequence], top_k: int = 10, item_table=None
) -> pd.DataFrame:
    """Top-k raw item ids (with titles where known) for raw-id histories, history items excluded.

    The same answer as the exported model (:meth:`merlin_molar.serving.lean.LeanModel.top_k`) for the same
    request: the model reads the last ``max_length`` items of a history, and every item of the history, also
    the older ones, is left out of the answer.

    Items added to the catalogue after training (``add-items``) are scored too (Molar: by content, read
    from ``item_table``, default ``PREPARED/item_table``); an ID-only model (SASRec, GRU4Rec) recommends from
    the items it was trained on, and refuses a history holding an item added after its training."""
    from merlin.schema import Tags

    from merlin_molar.cold_start import model_for_catalogue

    check_model_matches(model_dir, prepared)
    model, kind, config, schema = load_model(model_dir)
    if kind in ID_MODELS:  # no embedding for added items: it ranks (and reads) only the ones it was trained on
        scored = int(schema.select_by_tag(Tags.ITEM_ID).first.int_domain.max) + 1
    else:
        model = model_for_catalogue(model, kind, prepared, item_table)
        scored = prepared.item_cardinality
    items = prepared.items()
    to_code = dict(zip(items["item_id_raw"].astype(str), items["item_id"]))
    to_raw = dict(zip(items["item_id"], items["item_id_raw"]))
    title_col = next((c for c in ("clean_title", "title", "name") if c in items), None)
    titles = dict(zip(items["item_id"], items[title_col])) if title_col else {}
    rankable = sum(1 for code in to_code.values() if code < scored)
    max_length = int(getattr(config, "max_length", None) or prepared.max_length)
    rows = []
    for user, history in enumerate(histories):
        if len(history) == 0:
            raise MolarDataError("--history", f"history {user} is empty: give at least one item id")
        unknown = [h for h in history if str(h) not in to_code]
        if unknown:
            raise MolarDataError(
                "--history", f"history {user}: unknown item id(s) {unknown[:5]} (not in the prepared catalogue)"
            )
        codes = [to_code[str(h)] for h in history]
        added = [h for h, code in zip(history, codes) if code >= scored]
        if added:
            raise MolarDataError(
                "--history", f"history {user}: item id(s) {added[:5]} were added after the {ID_MODELS[kind].title} "
                "model was trained and it has no embedding for them (retrain it, or use a Molar model with "
                "extend-model)",
            )
        seen = sorted(set(codes))
        candidates = rankable - len(seen)
        if top_k > candidates:
            raise MolarDataError("--top-k", f"{top_k} is more than the {candidates} items not in history {user}")
        window = codes[-max_length:]  # the model reads the last max_length items ...
        batch = torch.zeros(1, max_length, dtype=torch.long)
        batch[0, : len(window)] = torch.tensor(window)
        with torch.no_grad():
            scores = model({"item_id-list": batch})
        scores[0, seen] = float("-inf")  # ... and no item of the history, older ones included, comes back
        top_scores, top_ids = torch.topk(scores[0], k=top_k)
        for rank, (code, score) in enumerate(zip(top_ids.tolist(), top_scores.tolist()), 1):
            rows.append(
                {"history": user, "rank": rank, "item_id": to_raw[code], "title": titles.get(code, ""), "score": score}
            )
    return pd.DataFrame(rows)


def metrics_table(results: Dict[str, Dict], split: str = "test", ks=(10, 20, 50)) -> str:
    """A fixed-width table of Recall/NDCG@K and train time per model."""
    width = max([28, *(len(name) + 2 for name in results)])
    header = f"{'model':<{width}}" + "".join(f"{f'R@{k}':>9}{f'N@{k}':>9}" for k in ks) + f"{'train s':>10}"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        m = result[split]
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{m[f'recall@{k}']:>9.4f}{m[f'ndcg@{k}']:>9.4f}" for k in ks)
            + f"{result.get('train_seconds', float('nan')):>10.1f}"
        )
    return "\n".join(lines)
