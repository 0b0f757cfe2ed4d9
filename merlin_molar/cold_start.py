"""Content-based cold start: held-out "new" items, scoring them with a trained model, and measuring it.

Three parts, each used by the CLI, the benchmark (``benchmarks/cold_start.py``) and the tests:

* :func:`hold_out_items` (called by ``prepare(..., cold_items=0.1)``): the latest items to appear, by first
  interaction time, become *cold*. Their interactions are removed from every history, except where one is
  a user's last interaction: there it stays as that user's test target. NVTabular's Categorify is fitted
  on the warm interactions only, so the prepared vocabulary (and every model trained on it) has never
  seen a cold item; in the test split a cold target is Categorify's out-of-vocabulary id until the cold
  items are added with ``merlin-molar add-items --items PREPARED/cold_items.csv``. (So in such a directory
  the test metrics that ``train`` prints score cold targets as the OOV id; :func:`evaluate_cold_start` is the
  cold-start measurement.)
* :func:`extend_catalogue`: a trained Molar model scores the extended catalogue with no retraining. The
  content tower reads the extended item table; the ID branch has no embedding for a new item, so the
  task fills its ID score in from an ID embedding imputed from its content and tempers the new items'
  scores (see :func:`merlin_molar.models.task.calibrated_new_item_scores`), then adds a log-prior offset
  chosen on the validation split without test data (:func:`estimate_new_item_prior`). ID-only models (SASRec, GRU4Rec)
  are refused.
* :func:`evaluate_cold_start`: full ranking over the extended catalogue (history masked), with metrics
  reported separately for users whose test target is cold and users whose target is warm, for the model
  and for three baselines scored in the same run: random, popularity (zero for items never seen in
  training) and content-only nearest neighbour of the last item (cosine in the MIRM table);
  :func:`cold_start_evaluation` wires it for a saved model (the CLI's ``evaluate-cold-start`` and the
  benchmark).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from merlin_molar.errors import MolarDataError

LOG = logging.getLogger(__name__)

COLD_ITEMS_FILE = "cold_items.csv"
COLD_TARGETS_FILE = "cold_targets.parquet"
OOV_ID = 2  # Categorify's out-of-vocabulary id


# --------------------------------------------------------------------------------------------------------------
# hold-out (prepare)
# --------------------------------------------------------------------------------------------------------------
def hold_out_items(interactions: pd.DataFrame, fraction: float, order_column: str) -> Tuple[pd.DataFrame, list]:
    """``(kept interactions, cold raw ids ordered by first appearance)``.

    The cold items are the ``ceil(fraction * items)`` items whose first interaction is the latest. A cold
    item's interaction is kept only where it is a user's last interaction (the test target)."""
    if not 0 < fraction < 1:
        raise MolarDataError("--cold-items", f"must be a fraction in (0, 1), got {fraction}")
    ordered = interactions.sort_values(["timestamp", order_column], kind="stable")
    first = ordered.drop_duplicates("item_id", keep="first")
    n_cold = int(math.ceil(fraction * len(first)))
    if n_cold >= len(first):
        raise MolarDataError("--cold-items", f"{fraction} would hold out every item")
    cold = first["item_id"].tolist()[-n_cold:]
    is_cold = interactions["item_id"].isin(set(cold))
    last_of_user = ordered.drop_duplicates("user_id", keep="last").index
    keep = ~is_cold | interactions.index.isin(last_of_user)
    return interactions[keep], cold


def write_cold_files(root: Path, raw_items: pd.DataFrame, cold: Sequence, test: pd.DataFrame, kept) -> dict:
    """Write ``cold_items.csv`` (content rows of the cold items, in first-appearance order: the file to give
    ``add-items``) and ``cold_targets.parquet`` (user_id, raw id of the cold test target)."""
    from merlin_molar.io import atomic_path

    by_id = raw_items.set_index("item_id")
    present = [i for i in cold if i in by_id.index]
    if not present:
        raise MolarDataError("--cold-items", "none of the held-out items has a row in the item table")
    rows = by_id.loc[present].reset_index()
    with atomic_path(root / COLD_ITEMS_FILE) as tmp:
        rows.to_csv(tmp, index=False)
    cold_set = set(cold)
    last = kept.sort_values(["timestamp", "interaction_order"], kind="stable").drop_duplicates("user_id", keep="last")
    targets = last[last["item_id"].isin(cold_set) & last["user_id"].isin(set(test["user_id"]))]
    targets = pd.DataFrame({"user_id": targets["user_id"].to_numpy(), "item_id_raw": targets["item_id"].to_numpy()})
    with atomic_path(root / COLD_TARGETS_FILE) as tmp:
        targets.sort_values("user_id").to_parquet(tmp, index=False)
    return {
        "cold_items": len(cold),
        "cold_items_with_content": len(present),
        "cold_target_users": int(len(targets)),
        "items_file": COLD_ITEMS_FILE,
        "targets_file": COLD_TARGETS_FILE,
    }


# --------------------------------------------------------------------------------------------------------------
# scoring new items with a trained model
# --------------------------------------------------------------------------------------------------------------
class KnownIdsEmbedding(torch.nn.Module):
    """An ID branch's item embedding that reads ids it was not trained on as Categorify's OOV id."""

    def __init__(self, embedding: torch.nn.Embedding, known: int, oov: int = OOV_ID):
        super().__init__()
        self.embedding, self.known, self.oov = embedding, known, oov

    @property
    def weight(self):
        return self.embedding.weight

    def forward(self, ids):
        return self.embedding(torch.where(ids >= self.known, torch.full_like(ids, self.oov), ids))


IMPUTATION_SHRINKAGE = 0.1  # ridge penalty, relative to the content features' mean variance
IMPUTATION_NEIGHBOURS = 5  # known items whose ID embeddings are averaged, by content cosine
IMPUTATION_TEMPERATURE = 0.05  # softmax temperature over those neighbours' cosines
IMPUTATION_NEIGHBOUR_WEIGHT = 0.5  # the neighbour average's share; the ridge map has the rest


def impute_id_embeddings(
    content_table: torch.Tensor,
    id_table: torch.Tensor,
    known: int,
    shrinkage: float = IMPUTATION_SHRINKAGE,
    neighbours: int = IMPUTATION_NEIGHBOURS,
    temperature: float = IMPUTATION_TEMPERATURE,
    neighbour_weight: float = IMPUTATION_NEIGHBOUR_WEIGHT,
    batch_size: int = 4096,
) -> torch.Tensor:
    """``[items, id_dim]``: an ID embedding for every row of ``content_table`` (the MIRM item table), learned
    from the ``known`` items, whose ID embeddings (``id_table``) the ID branch was trained with (reserved ids
    0..2 left out). Known items get an imputed value too, so that new and known items can be compared on one
    scale (:func:`merlin_molar.models.task.calibrated_new_item_scores`). It is the mix of

    * a ridge regression of the ID embeddings on the content rows (the global trend: genre, era, style);
      ``shrinkage`` is its penalty in units of a content feature's mean variance, so it means the same for a
      384-wide sentence encoder and a 3584-wide MLLM;
    * the softmax(cosine / ``temperature``)-weighted mean ID embedding of the ``neighbours`` known items
      closest in content (the local structure the regression averages away: a sequel, the same franchise),
      with weight ``neighbour_weight``.

    Chosen on MovieLens-1M's validation simulation (:func:`estimate_new_item_prior`: pseudo-new hits@10 of
    353 at the 2% warm budget): ridge alone reached 64-71 for shrinkage 0.005-0.5 (a flat optimum), the
    neighbour mean alone 50-60, their 0.5/0.5 mix 73 (64-74 over mixes 0.25-0.75, 5-20 neighbours and
    temperatures 0.02-0.1)."""
    from merlin_molar.evaluation import FIRST_ITEM_ID

    if content_table.size(0) < known or known - FIRST_ITEM_ID < 2:
        raise MolarDataError("item table", f"needs at least {known} rows and 2 known items to impute ID embeddings")
    x = content_table.detach().double()
    y = id_table.detach().double()[FIRST_ITEM_ID:known]
    xk = x[FIRST_ITEM_ID:known]
    x_mean, y_mean = xk.mean(0), y.mean(0)
    xc = xk - x_mean
    gram = xc.T @ xc
    penalty = shrinkage * torch.trace(gram) / gram.size(0) + 1e-12
    weights = torch.linalg.solve(gram + penalty * torch.eye(gram.size(0), dtype=gram.dtype), xc.T @ (y - y_mean))
    imputed = (x - x_mean) @ weights + y_mean
    if neighbour_weight > 0:
        unit = torch.nn.functional.normalize(content_table.detach().float(), dim=1)
        unit_known = unit[FIRST_ITEM_ID:known]
        k = min(int(neighbours), unit_known.size(0))
        batch_size = max(1, min(batch_size, 2**25 // unit_known.size(0)))  # at most 128 MiB of cosines at once
        for start in range(0, x.size(0), batch_size):
            top = (unit[start : start + batch_size] @ unit_known.T).topk(k, dim=1)
            share = torch.softmax(top.values.double() / temperature, dim=1)
            mean = (share.unsqueeze(-1) * y[top.indices]).sum(1)
            imputed[start : start + batch_size] = (1 - neighbour_weight) * imputed[start : start + batch_size] + (
                neighbour_weight * mean
            )
    return imputed.to(id_table.dtype)


def extend_catalogue(
    model, kind: str, table: torch.Tensor, new_item_scoring: str = "imputed", new_item_prior: float = 0.0,
    new_item_temperature: float = None,
):
    """Make a trained model score ``table``'s catalogue (the model's own table plus rows added after it was
    trained), in place; returns the model. ``new_item_prior``: the log-prior offset added to the new items'
    scores (:func:`estimate_new_item_prior` chooses it; 0 = the calibrated score alone);
    ``new_item_temperature``: their tempering (default :data:`~merlin_molar.models.task.NEW_ITEM_TEMPERATURE`;
    see :func:`~merlin_molar.models.task.calibrated_new_item_scores`).

    The first rows of ``table`` must be byte-identical to the table the model was trained with, so a table
    of another dataset or encoder cannot be swapped in by mistake."""
    from merlin_molar.models.id_models import ID_MODELS
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    if kind in ID_MODELS:
        raise MolarDataError(
            "model",
            f"a {ID_MODELS[kind].title} model has no embedding for items added after training and cannot score "
            "them (retrain it, or use a Molar model, whose content tower scores new items)",
        )
    if kind != "molar":
        raise MolarDataError("model", f"unknown model kind {kind!r}")
    emb = _content_embedding(model)
    known = int(getattr(emb, "known_items", emb.table.size(0)))
    old = emb.table[:known]
    table = table.to(dtype=torch.float32, device=old.device)
    if table.size(0) < known or table.size(1) != old.size(1) or not torch.equal(table[:known], old):
        raise MolarDataError(
            "item table",
            f"its first {known} rows are not the table this model was trained with (another dataset, encoder "
            "or catalogue version): use the table the model was trained on, extended with `add-items`",
        )
    emb.table = table.clone()
    emb.known_items = known
    emb.num_embeddings = table.size(0)
    emb._cached_weight = None
    task = model.heads[0].prediction_task_dict["next-item"]
    task.known_items = known
    task.new_item_scoring = new_item_scoring
    task.new_item_prior = float(new_item_prior)
    task.new_item_temperature = float(NEW_ITEM_TEMPERATURE if new_item_temperature is None else new_item_temperature)
    task.imputed_id_table = None
    if new_item_scoring == "imputed" and task.id_item_table is not None:
        task.imputed_id_table = impute_id_embeddings(table, task.id_item_table.weight, known)
    id_body = model.heads[0].body.id_body
    if id_body is not None:
        tables = id_body.inputs.categorical_module.embedding_tables
        id_col = next(iter(tables))
        if not isinstance(tables[id_col], KnownIdsEmbedding):
            tables[id_col] = KnownIdsEmbedding(tables[id_col], known)
    return model


def model_for_catalogue(
    model, kind: str, prepared, item_table_path=None, new_item_scoring: str = "imputed", new_item_prior="auto",
    new_item_temperature: float = None,
):
    """``model`` ready to score ``prepared``'s current catalogue: unchanged when it was trained on it, extended
    with the prepared item table when items were added since (``add-items``). ``new_item_prior``: a number,
    or ``"auto"`` (default) for :func:`estimate_new_item_prior` on ``prepared``'s validation split (one
    inference pass over it; ``extend-model`` does it once and saves the result with the model)."""
    cardinality = prepared.item_cardinality
    trained = _trained_cardinality(model, kind)
    if trained == cardinality:
        return model
    if trained > cardinality:
        raise MolarDataError(prepared.root, f"has {cardinality} item ids, fewer than the model's {trained}")
    if kind != "molar":
        extend_catalogue(model, kind, None)  # raises the clear ID-model error
    from merlin_molar.items import load_item_table

    path = Path(item_table_path) if item_table_path else prepared.root / "item_table"
    prior = 0.0
    if new_item_prior == "auto":
        prior = estimate_new_item_prior(model, prepared, new_item_scoring=new_item_scoring, item_table=path,
                                        new_item_temperature=new_item_temperature)["prior"]
    elif new_item_prior is not None:
        prior = float(new_item_prior)
    return extend_catalogue(model, kind, load_item_table(path, prepared), new_item_scoring, prior,
                            new_item_temperature)


def _content_embedding(model):
    """A Molar model's content item embedding (the MIRM table it reads, ``.table``)."""
    return next(iter(model.heads[0].body.content[0].categorical_module.embedding_tables.values()))


