"""Readers that turn real-world inputs into the two canonical tables every later step consumes.

* interactions: ``user_id``, ``item_id``, ``timestamp`` (int64 seconds or any monotone integer)
* items: ``item_id`` plus text columns (``title``, ``genres``, ...) and an optional ``image`` column
  holding an absolute image path (``None`` where the item has no image)

One reader per input format; :func:`read_dataset` picks one from what the directory holds.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from merlin_molar.errors import MolarDataError

INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp"]
LOG = logging.getLogger(__name__)
REPORT_FIRST = 20


@dataclass
class RawDataset:
    """Canonical interactions + items, and where they came from."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    source: str
    text_columns: List[str] = field(default_factory=list)
    identifier_columns: List[str] = field(default_factory=list)  # kept out of the default text (codes, urls)

    @property
    def has_images(self) -> bool:
        return "image" in self.items and self.items["image"].notna().any()


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise MolarDataError(path, "file not found")
    if path.stat().st_size == 0:
        raise MolarDataError(path, "file is empty")
    return path


def _read_csv(path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures (not text, not UTF-8, malformed rows) name the file."""
    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError as e:
        raise MolarDataError(
            path, f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}): save it as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise MolarDataError(path, "no data (empty or only blank lines)") from None
    except (pd.errors.ParserError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise MolarDataError(path, f"not a readable {kwargs.get('sep', ',')!r}-separated file ({reason})") from None


def _read_parquet(path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for damaged or foreign files
        raise MolarDataError(path, f"not a readable parquet file ({' '.join(str(e).split())[:200]})") from None


def _warn_odd_ids(col: pd.Series, name: str, source) -> None:
    """Warn about ids that are kept but are probably a mistake: negative numbers, blanks around the id,
    non-integer numbers, a mix of numbers and text (all then read as text, so '7' and '07' differ)."""
    values = pd.Series(col.unique())
    problems = []
    if pd.api.types.is_integer_dtype(values):
        negative = values[values < 0]
        if len(negative):
            problems.append((f"{len(negative)} negative {name}(s)", negative))
    else:
        text = values.astype(str)
        padded = values[text != text.str.strip()]
        if len(padded):
            problems.append((f"{len(padded)} {name}(s) with blanks around them", padded))
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().any() and numeric.isna().any():
            problems.append((f"a mix of numeric and non-numeric {name}s (all read as text)", values[numeric.isna()]))
        elif numeric.notna().all():
            problems.append((f"{len(values)} non-integer numeric {name}(s) (read as text)", values))
    for what, examples in problems:
        LOG.warning("%s: %s, e.g. %s: kept as they are; check the file", source, what,
                    examples.head(5).tolist())


def _require_columns(df: pd.DataFrame, columns, source) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MolarDataError(source, f"missing column(s) {missing}; found {list(df.columns)}")


def validate_interactions(df: pd.DataFrame, source) -> pd.DataFrame:
    """Check and normalise an interactions frame to the canonical columns and dtypes."""
    _require_columns(df, INTERACTION_COLUMNS, source)
    df = df[INTERACTION_COLUMNS].copy()
    if df.empty:
        raise MolarDataError(source, "no interactions (empty table)")
    for col in ("user_id", "item_id"):
        if df[col].isna().any():
            raise MolarDataError(source, f"{int(df[col].isna().sum())} rows have an empty {col}")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    if ts.isna().any():
        ts = _timestamps_from_dates(df["timestamp"], ts, source)
    df["timestamp"] = ts.astype("int64")
    for col in ("user_id", "item_id"):
        df[col] = _as_id(df[col], source)
        _warn_odd_ids(df[col], col, source)
    duplicated = df.duplicated(INTERACTION_COLUMNS)
    if duplicated.any():
        # an exact repeat puts a test target into its own history; repeats at other times are kept
        LOG.warning(
            "%s: %d duplicate (user_id, item_id, timestamp) row(s) dropped, e.g. %s; repeat interactions at "
            "different times are kept", source, int(duplicated.sum()),
            df.loc[duplicated, INTERACTION_COLUMNS].head(3).values.tolist(),
        )
        df = df[~duplicated]
    return df.reset_index(drop=True)


def _timestamps_from_dates(col: pd.Series, numeric: pd.Series, source) -> pd.Series:
    """Dates and times (ISO 8601, as most exported logs write them: ``2024-03-01T12:30:00Z``; no zone = UTC)
    as integer seconds since 1970, or nanoseconds when some carry fractions of a second (only the order
    matters). Numbers and dates mixed, or values that are neither, are refused by example."""
    if numeric.notna().any():
        bad = col[numeric.isna()].head(3).tolist()
        raise MolarDataError(source, f"timestamp: numbers mixed with non-numbers, e.g. {bad}: use one kind")
    text = col.astype(str).str.strip()
    # parsed apart: in one call pandas gives naive values the zone of the zoned ones (pandas 2.3)
    zoned = text.str.contains(r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$", case=False)
    dates = pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns, UTC]")
    for part in (zoned, ~zoned):
        if part.any():
            dates[part] = pd.to_datetime(text[part], errors="coerce", utc=True, format="ISO8601")
    if dates.isna().any():
        bad = col[dates.isna()].head(3).tolist()
        raise MolarDataError(source, f"timestamp: {int(dates.isna().sum())} value(s) neither a number nor an "
                                     f"ISO 8601 date, e.g. {bad}")
    nanoseconds = (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ns")
    whole_seconds = (nanoseconds % 10**9 == 0).all()
    return nanoseconds // 10**9 if whole_seconds else nanoseconds


def validate_items(df: pd.DataFrame, source, text_columns: List[str]) -> pd.DataFrame:
    """Check an item table: an ``item_id`` column, unique ids, and at least one content column."""
    _require_columns(df, ["item_id"], source)
    if df.empty:
        raise MolarDataError(source, "no items (empty table)")
    df = df.copy()
    df["item_id"] = _as_id(df["item_id"], source)
    dup = df["item_id"][df["item_id"].duplicated()]
    if len(dup):
        raise MolarDataError(source, f"{len(dup)} duplicate item id(s), e.g. {dup.head(3).tolist()}")
    content = [c for c in text_columns if c in df.columns] + (["image"] if "image" in df else [])
    if not content:
        raise MolarDataError(source, f"no content columns: expected some of {text_columns + ['image']}")
    if "image" not in df:
        df["image"] = None
    return df.reset_index(drop=True)


def _as_id(col: pd.Series, source=None) -> pd.Series:
    """Integer ids stay int64; anything else becomes a string id. Integer ids with a few non-integer numbers
    among them (``1.5`` in a column of ``168``, ...) are refused naming those: read as text, every id would
    change (``168`` becoming ``'168.0'``) and match nothing in the other table."""
    if pd.api.types.is_integer_dtype(col):
        return col.astype("int64")
    numeric = pd.to_numeric(col, errors="coerce")
    whole = numeric == np.floor(numeric)
    if numeric.notna().all() and whole.all():
        return numeric.astype("int64")
    if pd.api.types.is_float_dtype(col) and whole.any():
        odd = col[~whole]
        lines = (odd.index[:5] + 2).tolist()  # the header is line 1
        raise MolarDataError(
            source or col.name,
            f"{col.name}: {len(odd)} non-integer value(s) among integer ids, e.g. {odd.head(5).tolist()} (line(s) "
            f"{lines}): ids must all be integers, or all text; fix or remove those rows",
        )
    return col.astype(str)


def _resolve_images(items: pd.DataFrame, root: Path) -> pd.DataFrame:
    def resolve(p):
        if p is None or (isinstance(p, float) and np.isnan(p)) or str(p).strip() == "":
            return None
        p = Path(str(p))
        return str(p if p.is_absolute() else (root / p).resolve())

    items = items.copy()
    items["image"] = items["image"].map(resolve)
    return items


def read_csv_layout(root: Path) -> RawDataset:
    """The ``interactions.csv`` + ``items.csv`` layout (e.g. ``../shared/data/ml-1m``)."""
    inter_path = _require_file(root / "interactions.csv")
    items_path = _require_file(root / "items.csv")
    interactions = validate_interactions(_read_csv(inter_path), inter_path)
    items = _read_csv(items_path, keep_default_na=False, na_values={"image": [""]})
    # every column but the id, the image and identifiers is item text, in file order (numbers too: "price: 12.99")
    text, identifiers = _without_identifiers(items, [c for c in items.columns if c not in ("item_id", "image")])
    if "clean_title" in text and "title" in text:
        text.remove("title")  # MovieLens: the clean title without the year; the year is its own field
    items = _text_as_strings(items, text)
    items = validate_items(items, items_path, text)
    return RawDataset(interactions, _resolve_images(items, root), str(root), text, identifiers)


IDENTIFIER_NAME = re.compile(r"(^|_)(id|asin|sku|isbn|ean|upc|uuid|guid|url|uri)$", re.IGNORECASE)


def _looks_like_identifier(col: pd.Series) -> bool:
    """A distinct value per item that names it rather than describes it: by its column name (``asin``,
    ``imdb_id``, ``url``, ...), or as text with no blank in it and a digit in every value (``B00004Z5M1``)."""
    values = col.dropna()
    if len(values) < 2 or values.nunique() != len(values):
        return False
    if IDENTIFIER_NAME.search(str(col.name)):
        return True
    if pd.api.types.is_numeric_dtype(values):
        return False
    text = values.astype(str)
    return not text.str.contains(r"\s").any() and text.str.contains(r"\d").all()


def _without_identifiers(items: pd.DataFrame, columns: List[str]):
    """``(text columns, identifier columns)``: ``columns`` split; all of them stay text if all look like ids."""
    identifiers = [c for c in columns if _looks_like_identifier(items[c])]
    if len(identifiers) == len(columns):
        return list(columns), []
    return [c for c in columns if c not in identifiers], identifiers


def read_movielens_dat(root: Path) -> RawDataset:
    """Original GroupLens MovieLens-1M files: ``ratings.dat`` and ``movies.dat`` (``::``-separated)."""
    ratings = _require_file(root / "ratings.dat")
    movies = _require_file(root / "movies.dat")
    inter = _read_csv(
        ratings, sep="::", engine="python", names=["user_id", "item_id", "rating", "timestamp"], encoding="latin-1"
    )
    items = _read_csv(movies, sep="::", engine="python", names=["item_id", "title", "genres"], encoding="latin-1")
    items["genres"] = items["genres"].str.replace("|", ", ", regex=False)
    images = root / "images"
    if images.is_dir():
        items["image"] = [str(images / f"{i}.jpg") if (images / f"{i}.jpg").exists() else None for i in items.item_id]
    text = ["title", "genres"]
    return RawDataset(validate_interactions(inter, ratings), validate_items(items, movies, text), str(root), text)


def read_movielens_100k(root: Path) -> RawDataset:
    """Original GroupLens ML-100K files: ``u.data`` (tab-separated) and ``u.item`` (``|``-separated)."""
    ratings = _require_file(root / "u.data")
    movies = _require_file(root / "u.item")
    inter = _read_csv(ratings, sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    genre_names = [
        "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
        "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
    ]
    items = _read_csv(
        movies, sep="|", encoding="latin-1", header=None,
        names=["item_id", "title", "release_date", "video_release_date", "url", *genre_names],
    )
    flags = items[genre_names].to_numpy().astype(bool)
    items["genres"] = [", ".join(g for g, on in zip(genre_names, row) if on) for row in flags]
    items = items[["item_id", "title", "genres"]]
    text = ["title", "genres"]
    return RawDataset(validate_interactions(inter, ratings), validate_items(items, movies, text), str(root), text)


def _read_atomic(path: Path) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header fields written ``name:type``."""
    df = _read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def read_recbole(root: Path) -> RawDataset:
    """RecBole atomic files: ``<name>.inter`` (+ ``<name>.item``) in one directory."""
    inters = sorted(root.glob("*.inter"))
    if not inters:
        raise MolarDataError(root, "no RecBole .inter file")
    inter_path = _require_file(inters[0])
    inter = _read_atomic(inter_path)
    inter = inter.rename(columns={"timestamp": "timestamp"})
    item_path = inter_path.with_suffix(".item")
    if item_path.exists():
        items = _read_atomic(item_path)
        text = [c for c in items.columns if c not in ("item_id",) and not c.endswith("_id")]
    else:
        raise MolarDataError(item_path, "file not found (a RecBole .item file with item content is required)")
    return RawDataset(validate_interactions(inter, inter_path), validate_items(items, item_path, text), str(root), text)


def _read_json_lines(path: Path) -> List[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MolarDataError(path, f"line {n} is not JSON ({e.msg})") from None
    return rows


def read_amazon(reviews: Path, meta: Path, image_dir: Optional[Path] = None) -> RawDataset:
    """Amazon review JSON lines (``reviewerID``/``user_id``, ``asin``/``parent_asin``, ``unixReviewTime``/
    ``timestamp``) with product metadata JSON lines (``asin``/``parent_asin``, ``title``, ``description``,
    ``categories``/``category``, ``brand``, ``price``). Images are read from ``image_dir/<asin>.jpg``."""
    _require_file(reviews)
    _require_file(meta)
    inter = pd.DataFrame(_read_json_lines(reviews))
    inter = inter.rename(
        columns={"reviewerID": "user_id", "asin": "item_id", "parent_asin": "item_id", "unixReviewTime": "timestamp"}
    )
    inter = inter.loc[:, ~inter.columns.duplicated()]
    items = pd.DataFrame(_read_json_lines(meta))
    items = items.rename(columns={"asin": "item_id", "parent_asin": "item_id", "category": "categories"})
    items = items.loc[:, ~items.columns.duplicated()]
    for col in ("description", "categories", "features", "feature"):
        if col in items:
            items[col] = items[col].map(_flatten_text)
    text = [c for c in ("title", "brand", "categories", "price", "description") if c in items.columns]
    if image_dir is not None:
        items["image"] = [
            str(image_dir / f"{i}.jpg") if (image_dir / f"{i}.jpg").exists() else None for i in items.item_id
        ]
    inter = validate_interactions(inter, reviews)
    if inter["timestamp"].max() > 10**11:  # the 2023 dump stores milliseconds
        inter["timestamp"] //= 1000
    return RawDataset(inter, validate_items(items, meta, text), str(reviews.parent), text)


def _text_as_strings(items: pd.DataFrame, text_columns: List[str]) -> pd.DataFrame:
    """Text columns as strings, numbers written as they are in the file (1995, not 1995.0); empty stays empty."""
    items = items.copy()
    for col in text_columns:
        values = items[col]
        if pd.api.types.is_float_dtype(values) and (values.dropna() == values.dropna().round()).all():
            values = values.astype("Int64")
        items[col] = values.astype("string").fillna("")
    return items


def select_text_columns(raw: RawDataset, text_columns: Optional[Sequence[str]]) -> RawDataset:
    """``raw`` with the item text restricted to ``text_columns`` (in that order), e.g. from ``--text-columns``."""
    if not text_columns:
        return raw
    missing = [c for c in text_columns if c not in raw.items.columns]
    if missing:
        raise MolarDataError(
            "--text-columns", f"unknown column(s) {missing}; the item table has {list(raw.items.columns)}"
        )
    return RawDataset(raw.interactions, _text_as_strings(raw.items, list(text_columns)), raw.source,
                      list(text_columns))


def _flatten_text(value) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_flatten_text(v) for v in value if v is not None and str(v).strip())
    return "" if value is None else str(value)


def read_table(
    interactions: Path,
    items: Path,
    column_map: Optional[Dict[str, str]] = None,
    text_columns: Optional[List[str]] = None,
    image_root: Optional[Path] = None,
) -> RawDataset:
    """Generic CSV or parquet files; ``column_map`` renames source columns to the canonical names,
    e.g. ``{"uid": "user_id", "sku": "item_id", "ts": "timestamp", "img": "image"}``."""
    column_map = column_map or {}
    inter = _read_any(interactions).rename(columns=column_map)
    item_df = _read_any(items).rename(columns=column_map)
    text, identifiers = text_columns, []
    if not text:
        text, identifiers = _without_identifiers(
            item_df, [c for c in item_df.columns if c not in ("item_id", "image") and item_df[c].dtype == object])
    item_df = validate_items(item_df, items, text)
    if image_root is not None or "image" in item_df:
        item_df = _resolve_images(item_df, image_root or items.parent)
    return RawDataset(validate_interactions(inter, interactions), item_df, str(interactions.parent), text,
                      identifiers)


def _read_any(path: Path) -> pd.DataFrame:
    _require_file(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix in (".csv", ".txt"):
        return _read_csv(path)
    if path.suffix == ".tsv":
        return _read_csv(path, sep="\t")
    raise MolarDataError(path, f"unsupported file type {path.suffix!r} (use .csv, .tsv or .parquet)")


_DETECTORS: List[tuple] = [
    ("csv", lambda r: (r / "interactions.csv").exists(), read_csv_layout),
    ("movielens-dat", lambda r: (r / "ratings.dat").exists(), read_movielens_dat),
    ("movielens-100k", lambda r: (r / "u.data").exists(), read_movielens_100k),
    ("recbole", lambda r: any(r.glob("*.inter")), read_recbole),
]


def read_dataset(path, fmt: str = "auto", text_columns: Optional[Sequence[str]] = None) -> RawDataset:
    """Read a dataset directory in one of the supported layouts (``auto`` detects it). The item text is
    every text column of the item table but identifiers (codes, urls: a warning names them) unless
    ``text_columns`` names the columns to use."""
    raw = _read_layout(path, fmt)
    if not text_columns and raw.identifier_columns:
        LOG.warning("%s: column(s) %s look like identifiers (a distinct code per item) and are left out of the "
                    "item text; name them in --text-columns to embed them", raw.source, raw.identifier_columns)
    return select_text_columns(raw, text_columns)


def _read_layout(path, fmt: str) -> RawDataset:
    root = Path(os.path.expanduser(str(path))).resolve()
    if not root.exists():
        raise MolarDataError(root, "dataset directory not found")
    if not root.is_dir():
        raise MolarDataError(root, "expected a dataset directory")
    readers: Dict[str, Callable] = {name: fn for name, _, fn in _DETECTORS}
    if fmt != "auto":
        if fmt not in readers:
            raise MolarDataError(root, f"unknown format {fmt!r}; choose one of {sorted(readers)}")
        return readers[fmt](root)
    for _, detect, reader in _DETECTORS:
        if detect(root):
            return reader(root)
    raise MolarDataError(
        root, "no known layout: expected interactions.csv + items.csv, ratings.dat + movies.dat, or a RecBole .inter"
    )
