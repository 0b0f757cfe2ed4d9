"""Add new items to a prepared catalogue without re-fitting anything: the vocabulary and the item table grow.

    >>> from merlin_molar.data import load_prepared
    >>> from merlin_molar.items.add_items import add_items
    >>> add_items(load_prepared("/tmp/p"), "new_items.csv")         # doctest: +SKIP

What it does, on a directory written by ``prepare`` and ``embed-items``:

* **vocabulary**: the fitted NVTabular Categorify vocabulary gets the new raw ids appended, in file order,
  with the next free ids (existing ids never move). The extended vocabulary is a new immutable file
  ``catalogue/v<N>/unique.item_id.parquet``; the saved workflow (``workflow/``) is re-saved around it, so
  the same ``Workflow.transform`` (and the served workflow after ``export``) maps the new raw ids.
* **item table**: the new rows are embedded with the encoder, prompt template and settings recorded in
  the table's ``metadata.json`` and appended; existing rows, ids and vectors are copied byte for byte.
* **content**: ``items.parquet`` gains the new items' content rows.
* **version**: the manifest records catalogue version ``N`` with the new item cardinality and the id
  mapping's fingerprint (also written into the table's metadata), so a model or a server can tell which
  catalogue it was made for.

It refuses (:class:`MolarDataError`, one line) an id already present with different content, an encoder
that differs from the table's, and a file without usable content. An id already present with the same
content is skipped, so re-running the same file is a no-op. It is atomic and resumable: the new rows are
embedded in chunks into ``PREPARED/.add_items.work`` (a re-run skips finished chunks); everything is staged
there and only then moved into place, the manifest last; an interrupted move is finished by the re-run.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, file_checksums, owner_tag, read_json, write_json
from merlin_molar.items.fusion import JoinStatistics, join_parts
from merlin_molar.items.table import (
    EMBEDDINGS_FILE,
    METADATA_FILE,
    TableRows,
    encode_items,
    item_id_fingerprint,
    load_embedded_chunk,
    read_table_metadata,
    read_table_rows,
    save_embedded_chunk,
    write_table_rows,
)

LOG = logging.getLogger(__name__)
WORK_DIR = ".add_items.work"
VOCAB_FILE = "unique.item_id.parquet"
CHUNK_ITEMS = 256
# The steps of the final move, in order; the manifest (which names the catalogue version) goes last.
STAGED = ("workflow", "items.parquet", "item_table", "molar_manifest.json")


@dataclass
class AddItemsResult:
    version: int
    added: List  # raw ids added, in id order
    first_id: Optional[int]  # encoded id of the first added item
    skipped: List  # raw ids already present with the same content
    item_cardinality: int
    id_mapping_fingerprint: str
    item_table: Path


def read_new_items(path, text_columns, images_dir=None, id_dtype=None) -> pd.DataFrame:
    """The new items file (csv, or parquet), checked: ``item_id``, unique ids, some content per row."""
    from merlin_molar.data.readers import _as_id

    path = Path(path)
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype={"year": "string"}, keep_default_na=False, na_values={"image": [""]})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise MolarDataError(path, f"not a readable item table ({e})") from None
    if "item_id" not in frame:
        raise MolarDataError(path, f"missing column 'item_id'; found {list(frame.columns)}")
    if frame.empty:
        raise MolarDataError(path, "no items (empty table)")
    content = [c for c in text_columns if c in frame] + (["image"] if "image" in frame else [])
    if not content:
        raise MolarDataError(path, f"no usable content: none of the columns {list(text_columns) + ['image']}")
    frame = frame.copy()
    frame["item_id"] = _as_id(frame["item_id"], path)
    if id_dtype is not None and frame["item_id"].dtype != id_dtype:
        try:
            frame["item_id"] = frame["item_id"].astype(id_dtype)
        except (TypeError, ValueError):
            raise MolarDataError(path, f"item_id values are not of the catalogue's id type ({id_dtype})") from None
    dup = frame["item_id"][frame["item_id"].duplicated()]
    if len(dup):
        raise MolarDataError(path, f"{len(dup)} duplicate item id(s), e.g. {dup.head(3).tolist()}")
    for c in text_columns:
        if c not in frame:
            frame[c] = None
    if "image" not in frame:
        frame["image"] = None
    root = Path(images_dir) if images_dir else path.parent
    frame["image"] = [
        None if not _present(p) else str(Path(str(p)) if Path(str(p)).is_absolute() else (root / str(p)).resolve())
        for p in frame["image"]
    ]
    no_content = [i for i, row in zip(frame["item_id"], frame[list(text_columns)].itertuples(False))
                  if not any(_present(v) for v in row)]
    no_content = [i for i, img in zip(frame["item_id"], frame["image"]) if i in set(no_content) and img is None]
    if len(no_content) == len(frame):
        raise MolarDataError(path, f"no usable content: every row has empty {list(text_columns)} and no image")
    if no_content:
        raise MolarDataError(path, f"{len(no_content)} item(s) have neither text nor an image, e.g. {no_content[:5]}")
    return frame


def _present(value) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return False
    return str(value).strip() != ""


def _norm(value) -> str:
    return str(value).strip() if _present(value) else ""


def extend_vocabulary(workflow, new_raw_ids: List, vocab_path: Path):
    """Append ``new_raw_ids`` to the workflow's fitted Categorify vocabulary, written to ``vocab_path`` (a new
    file), and point the workflow (and its output schema) at it. Returns the new codes."""
    from merlin_molar.data.workflow import categorify_op

    op = categorify_op(workflow)
    (column,) = list(op.categories)
    vocab = pd.read_parquet(op.categories[column])
    start = int(vocab.index.max()) + 1
    added = pd.DataFrame(
        {column: np.asarray(new_raw_ids, dtype=vocab[column].dtype), **{c: 0 for c in vocab.columns if c != column}},
        index=pd.RangeIndex(start, start + len(new_raw_ids)),
    )
    extended = pd.concat([vocab, added])
    if not isinstance(extended.index, pd.RangeIndex):
        extended.index = pd.RangeIndex(int(vocab.index.min()), start + len(new_raw_ids))
    vocab_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(vocab_path) as tmp:
        extended.to_parquet(tmp)
    op.categories[column] = str(vocab_path)
    workflow.fit_schema(workflow.input_schema)  # domain / cardinality / cat_path from the new file
    return list(range(start, start + len(new_raw_ids)))


def _file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _check_encoder(metadata: dict, encoder, table_dir: Path):
    """The table's encoder, rebuilt from its metadata; or ``encoder`` if it is the same one."""
    from merlin_molar.items import build_encoder
    from merlin_molar.items.encoders import resolve_encoder_name
    from merlin_molar.items.prompts import ItemPromptBuilder

    recorded = metadata["encoder"]
    if encoder is None or isinstance(encoder, (str, os.PathLike)):
        if encoder is not None and resolve_encoder_name(encoder) != recorded["name_or_path"]:
            raise MolarDataError(
                "--encoder", f"{encoder} differs from the item table's encoder {recorded['name_or_path']} "
                f"({table_dir / 'metadata.json'}): new rows must come from the same encoder"
            )
        prompts = ItemPromptBuilder(**recorded["prompts"])
        kwargs = {"prompts": prompts}
        if recorded.get("kind") == "multimodal":
            kwargs["fusion"] = recorded.get("fusion", "l2")
        if recorded.get("kind") == "sentence" and recorded.get("max_seq_length"):
            kwargs["max_seq_length"] = recorded["max_seq_length"]
        if recorded.get("dtype"):
            import torch

            kwargs["dtype"] = getattr(torch, recorded["dtype"].replace("torch.", ""))
        encoder = build_encoder(recorded["name_or_path"], kind=recorded["kind"], **kwargs)
    described = {**encoder.describe(), "prompts": encoder.prompts.describe()}
    ignore = {"device"}
    keys = (set(described) | set(recorded)) - ignore
    differs = sorted(k for k in keys if described.get(k) != recorded.get(k))
    if differs:
        detail = ", ".join(f"{k}: {described.get(k)!r} vs {recorded.get(k)!r}" for k in differs[:3])
        raise MolarDataError(
            "encoder", f"differs from the item table's ({detail}); new rows must use the same encoder (to change "
            f"encoder or settings, embed the whole catalogue again: merlin-molar embed-items)"
        )
    return encoder


