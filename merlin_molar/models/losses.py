"""Next-item losses and the post-alignment loss.

All take user embeddings ``[N, d]`` at labelled positions, their target item ids ``[N]`` and the item
embedding matrix ``[n_items, d]``. Item ids below ``first_item_id`` (padding/null/OOV) are never sampled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from merlin_molar.ids import FIRST_ITEM_ID


class FullSoftmaxLoss(torch.nn.Module):
    """Cross-entropy over every item (dot-product logits), as in a well-trained SASRec."""

    def logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return users @ items.t()

    def forward(self, users, targets, items):
        return F.cross_entropy(self.logits(users, items), targets.long())


class LogitScale(torch.nn.Module):
    """A learnable inverse temperature, initialised at ``init`` and clamped to ``max_value`` (CLIP/HLLM)."""

    def __init__(self, init: float = 1 / 0.07, max_value: float = 100.0):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(init)))
        self.max_value = max_value

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_value)


class SampledInfoNCELoss(torch.nn.Module):
    """InfoNCE against ``num_negatives`` uniformly sampled items shared by the batch (the paper's public
    code): cosine logits times a learnable scale; sampled items equal to the target or nearly identical to
    it (cosine > ``false_negative_threshold``) are masked as false negatives."""

    def __init__(self, num_negatives: int = 512, false_negative_threshold: float = 0.99, first_item_id=FIRST_ITEM_ID):
        super().__init__()
        self.num_negatives = num_negatives
        self.threshold = false_negative_threshold
        self.first_item_id = first_item_id
        self.scale = LogitScale()

    def logits(self, users, items):
        return self.scale() * F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).t()

    def forward(self, users, targets, items):
        targets = targets.long()
        users = F.normalize(users, dim=-1)
        items = F.normalize(items, dim=-1)
        negatives = torch.randint(self.first_item_id, items.size(0), (self.num_negatives,), device=users.device)
        positive_items = items[targets]
        pos = (users * positive_items).sum(-1, keepdim=True)
        neg = users @ items[negatives].t()
        false_negative = (negatives.view(1, -1) == targets.view(-1, 1)) | (
            positive_items @ items[negatives].t() > self.threshold
        )
        neg = neg.masked_fill(false_negative, float("-inf"))
        logits = self.scale() * torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))


class SampledBCELoss(torch.nn.Module):
    """The paper's L_rec: binary cross-entropy with one sampled negative per positive (dot products)."""

    def __init__(self, first_item_id=FIRST_ITEM_ID):
        super().__init__()
        self.first_item_id = first_item_id

    def logits(self, users, items):
        return users @ items.t()

    def forward(self, users, targets, items):
        targets = targets.long()
        negatives = torch.randint(self.first_item_id, items.size(0), targets.shape, device=users.device)
        n_real = items.size(0) - self.first_item_id
        shifted = self.first_item_id + (negatives - self.first_item_id + 1) % n_real
        negatives = torch.where(negatives == targets, shifted, negatives)
        pos = (users * items[targets]).sum(-1)
        neg = (users * items[negatives]).sum(-1)
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg)
        )


REC_LOSSES = {"ce": FullSoftmaxLoss, "infonce": SampledInfoNCELoss, "bce": SampledBCELoss}


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Post-alignment loss: row i of ``a`` and row i of ``b`` are the same user (content vs ID embedding);
    every other row in the batch is a negative. Cosine similarity / temperature, averaged both ways."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    labels = torch.arange(a.size(0), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
