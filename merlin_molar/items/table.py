"""The precomputed multimodal item feature table: embed the catalogue, merge shards, load and check.

Layout of a table directory (``output_path``)::

    embeddings.parquet  one row per Categorify id 0..item_cardinality-1 (row order = id): ``item_id`` (int64),
                        ``embedding`` (fixed-size list<float32>[dim]), ``has_embedding`` (False for the
                        reserved ids 0..2 and items without content: zero vectors), ``used_image``
    schema.pbtxt        Merlin schema: ``item_id`` tagged ITEM_ID, ``embedding`` tagged EMBEDDING
    metadata.json       encoder/backbone, prompt template, dim, date, counts, items whose image was missing
                        or unreadable, and the fingerprint of the prepared data's id mapping

The job is resumable and shardable. It plans the catalogue once (items sorted by token length, cut into
batches and fixed chunks of batches; chunk ``c`` belongs to shard ``c % num_shards``) in a work directory
``<output_path>.work``; each finished chunk is written there atomically, a re-run skips finished chunks,
each shard writes its own ``shard-K-of-N.npz``, and :func:`merge_shards` assembles the table. Because
the batches are the same however the work is split or interrupted, the table is byte-for-byte the same.

    >>> from merlin_molar.data import load_prepared
    >>> from merlin_molar.items import build_encoder, embed_catalogue, load_item_table
    >>> prepared = load_prepared("/tmp/p1m")                                        # doctest: +SKIP
    >>> embed_catalogue(prepared, build_encoder(), "/tmp/p1m/item_table")            # doctest: +SKIP
    >>> load_item_table("/tmp/p1m/item_table", prepared).shape                       # doctest: +SKIP
    torch.Size([3709, 384])
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, read_json, write_json
from merlin_molar.items.encoders import EncodedBatch, ItemEncoder
from merlin_molar.items.fusion import JOIN_FILE, fit_join, join_parts
from merlin_molar.items.prompts import ItemContent, ItemPromptBuilder
from merlin_molar.progress import progress_bar

LOG = logging.getLogger(__name__)
EMBEDDINGS_FILE = "embeddings.parquet"
SCHEMA_FILE = "schema.pbtxt"
METADATA_FILE = "metadata.json"
PLAN_FILE = "plan.json"
EMBEDDING_COLUMN = "embedding"
FORMAT_VERSION = 1
REPORT_FIRST = 20  # how many example ids the logs and the metadata name


def item_id_fingerprint(prepared) -> str:
    """sha256 of the (encoded id, raw id) pairs of the prepared data's fitted Categorify mapping."""

    from merlin_molar.data.workflow import item_id_mapping

    mapping = item_id_mapping(prepared.load_workflow()).sort_values()
    lines = "".join(f"{enc}\t{raw}\n" for raw, enc in mapping.items())
    return hashlib.sha256(lines.encode()).hexdigest()


def catalogue_items(prepared, encoder: ItemEncoder) -> Tuple[List[ItemContent], List[int], "ItemPromptBuilder"]:
    """The prepared items with content (as encoder inputs), the ids of those without any, and the
    encoder's prompt builder with the dataset's text columns filled in."""
    frame = prepared.items()
    source = prepared.items_path
    ids = frame["item_id"].to_numpy()
    if len(np.unique(ids)) != len(ids) or ids.min() < 3 or ids.max() >= prepared.item_cardinality:
        raise MolarDataError(source, f"item_id is not a set of distinct ids in [3, {prepared.item_cardinality})")
    prompts = encoder.prompts.with_columns(prepared.manifest.get("text_columns") or [])
    from merlin_molar.data.workflow import report_items_without_content
    from merlin_molar.items.prompts import _present

    # an item with a row but neither text nor an image is treated (and reported) like one without a row:
    # the same warning with raw ids, whether one item or half the catalogue lacks content
    # an image counts only for an encoder that reads images, and only if it can be read
    # an image-only encoder: an item is its image (no image: no content; an unreadable one stops the run in
    # the encoder's lengths(), before anything is encoded)
    columns = [c for c in prompts.text_columns if c in frame] if encoder.reads_text else []
    has_any = frame["has_content"] & False
    if columns:
        has_any = frame[columns].apply(lambda col: col.map(_present)).any(axis=1)
    if "image" in frame and not encoder.reads_text:
        has_any = frame["image"].map(_present)
    elif "image" in frame and encoder.uses_images:
        from merlin_molar.items.images import load_image

        image_only = frame["has_content"] & ~has_any & frame["image"].map(_present)
        has_any[image_only] = frame.loc[image_only, "image"].map(lambda path: load_image(path, None)[1] is None)
    usable = frame["has_content"] & has_any
    raw = frame["item_id_raw"] if "item_id_raw" in frame else frame["item_id"]
    report_items_without_content(
        raw[~usable], len(frame), source, "have no content (no item-table row, or neither text nor image)"
    )
    no_content = sorted(int(i) for i in frame.loc[~usable, "item_id"])
    items = prompts.items_from_frame(frame[usable], source)
    if not encoder.reads_text:  # its text fields do not reach the encoder: keep them out of the plan's digest
        items = [ItemContent(item.item_id, (), item.image) for item in items]
    return items, no_content, prompts