def _replace(staged: Path, final: Path) -> None:
    if not staged.exists():
        return
    if staged.is_dir():
        old = final.with_name(f".old-{final.name}-{owner_tag()}-")
        if final.exists():
            os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def _commit(work: Path, targets: dict) -> None:
    for name in STAGED:
        if name in targets:
            _replace(work / "staged" / name, targets[name])
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Addition:
    """What one add-items run adds: the plan (saved in the work directory, so a re-run resumes only the same
    addition) and what the later steps need."""

    root: Path
    table_dir: Path
    work: Path
    metadata: dict  # the item table's
    text_columns: List[str]
    workflow: object  # the fitted NVTabular workflow, extended in the stage step
    encoder: object  # the table's encoder (ItemEncoder), which embeds the new rows
    new: pd.DataFrame  # the new items' rows, in file order
    codes: List[int]  # their encoded ids
    version: int  # the catalogue version they make
    vocab_path: Path
    plan: dict
    join: Optional[JoinStatistics]  # the table's join statistics (a text+image table joined by whitening)


def add_items(
    prepared,
    items_path,
    item_table=None,
    images_dir=None,
    encoder=None,
    batch_size: int = 32,
    progress: bool = True,
    max_chunks: Optional[int] = None,
) -> AddItemsResult:
    """Add the items of ``items_path`` to ``prepared``'s vocabulary and item table (default
    ``PREPARED/item_table``); see the module docstring. ``encoder``: ``None`` (rebuild the table's), a path
    that must equal the table's, or an :class:`ItemEncoder` whose description must match it.
    ``max_chunks`` stops after that many newly embedded chunks (a later call resumes).

    Four steps: plan (what is new, refusals), embed (chunk by chunk, resumable), stage (every file that
    changes, written beside the originals), commit (moved into place, the manifest last)."""
    root = Path(prepared.root)
    table_dir = Path(item_table) if item_table else root / "item_table"
    work = root / WORK_DIR
    targets = {
        "workflow": root / "workflow",
        "items.parquet": root / "items.parquet",
        "item_table": table_dir,
        "molar_manifest.json": root / "molar_manifest.json",
    }
    if (work / "staged" / "ready").exists():  # an interrupted move: finish it first
        LOG.info("finishing the interrupted add-items of version %s", read_json(work / "plan.json")["version"])
        _commit(work, targets)
        from merlin_molar.data import load_prepared

        prepared = load_prepared(root)

    addition, skipped = _plan(prepared, items_path, table_dir, work, images_dir, batch_size, encoder)

    def unchanged():  # the catalogue as it is (its fingerprint was checked against the table's by _plan)
        return AddItemsResult(int(prepared.manifest.get("catalogue", {}).get("version", 1)), [], None, skipped,
                              prepared.item_cardinality, item_id_fingerprint(prepared), table_dir)

    if addition is None:
        return unchanged()
    rows, problems = _embed(addition, addition.encoder, items_path, batch_size, progress, max_chunks)
    if rows is None:  # stopped after max_chunks
        return unchanged()
    fingerprint, cardinality = _stage(prepared, addition, items_path, rows, problems)
    _commit(work, targets)
    codes = addition.codes
    LOG.info("added %d item(s) as ids %d..%d (catalogue version %d)", len(codes), codes[0], codes[-1],
             addition.version)
    return AddItemsResult(addition.version, addition.new["item_id"].tolist(), codes[0], skipped, cardinality,
                          fingerprint, table_dir)


