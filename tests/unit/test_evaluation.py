import pytest
import torch

from merlin_molar.evaluation import (
    TOP_KS,
    EarlierItems,
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


def test_earlier_items_are_found_by_user_index_whatever_the_row_order():
    earlier = EarlierItems(user_index=[3, 0, 2], items=[[7, 8, 9], [5], []])
    assert len(earlier) == 4
    assert earlier.padded(torch.tensor([0, 1, 2, 3])).tolist() == [[5, 0, 0], [0, 0, 0], [0, 0, 0], [7, 8, 9]]
    assert earlier.padded(torch.tensor([3, 0])).tolist() == [[7, 8, 9], [5, 0, 0]]


def test_earlier_items_read_from_arrow_equal_those_from_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from merlin_molar.ids import EARLIER_ITEMS, USER_INDEX

    table = pa.table({USER_INDEX: [1, 0], EARLIER_ITEMS: [[4, 6], [9]]})
    pq.write_table(table, tmp_path / "earlier.parquet")
    read = EarlierItems.read(tmp_path / "earlier.parquet")
    from_lists = EarlierItems([1, 0], [[4, 6], [9]])
    users = torch.tensor([0, 1])
    assert torch.equal(read.padded(users), from_lists.padded(users))


def test_an_earlier_items_table_with_a_user_twice_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        EarlierItems([0, 1, 0], [[4], [5], [6]])


def test_earlier_items_mask_older_items_but_keep_the_target():
    earlier = EarlierItems([0, 1], [[4, 5], [6]])
    scores = torch.arange(16, dtype=torch.float).repeat(2, 1)
    masked = earlier.mask(scores, user_index=torch.tensor([0, 1]), targets=torch.tensor([5, 7]))
    assert torch.isinf(masked[0, 4]) and masked[0, 5] == 5 and masked[0, 6] == 6
    assert torch.isinf(masked[1, 6]) and masked[1, 4] == 4
    with pytest.raises(ValueError, match="outside"):
        earlier.padded(torch.tensor([2]))
