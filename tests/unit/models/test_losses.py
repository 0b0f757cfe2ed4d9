import torch

from merlin_molar.models.losses import FullSoftmaxLoss, SampledBCELoss, SampledInfoNCELoss, symmetric_infonce


def test_alignment_loss_decreases_when_one_side_learns_the_other():
    torch.manual_seed(0)
    target = torch.randn(32, 16)
    learned = torch.nn.Parameter(torch.randn(32, 16))
    opt = torch.optim.Adam([learned], lr=0.05)
    start = symmetric_infonce(learned, target).item()
    for _ in range(100):
        opt.zero_grad()
        loss = symmetric_infonce(learned, target)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert loss.item() < 0.2 * start
    shuffled = symmetric_infonce(learned, target[torch.randperm(32)]).item()
    assert loss.item() < shuffled


def test_alignment_loss_is_symmetric():
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    torch.testing.assert_close(symmetric_infonce(a, b), symmetric_infonce(b, a))


def test_infonce_masks_false_negatives():
    torch.manual_seed(0)
    items = torch.randn(10, 8)
    items[5] = items[4] * 2  # same direction: cosine 1 with item 4
    users = torch.randn(6, 8)
    loss = SampledInfoNCELoss(num_negatives=50, first_item_id=4)
    # only items 4..9 can be sampled; the target 4 and its near-duplicate 5 must never count as negatives
    masked = loss(users, torch.full((6,), 4), items[:6])
    assert torch.isfinite(masked)
    assert masked.item() < 1e-4  # every sampled negative (4 or 5) is masked: only the positive remains


def test_infonce_scale_is_learnable_and_capped():
    loss = SampledInfoNCELoss()
    assert abs(loss.scale().item() - 1 / 0.07) < 1e-3
    with torch.no_grad():
        loss.scale.log_scale.fill_(10.0)
    assert loss.scale().item() == 100.0


def test_bce_negatives_differ_from_targets_and_full_softmax_matches_cross_entropy():
    torch.manual_seed(0)
    users, items = torch.randn(200, 4), torch.randn(5, 4)
    targets = torch.randint(3, 5, (200,))
    assert torch.isfinite(SampledBCELoss()(users, targets, items))
    expected = torch.nn.functional.cross_entropy(users @ items.t(), targets)
    torch.testing.assert_close(FullSoftmaxLoss()(users, targets, items), expected)
