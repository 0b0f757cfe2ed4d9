"""What the item tables know before any training: content-only diagnostics of item tables of one prepared catalogue.

For each table (``NAME=PATH``), and for each join of a text table with an image table built here both ways
(``TEXT+IMAGE`` given as ``--joins``: per-modality L2 normalisation, the encoder's rule; per-modality centring on
the catalogue mean, then L2; and per-modality PCA whitening fitted on the catalogue):

* ``sequel_at_1``: of the films with a franchise partner in the catalogue (another film whose clean title starts
  with this one's, or this one's with it, followed by a number, ``:`` or ``Part``: Toy Story / Toy Story 2,
  Godfather / Godfather: Part II; partners of partners count), how often the nearest other film (cosine after
  centring) is a partner; films without a vector (zero rows) are left out.
* ``knn_test_ndcg@10`` / ``recall@10``: content kNN next-item prediction on the test split (score = cosine of each
  item to the user's last history item, history masked, full ranking), the cold-start baseline's scorer.

    python benchmarks/content_neighbours.py --prepared outputs/quality/ml-1m/prepared_L50 \\
        --tables minilm=.../item_table smollm2=.../item_table_smollm2 ... --joins minilm+efficientnet-lite0
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import command_line, git_commit, machine, now, table, write_result  # noqa: E402
from merlin_molar.data import load_prepared  # noqa: E402
from merlin_molar.evaluation import mask_seen_items, reference_metrics  # noqa: E402
from merlin_molar.items import load_item_table  # noqa: E402
from merlin_molar.items.fusion import fit_join, join_parts  # noqa: E402

FIRST = 3


def franchise_partners(prepared) -> dict:
    """item id -> set of ids of its franchise partners (see the module docstring)."""
    items = prepared.items()
    titles = {int(i): re.sub(r",\s*(the|a|an)$", "", str(t).strip().lower())  # "Godfather: Part II, The"
              for i, t in zip(items["item_id"], items["clean_title"])}
    by_title = sorted(titles.items(), key=lambda kv: kv[1])
    partners = {i: set() for i in titles}
    follow = re.compile(r"^(\s+\d|\s+(part|ii|iii|iv|v)\b|\s*:)")
    for i, a in by_title:
        if len(a) < 3:
            continue
        for j, b in by_title:
            if i != j and b.startswith(a) and follow.match(b[len(a):]):
                partners[i].add(j)
                partners[j].add(i)
    groups = {}  # a franchise: the films connected by that relation (Rocky II and Rocky III through Rocky)
    for i in partners:
        if i in groups or not partners[i]:
            continue
        group, todo = set(), [i]
        while todo:
            j = todo.pop()
            if j not in group:
                group.add(j)
                todo.extend(partners[j])
        for j in group:
            groups[j] = group - {j}
    return groups


def centred_unit(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    y = x[rows] - x[rows].mean(0)
    out[rows] = torch.nn.functional.normalize(y, dim=1)
    return out


def sequel_at_1(table: torch.Tensor, partners: dict) -> dict:
    has = table.abs().sum(1) > 0
    has[:FIRST] = False
    rows = torch.nonzero(has).squeeze(1)
    x = centred_unit(table.float(), rows)
    sims = x @ x.T
    sims[:, ~has] = float("-inf")
    sims.fill_diagonal_(float("-inf"))
    asked = [i for i, p in partners.items() if has[i] and any(has[j] for j in p)]
    hits = sum(int(sims[i].argmax()) in partners[i] for i in asked)
    return {"sequel_at_1": round(hits / len(asked), 4), "films_with_partner": len(asked)}


def knn_test(table: torch.Tensor, prepared) -> dict:
    from merlin_molar.data.workflow import ITEM_SEQUENCE

    test = prepared.split_frame("test")
    sequences = [np.asarray(s, dtype=np.int64) for s in test[ITEM_SEQUENCE]]
    histories = torch.zeros(len(sequences), prepared.max_length, dtype=torch.long)
    for row, sequence in enumerate(sequences):  # the last item is the target
        history = torch.from_numpy(sequence[:-1][-prepared.max_length:].copy())
        histories[row, : len(history)] = history
    targets = torch.tensor([int(s[-1]) for s in sequences])
    normed = torch.nn.functional.normalize(table.float(), dim=1)
    totals = {}
    for start in range(0, len(targets), 1024):
        h, t = histories[start:start + 1024], targets[start:start + 1024]
        last = h.gather(1, ((h != 0).sum(1) - 1).clamp(min=0).view(-1, 1)).squeeze(1)
        scores = mask_seen_items(normed[last] @ normed.T, h, t)
        for k, v in reference_metrics(scores, t, (10,)).items():
            totals[k] = totals.get(k, 0.0) + float(v.sum())
    return {"knn_test_ndcg@10": round(totals["ndcg_at_10"] / len(targets), 4),
            "knn_test_recall@10": round(totals["recall_at_10"] / len(targets), 4)}


def joined(text: torch.Tensor, image: torch.Tensor, how: str) -> torch.Tensor:
    """The two tables joined as :mod:`merlin_molar.items.fusion` does (``l2``, ``whitened``: its statistics fitted
    on these rows), or each part centred on the catalogue mean then L2-normalised (``centred``, a diagnostic only).
    Rows without a text vector stay zero; rows without an image vector get a zero image part."""
    has_text = (text.abs().sum(1) > 0).numpy()
    has_image = (image.abs().sum(1) > 0).numpy()
    if how == "centred":
        rows = torch.nonzero(torch.from_numpy(has_text)).squeeze(1)
        image_rows = torch.nonzero(torch.from_numpy(has_image)).squeeze(1)
        return torch.cat([centred_unit(text.float(), rows), centred_unit(image.float(), image_rows)], 1) / np.sqrt(2)
    raw = torch.cat([text, image], dim=1).numpy()[has_text]
    used = has_image[has_text]
    statistics = fit_join(raw, used, text.shape[1]) if how == "whitened" else None
    out = torch.zeros(len(text), raw.shape[1])
    out[torch.from_numpy(has_text)] = torch.from_numpy(join_parts(raw, used, text.shape[1], statistics))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--tables", nargs="+", required=True, help="NAME=PATH of item tables of --prepared")
    parser.add_argument("--joins", nargs="*", default=[],
                        help="TEXT+IMAGE names of --tables, joined three ways: l2 / centred / whitened")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepared = load_prepared(args.prepared)
    partners = franchise_partners(prepared)
    tables = {name: load_item_table(path, prepared) for name, path in (t.split("=", 1) for t in args.tables)}
    for spec in args.joins:
        text, image = spec.split("+", 1)
        for how in ("l2", "centred", "whitened"):
            tables[f"{spec} ({how}, built here)"] = joined(tables[text], tables[image], how)
    rows = []
    for name, t in tables.items():
        row = {"table": name, "dim": t.shape[1], "rows_with_vector": int((t[FIRST:].abs().sum(1) > 0).sum())}
        row.update(sequel_at_1(t, partners))
        row.update(knn_test(t, prepared))
        rows.append(row)
        print(row, flush=True)
    print(table(rows, list(rows[0])))
    if args.output:
        print("wrote", write_result(args.output, {
            "benchmark": "content_neighbours", "command": command_line(), "git_commit": git_commit(),
            "machine": machine(), "date": now(), "prepared": args.prepared, "rows": rows}))


if __name__ == "__main__":
    main()
