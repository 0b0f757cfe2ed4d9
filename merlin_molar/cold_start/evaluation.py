"""The cold-start evaluation: full ranking over the extended catalogue (history masked), with metrics reported
separately for users whose test target is cold and users whose target is warm, for a model and for three
baselines scored in the same run (random, popularity, content kNN of the last item)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from merlin_molar.cold_start.extension import model_for_catalogue
from merlin_molar.cold_start.prior import WARM_COST_BUDGET, estimate_new_item_prior, histories_and_targets
from merlin_molar.cold_start.scorers import (
    content_knn_scorer,
    first_items_scorer,
    known_items_scorer,
    model_scorer,
    popularity_scorer,
    random_scorer,
)
from merlin_molar.data.holdout import COLD_ITEMS_FILE, COLD_TARGETS_FILE
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE, OOV_ID
from merlin_molar.models.catalogue import trained_cardinality
from merlin_molar.progress import progress_bar


def cold_test_split(prepared) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(histories [users, max_length] left-aligned, targets [users], is_cold [users])`` of the test split,
    with each cold target re-encoded through the prepared (extended) vocabulary."""

    from merlin_molar.data.workflow import item_id_mapping

    manifest = prepared.manifest
    if "cold_start" not in manifest:
        raise MolarDataError(prepared.root, "was not prepared with a cold-item hold-out (prepare --cold-items)")
    test = prepared.split_frame("test").sort_values("user_id").reset_index(drop=True)
    sequences = [np.asarray(s, dtype=np.int64) for s in test[ITEM_SEQUENCE]]
    cold = pd.read_parquet(prepared.root / COLD_TARGETS_FILE)
    mapping = item_id_mapping(prepared.load_workflow())
    missing = sorted(set(cold["item_id_raw"]) - set(mapping.index))
    if missing:
        raise MolarDataError(
            prepared.root,
            f"{len(missing)} cold item(s) are not in the vocabulary yet, e.g. {missing[:5]}: run "
            f"`merlin-molar add-items --prepared {prepared.root} --items {prepared.root / COLD_ITEMS_FILE}` first",
        )
    row_of = {u: i for i, u in enumerate(test["user_id"].tolist())}
    is_cold = np.zeros(len(test), dtype=bool)
    for user, raw in zip(cold["user_id"].tolist(), cold["item_id_raw"].tolist()):
        i = row_of[user]
        if sequences[i][-1] != OOV_ID:
            raise MolarDataError(prepared.root / "test", f"user {user}: the cold target is not the OOV id")
        sequences[i] = sequences[i].copy()
        sequences[i][-1] = int(mapping[raw])
        is_cold[i] = True
    if (np.array([s[-1] for s in sequences]) == OOV_ID).any():
        raise MolarDataError(prepared.root / "test", "a test target is out of vocabulary but not a cold item")
    histories, targets = histories_and_targets(sequences, prepared.max_length)
    return histories, targets, torch.from_numpy(is_cold)
OFFSET_GRID = tuple(float(b) for b in np.round(np.arange(-6.0, 2.0001, 0.1), 2))


