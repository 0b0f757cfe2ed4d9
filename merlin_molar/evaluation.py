"""The one full-ranking evaluator used by every model in the project.

Protocol (paper §4.1, ../shared/DESIGN.md §1): score every item in the catalogue, mask the items the
user has already interacted with, the whole history and not only the window the model reads
(:class:`EarlierItems`; the target is never masked), and report Recall@K and NDCG@K for
K = 10, 20, 50, averaged over users. The accumulation rides Transformers4Rec's own ranking metrics
(:class:`transformers4rec.torch.ranking_metric.NDCGAt` / ``RecallAt``), which the Trainer's evaluation
loop already calls; :func:`reference_metrics` is an independent plain-torch implementation used to
check them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from transformers4rec.torch.ranking_metric import NDCGAt, RecallAt

from merlin_molar.ids import FIRST_ITEM_ID

TOP_KS = (10, 20, 50)


def ranking_metrics(top_ks: Sequence[int] = TOP_KS):
    """T4Rec metric objects for a prediction task's ``metrics=`` argument."""
    return (NDCGAt(top_ks=list(top_ks), labels_onehot=True), RecallAt(top_ks=list(top_ks), labels_onehot=True))


def mask_seen_items(
    scores: torch.Tensor,
    history: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    first_item_id: int = FIRST_ITEM_ID,
) -> torch.Tensor:
    """Return ``scores`` with the reserved ids (padding/null/OOV) and each row's history set to -inf.

    ``history`` is a padded ``[batch, length]`` tensor of item ids (0 = padding). When ``targets`` is
    given, each row's target keeps its score even if it also occurs in the history (repeat consumption),
    so a repeated item stays rankable instead of silently scoring zero.
    """
    masked = scores.clone()
    masked[:, :first_item_id] = float("-inf")
    masked.scatter_(1, history.long().clamp(min=0), float("-inf"))
    if targets is not None:
        rows = torch.arange(scores.size(0), device=scores.device)
        masked[rows, targets.long()] = scores[rows, targets.long()]
    return masked


class EarlierItems:
    """Each user's items older than the window an evaluated row holds, by ``user_index``.

    A model reads at most ``max_length`` items, yet the protocol masks the user's whole history (the paper,
    the plain reference SASRec): with ML-1M at length 50, 4,205 of 6,040 test users have older items, which
    masking the window alone would leave rankable. Read from ``earlier/<split>.parquet`` of a prepared
    directory (:func:`merlin_molar.data.workflow.prepare`)."""

    def __init__(self, user_index: Sequence[int], items):
        """``items``: one list of item ids per entry of ``user_index`` (a sequence, or an arrow list array)."""
        import pyarrow as pa

        user_index = np.array(user_index, dtype=np.int64)  # a copy: arrow's arrays are read-only
        if isinstance(items, pa.ChunkedArray):
            items = items.combine_chunks()
        if not isinstance(items, pa.Array):
            items = pa.array(list(items), type=pa.list_(pa.int64()))
        if len(items) != len(user_index):
            raise ValueError(f"{len(user_index)} user indices for {len(items)} item lists")
        if len(np.unique(user_index)) != len(user_index):
            raise ValueError("the earlier-items table holds a user_index more than once")
        if len(user_index) and user_index.min() < 0:
            raise ValueError("the earlier-items table holds a negative user_index")
        lengths = items.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = items.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        rows = int(user_index.max()) + 1 if len(user_index) else 0
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.lengths[torch.from_numpy(user_index)] = torch.from_numpy(lengths)
        self.offsets = torch.zeros(rows + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(self.lengths, 0)
        # each flat value goes to its user's slot, whatever order the table's rows come in
        row_of_value = np.repeat(np.arange(len(lengths)), lengths)
        start_in_flat = np.cumsum(lengths) - lengths
        within_row = np.arange(len(flat)) - start_in_flat[row_of_value]
        destination = self.offsets.numpy()[user_index][row_of_value] + within_row
        values = np.zeros(len(flat), dtype=np.int64)
        values[destination] = flat
        self.values = torch.from_numpy(values)

    @classmethod
    def read(cls, path) -> "EarlierItems":
        import pyarrow.parquet as pq

        from merlin_molar.ids import EARLIER_ITEMS, USER_INDEX

        table = pq.read_table(str(path), columns=[USER_INDEX, EARLIER_ITEMS])
        return cls(table.column(USER_INDEX).to_numpy(), table.column(EARLIER_ITEMS))

    def __len__(self) -> int:
        return self.lengths.numel()

    def padded(self, user_index: torch.Tensor) -> torch.Tensor:
        """``[batch, longest]`` item ids of the given users, right-padded with 0."""
        user_index = user_index.reshape(-1).long().cpu()
        if len(user_index) and (int(user_index.min()) < 0 or int(user_index.max()) >= len(self)):
            raise ValueError(f"user_index outside the earlier-items table's {len(self)} users")
        lengths = self.lengths[user_index]
        out = torch.zeros(len(user_index), int(lengths.max()) if len(user_index) else 0, dtype=torch.long)
        positions = torch.arange(out.size(1))
        inside = positions < lengths[:, None]
        out[inside] = self.values[(self.offsets[user_index][:, None] + positions)[inside]]
        return out

    def mask(self, scores: torch.Tensor, user_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``scores`` with the users' earlier items also set to -inf (the target keeps its score)."""
        return mask_seen_items(scores, self.padded(user_index).to(scores.device), targets)


def history_without_last(item_seq: torch.Tensor, padding_idx: int = 0) -> torch.Tensor:
    """The input sequence with each row's last non-padding item (the evaluation target) removed."""
    lengths = (item_seq != padding_idx).sum(dim=1)
    history = item_seq.clone()
    rows = torch.arange(item_seq.size(0), device=item_seq.device)
    history[rows, (lengths - 1).clamp(min=0)] = padding_idx
    return history


def reference_metrics(
    scores: torch.Tensor, targets: torch.Tensor, top_ks: Iterable[int] = TOP_KS
) -> Dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K for one relevant item per user, computed from the target's rank."""
    target_scores = scores.gather(1, targets.long().view(-1, 1))
    # rank = number of items scored strictly higher (ties resolved in the target's favour)
    rank = (scores > target_scores).sum(dim=1)
    out = {}
    for k in top_ks:
        hit = rank < k
        out[f"recall_at_{k}"] = hit.float()
        out[f"ndcg_at_{k}"] = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank.float()))
    return out


def summarise(trainer_metrics: Dict[str, float], prefix: str) -> Dict[str, float]:
    """Turn the Trainer's ``{prefix}_/next-item/ndcg_at_10``-style keys into ``ndcg@10``."""
    out = {}
    for key, value in trainer_metrics.items():
        name = key.rsplit("/", 1)[-1]
        for metric in ("ndcg", "recall"):
            if name.startswith(f"{metric}_at_"):
                out[f"{metric}@{name.rsplit('_', 1)[-1]}"] = float(value)
        if name == "loss":
            out["loss"] = float(value)
    return dict(sorted(out.items()))
