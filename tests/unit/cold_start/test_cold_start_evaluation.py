"""The cold-start evaluation: cold and warm metrics with the baselines, new items on the model scale, the
warm-cost trade-off."""

import pytest
import torch

from merlin_molar.cold_start import (
    content_knn_scorer,
    evaluate_cold_start,
    model_for_catalogue,
    model_scorer,
    new_items_on_model_scale,
    popularity_scorer,
    random_scorer,
    warm_cost_tradeoff,
)
from merlin_molar.data import load_prepared
from merlin_molar.data.holdout import COLD_ITEMS_FILE
from merlin_molar.errors import MolarDataError
from merlin_molar.items import load_item_table
from merlin_molar.items.add_items import add_items


def test_cold_and_warm_metrics_with_baselines(cold, tiny_molar):
    old_table = load_item_table(cold.root / "item_table", cold)
    old_model = tiny_molar(cold, old_table)
    with pytest.raises(MolarDataError, match="not in the vocabulary yet"):
        evaluate_cold_start(cold, {"random": random_scorer(cold.item_cardinality)}, progress=False)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    width, n_old = prepared.item_cardinality, old_table.size(0)
    table = load_item_table(prepared.root / "item_table", prepared)
    model = model_for_catalogue(tiny_molar(cold, old_table), "molar", prepared)
    results = evaluate_cold_start(prepared, {
        "molar": model_scorer(model, width), "molar_old_catalogue": model_scorer(old_model, width),
        "content_knn": content_knn_scorer(table), "popularity": popularity_scorer(prepared, width),
        "random": random_scorer(width),
    }, progress=False, known_items=n_old)
    n_cold = prepared.manifest["cold_start"]["cold_target_users"]
    assert all(r["cold"]["users"] == n_cold and r["all"]["users"] == prepared.manifest["users"]
               for r in results.values())
    # a model that does not know the new items, and popularity (zero for them), never retrieve a cold target
    assert results["molar_old_catalogue"]["cold"]["recall@50"] == 0
    assert results["popularity"]["cold"]["recall@50"] == 0
    assert results["molar_old_catalogue"]["warm"]["new_item_share@10"] == 0
    assert results["molar"]["all"]["new_item_share@10"] > 0
    assert results["popularity"]["warm"]["recall@10"] > results["random"]["warm"]["recall@10"]
    # content kNN: each user's scores are the cosine to their last item
    normed = torch.nn.functional.normalize(table, dim=1)
    h = torch.zeros(1, 20, dtype=torch.long)
    h[0, :2] = torch.tensor([5, 9])
    torch.testing.assert_close(content_knn_scorer(table)(h)[0], normed @ normed[9])


def test_new_items_placed_on_the_model_scale_by_the_other_scorers_rank(cold, tiny_molar):
    old_table = load_item_table(cold.root / "item_table", cold)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    known, width = old_table.size(0), prepared.item_cardinality
    table = load_item_table(prepared.root / "item_table", prepared)
    molar = model_scorer(model_for_catalogue(tiny_molar(cold, old_table), "molar", prepared), width)
    knn = content_knn_scorer(table)
    h = torch.zeros(3, 20, dtype=torch.long)
    h[:, :2] = torch.tensor([[3, 4], [5, 9], [7, 8]])
    mixed, base, other = new_items_on_model_scale(molar, knn, known)(h), molar(h), knn(h)
    torch.testing.assert_close(mixed[:, :known], base[:, :known])  # known items keep the model's scores
    for u in range(3):
        known_scores = set(base[u, 3:known].tolist())
        assert all(v in known_scores for v in mixed[u, known:].tolist())  # on the model's own scale
        order = other[u, known:].argsort()
        assert (mixed[u, known:][order].diff() >= 0).all()  # in the other scorer's order
        # a new item lands at the model score of the known item the other scorer ranks just below it
        j = int(other[u, known:].argmax())
        below = other[u, 3:known] < other[u, known + j]
        expected = base[u, 3:known].sort().values[min(int(below.sum()), known - 4)]
        assert float(mixed[u, known + j]) == float(expected)


def test_warm_cost_tradeoff_counts_cold_hits_against_the_known_only_ranking(cold):
    old_table = load_item_table(cold.root / "item_table", cold)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    known = old_table.size(0)
    knn = content_knn_scorer(load_item_table(prepared.root / "item_table", prepared))
    out = warm_cost_tradeoff(prepared, {"knn": knn}, known, offsets=(-100.0, 0.0, 100.0), progress=False)["knn"]
    low, zero, high = out["curve"]
    # (cosines lie in [-1, 1]: an offset of 100 puts the new items below or above every known item)
    # new items pushed out of every top-10: nothing gained, nothing lost
    assert (low["cold_hits@10"], low["warm_cost"]) == (0, 0.0)
    # offset 0 is the scorer as it is: the same numbers as the cold-start evaluation
    plain = evaluate_cold_start(prepared, {"knn": knn}, progress=False, known_items=known)["knn"]
    assert zero["cold_hits@10"] == plain["cold"]["hits@10"]
    assert zero["warm_ndcg@10"] == pytest.approx(plain["warm"]["ndcg@10"], abs=1e-6)
    assert out["warm_ndcg@10_known_items_only"] >= zero["warm_ndcg@10"] - 1e-9  # adding items never lifts warm
    # new items first for everyone: every cold target in the new items' top 10 is a hit, warm users lose
    assert high["cold_hits@10"] >= zero["cold_hits@10"] and high["warm_cost"] >= zero["warm_cost"]
    assert out["cold_users"] == prepared.manifest["cold_start"]["cold_target_users"]
    # with the new items first for everyone, a cold hit is a target in the top 10 of the new items alone
    assert high["cold_recall@10"] == pytest.approx(out["cold_recall@10_among_new_items"])
    assert out["best_within_budget"] == max((c for c in out["curve"] if c["warm_cost"] <= 0.02),
                                            key=lambda c: (c["cold_hits@10"], -c["warm_cost"]))
