import torch

from merlin_molar.evaluation import (
    TOP_KS,
    history_without_last,
    mask_seen_items,
    ranking_metrics,
    reference_metrics,
)


def test_t4rec_metrics_equal_the_rank_based_reference():
    torch.manual_seed(0)
    scores = torch.randn(64, 300)
    targets = torch.randint(3, 300, (64,))
    history = torch.randint(3, 300, (64, 30))
    history[history == targets.view(-1, 1)] = 0
    masked = mask_seen_items(scores, history, targets)
    expected = {k: v.mean() for k, v in reference_metrics(masked, targets).items()}
    ndcg, recall = ranking_metrics()
    ndcg.update(masked, targets)
    recall.update(masked, targets)
    for i, k in enumerate(TOP_KS):
        torch.testing.assert_close(ndcg.compute()[i], expected[f"ndcg_at_{k}"])
        torch.testing.assert_close(recall.compute()[i], expected[f"recall_at_{k}"])


def test_mask_seen_items_keeps_target_and_masks_reserved_ids():
    scores = torch.arange(10.0).repeat(2, 1)
    history = torch.tensor([[9, 8, 0], [7, 0, 0]])
    targets = torch.tensor([8, 5])
    masked = mask_seen_items(scores, history, targets)
    assert torch.isinf(masked[:, :3]).all()
    assert masked[0, 9] == float("-inf") and masked[0, 8] == 8.0  # repeat target stays rankable
    assert masked[1, 7] == float("-inf") and masked[1, 5] == 5.0


def test_history_without_last_removes_the_target_position():
    seq = torch.tensor([[5, 6, 7, 0], [3, 4, 0, 0]])
    assert history_without_last(seq).tolist() == [[5, 6, 0, 0], [3, 0, 0, 0]]


def test_reference_metric_values():
    scores = torch.tensor([[0.0, 0, 0, 5, 4, 3, 2, 1]])
    out = reference_metrics(scores, torch.tensor([5]), top_ks=(2, 3))
    assert out["recall_at_2"].item() == 0.0 and out["recall_at_3"].item() == 1.0
    assert abs(out["ndcg_at_3"].item() - 0.5) < 1e-6  # rank 2 (0-based) -> 1 / log2(4)


def test_a_sequence_without_a_target_is_reported_not_silently_misaligned():
    import pytest

    from merlin_molar.errors import MolarDataError
    from merlin_molar.models.task import require_one_target_per_row

    require_one_target_per_row(4, 4)
    with pytest.raises(MolarDataError, match="1 rows have fewer"):
        require_one_target_per_row(3, 4)
