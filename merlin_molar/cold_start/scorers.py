"""Scorers for the cold-start evaluation: ``histories [users, length] -> scores [users, items]`` of a model
and of the baselines (content kNN of the last item, popularity, random)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from merlin_molar.ids import FIRST_ITEM_ID, ITEM_SEQUENCE


def model_scorer(model, width: int, **task_settings) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores of a T4Rec model in inference mode for padded histories, padded with -inf to ``width``
    columns (a model that does not know the new items cannot rank them). ``task_settings``: attributes of
    the prediction task set only while this scorer runs (e.g. ``id_weight=0.0``)."""
    task = model.heads[0].prediction_task_dict["next-item"]

    def score(histories):
        saved = {name: getattr(task, name) for name in ("mask_history", *task_settings)}
        for name, value in {**task_settings, "mask_history": False}.items():
            setattr(task, name, value)  # the evaluator masks, the same way for every scorer
        try:
            with torch.no_grad():
                scores = model({"item_id-list": histories}).float()
        finally:
            for name, value in saved.items():
                setattr(task, name, value)
        if scores.size(1) < width:
            pad = torch.full((scores.size(0), width - scores.size(1)), float("-inf"))
            scores = torch.cat([scores, pad], dim=1)
        return scores

    return score


def content_knn_scorer(table: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cosine similarity, in the MIRM table, between every item and the user's last item."""
    normed = torch.nn.functional.normalize(table.float(), dim=1)

    def score(histories):
        last = histories.gather(1, ((histories != 0).sum(1) - 1).clamp(min=0).view(-1, 1)).squeeze(1)
        return normed[last] @ normed.T

    return score


def new_items_on_model_scale(model_scores: Callable, new_item_scores: Callable, known: int) -> Callable:
    """A scorer that ranks the known items by ``model_scores`` and the new ones (ids ``>= known``) by
    ``new_item_scores`` (e.g. :func:`content_knn_scorer`), each new item placed on the model's scale by rank:
    it gets the model score of the known item that ``new_item_scores`` ranks just below it for that user (the
    quantile mapping :func:`merlin_molar.models.task.calibrated_new_item_scores` applies to the content tower).
    The cold-start trade-off uses it to compare ways of scoring new items at the same warm cost."""
    from merlin_molar.models.task import rank_matched

    def score(histories):
        scores = model_scores(histories).clone()
        other = new_item_scores(histories).float()
        scores[:, known:] = rank_matched(other[:, FIRST_ITEM_ID:known], scores[:, FIRST_ITEM_ID:known],
                                         other[:, known:])
        return scores

    return score


def popularity_scorer(prepared, width: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Interaction counts in the validation split's histories (every interaction training saw, including the
    validation targets); zero for items never seen. Ties are broken at random."""

    valid = prepared.split_frame("valid")[ITEM_SEQUENCE]
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in valid]), minlength=width)[:width]
    counts = torch.from_numpy(counts.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)

    def score(histories):
        return counts.expand(histories.size(0), -1) + 0.5 * torch.rand(histories.size(0), width, generator=generator)

    return score


def random_scorer(width: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda histories: torch.rand(histories.size(0), width, generator=generator)


def known_items_scorer(scorer: Callable, known: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``scorer`` ranking only the first ``known`` items (the others score -inf): for an extended Molar
    model, the same ranking of the known items as the model before the extension (the fused scores of the
    known items move by one constant per user when items are added)."""

    def score(histories):
        scores = scorer(histories).clone()
        scores[:, known:] = float("-inf")
        return scores

    return score


def first_items_scorer(scorer: Callable, items: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda histories: scorer(histories)[:, :items]
