"""The new-item prior: chosen on validation data only, by the simulation and by the added items' own warm cost."""

import numpy as np
import pytest
import torch

from merlin_molar.cold_start import (
    model_scorer,
)
from merlin_molar.data import load_prepared, read_dataset
from merlin_molar.data.holdout import COLD_ITEMS_FILE, hold_out_items
from merlin_molar.data.workflow import item_id_mapping
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.items import load_item_table
from merlin_molar.items.add_items import add_items


def test_item_arrival_order_is_first_training_interaction_of_known_items(cold_base, tiny_dir):
    from merlin_molar.cold_start import item_arrival_order

    order = item_arrival_order(cold_base)
    mapping = item_id_mapping(cold_base.load_workflow())
    assert sorted(order.tolist()) == sorted(mapping.tolist())  # every known item once, no cold item
    raw = read_dataset(tiny_dir)
    inter = raw.interactions.assign(order=np.arange(len(raw.interactions)))
    inter, _ = hold_out_items(inter, 0.1, "order")  # a cold item stays only as its user's test target
    inter = inter.sort_values(["timestamp", "order"])
    before_test = inter[inter.groupby("user_id").cumcount(ascending=False) >= 1]  # the test targets dropped
    first = before_test.drop_duplicates("item_id")["item_id"].map(mapping).tolist()
    assert order[: len(first)].tolist() == first
    # those are the interactions of the validation split (whose histories this data never truncates)
    valid = cold_base.split_frame("valid")[ITEM_SEQUENCE]
    assert max(len(s) for s in valid) < cold_base.max_length
    assert set(first) == set(np.concatenate([np.asarray(s) for s in valid]).tolist())
    foreign = read_dataset(tiny_dir)
    foreign.interactions = foreign.interactions.iloc[1:]
    with pytest.raises(MolarDataError, match="fingerprint"):
        item_arrival_order(cold_base, foreign)


def test_new_item_prior_is_chosen_on_validation_data_only(cold, monkeypatch, tiny_molar):
    from merlin_molar.cold_start import PRIOR_GRID, PriorSearch, estimate_new_item_prior
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    first = estimate_new_item_prior(model, cold)
    real_split = type(cold).split_frame

    def no_test(self, split):
        assert split != "test", "the prior must not read the test split"
        return real_split(self, split)

    monkeypatch.setattr(type(cold), "split_frame", no_test)
    again = estimate_new_item_prior(model, cold)
    assert again == first  # deterministic
    assert first["prior"] in PRIOR_GRID and first["rule"] == "both"
    # no items added yet: the default rule is the simulation's budget alone
    assert first["by_rule"]["both"] == first["by_rule"]["budget"] == first["prior"]
    assert first["new_item_temperature"] == NEW_ITEM_TEMPERATURE
    curve = first["curve"]
    assert [c["prior"] for c in curve] == sorted(PRIOR_GRID)
    # budget rule: the largest offset whose warm cost is within 2%; warm NDCG only falls as the offset grows
    warm = [c["warm_ndcg@10"] for c in curve]
    assert all(a >= b - 1e-9 for a, b in zip(warm, warm[1:]))
    within = [c["prior"] for c in curve if c["warm_cost"] <= 0.02 + 1e-12]
    assert first["prior"] == (max(within) if within else min(PRIOR_GRID))
    assert first["at_grid_edge"] == (first["prior"] == max(PRIOR_GRID))
    # a grid whose top is within the budget: the grid set the prior, and the estimate says so
    capped = estimate_new_item_prior(model, cold, PriorSearch(grid=(-4.0, -3.95)))
    assert capped["prior"] == -3.95 and capped["at_grid_edge"]
    # ndcg rule: the best NDCG@10 over all users, ties to the offset closest to 0
    best = max(c["ndcg@10"] for c in curve)
    by_ndcg = first["by_rule"]["ndcg"]
    assert next(c["ndcg@10"] for c in curve if c["prior"] == by_ndcg) == best
    assert all(abs(c["prior"]) >= abs(by_ndcg) for c in curve if c["ndcg@10"] == best)
    assert estimate_new_item_prior(model, cold, PriorSearch(rule="ndcg"))["prior"] == by_ndcg
    assert first["validation_users"] == cold.manifest["users"]
    shares = [c["new_item_share@10"] for c in curve]
    assert shares == sorted(shares)  # a larger offset puts more pseudo-new items in the top 10