def _plan(prepared, items_path, table_dir: Path, work: Path, images_dir, batch_size: int, encoder):
    """``(addition or None when nothing is new, raw ids skipped as already present with the same content)``;
    refuses, before anything is written, a table not made for this catalogue, an id present with other content,
    an encoder other than the table's (:func:`_check_encoder`), or another unfinished run."""
    from merlin_molar.data.workflow import item_id_mapping

    root = Path(prepared.root)
    if not (table_dir / EMBEDDINGS_FILE).is_file():
        raise MolarDataError(table_dir, "no item table: run `merlin-molar embed-items` first, or pass --item-table")
    metadata = read_table_metadata(table_dir)
    manifest = prepared.manifest
    if metadata.get("item_cardinality") != prepared.item_cardinality or metadata.get(
        "id_mapping_fingerprint"
    ) != item_id_fingerprint(prepared):
        raise MolarDataError(table_dir, f"was not made for the current catalogue of {root}: re-run embed-items")
    text_columns = metadata["encoder"]["prompts"].get("text_columns") or manifest.get("text_columns") or []
    workflow = prepared.load_workflow()
    mapping = item_id_mapping(workflow)
    frame = read_new_items(items_path, text_columns, images_dir, mapping.index.dtype)
    catalogue_columns = list(prepared.items().columns)
    ignored = [c for c in frame.columns if c not in ("item_id", "image", *text_columns, *catalogue_columns)]
    if ignored:
        LOG.warning("%s: column(s) %s ignored: the catalogue's items are embedded from %s only (to use them, "
                    "prepare with --text-columns naming them and embed the whole catalogue again)", items_path,
                    ignored, text_columns)

    # ids already present: same content -> skipped, different content -> refused
    present = frame[frame["item_id"].isin(mapping.index)]
    skipped = []
    if len(present):
        existing = prepared.items().set_index("item_id_raw")
        for _, row in present.iterrows():
            old = existing.loc[row["item_id"]] if row["item_id"] in existing.index else None
            if old is None or not bool(old.get("has_content", False)):
                msg = f"item_id {row['item_id']} is already in the catalogue without content"
                raise MolarDataError(items_path, msg)
            diff = [c for c in text_columns if _norm(row[c]) != _norm(old.get(c))]
            if diff:
                c = diff[0]
                raise MolarDataError(
                    items_path,
                    f"item_id {row['item_id']} is already in the catalogue with different content "
                    f"({c}: {_norm(row[c])!r} vs {_norm(old.get(c))!r})",
                )
            skipped.append(row["item_id"])
    new = frame[~frame["item_id"].isin(mapping.index)].reset_index(drop=True)
    if new.empty:
        LOG.info("nothing to add: all %d item(s) are already in the catalogue", len(frame))
        return None, skipped

    encoder = _check_encoder(metadata, encoder, table_dir)
    join = metadata.get("join")
    if join is None and getattr(encoder, "raw_rows", False):
        raise MolarDataError(table_dir / METADATA_FILE, "names a whitened text+image join but no join statistics")
    join = JoinStatistics.load(table_dir / join["file"], join["sha256"]) if join else None
    version = int(manifest.get("catalogue", {}).get("version", 1)) + 1
    first_id = prepared.item_cardinality
    codes = list(range(first_id, first_id + len(new)))
    vocab_path = root / "catalogue" / f"v{version}" / VOCAB_FILE
    plan = {
        "version": version,
        "base_fingerprint": metadata["id_mapping_fingerprint"],
        "items_file_sha": _file_sha(items_path),
        "new_raw_ids": [str(i) for i in new["item_id"]],
        "first_id": first_id,
        "vocab_path": str(vocab_path),
        "batch_size": batch_size,
        "encoder": metadata["encoder"],
    }
    if (work / "plan.json").exists() and read_json(work / "plan.json") != plan:
        raise MolarDataError(work, "holds an unfinished add-items run of another file or catalogue: delete it first")
    write_json(work / "plan.json", plan)
    return _Addition(root, table_dir, work, metadata, text_columns, workflow, encoder, new, codes, version,
                     vocab_path, plan, join), skipped


