"""Saved models extended to the current catalogue (extend-model): reloaded, scored and served alike."""

import pandas as pd
import pytest
import torch

from merlin_molar.cold_start import (
    model_for_catalogue,
)
from merlin_molar.data import load_prepared
from merlin_molar.data.holdout import COLD_ITEMS_FILE
from merlin_molar.data.workflow import item_id_mapping
from merlin_molar.errors import MolarDataError
from merlin_molar.items import load_item_table
from merlin_molar.items.add_items import add_items
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.molar import MolarConfig
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model


def test_extended_saved_model_reloads_scores_new_items_and_recommends_them(cold, tmp_path, tiny_molar):
    from merlin_molar.cold_start import extend_saved_model
    from merlin_molar.io import read_json
    from merlin_molar.persistence import load_model, save_model
    from merlin_molar.pipeline import recommend

    old_table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, old_table)
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20)
    saved = save_model(model, tmp_path / "model", "molar", config, cold.schema, old_table)
    sasrec = sasrec_model(cold.schema, SASRecConfig(d_model=16, n_layers=1, n_heads=1, max_length=20))
    sasrec_dir = save_model(sasrec, tmp_path / "sasrec", "sasrec", SASRecConfig(d_model=16, n_layers=1, n_heads=1,
                                                                                  max_length=20), cold.schema)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    out = extend_saved_model(saved, prepared, tmp_path / "extended")
    reloaded, kind, _, schema = load_model(out)
    assert schema.select_by_name(["item_id-list"]).first.int_domain.max == prepared.item_cardinality - 1
    in_memory = model_for_catalogue(load_model(saved)[0], "molar", prepared)
    histories = torch.zeros(3, 20, dtype=torch.long)
    histories[:, :2] = torch.tensor([[3, 4], [7, 9], [20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded({"item_id-list": histories}), in_memory({"item_id-list": histories}))
    task = reloaded.heads[0].prediction_task_dict["next-item"]
    assert task.new_item_scoring == "imputed" and task.imputed_id_table.shape == (prepared.item_cardinality, 16)
    # the scoring method is saved with the extension and comes back on load (the CLI offers the same choices)
    from merlin_molar.cli import NEW_ITEM_SCORING_CHOICES
    from merlin_molar.models.task import NEW_ITEM_SCORING

    assert NEW_ITEM_SCORING_CHOICES == NEW_ITEM_SCORING
    quantile = extend_saved_model(saved, prepared, tmp_path / "quantile", new_item_scoring="quantile",
                                  new_item_prior=0.0)
    assert read_json(quantile / "molar_model.json")["catalogue_extension"]["new_item_scoring"] == "quantile"
    task = load_model(quantile)[0].heads[0].prediction_task_dict["next-item"]
    assert task.new_item_scoring == "quantile" and task.imputed_id_table is None
    # an extension saved before the tempering existed is scored as it was then: temperature 1
    from merlin_molar.cli import NEW_ITEM_TEMPERATURE as CLI_TEMPERATURE
    from merlin_molar.io import write_json
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    assert CLI_TEMPERATURE == NEW_ITEM_TEMPERATURE
    assert load_model(out)[0].heads[0].prediction_task_dict["next-item"].new_item_temperature == NEW_ITEM_TEMPERATURE
    meta = read_json(quantile / "molar_model.json")
    del meta["catalogue_extension"]["new_item_temperature"]
    del meta["description_sha256"]  # nor did it record a checksum of the description itself
    write_json(quantile / "molar_model.json", meta)
    assert load_model(quantile)[0].heads[0].prediction_task_dict["next-item"].new_item_temperature == 1.0

    mapping = item_id_mapping(prepared.load_workflow())
    new_raw = set(pd.read_csv(cold.root / COLD_ITEMS_FILE)["item_id"])
    old_raw = [r for r in mapping.index if r not in new_raw]
    histories = [old_raw[i : i + 3] for i in range(0, 60, 3)]
    recs = recommend(saved, prepared, histories, top_k=10)  # the original model, extended on the fly
    recs_ext = recommend(out, prepared, histories, top_k=10)
    pd.testing.assert_frame_equal(recs, recs_ext)
    # this random tiny model's validation-chosen prior may keep new items out of these top-10s; a high one must not
    boosted = extend_saved_model(saved, prepared, tmp_path / "boosted", new_item_prior=3.0)
    assert set(recommend(boosted, prepared, histories, top_k=10)["item_id"]) & new_raw
    # an ID model recommends from the items it was trained on; a history holding an added item is refused
    from_sasrec = recommend(sasrec_dir, prepared, histories[:2], top_k=10)
    assert len(from_sasrec) == 20 and not set(from_sasrec["item_id"]) & new_raw
    with pytest.raises(MolarDataError, match="added after the SASRec model was trained"):
        recommend(sasrec_dir, prepared, [histories[0] + [sorted(new_raw)[0]]])
    with pytest.raises(MolarDataError, match="SASRec model has no embedding"):
        extend_saved_model(sasrec_dir, prepared, tmp_path / "nope")


def test_prior_is_saved_with_the_extended_model_and_scored_alike_by_task_lean_and_recommend(cold, tmp_path, tiny_molar):
    from merlin_molar.cold_start import cold_start_evaluation, extend_saved_model
    from merlin_molar.io import read_json
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE
    from merlin_molar.persistence import load_model, save_model
    from merlin_molar.serving.lean import LeanModel, export_lean

    old_table = load_item_table(cold.root / "item_table", cold)
    n_old = old_table.size(0)
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20)
    saved = save_model(tiny_molar(cold, old_table), tmp_path / "model", "molar", config, cold.schema, old_table)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    auto = extend_saved_model(saved, prepared, tmp_path / "auto")
    extension = read_json(auto / "molar_model.json")["catalogue_extension"]
    assert extension["new_item_prior"] == extension["new_item_prior_estimate"]["prior"]
    assert load_model(auto)[0].heads[0].prediction_task_dict["next-item"].new_item_prior == extension[
        "new_item_prior"]

    assert extension["new_item_temperature"] == NEW_ITEM_TEMPERATURE
    out = extend_saved_model(saved, prepared, tmp_path / "fixed", new_item_prior=-0.75, new_item_temperature=1.5)
    zero = extend_saved_model(saved, prepared, tmp_path / "zero", new_item_prior=0, new_item_temperature=1.5)
    model = load_model(out)[0]
    histories = torch.zeros(4, 20, dtype=torch.long)
    histories[:, :3] = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    histories[3, 3] = n_old + 1  # a new item in the history: read by the content tower
    with torch.no_grad():
        with_prior = model({"item_id-list": histories})
        without = load_model(zero)[0]({"item_id-list": histories})
    finite = torch.isfinite(without)
    torch.testing.assert_close(with_prior[:, :n_old][finite[:, :n_old]], without[:, :n_old][finite[:, :n_old]])
    shift = (with_prior - without)[:, n_old:][finite[:, n_old:]]
    torch.testing.assert_close(shift, torch.full_like(shift, -0.75))

    assert model.heads[0].prediction_task_dict["next-item"].new_item_temperature == 1.5
    lean = LeanModel.load(export_lean(out, tmp_path / "lean"))
    assert lean.meta["new_item_prior"] == -0.75 and lean.meta["known_items"] == n_old
    assert lean.meta["new_item_temperature"] == 1.5
    with torch.no_grad():
        got = lean.scores(histories)
    got[:, :3] = float("-inf")
    got.scatter_(1, histories, float("-inf"))
    assert torch.equal(torch.isfinite(got), torch.isfinite(with_prior))
    finite = torch.isfinite(with_prior)
    torch.testing.assert_close(got[finite], with_prior[finite], rtol=1e-5, atol=1e-5)

    # the evaluation of the saved, extended model uses its saved prior; molar_no_prior is the prior-0 model
    results = cold_start_evaluation(out, prepared, diagnostics=True, progress=False)
    results_zero = cold_start_evaluation(zero, prepared, progress=False)
    assert results["molar_no_prior"] == results_zero["molar"]
    assert results["molar_old_catalogue"]["cold"]["recall@50"] == 0
    assert results["molar_old_catalogue"]["all"]["new_item_share@10"] == 0
    assert results["molar"]["all"]["new_item_share@10"] < results["molar_no_prior"]["all"]["new_item_share@10"]