def encode_items(
    encoder: ItemEncoder, items: Sequence[ItemContent], batch_size: int = 32, progress: bool = True
) -> EncodedBatch:
    """Encode ``items`` in length-sorted batches; results come back in input order.

        >>> batch = encode_items(build_encoder(), items, batch_size=64)  # doctest: +SKIP
    """

    lengths = encoder.lengths(items)
    order = sorted(range(len(items)), key=lambda i: (lengths[i], items[i].item_id))
    embeddings = np.zeros((len(items), encoder.dim), dtype=np.float32)
    used = np.zeros(len(items), dtype=bool)
    problems: Dict[int, str] = {}
    indices = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = encode_batches(encoder, [[items[i] for i in index] for index in indices])
    with progress_bar(total=len(items), desc=f"encode ({encoder.kind})", unit="item", disable=not progress) as bar:
        for index, batch in zip(indices, batches):
            embeddings[index] = batch.embeddings
            used[index] = batch.used_image
            problems.update(batch.image_problems)
            bar.update(len(index))
    return EncodedBatch(embeddings, used, problems)


def encode_batches(
    encoder: ItemEncoder, batches: Sequence[Sequence[ItemContent]], prefetch: Optional[bool] = None
) -> Iterator[EncodedBatch]:
    """Encode ``batches`` in order. With ``prefetch`` (default: when the encoder runs on GPU) the next
    batch is prepared (images, processor) on a host thread while the model runs the current one."""
    if prefetch is None:
        prefetch = str(encoder.device).startswith("cuda")
    if not prefetch:
        for items in batches:
            yield encoder.encode(items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encoder.prepare, batches[0]) if batches else None
        for i in range(len(batches)):
            prepared = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(encoder.prepare, batches[i + 1])
            yield encoder.forward(prepared)


def torchrun_shard() -> Tuple[int, int]:
    """``(shard_index, num_shards)`` from torchrun's ``RANK``/``WORLD_SIZE`` (``(0, 1)`` outside torchrun).

        # torchrun --nproc-per-node 8 embed.py, where embed.py does:
        >>> shard, shards = torchrun_shard()                                                     # doctest: +SKIP
        >>> encoder = build_encoder(path, device=f"cuda:{os.environ['LOCAL_RANK']}")              # doctest: +SKIP
        >>> embed_catalogue(prepared, encoder, out, shard_index=shard, num_shards=shards)        # doctest: +SKIP
        # then, once every rank has finished: merge_shards(out)
    """
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class CatalogueResult:
    """What one :func:`embed_catalogue` call did."""

    output_path: Path
    complete: bool  # the final table exists (single process) / this shard is finished (sharded)
    shard_path: Optional[Path]
    chunks_total: int  # chunks of this shard
    chunks_done: int
    chunks_encoded: int  # by this call
    items_encoded: int  # by this call
    seconds: float
    reused: bool = False  # the table at output_path was already made by this very plan: nothing was encoded