def _embed(addition: _Addition, encoder, items_path, batch_size: int, progress: bool, max_chunks: Optional[int]):
    """``(the new rows, image problems by id)``, embedded chunk by chunk into the work directory (a re-run skips
    the finished chunks); ``(None, None)`` when ``max_chunks`` new chunks were embedded before the end."""
    from merlin_molar.progress import progress_bar

    work, codes = addition.work, addition.codes
    prompts = encoder.prompts.with_columns(addition.text_columns)
    contents = prompts.items_from_frame(addition.new.assign(item_id=codes), items_path)
    chunks = [list(range(s, min(s + CHUNK_ITEMS, len(contents)))) for s in range(0, len(contents), CHUNK_ITEMS)]
    finished = [c for c in range(len(chunks)) if (work / f"chunk-{c:05d}.npz").exists()]
    encoded_now = 0
    with progress_bar(total=len(contents), initial=sum(len(chunks[c]) for c in finished),
              desc=f"add items [{encoder.kind}]", unit="item", disable=not progress) as bar:
        for c, index in enumerate(chunks):
            path = work / f"chunk-{c:05d}.npz"
            if path.exists():
                continue
            if max_chunks is not None and encoded_now >= max_chunks:
                return None, None
            batch = encode_items(encoder, [contents[i] for i in index], batch_size=batch_size, progress=False)
            save_embedded_chunk(path, [codes[i] for i in index], batch.embeddings, batch.used_image,
                                batch.image_problems)
            encoded_now += 1
            bar.update(len(index))
    if finished:
        LOG.info("resumed: %d of %d chunks were already embedded", len(finished), len(chunks))
    parts = [load_embedded_chunk(work / f"chunk-{c:05d}.npz") for c in range(len(chunks))]
    if not np.array_equal(np.concatenate([p[0] for p in parts]), np.asarray(codes)):
        raise MolarDataError(work, "embedded chunks do not match the plan: delete the work dir and re-run")
    rows = TableRows(np.concatenate([p[1] for p in parts]).astype(np.float32),
                     np.ones(len(codes), bool), np.concatenate([p[2] for p in parts]))
    return rows, {k: v for p in parts for k, v in p[3].items()}


