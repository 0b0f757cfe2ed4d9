"""A small synthetic catalogue with learnable structure, in the ``interactions.csv`` + ``items.csv`` layout.

Items belong to genres; their titles and genre fields name the genre, and (optionally) their images are
genre-coloured squares, so a content encoder can tell genres apart. Each user prefers a few genres and
walks through them in item order, so both an ID model (item-to-item transitions) and a content model
(genre affinity) have something to learn. Used by the fast unit tests and to try the CLI without data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from merlin_molar.data.readers import RawDataset, read_csv_layout

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Western", "Documentary"]
COLOURS = [(200, 30, 30), (240, 200, 20), (40, 40, 160), (10, 10, 10), (230, 120, 170), (30, 180, 200),
           (150, 90, 30), (90, 160, 60)]
WORDS = ["night", "river", "city", "storm", "garden", "letter", "road", "island", "winter", "machine"]


def product_code(item_id: int) -> str:
    """A 10-character Amazon-style product code (ASIN-like, e.g. ``B00004Z5M1``) for an integer id."""
    digits, n = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", int(item_id) * 7919 + 4649
    code = ""
    while n:
        n, r = divmod(n, 36)
        code = digits[r] + code
    return "B" + code.rjust(9, "0")


def synthetic_frames(n_users: int = 300, n_items: int = 120, length: int = 12, seed: int = 0,
                     string_ids: bool = False):
    """``(interactions, items)`` data frames: raw ids, timestamps, titles, genres.

    ``string_ids``: item ids are product codes such as ``B0000006OV`` (:func:`product_code`) instead of integers,
    as in most real catalogues."""
    rng = np.random.default_rng(seed)
    genre_of = np.arange(n_items) % len(GENRES)
    names = [f"The {WORDS[i % len(WORDS)]} of {GENRES[g].lower()} {i}" for i, g in enumerate(genre_of)]
    years = 1970 + np.arange(n_items) % 40
    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1) * 10,
        "title": [f"{name} ({year})" for name, year in zip(names, years)],
        "clean_title": names,
        "year": years,
        "genres": [GENRES[g] for g in genre_of],
    })
    by_genre = [np.flatnonzero(genre_of == g) for g in range(len(GENRES))]
    rows = []
    for user in range(n_users):
        liked = rng.choice(len(GENRES), size=2, replace=False)
        n = int(rng.integers(max(3, length // 2), length + 1))
        cursor = {g: int(rng.integers(len(by_genre[g]))) for g in liked}
        seen = set()
        while len(seen) < n:
            g = liked[0] if rng.random() < 0.7 else liked[1]
            pool = by_genre[g]
            item = int(pool[cursor[g] % len(pool)]) if rng.random() < 0.8 else int(rng.integers(n_items))
            cursor[g] += 1
            if item in seen:
                continue
            seen.add(item)
            rows.append((user + 1, int(items["item_id"].iloc[item]), 1_000_000 + user * 1000 + len(seen), 4.0))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    if string_ids:
        items["item_id"] = items["item_id"].map(product_code)
        interactions["item_id"] = interactions["item_id"].map(product_code)
    return interactions, items


def write_synthetic_dataset(root, n_users: int = 300, n_items: int = 120, length: int = 12, seed: int = 0,
                            images: bool = False, image_size: int = 32, string_ids: bool = False) -> Path:
    """Write the dataset under ``root`` (created); with ``images``, one PNG per item under ``root/images``;
    with ``string_ids``, product-code item ids (see :func:`synthetic_frames`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    interactions, items = synthetic_frames(n_users, n_items, length, seed, string_ids)
    if images:
        from PIL import Image

        (root / "images").mkdir(exist_ok=True)
        paths = []
        for item_id, genre in zip(items["item_id"], items["genres"]):
            path = f"images/{item_id}.png"
            Image.new("RGB", (image_size, image_size), COLOURS[GENRES.index(genre)]).save(root / path)
            paths.append(path)
        items["image"] = paths
    interactions.to_csv(root / "interactions.csv", index=False)
    items.to_csv(root / "items.csv", index=False)
    return root


def synthetic_dataset(root, images: bool = False, **kwargs) -> RawDataset:
    """Write the dataset under ``root`` and read it back through the csv-layout reader."""
    return read_csv_layout(write_synthetic_dataset(root, images=images, **kwargs))


def main(argv: Optional[list] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a small synthetic dataset in the csv layout.")
    parser.add_argument("output")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--images", action="store_true")
    parser.add_argument("--string-ids", action="store_true", help="product codes (e.g. B0000006OV) as item ids")
    args = parser.parse_args(argv)
    print(write_synthetic_dataset(args.output, args.users, args.items, images=args.images, string_ids=args.string_ids))


if __name__ == "__main__":
    main()