def test_new_item_prior_follows_how_often_the_pseudo_new_items_are_targets(cold, tiny_molar):
    """Pseudo-new items that are never validation targets are pushed down (a negative prior); items that are
    the validation targets get a higher one: the estimate reads the validation targets, nothing else."""
    from merlin_molar.cold_start import PriorSearch, estimate_new_item_prior

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    targets = {int(s[-1]) for s in cold.split_frame("valid")[ITEM_SEQUENCE]}
    known = list(range(3, table.size(0)))
    never = [i for i in known if i not in targets]
    assert never and targets
    low = estimate_new_item_prior(model, cold, PriorSearch(rule="ndcg"), pseudo_new=never)
    high = estimate_new_item_prior(model, cold, PriorSearch(rule="ndcg"), pseudo_new=sorted(targets))
    assert low["prior"] < 0
    assert high["prior"] > low["prior"]
    assert low["validation_targets_pseudo_new"] == 0
    with pytest.raises(MolarDataError, match="trained item ids"):
        estimate_new_item_prior(model, cold, pseudo_new=[table.size(0)])


def test_actual_budget_rule_reads_the_added_items_own_warm_cost(cold, tiny_molar):
    """With the added items in the catalogue, ``rule="actual_budget"`` reads their own warm cost on the
    validation split (all of whose targets are known items), not the pseudo-new simulation's; the model passed
    in is untouched."""
    from merlin_molar.cold_start import PRIOR_GRID, PriorSearch, estimate_new_item_prior
    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    before = estimate_new_item_prior(model, cold)
    assert "actual_new_items" not in before and "actual_budget" not in before["by_rule"]
    with pytest.raises(ValueError, match="rule"):
        estimate_new_item_prior(model, cold, PriorSearch(rule="actual_budget"))
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    estimate = estimate_new_item_prior(model, prepared)
    task = model.heads[0].prediction_task_dict["next-item"]
    assert not hasattr(task, "known_items")  # estimated on a copy
    assert estimate["by_rule"]["budget"] == before["prior"]  # the simulation is unchanged by the added items
    assert estimate["curve"] == before["curve"]
    # the default rule: within the budget on both estimates
    assert estimate["rule"] == "both"
    assert estimate["prior"] == min(estimate["by_rule"]["budget"], estimate["by_rule"]["actual_budget"])
    actual = estimate["actual_new_items"]
    assert actual["new_items"] == prepared.item_cardinality - table.size(0) > 0
    curve = actual["curve"]
    assert [c["prior"] for c in curve] == sorted(PRIOR_GRID)
    within = [c["prior"] for c in curve if c["warm_cost"] <= 0.02 + 1e-12]
    assert estimate["by_rule"]["actual_budget"] == (max(within) if within else min(PRIOR_GRID))
    assert estimate_new_item_prior(model, prepared, PriorSearch(rule="actual_budget"))["prior"] == estimate["by_rule"][
        "actual_budget"]
    warm = [c["warm_ndcg@10"] for c in curve]
    assert all(a >= b - 1e-9 for a, b in zip(warm, warm[1:]))
    shares = [c["new_item_share@10"] for c in curve]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    # the reference: the untouched model's validation NDCG@10 over the known items
    sequences = [np.asarray(v, dtype=np.int64) for v in prepared.split_frame("valid")[ITEM_SEQUENCE]]
    histories = torch.zeros(len(sequences), prepared.max_length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        histories[i, : len(seq) - 1] = torch.from_numpy(seq[:-1][-prepared.max_length:])
    targets = torch.tensor([int(seq[-1]) for seq in sequences])
    scores = mask_seen_items(model_scorer(model, table.size(0))(histories), histories, targets)
    expected = float(reference_metrics(scores, targets, (10,))["ndcg_at_10"].mean())
    assert actual["validation_ndcg@10_known_items_only"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_prior_without_the_raw_data_asks_for_an_explicit_value(cold):
    from merlin_molar.cold_start import item_arrival_order
    from merlin_molar.io import read_json, write_json

    manifest = read_json(cold.root / "molar_manifest.json")
    write_json(cold.root / "molar_manifest.json", {**manifest, "source": str(cold.root / "gone")})
    with pytest.raises(MolarDataError, match="extend-model --new-item-prior NUMBER"):
        item_arrival_order(load_prepared(cold.root))


def test_prior_search_refuses_an_unknown_rule_and_an_empty_grid():
    from merlin_molar.cold_start import PriorSearch

    with pytest.raises(ValueError, match=r"rule must be one of \['actual_budget', 'both', 'budget', 'ndcg'\]"):
        PriorSearch(rule="best")
    with pytest.raises(ValueError, match="grid"):
        PriorSearch(grid=())
    with pytest.raises(ValueError, match="pseudo_new_fraction"):
        PriorSearch(pseudo_new_fraction=1.0)