def _stage(prepared, addition: _Addition, items_path, rows: TableRows, problems: dict):
    """Write every file the addition changes into ``work/staged`` (vocabulary and workflow, items.parquet, the
    item table, the manifest), then mark it ready; returns ``(new id-mapping fingerprint, new cardinality)``."""
    from merlin_molar.data.workflow import item_id_mapping

    new, codes, metadata, manifest = addition.new, addition.codes, addition.metadata, prepared.manifest
    staged = addition.work / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    workflow = addition.workflow
    if extend_vocabulary(workflow, new["item_id"].tolist(), addition.vocab_path) != codes:
        raise MolarDataError(prepared.workflow_path, "the vocabulary's next free id is not the item cardinality")
    workflow.save(str(staged / "workflow"))
    extended_mapping = item_id_mapping(workflow)
    if not all(extended_mapping[r] == c for r, c in zip(new["item_id"], codes)):
        raise MolarDataError(prepared.workflow_path, "the extended vocabulary does not map the new ids as planned")
    lines = "".join(f"{enc}\t{raw}\n" for raw, enc in extended_mapping.sort_values().items())
    fingerprint = hashlib.sha256(lines.encode()).hexdigest()

    items = prepared.items()
    added_rows = new.drop(columns=["item_id"]).assign(item_id_raw=new["item_id"].to_numpy(), item_id=codes,
                                                      has_content=True)
    # the catalogue's columns and dtypes (a column the file lacks is missing, <NA>, for the new rows)
    added_rows = added_rows.reindex(columns=items.columns).astype(items.dtypes.to_dict())
    pd.concat([items, added_rows], ignore_index=True).to_parquet(staged / "items.parquet", index=False)

    join = addition.join
    if join is not None:  # the encoder gave raw [text | image] rows: join them with the catalogue's statistics
        rows = TableRows(join_parts(rows.embeddings, rows.used_image, join.text_dim, join), rows.has_embedding,
                         rows.used_image)
    table = read_table_rows(addition.table_dir).appended(rows)
    cardinality = len(table.embeddings)
    (staged / "item_table").mkdir()
    write_table_rows(staged / "item_table", table)
    if join is not None:
        join_file = metadata["join"]["file"]
        shutil.copyfile(addition.table_dir / join_file, staged / "item_table" / join_file)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry = {"version": addition.version, "created": now, "items_file": str(Path(items_path).resolve()),
             "items_file_sha": addition.plan["items_file_sha"], "added": len(codes), "first_id": codes[0],
             "item_cardinality": cardinality, "id_mapping_fingerprint": fingerprint}
    history = metadata.get("catalogue_versions") or [
        {"version": 1, "item_cardinality": metadata["item_cardinality"],
         "id_mapping_fingerprint": metadata["id_mapping_fingerprint"]}
    ]
    write_json(staged / "item_table" / METADATA_FILE, {
        # no longer one embedding run's product
        **{k: v for k, v in metadata.items() if k not in ("plan_sha256", "table_sha256")},
        "item_cardinality": cardinality,
        "items_embedded": int(table.has_embedding.sum()),
        "items_with_image": int(table.used_image.sum()),
        "id_mapping_fingerprint": fingerprint,
        "catalogue_version": addition.version,
        "catalogue_versions": history + [entry],
        "missing_image_count": int(metadata.get("missing_image_count", 0)) + len(problems),
        "missing_image_ids": list(metadata.get("missing_image_ids", [])) + sorted(problems),
    })
    (staged / "item_table").chmod(0o755)
    catalogue = manifest.get("catalogue") or {"version": 1, "history": [history[0]]}
    checksums = manifest.get("sha256")
    if checksums is not None:  # the prepared directory's checksums follow the files add-items replaces
        checksums = {k: v for k, v in checksums.items() if not (k == "items.parquet" or k.startswith("workflow/"))}
        checksums.update(file_checksums(staged, ["workflow", "items.parquet"]))
    write_json(staged / "molar_manifest.json", {
        **manifest,
        **({"sha256": checksums} if checksums is not None else {}),
        "item_cardinality": cardinality,
        "catalogue": {"version": addition.version, "item_cardinality": cardinality,
                      "id_mapping_fingerprint": fingerprint, "history": catalogue["history"] + [entry]},
    })
    (staged / "ready").write_text(now)
    return fingerprint, cardinality