def warm_cost_tradeoff(
    prepared, scorers: Dict[str, Callable], known: int, offsets: Sequence[float] = OFFSET_GRID,
    budget: float = WARM_COST_BUDGET, items: int = None, batch_size: int = 512, progress: bool = True,
) -> Dict[str, dict]:
    """What each way of scoring new items buys in cold hits for what it costs the warm targets, over the test
    split: for every scorer of the extended catalogue and every offset ``b`` added to the new items' scores,
    the cold targets' hits@10 and recall@10, and the warm targets' NDCG@10 against the same scorer ranking only
    the ``known`` items (what the requirement's warm cost compares with). ``best_within_budget`` is the point
    of the curve with the most cold hits at a warm cost of at most ``budget``. ``cold_recall@10_among_new_items``
    (and the median rank, 1 = first) ranks each cold target among the new items alone: how well the scorer
    orders the new items for a user, which no offset changes, apart from where they land among the known ones.

    The offsets are swept on the test split, so every point is an oracle choice: this is a measurement of the
    frontier each scorer can reach, never a way to set the prior (:func:`estimate_new_item_prior` does that on
    validation data)."""
    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    histories, targets, is_cold = cold_test_split(prepared)
    width = prepared.item_cardinality if items is None else int(items)
    new_col = torch.arange(width) >= known
    n_cold, n_warm = int(is_cold.sum()), int((~is_cold).sum())
    out = {}
    for name, scorer in scorers.items():
        cold_hits, warm_ndcg, warm_ndcg_old = np.zeros(len(offsets)), np.zeros(len(offsets)), 0.0
        rank_among_new = []  # each cold target's rank among the new items alone (no offset moves it)
        starts = range(0, len(targets), batch_size)
        for start in progress_bar(len(starts), iterable=starts, desc=f"warm-cost trade-off [{name}]",
                                  disable=not progress):
            h, t = histories[start : start + batch_size], targets[start : start + batch_size]
            cold = is_cold[start : start + batch_size]
            scores = mask_seen_items(scorer(h)[:, :width].float(), h, t)
            old = reference_metrics(scores.masked_fill(new_col, float("-inf")), t, (10,))
            warm_ndcg_old += float(old["ndcg_at_10"][~cold].sum())
            if cold.any():
                new_scores, target = scores[cold][:, known:], t[cold] - known
                rank_among_new.append((new_scores > new_scores.gather(1, target.view(-1, 1))).sum(1))
            for j, b in enumerate(offsets):
                m = reference_metrics(scores + b * new_col, t, (10,))
                cold_hits[j] += float(m["recall_at_10"][cold].sum())
                warm_ndcg[j] += float(m["ndcg_at_10"][~cold].sum())
        warm_ndcg, warm_ndcg_old = warm_ndcg / max(n_warm, 1), warm_ndcg_old / max(n_warm, 1)
        curve = [{"offset": float(b), "cold_hits@10": int(round(cold_hits[j])),
                  "cold_recall@10": float(cold_hits[j] / max(n_cold, 1)), "warm_ndcg@10": float(warm_ndcg[j]),
                  "warm_cost": float(1 - warm_ndcg[j] / warm_ndcg_old) if warm_ndcg_old > 0 else 0.0}
                 for j, b in enumerate(offsets)]
        within = [c for c in curve if c["warm_cost"] <= budget + 1e-12]
        best = max(within, key=lambda c: (c["cold_hits@10"], -c["warm_cost"])) if within else None
        ranks = torch.cat(rank_among_new) if rank_among_new else torch.zeros(0, dtype=torch.long)
        out[name] = {"cold_users": n_cold, "warm_users": n_warm, "warm_ndcg@10_known_items_only": warm_ndcg_old,
                     "new_items": int(width - known),
                     "cold_recall@10_among_new_items": float((ranks < 10).float().mean()) if len(ranks) else None,
                     "cold_median_rank_among_new_items": float(ranks.float().median()) + 1 if len(ranks) else None,
                     "best_within_budget": best, "curve": curve}
    return out


