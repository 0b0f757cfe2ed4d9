"""Preprocessing throughput: the project's NVTabular workflow against plain pandas, same output, same run.

Both sides turn the MovieLens-1M interactions into the leave-one-out splits the models read: item ids
encoded like NVTabular's Categorify (0/1/2 reserved, then most frequent first), each user's items sorted
by time, users with fewer than 3 interactions dropped, ``train`` = s[:-2], ``valid`` = s[:-1], ``test`` = s,
each cut to its last ``--max-length`` items, written as parquet with a vocabulary and the item table.

* ``nvtabular_prepare``: :func:`merlin_molar.data.prepare` end to end (CPU mode), as users call it; it
  also writes the fitted workflow, Merlin schemas and a manifest with a content fingerprint.
* ``nvtabular_workflows``: only the NVTabular graphs of that function (Categorify + Groupby + Filter, then
  the three ListSlice workflows writing parquet), for a like-for-like comparison with pandas.
* ``pandas``: the same output written with pandas/numpy/pyarrow in this script.

Before timing, the outputs are compared user by user (raw item ids, so a different id assignment could
not hide a different sequence) and the id mappings are compared too. Rows/s counts input interactions.

    nice -n 10 .venv/bin/python benchmarks/preprocess_ml1m.py --repeats 5
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merlin_molar  # noqa: E402,F401  (compat overrides, incl. the dask string-conversion trap)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from merlin.io import Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import data_dir, command_line, git_commit, machine, now, table, result_path, write_result  # noqa: E402
from merlin_molar.ids import ITEM_SEQUENCE  # noqa: E402
from merlin_molar.data import SPLITS, prepare, read_dataset  # noqa: E402
from merlin_molar.data.workflow import (  # noqa: E402
    FIRST_ITEM_ID,
    MIN_HISTORY,
    encode_items,
    item_id_mapping,
    sequence_workflow,
    split_workflow,
)

DROP_LAST = {"train": 2, "valid": 1, "test": 0}


def pandas_prepare(interactions: pd.DataFrame, items: pd.DataFrame, out_dir: Path, max_length: int, source: str):
    """Plain pandas/numpy implementation of the project's leave-one-out preparation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Categorify: most frequent first. Same two sorts as NVTabular's vocabulary writer (by value, then an
    # unstable sort by count), so that items with equal counts get the same ids.
    counts = interactions["item_id"].value_counts()
    vocab = counts.rename_axis("item_id").reset_index(name="count").sort_values("item_id", ignore_index=True)
    vocab = vocab.sort_values("count", ascending=False, ignore_index=True)
    mapping = pd.Series(np.arange(FIRST_ITEM_ID, FIRST_ITEM_ID + len(vocab)), index=vocab["item_id"].values)
    df = pd.DataFrame({
        "user_id": interactions["user_id"].values,
        "item_id": mapping.reindex(interactions["item_id"].values).values,
        "timestamp": interactions["timestamp"].values,
    })
    # Stable time sort: equal timestamps keep their input order, as prepare() does; the stable sort by
    # user then groups without disturbing that order.
    df = df.sort_values("timestamp", kind="stable", ignore_index=True)
    df = df.sort_values("user_id", kind="stable", ignore_index=True)
    users, starts, lengths = np.unique(df["user_id"].values, return_index=True, return_counts=True)
    keep = lengths >= MIN_HISTORY
    users, starts, lengths = users[keep], starts[keep], lengths[keep]
    values = df["item_id"].values.astype(np.int64)
    ends = starts + lengths
    for split in SPLITS:
        stop = ends - DROP_LAST[split]
        begin = np.maximum(starts, stop - max_length)
        sizes = stop - begin
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        # gather index: for every kept position, begin[u] + position within the user's slice
        index = np.repeat(begin - offsets[:-1], sizes) + np.arange(offsets[-1])
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[index]))
        split_dir = out_dir / split
        split_dir.mkdir(exist_ok=True)
        pq.write_table(pa.table({"user_id": users, ITEM_SEQUENCE: column}), split_dir / "part_0.parquet")
    vocab_out = pd.DataFrame({"item_id": vocab["item_id"].values, "item_id_size": vocab["count"].values},
                             index=mapping.values)
    vocab_out.to_parquet(out_dir / "vocabulary.parquet")
    encode_items(items, mapping, source).to_parquet(out_dir / "items.parquet", index=False)
    return mapping


def nvtabular_workflows(interactions: pd.DataFrame, out_dir: Path, max_length: int):
    """The NVTabular graphs of :func:`merlin_molar.data.prepare`, without its bookkeeping."""
    wf = sequence_workflow(cat_path=str(out_dir / ".categories"))
    grouped = wf.fit_transform(Dataset(interactions)).to_ddf().compute()
    for split in SPLITS:
        out = split_workflow(split, max_length).fit_transform(Dataset(grouped, schema=wf.output_schema))
        out.to_parquet(str(out_dir / split), output_files=1)
    return wf