class _WorkDir:
    def __init__(self, output_path: Path):
        self.root = output_path.with_name(output_path.name + ".work")

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    def chunk(self, c: int) -> Path:
        return self.root / "chunks" / f"chunk-{c:06d}.npz"

    def shard(self, k: int, n: int) -> Path:
        return self.root / f"shard-{k:05d}-of-{n:05d}.npz"


def save_embedded_chunk(path: Path, ids, embeddings, used, problems: Dict[int, str]) -> None:
    """Write a resumable run's chunk of newly embedded rows (ids, vectors, image use, image problems), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                item_id=np.asarray(ids, dtype=np.int64),
                embedding=np.asarray(embeddings, dtype=np.float32),
                used_image=np.asarray(used, dtype=bool),
                image_problems=np.array(json.dumps({str(k): v for k, v in sorted(problems.items())})),
            )


def load_embedded_chunk(path: Path):
    """``(ids, embeddings, used_image, image_problems)`` of a chunk written by :func:`save_embedded_chunk`."""
    try:
        with np.load(path) as z:
            problems = {int(k): v for k, v in json.loads(str(z["image_problems"])).items()}
            return z["item_id"], z["embedding"], z["used_image"], problems
    except (OSError, ValueError, KeyError) as e:
        raise MolarDataError(path, f"unreadable work file ({e}); delete it and re-run") from None


def _plan(prepared, encoder, items, no_content, prompts, batch_size: int, chunk_batches: int) -> dict:
    lengths = encoder.lengths(items)
    order = sorted(range(len(items)), key=lambda i: (lengths[i], items[i].item_id))
    ids = [items[i].item_id for i in order]
    chunk = batch_size * chunk_batches
    return {
        "format_version": FORMAT_VERSION,
        "encoder": {**encoder.describe(), "prompts": prompts.describe()},
        "item_cardinality": prepared.item_cardinality,
        "id_mapping_fingerprint": item_id_fingerprint(prepared),
        "dataset": prepared.manifest.get("source"),
        "batch_size": batch_size,
        "chunk_batches": chunk_batches,
        "no_content_ids": no_content,
        "chunks": [ids[i : i + chunk] for i in range(0, len(ids), chunk)],
        # what the ids and names above do not show: the items' text and images, and the encoder's weights
        "content_sha256": _content_digest(items, encoder.uses_images),
        "weights": _weights_identity(encoder.describe()),
    }


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _content_digest(items: Sequence[ItemContent], uses_images: bool) -> str:
    """sha256 of every item's text fields and image path (with the image file's size and modification
    time when the encoder reads images), by id."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.item_id):
        image = None
        if item.image:
            path = Path(item.image)
            image = [item.image, *(_file_stamp(path) if uses_images and path.is_file() else [])]
        h.update(json.dumps([item.item_id, item.fields, image]).encode())
    return h.hexdigest()


def _weights_identity(described: dict):
    """:func:`_files_identity` of the encoder's model (of both, for a text+image encoder)."""
    if described.get("kind") == "multimodal":
        return [_files_identity(described[part].get("name_or_path")) for part in ("text", "image")]
    return _files_identity(described.get("name_or_path"))