def evaluate_cold_start(
    prepared,
    scorers: Dict[str, Callable],
    top_ks=(10, 20, 50),
    batch_size: int = 256,
    progress: bool = True,
    known_items: int = None,
    items: int = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{scorer: {"cold"|"warm"|"all": {"recall@K", "ndcg@K", "hits@K", "users"}}}`` over the test split, full
    ranking of the prepared catalogue (its first ``items`` ids when given), reserved ids and history masked
    (the target never); ``hits@K`` counts the users whose target is in their top K. With ``known_items``
    (the catalogue size before the new items), each group also reports ``new_item_share@10``: the fraction
    of its top-10 slots taken by new items."""
    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    histories, targets, is_cold = cold_test_split(prepared)
    width = prepared.item_cardinality if items is None else int(items)
    if int(targets.max()) >= width:
        raise MolarDataError(prepared.root, f"a test target is not among the first {width} items")
    results = {}
    for name, scorer in scorers.items():
        per_user: Dict[str, list] = {}
        starts = range(0, len(targets), batch_size)
        for start in progress_bar(len(starts), iterable=starts, desc=f"cold-start eval [{name}]", disable=not progress):
            h, t = histories[start : start + batch_size], targets[start : start + batch_size]
            scores = scorer(h)
            if scores.size(1) != width:
                raise MolarDataError(name, f"scored {scores.size(1)} items, the catalogue has {width}")
            scores = mask_seen_items(scores, h, t)
            for key, value in reference_metrics(scores, t, top_ks).items():
                per_user.setdefault(key, []).append(value)
            if known_items is not None:
                top = torch.topk(scores, 10, dim=1).indices
                per_user.setdefault("new_item_share_at_10", []).append((top >= known_items).float().mean(1))
        per_user = {k: torch.cat(v) for k, v in per_user.items()}
        out = {}
        for group, mask in (("cold", is_cold), ("warm", ~is_cold), ("all", torch.ones_like(is_cold))):
            n = int(mask.sum())
            metrics = {"users": n}
            for key, values in per_user.items():
                metric, k = key.split("_at_")
                metrics[f"{metric}@{k}"] = float(values[mask].mean()) if n else float("nan")
                if metric == "recall":
                    metrics[f"hits@{k}"] = int(values[mask].sum())
            out[group] = metrics
        results[name] = out
    return results


def cold_start_evaluation(
    model_dir,
    prepared,
    item_table=None,
    *,
    diagnostics: bool = False,
    seed: int = 0,
    items: int = None,
    progress: bool = True,
    new_item_prior="auto",
    details: dict = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The cold-start evaluation of a saved model (the CLI's ``evaluate-cold-start`` and
    ``benchmarks/cold_start.py``): :func:`evaluate_cold_start` of the model, extended to ``prepared``'s
    catalogue when items were added since it was trained (named by its kind, ``molar``), and of the
    ``content_knn``, ``popularity`` and ``random`` baselines.

    ``diagnostics`` adds the variants that explain the model's numbers: ``molar_old_catalogue`` (the same
    model ranking only the items it was trained on), ``molar_content_scale`` (new items scored by the content
    log-softmax alone, no calibration), ``molar_no_prior`` (calibrated, without the new-item prior) and
    ``molar_content_tower`` (content scores only, ``id_weight`` 0), and, when the prior is estimated here,
    ``molar_simulation_budget`` and ``molar_actual_budget`` (the offsets ``rule="budget"`` and
    ``rule="actual_budget"`` choose, each alone), ``molar_untempered`` (new items not tempered, temperature 1)
    and ``molar_quantile`` (the earlier ``"quantile"`` calibration, untempered), the last two with their own
    prior estimated by the default rule. A model saved before
    items were added is extended here with ``new_item_prior`` (``"auto"``: :func:`estimate_new_item_prior`, on
    validation data); an extended model (``extend-model``) keeps the prior saved with it. ``details`` (a dict), when
    given, receives ``known_items``, ``new_item_prior`` and the estimate. ``items`` ranks only the first ``items``
    ids (the catalogue as it was at an earlier version: ids are appended, never moved). Each group reports
    ``new_item_share@10`` when the model knows fewer items."""
    from merlin_molar.items import load_item_table
    from merlin_molar.persistence import load_model

    model, kind, _, _ = load_model(model_dir)
    known = trained_cardinality(model, kind)
    estimate = None
    if new_item_prior == "auto" and kind == "molar" and known < prepared.item_cardinality:
        estimate = estimate_new_item_prior(model, prepared, item_table=item_table)
        new_item_prior = estimate["prior"]
    model = model_for_catalogue(model, kind, prepared, item_table, new_item_prior=new_item_prior)
    task = model.heads[0].prediction_task_dict["next-item"]
    known = int(getattr(task, "known_items", known))
    if details is not None:
        details.update(known_items=known, new_item_prior=float(getattr(task, "new_item_prior", 0.0)),
                       new_item_prior_estimate=estimate)
    width = prepared.item_cardinality
    table = load_item_table(Path(item_table) if item_table else prepared.root / "item_table", prepared)
    scorers = {
        kind: model_scorer(model, width),
        "content_knn": content_knn_scorer(table),
        "popularity": popularity_scorer(prepared, width, seed=seed),
        "random": random_scorer(width, seed=seed),
    }
    if diagnostics and kind == "molar":
        scorers.update({
            "molar_old_catalogue": known_items_scorer(scorers[kind], known),
            "molar_no_prior": model_scorer(model, width, new_item_prior=0.0),
            "molar_content_scale": model_scorer(model, width, new_item_scoring="content", new_item_prior=0.0,
                                                new_item_temperature=1.0),
            "molar_content_tower": model_scorer(model, width, id_weight=0.0),
        })
        if estimate is not None:
            for rule, name in (("budget", "molar_simulation_budget"), ("actual_budget", "molar_actual_budget")):
                if rule in estimate["by_rule"]:
                    scorers[name] = model_scorer(model, width, new_item_prior=estimate["by_rule"][rule])
        if estimate is not None and task.new_item_scoring != "quantile":
            for name, scoring in (("untempered", task.new_item_scoring), ("quantile", "quantile")):
                other = estimate_new_item_prior(model, prepared, new_item_scoring=scoring, item_table=item_table,
                                                new_item_temperature=1.0)
                scorers[f"molar_{name}"] = model_scorer(model, width, new_item_scoring=scoring,
                                                        new_item_prior=other["prior"], new_item_temperature=1.0)
                if details is not None:
                    details[f"{name}_prior_estimate"] = other
    if items is not None:
        scorers = {name: first_items_scorer(scorer, items) for name, scorer in scorers.items()}
    return evaluate_cold_start(
        prepared, scorers, progress=progress, known_items=known if known < (items or width) else None, items=items
    )


def cold_start_table(results: Dict[str, Dict], ks=(10, 20)) -> str:
    header = f"{'variant':<24}" + "".join(f"{g + ' ' + m + '@' + str(k):>16}" for g in ("cold", "warm")
                                         for k in ks for m in ("R", "N"))
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        cells = "".join(f"{r[g][('recall' if m == 'R' else 'ndcg') + '@' + str(k)]:>16.4f}" for g in ("cold", "warm")
                        for k in ks for m in ("R", "N"))
        lines.append(f"{name:<24}{cells}")
    return "\n".join(lines)


def summary(results: Dict[str, Dict], k: int = 10) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The ``{variant: {"cold": {"recall@10", "ndcg@10"}, "warm": {...}}}`` shape of the benchmark JSON."""
    return {
        name: {g: {f"recall@{k}": r[g][f"recall@{k}"], f"ndcg@{k}": r[g][f"ndcg@{k}"]} for g in ("cold", "warm")}
        for name, r in results.items()
    }
