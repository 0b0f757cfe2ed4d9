"""How the Molar task scores items added after training: quantile, imputed and tempered new-item scores."""

import pytest
import torch

from merlin_molar.models.task import calibrated_new_item_scores


def test_quantile_scores_put_new_items_at_the_id_score_of_their_content_rank():
    torch.manual_seed(0)
    known, new = 13, 3
    content = torch.log_softmax(torch.randn(2, known + new), -1)
    ident = torch.log_softmax(3 * torch.randn(2, known), -1)
    # new item 0 ties with the best known content score, new item 1 is above all, 2 is below all; a new item
    # in the middle gets the ID score of the known item it ranks with
    best = content[:, 3:known].max(-1).values
    content[:, known] = best
    content[:, known + 1] = best + 1
    content[:, known + 2] = content[:, 3:known].min(-1).values - 1
    got = calibrated_new_item_scores(content, ident, 0.5, "quantile")
    top_id = ident[:, 3:known].max(-1).values
    # a tie with the best known item gets that item's rank, hence the best ID score
    torch.testing.assert_close(got[:, 0], 0.5 * content[:, known] + 0.5 * top_id)
    torch.testing.assert_close(got[:, 1], 0.5 * content[:, known + 1] + 0.5 * top_id)
    torch.testing.assert_close(got[:, 2], 0.5 * content[:, known + 2] + 0.5 * ident[:, 3:known].min(-1).values)
    c, d = content[:, 3:known], ident[:, 3:known]
    middle = torch.cat([content, c.sort(-1).values[:, 4:5] + 1e-6], dim=1)  # just above the 5th lowest
    got = calibrated_new_item_scores(middle, ident, 0.5, "quantile")
    torch.testing.assert_close(got[:, -1], 0.5 * middle[:, -1] + 0.5 * d.sort(-1).values[:, 5])
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "content"), content[:, known:])
    with pytest.raises(ValueError):
        calibrated_new_item_scores(content, ident, 0.5, "nope")


def random_user_scores(users: int, known: int, new: int):
    """Content log-probabilities over ``known + new`` items, ID log-probabilities over the known ones, and
    logits against every item's imputed ID embedding, for ``users`` users."""
    torch.manual_seed(0)
    content = torch.log_softmax(torch.randn(users, known + new), -1)
    ident = torch.log_softmax(torch.randn(users, known), -1)
    return content, ident, 2 * torch.randn(users, known + new)


def test_imputed_scores_are_the_id_log_probability_of_the_imputed_embedding_among_the_known_items():
    known = 13
    content, ident, imputed_logits = random_user_scores(2, known, 3)
    got = calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits)
    # log-softmax over the known items' imputed logits (reserved ids 0..2 left out), read at the new items
    normaliser = torch.logsumexp(imputed_logits[:, 3:known], -1, keepdim=True)
    torch.testing.assert_close(got, 0.75 * content[:, known:] + 0.25 * (imputed_logits[:, known:] - normaliser))
    # a user's logits shifted by a constant change nothing: the scale is the known items' own
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits + 5.0), got)
    with pytest.raises(ValueError, match="imputed ID embedding"):
        calibrated_new_item_scores(content, ident, 0.25, "imputed")
    with pytest.raises(ValueError, match="imputed ID embedding"):
        calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits[:, :known])


def test_new_item_scores_are_tempered_around_each_users_new_item_log_mass():
    from merlin_molar.models.task import scores_with_new_items

    known = 13
    content, ident, imputed_logits = random_user_scores(3, known, 4)
    plain = calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, 1.0), plain)
    got = calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, 2.0)
    mass = torch.logsumexp(plain, -1, keepdim=True)
    torch.testing.assert_close(got, mass + (plain - mass) / 2)
    assert torch.equal(got.argsort(-1), plain.argsort(-1))  # the order among the new items stays
    torch.testing.assert_close(got.std(-1), plain.std(-1) / 2)  # their spread halves, per user
    # the known items' fused scores are untouched; the prior is added after the tempering
    fused = scores_with_new_items(content, ident, 0.5, "imputed", 0.3, imputed_logits, 2.0)
    torch.testing.assert_close(fused[:, :known], 0.5 * content[:, :known] + 0.5 * ident)
    torch.testing.assert_close(fused[:, known:], got + 0.3)
    # the quantile rule is tempered the same way; a model without an ID branch is not tempered at all
    quantile = calibrated_new_item_scores(content, ident, 0.5, "quantile")
    q_mass = torch.logsumexp(quantile, -1, keepdim=True)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "quantile", temperature=2.0),
                               q_mass + (quantile - q_mass) / 2)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.0, "imputed", imputed_logits, 2.0),
                               content[:, known:])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="new_item_temperature"):
            calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, bad)