def _files_identity(name_or_path) -> Optional[str]:
    """sha256 of the relative paths, sizes and modification times of a model's files (a directory or one
    file), so that a model rewritten in place (e.g. stage 1 run again into the same directory) is told
    apart; ``None`` for a name that is not a local path."""
    if not name_or_path or not Path(name_or_path).exists():
        return None
    root = Path(name_or_path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for path in files:
        h.update(json.dumps([str(path.relative_to(root)) if root.is_dir() else path.name,
                             *_file_stamp(path)]).encode())
    return h.hexdigest()


def _plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


# how a plan is computed (batches, chunks), not what it computes: a rerun that differs only in these reuses the table
HOW = ("batch_size", "chunk_batches", "chunks")


def _table_digest(plan: dict) -> str:
    """sha256 of what decides the table's content: the plan without the batching (:data:`HOW`)."""
    return _plan_digest({k: v for k, v in plan.items() if k not in HOW})


def _made_by(output_path: Path, plan: dict) -> bool:
    """Whether the finished table at ``output_path`` was written from ``plan``'s encoder, prompts, items and
    catalogue version (in batches of any size), so that embedding it again would give the same table."""
    try:
        metadata = read_json(output_path / METADATA_FILE)
    except (OSError, ValueError):
        return False
    if "table_sha256" in metadata:
        same = metadata["table_sha256"] == _table_digest(plan)
    else:  # written before the batching was told apart: only the very same plan
        same = metadata.get("plan_sha256") == _plan_digest(plan)
    return same and (output_path / EMBEDDINGS_FILE).is_file()


def _differences(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def embed_catalogue(
    prepared,
    encoder: ItemEncoder,
    output_path,
    batch_size: int = 32,
    shard_index: int = 0,
    num_shards: int = 1,
    resume: bool = True,
    chunk_batches: int = 8,
    max_chunks: Optional[int] = None,
    progress: bool = True,
) -> CatalogueResult:
    """Embed every item of ``prepared`` with ``encoder`` into the item table at ``output_path``.

    Single process (``num_shards=1``): writes the final table. Sharded: this call embeds shard
    ``shard_index`` of ``num_shards`` and writes ``<output_path>.work/shard-K-of-N.npz``; once every shard
    is there, :func:`merge_shards` writes the table (a failed shard is re-run alone with the same
    arguments). ``resume=False`` discards this shard's finished chunks. ``max_chunks`` stops after
    that many newly encoded chunks (the run can be continued later). A single-process call whose table
    already exists, written from the same plan (encoder, prompts, items, catalogue version), returns it
    as it is (``reused``) unless ``resume=False``.

        >>> embed_catalogue(prepared, encoder, "/tmp/p1m/item_table", batch_size=64)  # doctest: +SKIP
        >>> for k in range(4):  # e.g. one process per GPU
        ...     embed_catalogue(prepared, encoder, out, shard_index=k, num_shards=4)  # doctest: +SKIP
        >>> merge_shards(out)  # doctest: +SKIP
    """
    import time


    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError("batch_size and chunk_batches must be positive")
    output_path = Path(output_path)
    work = _WorkDir(output_path)
    started = time.perf_counter()
    items, no_content, prompts = catalogue_items(prepared, encoder)
    plan = _plan(prepared, encoder, items, no_content, prompts, batch_size, chunk_batches)
    items = {item.item_id: item for item in items}
    mine = [c for c in range(len(plan["chunks"])) if c % num_shards == shard_index]
    if num_shards == 1 and resume and not work.root.exists() and _made_by(output_path, plan):
        LOG.info("%s: already embedded with this encoder, prompts and catalogue; reusing it", output_path)
        return CatalogueResult(output_path=output_path, complete=True, shard_path=None, chunks_total=len(mine),
                               chunks_done=len(mine), chunks_encoded=0, items_encoded=0,
                               seconds=time.perf_counter() - started, reused=True)
    shard_file = work.shard(shard_index, num_shards)
    if not resume:
        for c in mine:
            work.chunk(c).unlink(missing_ok=True)
        shard_file.unlink(missing_ok=True)
    if work.plan.exists():
        existing = read_json(work.plan)
        if existing != plan:
            if (not resume and num_shards == 1) or not _has_work(work):  # nothing finished: nothing to keep
                shutil.rmtree(work.root)
            else:
                raise MolarDataError(
                    work.root,
                    f"holds work of a different run (differs in {_differences(existing, plan)}); "
                    "delete it, or pass resume=False (single process)",
                )
    if not work.plan.exists():
        write_json(work.plan, plan)

    done = [c for c in mine if work.chunk(c).exists()]
    todo = [c for c in mine if not work.chunk(c).exists()] if not shard_file.exists() else []
    encoded_chunks = encoded_items = 0
    total_items = sum(len(plan["chunks"][c]) for c in mine)
    initial = total_items - sum(len(plan["chunks"][c]) for c in todo)
    if done and todo:
        LOG.info("resuming %s: %d of %d chunks already done", output_path, len(done), len(mine))
    desc = f"embed items [{encoder.kind}]" + (f" shard {shard_index}/{num_shards}" if num_shards > 1 else "")
    with _forget_unstarted_work(work), progress_bar(total=total_items, initial=initial, desc=desc, unit="item",
                                                    disable=not progress) as bar:
        for c in todo:
            if max_chunks is not None and encoded_chunks >= max_chunks:
                break
            ids = plan["chunks"][c]
            parts = []
            batches = [[items[i] for i in ids[start : start + batch_size]] for start in range(0, len(ids), batch_size)]
            for encoded in encode_batches(encoder, batches):
                parts.append(encoded)
                bar.update(len(encoded.embeddings))
            problems = {k: v for p in parts for k, v in p.image_problems.items()}
            embeddings = np.concatenate([p.embeddings for p in parts])
            save_embedded_chunk(work.chunk(c), ids, embeddings, np.concatenate([p.used_image for p in parts]), problems)
            encoded_chunks += 1
            encoded_items += len(ids)

    finished = shard_file.exists() or all(work.chunk(c).exists() for c in mine)
    if finished and not shard_file.exists():
        _write_shard(work, mine, shard_file)
    seconds = time.perf_counter() - started
    result = CatalogueResult(
        output_path=output_path,
        complete=finished,
        shard_path=shard_file if finished else None,
        chunks_total=len(mine),
        chunks_done=len(mine) if finished else sum(work.chunk(c).exists() for c in mine),
        chunks_encoded=encoded_chunks,
        items_encoded=encoded_items,
        seconds=seconds,
    )
    if finished and num_shards == 1:
        merge_shards(output_path)
        result.shard_path = None  # merged into the table; the work dir is gone
    return result


def _has_work(work: _WorkDir) -> bool:
    return any(work.root.glob("chunks/*.npz")) or any(work.root.glob("shard-*.npz"))


@contextlib.contextmanager
def _forget_unstarted_work(work: _WorkDir):
    """A run that fails before any chunk is finished leaves no work directory (nothing to resume, and its
    plan would refuse a corrected rerun with other arguments)."""
    try:
        yield
    except BaseException:
        if work.root.exists() and not _has_work(work):
            shutil.rmtree(work.root, ignore_errors=True)
        raise


def _write_shard(work: _WorkDir, chunks: List[int], shard_file: Path) -> None:
    parts = [load_embedded_chunk(work.chunk(c)) for c in chunks]
    problems = {k: v for p in parts for k, v in p[3].items()}
    if parts:
        ids, emb, used = (np.concatenate([p[i] for p in parts]) for i in range(3))
    else:  # more shards than chunks
        ids, emb, used = np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, bool)
    save_embedded_chunk(shard_file, ids, emb, used, problems)
    if problems:
        LOG.warning("%s: %d item(s) had a missing or unreadable image and were encoded text-only, e.g. %s",
                    shard_file.name, len(problems), [problems[k] for k in sorted(problems)[:REPORT_FIRST]])
    for c in chunks:
        work.chunk(c).unlink(missing_ok=True)


def merge_shards(output_path, num_shards: Optional[int] = None) -> Path:
    """Assemble the final table from the shard files in ``<output_path>.work`` and remove the work dir.

    Refuses (MolarDataError) while any shard is missing, naming the ones to (re-)run."""
    output_path = Path(output_path)
    work = _WorkDir(output_path)
    plan = read_json(work.plan)
    if num_shards is None:
        counts = {int(p.stem.split("-of-")[1]) for p in work.root.glob("shard-*-of-*.npz")}
        if len(counts) != 1:
            raise MolarDataError(work.root, f"cannot tell the number of shards from the shard files ({sorted(counts)})")
        num_shards = counts.pop()
    missing = [k for k in range(num_shards) if not work.shard(k, num_shards).exists()]
    if missing:
        raise MolarDataError(work.root, f"shard(s) {missing} of {num_shards} not finished: run them, then merge")
    cardinality = plan["item_cardinality"]
    dim = int(plan["encoder"]["dim"])
    table = np.zeros((cardinality, dim), dtype=np.float32)
    has_embedding = np.zeros(cardinality, dtype=bool)
    used_image = np.zeros(cardinality, dtype=bool)
    problems: Dict[int, str] = {}
    for k in range(num_shards):
        ids, emb, used, shard_problems = load_embedded_chunk(work.shard(k, num_shards))
        if len(ids):
            table[ids] = emb
            has_embedding[ids] = True
            used_image[ids] = used
        problems.update(shard_problems)
    expected = sorted(i for chunk in plan["chunks"] for i in chunk)
    if sorted(np.flatnonzero(has_embedding).tolist()) != expected:
        raise MolarDataError(work.root, "shard files do not cover the planned items exactly; delete the work dir")
    statistics = None
    if plan["encoder"].get("fusion") == "whiten":  # the encoder wrote raw [text | image] rows
        text_dim = int(plan["encoder"]["text"]["dim"])
        statistics = fit_join(table[has_embedding], used_image[has_embedding], text_dim)
        table[has_embedding] = join_parts(table[has_embedding], used_image[has_embedding], text_dim, statistics)

    metadata = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": plan["dataset"],
        "encoder": plan["encoder"],
        "backbone": plan["encoder"].get("base_model", plan["encoder"]["name_or_path"]),
        "prompt_template": plan["encoder"]["prompts"],
        "dim": dim,
        "item_cardinality": cardinality,
        "items_embedded": int(has_embedding.sum()),
        "items_with_image": int(used_image.sum()),
        "zero_rows": [int(i) for i in np.flatnonzero(~has_embedding)],
        "encoder_reads_images": bool(plan["encoder"].get("uses_images", plan["encoder"]["kind"] == "vlm")),
        "no_content_ids": plan["no_content_ids"],
        "missing_image_count": len(problems),
        "missing_image_ids": sorted(problems),
        "missing_image_examples": {str(k): problems[k] for k in sorted(problems)[:REPORT_FIRST]},
        "id_mapping_fingerprint": plan["id_mapping_fingerprint"],
        "batch_size": plan["batch_size"],
        "num_shards": num_shards,
        "plan_sha256": _plan_digest(plan),
        "table_sha256": _table_digest(plan),
    }
    if problems:
        message = (
            f"{len(problems)} item(s) had a missing or unreadable image and were embedded from text only, "
            f"e.g. {[problems[k] for k in sorted(problems)[:5]]} (all listed in {METADATA_FILE})"
        )
        LOG.warning(message)
        warnings.warn(message, stacklevel=2)
    with atomic_path(output_path, is_dir=True) as tmp:
        write_table_rows(tmp, TableRows(table, has_embedding, used_image))
        if statistics is not None:
            metadata["join"] = {"fusion": "whiten", "file": JOIN_FILE, "sha256": statistics.save(tmp / JOIN_FILE),
                                "fitted_on": {"text_rows": int(has_embedding.sum()),
                                              "image_rows": int(used_image.sum())}}
        write_json(tmp / METADATA_FILE, metadata)
        tmp.chmod(0o755)  # mkdtemp makes it private; the table is meant to be shared
    shutil.rmtree(work.root, ignore_errors=True)
    return output_path


