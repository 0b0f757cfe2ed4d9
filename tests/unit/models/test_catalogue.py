"""A trained model extended to a larger catalogue: imputed ID embeddings, scoring new items, refusals."""

import pytest
import torch

from merlin_molar.cold_start import (
    model_for_catalogue,
)
from merlin_molar.data import load_prepared
from merlin_molar.data.holdout import COLD_ITEMS_FILE
from merlin_molar.errors import MolarDataError
from merlin_molar.items import load_item_table
from merlin_molar.items.add_items import add_items
from merlin_molar.models.catalogue import extend_catalogue, impute_id_embeddings
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model


def test_imputed_id_embeddings_recover_a_linear_content_to_id_map():
    """The ridge map from content rows to ID rows, fitted on the known items only (reserved rows left out)."""
    generator = torch.Generator().manual_seed(0)
    known, new, width, dim = 200, 20, 12, 5
    content = torch.randn(known + new, width, generator=generator)
    truth = torch.randn(width, dim, generator=generator)
    ids = content @ truth + 0.5
    ids[:3] = 100.0  # reserved rows (padding, OOV, ...): must not pull the fit
    imputed = impute_id_embeddings(content, ids[:known], known, shrinkage=1e-6, neighbour_weight=0.0)
    assert imputed.shape == (known + new, dim)
    torch.testing.assert_close(imputed[3:], (content @ truth + 0.5)[3:], atol=1e-3, rtol=0)
    # shrinkage pulls every imputed embedding towards the known items' mean
    shrunk = impute_id_embeddings(content, ids[:known], known, shrinkage=10.0, neighbour_weight=0.0)
    centre = ids[3:known].mean(0)
    assert (shrunk[known:] - centre).norm(dim=1).mean() < (imputed[known:] - centre).norm(dim=1).mean()
    with pytest.raises(MolarDataError, match="impute ID embeddings"):
        impute_id_embeddings(content[:50], ids[:known], known)


def test_imputed_id_embeddings_mix_in_the_content_neighbours_id_embeddings():
    """A new item whose content repeats a known item's takes (nearly) that item's ID embedding from the
    neighbour mean, however far it is from the linear trend; the default mixes the two halves."""
    generator = torch.Generator().manual_seed(1)
    known, width, dim = 100, 16, 4
    content = torch.randn(known, width, generator=generator)
    ids = torch.randn(known, dim, generator=generator)  # no linear relation at all
    twin = torch.cat([content, 2.0 * content[10:11]])  # same direction as item 10: cosine 1
    only_neighbours = impute_id_embeddings(twin, ids, known, neighbour_weight=1.0)
    torch.testing.assert_close(only_neighbours[known], ids[10], atol=1e-3, rtol=0)
    ridge = impute_id_embeddings(twin, ids, known, neighbour_weight=0.0)
    mixed = impute_id_embeddings(twin, ids, known)
    torch.testing.assert_close(mixed, 0.5 * ridge + 0.5 * only_neighbours)
    # the cosines are computed in blocks: the block size changes nothing
    torch.testing.assert_close(impute_id_embeddings(twin, ids, known, batch_size=7), mixed)


@pytest.mark.parametrize("adaptor", ["moe", "linear"])
def test_trained_model_scores_new_items_without_retraining(cold, adaptor, tiny_molar):
    old_table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, old_table, adaptor)
    histories = torch.zeros(4, 20, dtype=torch.long)
    histories[:, :3] = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    with torch.no_grad():
        before = model({"item_id-list": histories})
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    extended = model_for_catalogue(model, "molar", prepared)
    n_old, n_new = old_table.size(0), prepared.item_cardinality
    with torch.no_grad():
        after = extended({"item_id-list": histories})
    assert after.shape == (4, n_new)
    # known items keep their order (their fused scores move by one constant per user)
    finite = torch.isfinite(before)
    diff = (after[:, :n_old] - before)[finite].view(4, -1)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=0)
    # new items get finite scores on the same scale: some rank in the top 10, not all of it
    assert torch.isfinite(after[:, n_old:]).all()
    if adaptor == "linear":  # calibrated (no prior), this seeded untrained model puts some in the top 10, not all
        task = extended.heads[0].prediction_task_dict["next-item"]
        prior, task.new_item_prior = task.new_item_prior, 0.0
        with torch.no_grad():
            top = torch.topk(extended({"item_id-list": histories}), 10, dim=1).indices
        task.new_item_prior = prior
        share = float((top >= n_old).float().mean())
        assert 0 < share < 1
    # a history holding a new item: the content tower reads it, the ID branch sees OOV
    histories[0, 3] = n_new - 1
    with torch.no_grad():
        out = extended({"item_id-list": histories})
    assert torch.isfinite(out[0, 3:]).any() and out[0, n_new - 1] == float("-inf")


def test_extension_refuses_a_foreign_table_and_sasrec(cold, tiny_molar):
    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    foreign = torch.cat([table.clone(), torch.randn(2, table.size(1))])
    foreign[5] += 1
    with pytest.raises(MolarDataError, match="are not the table this model was trained with"):
        extend_catalogue(model, "molar", foreign)
    sasrec = sasrec_model(cold.schema, SASRecConfig(d_model=16, n_layers=1, n_heads=1, max_length=20))
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    with pytest.raises(MolarDataError, match="SASRec model has no embedding for items added after training"):
        model_for_catalogue(sasrec, "sasrec", load_prepared(cold.root))
