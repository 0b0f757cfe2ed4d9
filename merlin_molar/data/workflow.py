"""NVTabular preprocessing: Categorify item ids, group each user's history by time, leave-one-out splits.

The same NVTabular graph runs on CPU (pandas) or GPU (cuDF) and on a ``dask.distributed`` cluster; this
project's tests run it in CPU mode. On a cluster (:func:`merlin_molar.distributed.dask_cluster`), pass
``partitions=`` to :func:`prepare` so that the workers share the work; the output does not depend on it.

Output directory layout written by :func:`prepare`::

    workflow/          fitted NVTabular workflow (Categorify mapping reused by serving and the item table)
    train/ valid/ test/  parquet + schema.pbtxt, column ``item_id-list`` (ITEM_ID/LIST/CATEGORICAL), plus
                       ``user_id`` and ``user_index`` (the user's row number, untagged: no model input)
    earlier/valid.parquet earlier/test.parquet
                       per ``user_index``, column ``item_id-earlier``: the user's items older than the split
                       row's window, masked by the evaluation together with the window
    items.parquet      item content table in Categorify id order (column ``item_id`` = encoded id)
    molar_manifest.json  what this directory was made from (a different dataset is refused), and the sha256
                       of every file above (verified by :func:`load_prepared`)

Leave-one-out (chronological): for a user history ``s``, ``test`` holds ``s`` (the model predicts its last
item from the rest), ``valid`` holds ``s[:-1]`` and ``train`` holds ``s[:-2]``, each truncated to its
last ``max_length`` items. The evaluation masks the user's whole history, as the paper's protocol and the
plain reference SASRec do, not only the window the model reads: ``earlier/<split>.parquet`` holds the rest.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.io import Dataset
from merlin.schema import ColumnSchema, Schema, Tags

from merlin_molar.data.holdout import hold_out_items, write_cold_files
from merlin_molar.data.readers import RawDataset
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import EARLIER_ITEMS, FIRST_ITEM_ID, ITEM_SEQUENCE, USER_INDEX
from merlin_molar.io import atomic_path, claim_output_dir, file_checksums, read_json, verify_checksums, write_json

LOG = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
EVALUATED_SPLITS = ("valid", "test")
# how many of the history's last items each split leaves out (leave-one-out)
DROPPED_LAST = {"train": 2, "valid": 1, "test": 0}
MIN_HISTORY = 3  # one train item + one validation target + one test target
# Position of each interaction in the raw table: interactions with equal timestamps keep that order, whatever
# the partitioning (a plain sort by time leaves ties in an order that depends on each partition's contents).
ORDER_COLUMN = "interaction_order"


def sequence_workflow(
    min_history: int = MIN_HISTORY, cat_path: Optional[str] = None, order_column: Optional[str] = None
) -> nvt.Workflow:
    """Categorify item ids and group interactions into time-ordered per-user item lists.

    With ``order_column`` (an input column), equal timestamps are ordered by it."""
    item_id = ["item_id"] >> nvt.ops.Categorify(out_path=cat_path) >> nvt.ops.AddTags([Tags.ITEM_ID, Tags.ITEM])
    sort_cols = ["timestamp"] + ([order_column] if order_column else [])
    grouped = (item_id + ["user_id"] + sort_cols) >> nvt.ops.Groupby(
        groupby_cols=["user_id"], sort_cols=sort_cols, aggs={"item_id": ["list", "count"]}, name_sep="-"
    )
    long_enough = grouped >> nvt.ops.Filter(f=lambda df: df["item_id-count"] >= min_history)
    return nvt.Workflow(long_enough[["user_id", ITEM_SEQUENCE]])


def split_workflow(split: str, max_length: int) -> nvt.Workflow:
    """Leave-one-out slice of the grouped histories for one split, truncated to ``max_length``."""
    drop_last = DROPPED_LAST[split]
    if drop_last:
        sliced = [ITEM_SEQUENCE] >> nvt.ops.ListSlice(-(max_length + drop_last), -drop_last)
    else:
        sliced = [ITEM_SEQUENCE] >> nvt.ops.ListSlice(-max_length)
    return nvt.Workflow(sliced + ["user_id", USER_INDEX])


def earlier_items(grouped: pd.DataFrame, split: str, max_length: int) -> pd.DataFrame:
    """Per ``user_index``, the items of the user's history older than the ``split`` row's window: the part of
    the history the model does not read but the evaluation masks. (NVTabular's ListSlice cannot express it:
    its output schema needs a positive maximum length.)"""
    keep = DROPPED_LAST[split] + max_length
    earlier = [np.asarray(s, dtype=np.int64)[: max(len(s) - keep, 0)] for s in grouped[ITEM_SEQUENCE]]
    return pd.DataFrame({USER_INDEX: np.asarray(grouped[USER_INDEX], dtype=np.int64), EARLIER_ITEMS: earlier})


def k_core(interactions: pd.DataFrame, k: int, cat_path: Optional[str] = None) -> pd.DataFrame:
    """Iteratively keep users and items with at least ``k`` interactions (NVTabular JoinGroupby + Filter)."""
    if k <= 1:
        return interactions
    current = interactions
    while True:
        # NVTabular's Filter fails on an empty result: say so before running a step that would empty the table
        users, items = current["user_id"].value_counts(), current["item_id"].value_counts()
        if not ((current["user_id"].map(users) >= k) & (current["item_id"].map(items) >= k)).any():
            raise MolarDataError("--k-core", f"{k} removes every interaction (no user and item both have {k})")
        counted = (
            ["user_id", "item_id", "timestamp"]
            + (["item_id"] >> nvt.ops.JoinGroupby(cont_cols=["timestamp"], stats=["count"], out_path=cat_path))
            + (["user_id"] >> nvt.ops.JoinGroupby(cont_cols=["timestamp"], stats=["count"], out_path=cat_path))
        )
        kept = counted >> nvt.ops.Filter(f=lambda df: (df["item_id_count"] >= k) & (df["user_id_count"] >= k))
        out = nvt.Workflow(kept[["user_id", "item_id", "timestamp"]]).fit_transform(Dataset(current)).to_ddf()
        out = out.compute().reset_index(drop=True)
        if len(out) == len(current):
            return out
        if out.empty:
            raise MolarDataError("--k-core", f"{k} removes every interaction (no user and item both have {k})")
        current = out


def dataset_fingerprint(raw: RawDataset) -> str:
    """The raw data's identity (interactions and item ids), recorded by ``prepare`` as the manifest's
    ``fingerprint``: what tells whether a raw dataset is the one a prepared directory was made from."""
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(raw.interactions, index=False).values.tobytes())
    h.update(pd.util.hash_pandas_object(raw.items["item_id"].astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


VOCABULARY_DIRS = (".categories", "catalogue")  # where prepare and add-items write the Categorify vocabulary


def categorify_op(workflow):
    """The fitted Categorify of a workflow (exactly one)."""
    from merlin.dag import iter_nodes
    from nvtabular.ops import Categorify

    ops = [node.op for node in iter_nodes([workflow.output_node]) if isinstance(node.op, Categorify)]
    if len(ops) != 1:
        raise MolarDataError("workflow", f"expected one Categorify op, found {len(ops)}")
    return ops[0]


@dataclass
class PreparedData:
    """Paths and schema of a prepared output directory."""

    root: Path

    def split_path(self, split: str) -> Path:
        return self.root / split

    @property
    def workflow_path(self) -> Path:
        return self.root / "workflow"

    def load_workflow(self) -> nvt.Workflow:
        """The fitted workflow, reading its Categorify vocabulary from this directory. The saved workflow
        records the vocabulary's path as ``prepare`` / ``add-items`` were given it: relative to their working
        directory, or absolute. Either breaks once the directory is used from elsewhere or moved, so the
        vocabulary is looked up under ``root`` by its place in the directory (``.categories/...`` or
        ``catalogue/v<N>/...``)."""
        workflow = nvt.Workflow.load(str(self.workflow_path))
        op = categorify_op(workflow)
        (column,) = list(op.categories)
        recorded = Path(str(op.categories[column]))
        anchors = [i for i, part in enumerate(recorded.parts) if part in VOCABULARY_DIRS]
        local = self.root.joinpath(*recorded.parts[anchors[-1]:]) if anchors else recorded
        if not local.is_file():
            raise MolarDataError(self.workflow_path, f"its item vocabulary {local} is missing (an incomplete copy of "
                                                     "the prepared directory?)")
        op.categories[column] = str(local)
        # NVTabular's load points the operator at the workflow's own copy of the vocabulary but leaves the
        # output schema's cat_path as it was saved, relative to prepare's working directory: refit it
        if workflow.output_schema[ITEM_SEQUENCE].properties.get("cat_path") != str(local):
            workflow.fit_schema(workflow.input_schema)
        return workflow

    @property
    def items_path(self) -> Path:
        return self.root / "items.parquet"

    def earlier_items_path(self, split: str) -> Path:
        return self.root / "earlier" / f"{split}.parquet"

    @property
    def manifest(self) -> dict:
        return read_json(self.root / "molar_manifest.json")

    @property
    def schema(self) -> Schema:
        return Dataset(str(self.split_path("train")), engine="parquet").schema.select_by_name([ITEM_SEQUENCE])

    @property
    def item_cardinality(self) -> int:
        return int(self.manifest["item_cardinality"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def items(self) -> pd.DataFrame:
        return pd.read_parquet(self.items_path)

    def split_frame(self, split: str) -> pd.DataFrame:
        return Dataset(str(self.split_path(split)), engine="parquet").to_ddf().compute()


def load_prepared(root) -> PreparedData:
    root = Path(root)
    for required in ["molar_manifest.json", "workflow", *SPLITS, "items.parquet"]:
        if not (root / required).exists():
            raise MolarDataError(root / required, "missing: run `merlin-molar prepare` for this directory first")
    manifest = read_json(root / "molar_manifest.json")
    if not isinstance(manifest, dict) or "item_cardinality" not in manifest:
        raise MolarDataError(root / "molar_manifest.json", "not the manifest of a finished `prepare` run")
    if (root / ".add_items.work" / "staged" / "ready").exists():
        # an add-items run was interrupted while moving its files in: the checksums describe the old
        # catalogue until the rerun of add-items finishes the move (it must be able to load this directory)
        LOG.warning("%s: an interrupted `merlin-molar add-items` is pending: rerun it to finish", root)
    elif "sha256" in manifest:
        verify_checksums(root, manifest["sha256"], "run `merlin-molar prepare` for this directory again")
    else:  # prepared before checksums were recorded: at least every parquet footer must read
        import pyarrow.parquet as pq

        for path in [root / "items.parquet", *(p for s in SPLITS for p in sorted((root / s).glob("*.parquet")))]:
            try:
                pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for damaged files
                raise MolarDataError(path, f"not a readable parquet file ({type(e).__name__}): prepare again") from None
    return PreparedData(root)


def prepare(
    raw: RawDataset, output_dir, max_length: int = 200, k: int = 0, partitions: int = 1, cold_items: float = 0.0
) -> PreparedData:
    """Run the NVTabular workflows on ``raw`` and write the splits, item table and fitted workflow.

    ``partitions`` > 1 splits the interactions into that many Dask partitions (shuffled by user, as
    NVTabular's Groupby requires) so that the workers of an active Dask cluster share the work.

    ``cold_items`` > 0 holds out that fraction of items, the latest to appear, as new items for cold-start
    evaluation (:mod:`merlin_molar.data.holdout`): Categorify is fitted without them, they stay only as test
    targets (out of vocabulary until ``add-items`` adds ``cold_items.csv``)."""
    output_dir = Path(output_dir)
    # The fingerprint identifies the data; where it was read from (relative or absolute path) does not.
    identity = {"fingerprint": dataset_fingerprint(raw), "max_length": max_length, "k_core": k}
    if cold_items:
        identity["cold_items"] = cold_items
    if max_length < 2:
        raise MolarDataError("max_length", f"must be at least 2 (one history item and one target), got {max_length}")
    with tempfile.TemporaryDirectory(prefix="molar-kcore-") as scratch:  # before the output dir is claimed
        interactions = k_core(raw.interactions, k, cat_path=scratch)
    if interactions["user_id"].value_counts().max() < MIN_HISTORY:
        after = f" after the {k}-core filter" if k > 1 else ""
        problem = f"no user has at least {MIN_HISTORY} interactions{after}"
        raise MolarDataError("--k-core" if after else raw.source, problem)
    claim_output_dir(output_dir, {**identity, "stage": "prepare"})
    per_user = interactions["user_id"].value_counts()
    short = per_user[per_user < MIN_HISTORY]
    if len(short):
        LOG.warning("%s: %d user(s) with fewer than %d interactions (%d rows) left out: leave-one-out needs a "
                    "training item, a validation target and a test target per user", raw.source, len(short),
                    MIN_HISTORY, int(short.sum()))
    interactions = interactions.assign(**{ORDER_COLUMN: np.arange(len(interactions))})
    fit_on, cold = interactions, None
    if cold_items:
        interactions, cold = hold_out_items(interactions, cold_items, ORDER_COLUMN)
        fit_on = interactions[~interactions["item_id"].isin(set(cold))]

    wf = sequence_workflow(cat_path=str(output_dir / ".categories"), order_column=ORDER_COLUMN)
    dataset = Dataset(interactions, npartitions=partitions)
    fit_dataset = dataset if cold is None else Dataset(fit_on, npartitions=partitions)
    if partitions > 1:
        # persisted once on the cluster: fit and transform would each redo the shuffle
        dataset = Dataset(dataset.shuffle_by_keys(["user_id"]).to_ddf().persist())
        fit_dataset = dataset if cold is None else fit_dataset  # only Categorify is fitted: no shuffle needed
    wf.fit(fit_dataset)
    grouped = wf.transform(dataset).to_ddf().compute().sort_values("user_id", ignore_index=True)
    if grouped.empty:
        raise MolarDataError(raw.source, f"no user has at least {MIN_HISTORY} interactions")
    grouped[USER_INDEX] = np.arange(len(grouped), dtype=np.int64)
    with atomic_path(output_dir / "workflow", is_dir=True) as tmp:
        wf.save(str(tmp))

    grouped_schema = wf.output_schema + Schema([ColumnSchema(USER_INDEX, dtype=np.int64)])
    for split in SPLITS:
        out = split_workflow(split, max_length).fit_transform(Dataset(grouped, schema=grouped_schema))
        with atomic_path(output_dir / split, is_dir=True) as tmp:
            out.to_parquet(str(tmp), output_files=1)
    (output_dir / "earlier").mkdir(exist_ok=True)
    host_grouped = grouped.to_pandas() if hasattr(grouped, "to_pandas") else grouped  # cuDF on a GPU
    for split in EVALUATED_SPLITS:
        with atomic_path(output_dir / "earlier" / f"{split}.parquet") as tmp:
            earlier_items(host_grouped, split, max_length).to_parquet(tmp, index=False)

    mapping = item_id_mapping(wf)
    items = encode_items(raw.items, mapping, raw.source)
    with atomic_path(output_dir / "items.parquet") as tmp:
        items.to_parquet(tmp, index=False)

    manifest = {
        **identity,
        "source": raw.source,
        "stage": "prepare",
        "users": int(len(grouped)),
        "interactions": int(interactions["user_id"].isin(set(grouped["user_id"])).sum()),  # of the users kept
        "users_left_out": {"fewer_than": MIN_HISTORY, "users": int(len(short)), "interactions": int(short.sum())},
        "items_interacted": int(len(mapping)),
        "item_cardinality": int(mapping.max() + 1),
        "items_with_content": int(items["has_content"].sum()),
        "text_columns": raw.text_columns,
        "sha256": file_checksums(output_dir, ["workflow", *SPLITS, "earlier", "items.parquet"]),
    }
    if cold is not None:
        manifest["cold_start"] = {"fraction": cold_items, **write_cold_files(output_dir, raw.items, cold, grouped,
                                                                                interactions)}
    write_json(output_dir / "molar_manifest.json", manifest)
    return PreparedData(output_dir)


def item_id_mapping(workflow: nvt.Workflow) -> pd.Series:
    """Raw item id -> Categorify id, read from the fitted workflow's own vocabulary file."""
    path = Path(workflow.output_schema[ITEM_SEQUENCE].properties["cat_path"])
    vocab = pd.read_parquet(path)
    vocab = vocab[vocab.index >= FIRST_ITEM_ID]
    return pd.Series(vocab.index.astype("int64"), index=vocab["item_id"].values, name="item_id")


def encode_items(items: pd.DataFrame, mapping: pd.Series, source) -> pd.DataFrame:
    """Item table in Categorify order: one row per interacted item, ``item_id`` = encoded id.

    Interacted items missing from the content table keep a row with ``has_content=False`` (they are
    reported and get a zero content embedding) instead of being silently dropped."""
    items = items.copy()
    items["item_id_raw"] = items["item_id"].astype(mapping.index.dtype) if len(items) else items["item_id"]
    merged = pd.DataFrame({"item_id_raw": mapping.index, "item_id": mapping.values}).merge(
        items.drop(columns=["item_id"]), on="item_id_raw", how="left", indicator=True
    )
    merged["has_content"] = merged.pop("_merge") == "both"
    if not merged["has_content"].any():
        raise MolarDataError(source, "no interacted item appears in the item table (do the item ids match?)")
    report_items_without_content(merged.loc[~merged["has_content"], "item_id_raw"], len(merged), source,
                                 "have no row in the item table")
    return merged.sort_values("item_id").reset_index(drop=True)


REPORT_FIRST = 20


def report_items_without_content(raw_ids, total: int, source, why: str) -> None:
    """One warning, worded the same for one item or for half the catalogue, naming raw item ids."""
    raw_ids = pd.unique(pd.Series(raw_ids)).tolist()
    try:
        raw_ids = sorted(raw_ids)
    except TypeError:  # ids of mixed types
        raw_ids = sorted(raw_ids, key=str)
    if not raw_ids:
        return
    LOG.warning(
        "%s: %d of %d interacted item(s) %s and get a zero content embedding: item_id %s%s",
        source, len(raw_ids), total, why, raw_ids[:REPORT_FIRST], " ..." if len(raw_ids) > REPORT_FIRST else "",
    )