@dataclass
class TableRows:
    """An item table's rows, one per Categorify id: the vectors ``[items, dim]`` (float32), and per row whether
    it has an embedding (an item with content) and whether the encoder saw its image."""

    embeddings: np.ndarray
    has_embedding: np.ndarray
    used_image: np.ndarray

    def appended(self, other: "TableRows") -> "TableRows":
        return TableRows(np.concatenate([self.embeddings, other.embeddings]),
                         np.concatenate([self.has_embedding, other.has_embedding]),
                         np.concatenate([self.used_image, other.used_image]))


def read_table_rows(directory) -> TableRows:
    """The rows of the item table in ``directory``, as written by :func:`write_table_rows` (no check against a
    prepared catalogue: that is :func:`load_item_table`)."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    dim = int(read_table_metadata(directory)["dim"])
    try:
        arrow = pq.read_table(directory / EMBEDDINGS_FILE)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise MolarDataError(directory / EMBEDDINGS_FILE, f"not a readable item table ({e})") from None
    vectors = arrow.column(EMBEDDING_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return TableRows(vectors.astype(np.float32, copy=False).reshape(-1, dim),
                     arrow.column("has_embedding").to_numpy(zero_copy_only=False),
                     arrow.column("used_image").to_numpy(zero_copy_only=False))


def write_table_rows(directory: Path, rows: TableRows) -> None:
    """Write ``rows`` as the item table's parquet file (row ``i`` = Categorify id ``i``) and its Merlin schema into
    ``directory`` (its ``metadata.json`` is the caller's)."""
    import merlin.dtypes as md
    import pyarrow as pa
    import pyarrow.parquet as pq
    from merlin.schema import ColumnSchema, Schema, Tags
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    n, dim = rows.embeddings.shape
    arrow = pa.table(
        {
            "item_id": pa.array(np.arange(n, dtype=np.int64)),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(rows.embeddings.reshape(-1)), dim),
            "has_embedding": pa.array(rows.has_embedding),
            "used_image": pa.array(rows.used_image),
        }
    )
    pq.write_table(arrow, directory / EMBEDDINGS_FILE)
    schema = Schema(
        [
            ColumnSchema(
                "item_id",
                dtype=md.int64,
                tags=[Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL],
                properties={"domain": {"min": 0, "max": n - 1, "name": "item_id"}},
            ),
            ColumnSchema(EMBEDDING_COLUMN, dtype=md.float32, tags=[Tags.EMBEDDING, Tags.ITEM], dims=(None, dim)),
            ColumnSchema("has_embedding", dtype=md.boolean),
            ColumnSchema("used_image", dtype=md.boolean),
        ]
    )
    TensorflowMetadata.from_merlin_schema(schema).to_proto_text_file(str(directory), SCHEMA_FILE)