def read_split(path: Path, mapping: pd.Series) -> dict:
    """user -> tuple of raw item ids."""
    df = pd.concat([pd.read_parquet(f, columns=["user_id", ITEM_SEQUENCE]) for f in sorted(path.glob("*.parquet"))])
    raw = pd.Series(mapping.index.values, index=mapping.values)
    return {int(u): tuple(raw.reindex(np.asarray(s)).values.tolist()) for u, s in zip(df["user_id"], df[ITEM_SEQUENCE])}


def check_same_output(nvt_dir: Path, nvt_mapping: pd.Series, pd_dir: Path, pd_mapping: pd.Series) -> dict:
    report = {"mapping_identical": bool(nvt_mapping.sort_index().equals(pd_mapping.sort_index()))}
    for split in SPLITS:
        a = read_split(nvt_dir / split, nvt_mapping)
        b = read_split(pd_dir / split, pd_mapping)
        if a.keys() != b.keys():
            raise AssertionError(f"{split}: different users ({len(a)} vs {len(b)})")
        differ = [u for u in a if a[u] != b[u]]
        if differ:
            u = differ[0]
            raise AssertionError(f"{split}: {len(differ)} users differ, e.g. user {u}: {a[u][:8]} vs {b[u][:8]}")
        report[split] = {"users": len(a), "items": int(sum(len(s) for s in a.values()))}
    return report


def timed(fn, repeats: int, label: str):
    seconds = []
    for _ in tqdm(range(repeats + 1), desc=label, leave=False):
        tmp = Path(tempfile.mkdtemp(prefix="molar-prep-"))
        try:
            start = time.perf_counter()
            fn(tmp / "out")
            seconds.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return seconds[0], seconds[1:]  # the first run is a warm-up (imports, numba, file cache)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", type=Path, default=data_dir("ml-1m"), help="raw dataset directory")
    p.add_argument("--max-length", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (after one warm-up)")
    p.add_argument("--output", type=Path, default=result_path("preprocess_ml1m", "preprocess_ml1m.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    info = machine()
    started = now()
    raw = read_dataset(args.data)
    n_rows = len(raw.interactions)
    source = str(args.data)

    # correctness first: one output of each, compared user by user
    with tempfile.TemporaryDirectory(prefix="molar-prep-check-") as tmp:
        tmp = Path(tmp)
        prepared = prepare(raw, tmp / "nvt", max_length=args.max_length)
        nvt_mapping = item_id_mapping_from(prepared)
        pd_mapping = pandas_prepare(raw.interactions, raw.items, tmp / "pd", args.max_length, source)
        check = check_same_output(tmp / "nvt", nvt_mapping, tmp / "pd", pd_mapping)

    methods = {
        "nvtabular_prepare": lambda out: prepare(raw, out, max_length=args.max_length),
        "nvtabular_workflows": lambda out: nvtabular_workflows(raw.interactions, out, args.max_length),
        "pandas": lambda out: pandas_prepare(raw.interactions, raw.items, out, args.max_length, source),
    }
    rows, runs = [], {}
    for name, fn in methods.items():
        warmup, seconds = timed(fn, args.repeats, name)
        median = statistics.median(seconds)
        runs[name] = {"warmup_seconds": round(warmup, 4), "seconds": [round(s, 4) for s in seconds],
                      "median_seconds": round(median, 4), "rows_per_second_median": round(n_rows / median)}
        rows.append({"method": name, "median s": median, "min s": min(seconds), "max s": max(seconds),
                     "rows/s (median)": n_rows / median})
    base = runs["pandas"]["median_seconds"]
    for row in rows:
        row["vs pandas"] = f"{base / row['median s']:.2f}x"

    result = {
        "benchmark": "preprocess_ml1m",
        "command": command_line(),
        "git_commit": git_commit(),
        "date": started,
        "machine": info,
        "data": {"dir": source, "interactions": n_rows, "max_length": args.max_length},
        "repeats": args.repeats,
        "note": "rows = input interactions; one untimed warm-up per method; NVTabular runs in CPU mode (pandas "
                "backend). 'pandas' is the same output written by this script; 'same_output' is checked "
                "user by user on raw item ids before timing.",
        "same_output": check,
        "runs": runs,
        "speed_ratio_pandas_over": {k: round(base / v["median_seconds"], 3) for k, v in runs.items()},
    }
    path = write_result(args.output, result)
    print(table(rows, ["method", "median s", "min s", "max s", "rows/s (median)", "vs pandas"]))
    print(f"\nsame output: {check}")
    print(f"{n_rows:,} interactions, {args.repeats} repeats, {info['cpu_model']} ({info['logical_cpus']} CPUs)")
    print(f"wrote {path}")
    return result


def item_id_mapping_from(prepared) -> pd.Series:
    return item_id_mapping(prepared.load_workflow())


if __name__ == "__main__":
    main()