def _trained_cardinality(model, kind: str) -> int:
    if kind == "molar":
        return int(_content_embedding(model).num_embeddings)
    return int(model.heads[0].body.inputs.categorical_module.item_embedding_table.weight.size(0))


# --------------------------------------------------------------------------------------------------------------
# the new-item prior (estimated on training and validation data only)
# --------------------------------------------------------------------------------------------------------------
PRIOR_GRID = tuple(float(b) for b in np.round(np.arange(-4.0, 1.0001, 0.05), 2))  # log units, 0 included
PSEUDO_NEW_FRACTION = 0.1
WARM_COST_BUDGET = 0.02  # the warm NDCG@10 the cold-start requirement allows new items to cost


def _histories_and_targets(sequences, length: int, drop: np.ndarray = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(histories [users, length] left-aligned, right-padded with 0; targets [users])`` of whole sequences
    (the last item is the target), each history keeping its last ``length`` items; ``drop``: a boolean mask
    over item ids whose items are taken out of the histories first."""
    histories = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        h = np.asarray(seq[:-1], dtype=np.int64)
        if drop is not None:
            h = h[~drop[h]]
        h = np.array(h[-length:])
        histories[i, : len(h)] = torch.from_numpy(h)
    return histories, torch.tensor([int(seq[-1]) for seq in sequences])


def item_arrival_order(prepared, raw=None) -> np.ndarray:
    """Encoded ids of the trained (known) items, in order of their first interaction before the test:
    every user's interactions but the last (the test target; the validation target is the last one kept),
    after the cold hold-out, ties broken by position in the raw table, as ``prepare`` orders them. This is
    the order ``prepare --cold-items`` picks the cold items by, one step earlier in time. Known items that
    occur only as test targets come last, by id.

    The prepared splits keep no timestamps, so this reads the raw data ``prepare`` read (``raw``, or the
    manifest's ``source``) and refuses data whose fingerprint is not the prepared one. The test targets
    only decide which interactions are dropped, never the order."""

    from merlin_molar.data import read_dataset
    from merlin_molar.data.workflow import ORDER_COLUMN, dataset_fingerprint, item_id_mapping

    manifest = prepared.manifest
    if raw is None:
        source = manifest.get("source")
        if not source or not Path(source).exists():
            raise MolarDataError(prepared.root, f"the raw data it was prepared from ({source}) is not readable, so "
                                                "the new-item prior cannot be estimated: give it explicitly "
                                                "(`merlin-molar extend-model --new-item-prior NUMBER`)")
        raw = read_dataset(source, text_columns=manifest.get("text_columns"))
    if dataset_fingerprint(raw) != manifest.get("fingerprint"):
        raise MolarDataError(raw.source, "is not the data this directory was prepared from (fingerprint differs)")
    inter = raw.interactions
    if int(manifest.get("k_core") or 0) > 1:
        import tempfile

        from merlin_molar.data.workflow import k_core

        with tempfile.TemporaryDirectory(prefix="molar-kcore-") as scratch:
            inter = k_core(inter, int(manifest["k_core"]), cat_path=scratch)
    inter = inter.assign(**{ORDER_COLUMN: np.arange(len(inter))})
    if "cold_start" in manifest:
        inter, _ = hold_out_items(inter, manifest["cold_start"]["fraction"], ORDER_COLUMN)
    ordered = inter.sort_values(["timestamp", ORDER_COLUMN], kind="stable")
    from_end = ordered.groupby("user_id", sort=False).cumcount(ascending=False)
    before_test = ordered[from_end >= 1]
    history = prepared.manifest["catalogue"]["history"] if "catalogue" in manifest else None
    mapping = item_id_mapping(prepared.load_workflow())
    known = int(history[0]["item_cardinality"]) if history else prepared.item_cardinality
    codes = mapping[mapping < known]
    seen = [int(codes[i]) for i in before_test.drop_duplicates("item_id")["item_id"] if i in codes.index]
    rest = sorted(set(int(c) for c in codes) - set(seen))  # only test targets: last, by id
    return np.asarray(seen + rest, dtype=np.int64)


def estimate_new_item_prior(
    model,
    prepared,
    new_item_scoring: str = "imputed",
    fraction: float = PSEUDO_NEW_FRACTION,
    grid: Sequence[float] = PRIOR_GRID,
    pseudo_new: Sequence[int] = None,
    raw=None,
    batch_size: int = 256,
    rule: str = "both",
    warm_cost_budget: float = WARM_COST_BUDGET,
    item_table=None,
    new_item_temperature: float = None,
) -> dict:
    """The log-prior offset ``b`` for items added after training, chosen on the validation split by
    simulating cold start with the items the model *was* trained on. Returns ``{"prior": b, ...}`` with
    the whole curve, for the record.

    Why: a new item's calibrated score (:func:`merlin_molar.models.task.calibrated_new_item_scores`) says
    "as likely as the known item with the same content rank". That is a guess with no evidence of its
    base rate: the content rank of an item nobody has interacted with is noisier than the ID branch's
    score, and how often the freshest items are the next interaction is a property of the data. The
    Bayes-consistent fix for a ranking metric is one log-prior term per item group, ``log P(new) -
    log P(calibrated guess)``, i.e. a scalar offset ``b`` added to every new item's score. It is learned
    where the truth is known without touching the test split:

    1. *pseudo-new items*: the ``fraction`` of known items that appeared last before the test
       (:func:`item_arrival_order`: the rule ``prepare --cold-items`` picks the real cold items by, applied
       to the data up to the validation targets), or ``pseudo_new``;
    2. one inference pass over the validation split (history -> the validation target, the targets the
       model was not trained on), with the pseudo-new items removed from the histories as ``prepare``
       removes the cold items' interactions, keeping the content and ID log-probabilities of the known
       items;
    3. the pseudo-new items are scored as new items are: their ID scores dropped (the ID softmax
       renormalised over the other items), content-only with the same calibration (``"imputed"``: the ID
       embeddings imputed by a map fitted on the other known items only), tempered around the pseudo-new
       items' log-mass (``new_item_temperature``), plus ``b``;
    4. for every ``b`` of the grid, history masked as in evaluation: the validation NDCG@10 of the users
       whose target is not pseudo-new ("warm"), against the same users with the pseudo-new items not ranked
       at all (the model before the extension), and of all users.

    ``rule="budget"``: ``b`` = the largest grid value whose simulated warm cost is at most ``warm_cost_budget``
    (2%, the tolerance the cold-start requirement sets). It is an estimate, not a bound: the model was trained
    on the pseudo-new items, so its content scores are sharper for them than for items it never saw.

    ``rule="actual_budget"``, available once ``prepared``'s catalogue holds the items added after training
    (``add-items``; their table is ``item_table``, by default the prepared one): the same budget, read with
    *those* items instead of the pseudo-new ones (``actual_new_items``): every validation target is a known
    item, so the validation NDCG@10 with the actual new items ranked at offset ``b``, against the same model
    ranking only the known items, estimates the cost the requirement bounds. It has a bias of its own: an
    early-stopped model was chosen for its validation NDCG, so its validation targets can sit higher in the
    ranking than its test targets and be harder to displace.

    ``rule="both"`` (default): the largest ``b`` within the budget on *both* estimates (``"budget"`` alone
    while no items have been added). Measured on the test splits of the six committed cold-start models
    (``benchmarks/results/cold_start_*.json``, new items scored ``"imputed"`` at temperature 1), the test warm
    cost at the simulation's ``b`` was 1.8-2.3% on the four MovieLens-1M models and 0.3-0.6% on the two
    MovieLens-100K ones; at the added items' own ``b`` it was 1.1-1.7% and 1.9-2.7%. Each estimate is
    optimistic on one dataset; the smaller ``b`` stayed within 2% on all six. At the default temperature (2)
    the rule gives 1.3-1.8% on MovieLens-1M and 0.2-0.4% on MovieLens-100K, while the simulation alone
    would give 2.8-3.8% on MovieLens-1M.

    Adding new items is a trade: every top-10 slot they take is taken from a warm item, and the requirement
    states how much warm accuracy it is worth; within that budget new items get as much reach as possible.
    Each warm user's NDCG@10 can only fall as ``b`` grows (raising other items never lifts their target), so
    the rule is monotone and stable. ``rule="ndcg"``: the ``b`` with the best NDCG@10 over all users (ties to
    the ``b`` closest to 0). It weighs fresh and other targets by how often each occurs, which is the right objective
    for the mean metric but, with few fresh targets, a flat and noisy curve; on MovieLens-100K it drove new
    items out of every top-10. Every choice is recorded (``by_rule``), with the whole curves.

    The content log-probabilities are renormalised over the known items, so the estimate does not depend on
    whether ``model`` was already extended. A model without an ID branch (or ``id_weight`` 0) scores new
    items exactly like known ones and gets ``b = 0``."""
    from merlin_molar.data.workflow import ITEM_SEQUENCE
    from merlin_molar.evaluation import FIRST_ITEM_ID, mask_seen_items, reference_metrics
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE, scores_with_new_items

    if new_item_temperature is None:
        new_item_temperature = NEW_ITEM_TEMPERATURE
    task = model.heads[0].prediction_task_dict["next-item"]
    if getattr(model.heads[0].body, "id_body", None) is None or task.id_weight <= 0:
        return {"prior": 0.0, "why": "no ID branch: new items are scored like known ones"}
    known = int(task.id_item_table.weight.size(0))
    if pseudo_new is None:
        order = item_arrival_order(prepared, raw)
        pseudo_new = order[-int(math.ceil(fraction * len(order))):]
    pseudo_new = np.unique(np.asarray(pseudo_new, dtype=np.int64))
    if not len(pseudo_new) or pseudo_new.min() < FIRST_ITEM_ID or pseudo_new.max() >= known:
        raise MolarDataError("pseudo-new items", f"must be trained item ids in {FIRST_ITEM_ID}..{known - 1}")
    is_new = np.zeros(known, dtype=bool)
    is_new[pseudo_new] = True
    # column order of the simulation: the other known items first (reserved ids included), pseudo-new last
    perm = torch.from_numpy(np.concatenate([np.flatnonzero(~is_new), np.flatnonzero(is_new)]))
    n_old = int((~is_new).sum())

    valid = prepared.split_frame("valid").sort_values("user_id")
    sequences = [np.asarray(v, dtype=np.int64) for v in valid[ITEM_SEQUENCE]]
    histories, targets = _histories_and_targets(sequences, prepared.max_length, drop=is_new)  # new: in no history
    grid = sorted({float(b) for b in grid})
    ndcg_all, ndcg_warm, recall_new, share = (np.zeros(len(grid)) for _ in range(4))
    ndcg_warm_without = 0.0  # the warm users' NDCG@10 when the pseudo-new items are not ranked at all
    new_col = torch.from_numpy(is_new)
    target_is_new = new_col[targets]
    imputed_table = None  # in simulation order: fitted on the other known items, applied to all of them
    if new_item_scoring == "imputed":
        imputed_table = impute_id_embeddings(_content_embedding(model).table[:known][perm].float(),
                                             task.id_item_table.weight.float()[perm[:n_old]], n_old)
    task.log_prob_sink, saved, was_training = [], task.mask_history, model.training
    task.mask_history = False
    model.eval()
    try:
        for start in range(0, len(targets), batch_size):
            h, t = histories[start : start + batch_size], targets[start : start + batch_size]
            fresh = target_is_new[start : start + batch_size]
            task.log_prob_sink.clear()
            with torch.no_grad():
                model({"item_id-list": h})
            content_logp, id_logp, id_users = task.log_prob_sink[0]
            content_logp = torch.log_softmax(content_logp[:, :known].float(), -1)[:, perm]
            id_logp = torch.log_softmax(id_logp.float()[:, perm[:n_old]], -1)
            imputed_logits = None if imputed_table is None else task.id_loss.logits(id_users.float(), imputed_table)
            simulated = scores_with_new_items(content_logp, id_logp, task.id_weight, new_item_scoring,
                                              imputed_logits=imputed_logits, temperature=new_item_temperature)
            base = torch.empty_like(simulated)
            base[:, perm] = simulated  # back to item-id order
            base = mask_seen_items(base, h, t)
            without = base.masked_fill(new_col, float("-inf"))
            ndcg_warm_without += float(reference_metrics(without, t, (10,))["ndcg_at_10"][~fresh].sum())
            for j, b in enumerate(grid):
                scores = base + b * new_col
                m = reference_metrics(scores, t, (10,))
                ndcg_all[j] += float(m["ndcg_at_10"].sum())
                ndcg_warm[j] += float(m["ndcg_at_10"][~fresh].sum())
                recall_new[j] += float(m["recall_at_10"][fresh].sum())
                top = torch.topk(scores, 10, dim=1).indices
                share[j] += float(new_col[top].float().mean(1).sum())
    finally:
        task.log_prob_sink, task.mask_history = None, saved
        model.train(was_training)
    users, n_fresh = len(targets), int(target_is_new.sum())
    n_warm = users - n_fresh
    ndcg_all, share = ndcg_all / users, share / users
    ndcg_warm, ndcg_warm_without = ndcg_warm / max(n_warm, 1), ndcg_warm_without / max(n_warm, 1)
    recall_new = recall_new / max(n_fresh, 1)
    cost = 1 - ndcg_warm / ndcg_warm_without if ndcg_warm_without > 0 else np.zeros(len(grid))
    # "budget": the largest b whose warm cost is within the budget (warm NDCG only falls as b grows)
    by_budget = _largest_within_budget(grid, cost, warm_cost_budget)
    # "ndcg": the best mean NDCG@10 over all users; ties to the b closest to 0
    best = max(range(len(grid)), key=lambda j: (ndcg_all[j], -abs(grid[j]), -grid[j]))
    chosen = {"budget": by_budget, "ndcg": grid[best]}
    actual = _actual_new_items_curve(model, prepared, item_table, grid, new_item_scoring, new_item_temperature,
                                     batch_size)
    chosen["both"] = by_budget
    if actual is not None:
        chosen["actual_budget"] = _largest_within_budget(grid, [c["warm_cost"] for c in actual["curve"]],
                                                         warm_cost_budget)
        chosen["both"] = min(by_budget, chosen["actual_budget"])
    if rule not in chosen:
        raise ValueError(f"rule must be one of {sorted(chosen)}, got {rule!r}")
    at_grid_edge = rule != "ndcg" and chosen[rule] == grid[-1]
    if at_grid_edge:  # the budget would allow more: the grid, not the budget, set the prior
        LOG.warning("new-item prior: %+.2f is the top of the grid; the %s rule would allow a larger one",
                    grid[-1], rule)
    return {
        "prior": chosen[rule],
        "rule": rule,
        "at_grid_edge": at_grid_edge,
        "warm_cost_budget": warm_cost_budget,
        "by_rule": chosen,
        "pseudo_new_items": int(len(pseudo_new)),
        "pseudo_new_fraction": fraction,
        "validation_users": users,
        "validation_targets_pseudo_new": n_fresh,
        "validation_warm_ndcg@10_without_pseudo_new": float(ndcg_warm_without),
        "new_item_scoring": new_item_scoring,
        "new_item_temperature": float(new_item_temperature),
        **({"actual_new_items": actual} if actual is not None else {}),
        "curve": [
            {"prior": b, "ndcg@10": float(ndcg_all[j]), "warm_ndcg@10": float(ndcg_warm[j]),
             "warm_cost": float(cost[j]), "pseudo_new_recall@10": float(recall_new[j]),
             "new_item_share@10": float(share[j])}
            for j, b in enumerate(grid)
        ],
    }


def _largest_within_budget(grid: Sequence[float], cost: Sequence[float], budget: float) -> float:
    """The largest offset whose warm cost is within ``budget`` (warm NDCG only falls as the offset grows)."""
    within = [j for j in range(len(grid)) if cost[j] <= budget + 1e-12]
    return grid[within[-1]] if within else grid[0]


def _actual_new_items_curve(model, prepared, item_table, grid, new_item_scoring, new_item_temperature, batch_size):
    """The warm cost of the items added after training, for every offset of ``grid``, on the validation
    split (whose targets are all known items): ``None`` when ``prepared``'s catalogue has no such items.

    A copy of ``model`` is extended with the catalogue's table and scores the validation histories as they
    are (new items are in nobody's history); each offset's NDCG@10 is compared with the same scores ranking
    only the known items, which is what the model did before the extension (the known items' fused scores
    move by one constant per user when items are added)."""
    import copy

    from merlin_molar.data.workflow import ITEM_SEQUENCE
    from merlin_molar.evaluation import mask_seen_items, reference_metrics
    from merlin_molar.items import load_item_table

    task = model.heads[0].prediction_task_dict["next-item"]
    known = int(task.id_item_table.weight.size(0))
    if prepared.item_cardinality <= known:
        return None
    if item_table is None or not torch.is_tensor(item_table):
        item_table = load_item_table(Path(item_table) if item_table else prepared.root / "item_table", prepared)
    width = int(item_table.size(0))
    extended = extend_catalogue(copy.deepcopy(model), "molar", item_table, new_item_scoring, 0.0,
                                new_item_temperature)
    score = model_scorer(extended, width)
    new_col = torch.arange(width) >= known
    sequences = [np.asarray(v, dtype=np.int64) for v in prepared.split_frame("valid")[ITEM_SEQUENCE]]
    histories, targets = _histories_and_targets(sequences, prepared.max_length)
    loss = np.zeros((len(grid), len(targets)))  # each validation user's NDCG@10 lost to the new items
    share = np.zeros(len(grid))
    ndcg_without = np.zeros(len(targets))
    extended.eval()
    for start in range(0, len(targets), batch_size):
        h, t = histories[start : start + batch_size], targets[start : start + batch_size]
        rows = slice(start, start + len(t))
        base = mask_seen_items(score(h), h, t)
        ndcg_without[rows] = reference_metrics(base.masked_fill(new_col, float("-inf")), t, (10,))["ndcg_at_10"]
        for j, b in enumerate(grid):
            scores = base + b * new_col
            loss[j, rows] = ndcg_without[rows] - reference_metrics(scores, t, (10,))["ndcg_at_10"].numpy()
            share[j] += float(new_col[torch.topk(scores, 10, dim=1).indices].float().mean(1).sum())
    users = len(targets)
    share, reference = share / users, float(ndcg_without.mean())
    mean_loss = loss.mean(1)
    cost = mean_loss / reference if reference > 0 else mean_loss * 0
    return {
        "new_items": width - known,
        "validation_users": users,
        "validation_ndcg@10_known_items_only": reference,
        "curve": [{"prior": b, "warm_ndcg@10": reference - float(mean_loss[j]), "warm_cost": float(cost[j]),
                   "new_item_share@10": float(share[j])}
                  for j, b in enumerate(grid)],
    }


# --------------------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------------------
def cold_test_split(prepared) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(histories [users, max_length] left-aligned, targets [users], is_cold [users])`` of the test split,
    with each cold target re-encoded through the prepared (extended) vocabulary."""

    from merlin_molar.data.workflow import ITEM_SEQUENCE, item_id_mapping

    manifest = prepared.manifest
    if "cold_start" not in manifest:
        raise MolarDataError(prepared.root, "was not prepared with a cold-item hold-out (prepare --cold-items)")
    test = prepared.split_frame("test").sort_values("user_id").reset_index(drop=True)
    sequences = [np.asarray(s, dtype=np.int64) for s in test[ITEM_SEQUENCE]]
    cold = pd.read_parquet(prepared.root / COLD_TARGETS_FILE)
    mapping = item_id_mapping(prepared.load_workflow())
    missing = sorted(set(cold["item_id_raw"]) - set(mapping.index))
    if missing:
        raise MolarDataError(
            prepared.root,
            f"{len(missing)} cold item(s) are not in the vocabulary yet, e.g. {missing[:5]}: run "
            f"`merlin-molar add-items --prepared {prepared.root} --items {prepared.root / COLD_ITEMS_FILE}` first",
        )
    row_of = {u: i for i, u in enumerate(test["user_id"].tolist())}
    is_cold = np.zeros(len(test), dtype=bool)
    for user, raw in zip(cold["user_id"].tolist(), cold["item_id_raw"].tolist()):
        i = row_of[user]
        if sequences[i][-1] != OOV_ID:
            raise MolarDataError(prepared.root / "test", f"user {user}: the cold target is not the OOV id")
        sequences[i] = sequences[i].copy()
        sequences[i][-1] = int(mapping[raw])
        is_cold[i] = True
    if (np.array([s[-1] for s in sequences]) == OOV_ID).any():
        raise MolarDataError(prepared.root / "test", "a test target is out of vocabulary but not a cold item")
    histories, targets = _histories_and_targets(sequences, prepared.max_length)
    return histories, targets, torch.from_numpy(is_cold)


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
    from merlin_molar.evaluation import FIRST_ITEM_ID
    from merlin_molar.models.task import rank_matched

    def score(histories):
        scores = model_scores(histories).clone()
        other = new_item_scores(histories).float()
        scores[:, known:] = rank_matched(other[:, FIRST_ITEM_ID:known], scores[:, FIRST_ITEM_ID:known],
                                         other[:, known:])
        return scores

    return score


OFFSET_GRID = tuple(float(b) for b in np.round(np.arange(-6.0, 2.0001, 0.1), 2))


def warm_cost_tradeoff(
    prepared, scorers: Dict[str, Callable], known: int, offsets: Sequence[float] = OFFSET_GRID,
    budget: float = WARM_COST_BUDGET, items: int = None, batch_size: int = 512, progress: bool = True,
) -> Dict[str, dict]:
    """What each way of scoring new items buys in cold hits for what it costs the warm targets, over the test
    split: for every scorer of the extended catalogue and every offset ``b`` added to the new items' scores,
    the cold targets' hits@10 and recall@10, and the warm targets' NDCG@10 against the same scorer ranking only
    the ``known`` items (what the requirement's warm cost compares with). ``best_within_budget`` is the point
    of the curve with the most cold hits at a warm cost of at most ``budget``. ``cold_recall@10_among_new_items``
    (and the median rank, 1 = first) ranks each cold target among the new items alone: how well the scorer
    orders the new items for a user, which no offset changes, apart from where they land among the known ones.

    The offsets are swept on the test split, so every point is an oracle choice: this is a measurement of the
    frontier each scorer can reach, never a way to set the prior (:func:`estimate_new_item_prior` does that on
    validation data)."""
    from tqdm.auto import tqdm

    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    histories, targets, is_cold = cold_test_split(prepared)
    width = prepared.item_cardinality if items is None else int(items)
    new_col = torch.arange(width) >= known
    n_cold, n_warm = int(is_cold.sum()), int((~is_cold).sum())
    out = {}
    for name, scorer in scorers.items():
        cold_hits, warm_ndcg, warm_ndcg_old = np.zeros(len(offsets)), np.zeros(len(offsets)), 0.0
        rank_among_new = []  # each cold target's rank among the new items alone (no offset moves it)
        for start in tqdm(range(0, len(targets), batch_size), desc=f"warm-cost trade-off [{name}]",
                          disable=not progress):
            h, t = histories[start : start + batch_size], targets[start : start + batch_size]
            cold = is_cold[start : start + batch_size]
            scores = mask_seen_items(scorer(h)[:, :width].float(), h, t)
            old = reference_metrics(scores.masked_fill(new_col, float("-inf")), t, (10,))
            warm_ndcg_old += float(old["ndcg_at_10"][~cold].sum())
            if cold.any():
                new_scores, target = scores[cold][:, known:], t[cold] - known
                rank_among_new.append((new_scores > new_scores.gather(1, target.view(-1, 1))).sum(1))
            for j, b in enumerate(offsets):
                m = reference_metrics(scores + b * new_col, t, (10,))
                cold_hits[j] += float(m["recall_at_10"][cold].sum())
                warm_ndcg[j] += float(m["ndcg_at_10"][~cold].sum())
        warm_ndcg, warm_ndcg_old = warm_ndcg / max(n_warm, 1), warm_ndcg_old / max(n_warm, 1)
        curve = [{"offset": float(b), "cold_hits@10": int(round(cold_hits[j])),
                  "cold_recall@10": float(cold_hits[j] / max(n_cold, 1)), "warm_ndcg@10": float(warm_ndcg[j]),
                  "warm_cost": float(1 - warm_ndcg[j] / warm_ndcg_old) if warm_ndcg_old > 0 else 0.0}
                 for j, b in enumerate(offsets)]
        within = [c for c in curve if c["warm_cost"] <= budget + 1e-12]
        best = max(within, key=lambda c: (c["cold_hits@10"], -c["warm_cost"])) if within else None
        ranks = torch.cat(rank_among_new) if rank_among_new else torch.zeros(0, dtype=torch.long)
        out[name] = {"cold_users": n_cold, "warm_users": n_warm, "warm_ndcg@10_known_items_only": warm_ndcg_old,
                     "new_items": int(width - known),
                     "cold_recall@10_among_new_items": float((ranks < 10).float().mean()) if len(ranks) else None,
                     "cold_median_rank_among_new_items": float(ranks.float().median()) + 1 if len(ranks) else None,
                     "best_within_budget": best, "curve": curve}
    return out


def popularity_scorer(prepared, width: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Interaction counts in the validation split's histories (every interaction training saw, including the
    validation targets); zero for items never seen. Ties are broken at random."""
    from merlin_molar.data.workflow import ITEM_SEQUENCE

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


def evaluate_cold_start(
    prepared,
    scorers: Dict[str, Callable],
    top_ks=(10, 20, 50),
    batch_size: int = 256,
    progress: bool = True,
    known_items: int = None,
    items: int = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{scorer: {"cold"|"warm"|"all": {"recall@K", "ndcg@K", "hits@K", "users"}}}`` over the test split, full
    ranking of the prepared catalogue (its first ``items`` ids when given), reserved ids and history masked
    (the target never); ``hits@K`` counts the users whose target is in their top K. With ``known_items``
    (the catalogue size before the new items), each group also reports ``new_item_share@10``: the fraction
    of its top-10 slots taken by new items."""
    from tqdm.auto import tqdm

    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    histories, targets, is_cold = cold_test_split(prepared)
    width = prepared.item_cardinality if items is None else int(items)
    if int(targets.max()) >= width:
        raise MolarDataError(prepared.root, f"a test target is not among the first {width} items")
    results = {}
    for name, scorer in scorers.items():
        per_user: Dict[str, list] = {}
        for start in tqdm(range(0, len(targets), batch_size), desc=f"cold-start eval [{name}]", disable=not progress):
            h, t = histories[start : start + batch_size], targets[start : start + batch_size]
            scores = scorer(h)
            if scores.size(1) != width:
                raise MolarDataError(name, f"scored {scores.size(1)} items, the catalogue has {width}")
            scores = mask_seen_items(scores, h, t)
            for key, value in reference_metrics(scores, t, top_ks).items():
                per_user.setdefault(key, []).append(value)
            if known_items is not None:
                top = torch.topk(scores, 10, dim=1).indices
                per_user.setdefault("new_item_share_at_10", []).append((top >= known_items).float().mean(1))
        per_user = {k: torch.cat(v) for k, v in per_user.items()}
        out = {}
        for group, mask in (("cold", is_cold), ("warm", ~is_cold), ("all", torch.ones_like(is_cold))):
            n = int(mask.sum())
            metrics = {"users": n}
            for key, values in per_user.items():
                metric, k = key.split("_at_")
                metrics[f"{metric}@{k}"] = float(values[mask].mean()) if n else float("nan")
                if metric == "recall":
                    metrics[f"hits@{k}"] = int(values[mask].sum())
            out[group] = metrics
        results[name] = out
    return results


def cold_start_evaluation(
    model_dir,
    prepared,
    item_table=None,
    *,
    diagnostics: bool = False,
    seed: int = 0,
    items: int = None,
    progress: bool = True,
    new_item_prior="auto",
    details: dict = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The cold-start evaluation of a saved model (the CLI's ``evaluate-cold-start`` and
    ``benchmarks/cold_start.py``): :func:`evaluate_cold_start` of the model, extended to ``prepared``'s
    catalogue when items were added since it was trained (named by its kind, ``molar``), and of the
    ``content_knn``, ``popularity`` and ``random`` baselines.

    ``diagnostics`` adds the variants that explain the model's numbers: ``molar_old_catalogue`` (the same
    model ranking only the items it was trained on), ``molar_content_scale`` (new items scored by the content
    log-softmax alone, no calibration), ``molar_no_prior`` (calibrated, without the new-item prior) and
    ``molar_content_tower`` (content scores only, ``id_weight`` 0), and, when the prior is estimated here,
    ``molar_simulation_budget`` and ``molar_actual_budget`` (the offsets ``rule="budget"`` and
    ``rule="actual_budget"`` choose, each alone), ``molar_untempered`` (new items not tempered, temperature 1)
    and ``molar_quantile`` (the earlier ``"quantile"`` calibration, untempered), the last two with their own
    prior estimated by the default rule. A model saved before
    items were added is extended here with ``new_item_prior`` (``"auto"``: :func:`estimate_new_item_prior`, on
    validation data); an extended model (``extend-model``) keeps the prior saved with it. ``details`` (a dict), when
    given, receives ``known_items``, ``new_item_prior`` and the estimate. ``items`` ranks only the first ``items``
    ids (the catalogue as it was at an earlier version: ids are appended, never moved). Each group reports
    ``new_item_share@10`` when the model knows fewer items."""
    from merlin_molar.items import load_item_table
    from merlin_molar.persistence import load_model

    model, kind, _, _ = load_model(model_dir)
    known = _trained_cardinality(model, kind)
    estimate = None
    if new_item_prior == "auto" and kind == "molar" and known < prepared.item_cardinality:
        estimate = estimate_new_item_prior(model, prepared, item_table=item_table)
        new_item_prior = estimate["prior"]
    model = model_for_catalogue(model, kind, prepared, item_table, new_item_prior=new_item_prior)
    task = model.heads[0].prediction_task_dict["next-item"]
    known = int(getattr(task, "known_items", known))
    if details is not None:
        details.update(known_items=known, new_item_prior=float(getattr(task, "new_item_prior", 0.0)),
                       new_item_prior_estimate=estimate)
    width = prepared.item_cardinality
    table = load_item_table(Path(item_table) if item_table else prepared.root / "item_table", prepared)
    scorers = {
        kind: model_scorer(model, width),
        "content_knn": content_knn_scorer(table),
        "popularity": popularity_scorer(prepared, width, seed=seed),
        "random": random_scorer(width, seed=seed),
    }
    if diagnostics and kind == "molar":
        scorers.update({
            "molar_old_catalogue": known_items_scorer(scorers[kind], known),
            "molar_no_prior": model_scorer(model, width, new_item_prior=0.0),
            "molar_content_scale": model_scorer(model, width, new_item_scoring="content", new_item_prior=0.0,
                                                new_item_temperature=1.0),
            "molar_content_tower": model_scorer(model, width, id_weight=0.0),
        })
        if estimate is not None:
            for rule, name in (("budget", "molar_simulation_budget"), ("actual_budget", "molar_actual_budget")):
                if rule in estimate["by_rule"]:
                    scorers[name] = model_scorer(model, width, new_item_prior=estimate["by_rule"][rule])
        if estimate is not None and task.new_item_scoring != "quantile":
            for name, scoring in (("untempered", task.new_item_scoring), ("quantile", "quantile")):
                other = estimate_new_item_prior(model, prepared, new_item_scoring=scoring, item_table=item_table,
                                                new_item_temperature=1.0)
                scorers[f"molar_{name}"] = model_scorer(model, width, new_item_scoring=scoring,
                                                        new_item_prior=other["prior"], new_item_temperature=1.0)
                if details is not None:
                    details[f"{name}_prior_estimate"] = other
    if items is not None:
        scorers = {name: first_items_scorer(scorer, items) for name, scorer in scorers.items()}
    return evaluate_cold_start(
        prepared, scorers, progress=progress, known_items=known if known < (items or width) else None, items=items
    )


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


def cold_start_table(results: Dict[str, Dict], ks=(10, 20)) -> str:
    header = f"{'variant':<24}" + "".join(f"{g + ' ' + m + '@' + str(k):>16}" for g in ("cold", "warm")
                                         for k in ks for m in ("R", "N"))
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        cells = "".join(f"{r[g][('recall' if m == 'R' else 'ndcg') + '@' + str(k)]:>16.4f}" for g in ("cold", "warm")
                        for k in ks for m in ("R", "N"))
        lines.append(f"{name:<24}{cells}")
    return "\n".join(lines)


def summary(results: Dict[str, Dict], k: int = 10) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The ``{variant: {"cold": {"recall@10", "ndcg@10"}, "warm": {...}}}`` shape of the benchmark JSON."""
    return {
        name: {g: {f"recall@{k}": r[g][f"recall@{k}"], f"ndcg@{k}": r[g][f"ndcg@{k}"]} for g in ("cold", "warm")}
        for name, r in results.items()
    }


__all__ = [
    "COLD_ITEMS_FILE",
    "COLD_TARGETS_FILE",
    "KnownIdsEmbedding",
    "cold_start_evaluation",
    "cold_start_table",
    "content_knn_scorer",
    "evaluate_cold_start",
    "extend_catalogue",
    "hold_out_items",
    "model_for_catalogue",
    "new_items_on_model_scale",
    "model_scorer",
    "popularity_scorer",
    "random_scorer",
    "summary",
    "cold_test_split",
    "estimate_new_item_prior",
    "item_arrival_order",
    "PRIOR_GRID",
    "OFFSET_GRID",
    "warm_cost_tradeoff",
]