def read_table_metadata(path) -> dict:
    path = Path(path)
    return read_json((path.parent if path.suffix == ".parquet" else path) / METADATA_FILE)


def load_item_table(path, prepared):
    """The table at ``path`` as a float32 tensor ``[item_cardinality, dim]`` (row = Categorify id).

    Refuses (MolarDataError) a table made for other prepared data: a different item cardinality,
    id-mapping fingerprint, or rows that are not exactly ids ``0..item_cardinality-1`` in order.

        >>> table = load_item_table("/tmp/p1m/item_table", load_prepared("/tmp/p1m"))  # doctest: +SKIP
    """
    import pyarrow.parquet as pq
    import torch

    path = Path(path)
    directory = path.parent if path.suffix == ".parquet" else path
    parquet = directory / EMBEDDINGS_FILE
    metadata = read_table_metadata(directory)
    if not parquet.is_file():
        raise MolarDataError(parquet, "file not found")
    cardinality = prepared.item_cardinality
    if metadata.get("item_cardinality") != cardinality:
        raise MolarDataError(
            directory,
            f"made for {metadata.get('item_cardinality')} item ids, the prepared data at {prepared.root} has "
            f"{cardinality}: re-run embed_catalogue for it",
        )
    if metadata.get("id_mapping_fingerprint") != item_id_fingerprint(prepared):
        raise MolarDataError(
            directory,
            f"its item id mapping differs from the one fitted in {prepared.workflow_path} "
            "(another dataset or a re-fitted workflow): re-run embed_catalogue for it",
        )
    try:
        arrow = pq.read_table(parquet, columns=["item_id", EMBEDDING_COLUMN])
    except Exception as e:  # pyarrow raises several types for damaged files
        raise MolarDataError(parquet, f"not a readable item table ({e})") from None
    ids = arrow.column("item_id").to_numpy()
    if len(ids) != cardinality or not np.array_equal(ids, np.arange(cardinality)):
        raise MolarDataError(parquet, f"rows are not item ids 0..{cardinality - 1} in order")
    column = arrow.column(EMBEDDING_COLUMN).combine_chunks()
    dim = metadata.get("dim")
    if getattr(column.type, "list_size", None) != dim:
        raise MolarDataError(parquet, f"embedding column is not a fixed-size list of {dim} floats")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return torch.from_numpy(values.reshape(cardinality, dim).copy())
