"""Prediction tasks: next-item prediction evaluated with full ranking and history masking.

:class:`FullRankingNextItemTask` is Transformers4Rec's ``NextItemPredictionTask`` whose evaluation and
inference scores go through the project's evaluator (:mod:`merlin_molar.evaluation`): every item is
scored and the user's history is masked before the ranking metrics see the scores.
"""
from __future__ import annotations

import torch
from transformers4rec.torch.model.prediction_task import NextItemPredictionTask

from merlin_molar.errors import MolarDataError
from merlin_molar.evaluation import TOP_KS, history_without_last, mask_seen_items, ranking_metrics


class FullRankingNextItemTask(NextItemPredictionTask):
    """Next-item prediction with the paper's evaluation protocol.

    Example::

        task = FullRankingNextItemTask(weight_tying=True)
        model = tr.Model(tr.Head(body, task, inputs=inputs))
    """

    def __init__(self, *args, top_ks=TOP_KS, mask_history: bool = True, **kwargs):
        kwargs.setdefault("metrics", ranking_metrics(top_ks))
        super().__init__(*args, **kwargs)
        self.mask_history = mask_history

    def forward(self, inputs, targets=None, training=False, testing=False, top_k=None, **kwargs):
        if training or not self.mask_history:
            return super().forward(inputs, targets=targets, training=training, testing=testing, top_k=top_k, **kwargs)
        item_seq = self.embeddings.item_seq
        if testing:
            out = super().forward(inputs, targets=targets, training=False, testing=True, **kwargs)
            if out["predictions"].size(0) != item_seq.size(0):
                raise MolarDataError(
                    "evaluation batch",
                    "every evaluated sequence needs at least 2 items (history + target); "
                    f"{item_seq.size(0) - out['predictions'].size(0)} rows have fewer",
                )
            history = history_without_last(item_seq, self.padding_idx)
            out["predictions"] = mask_seen_items(out["predictions"], history, out["labels"])
            return out
        scores = super().forward(inputs, targets=targets, training=False, testing=False, **kwargs)
        scores = mask_seen_items(scores, item_seq)
        if top_k is None:
            return scores
        return torch.topk(scores, k=top_k, dim=-1)
