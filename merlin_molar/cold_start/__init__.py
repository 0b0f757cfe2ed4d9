"""Content-based cold start: scoring items added after training with a trained Molar model, and measuring it.

Holding the latest items out at prepare time is :mod:`merlin_molar.data.holdout`; the model surgery that lets
a trained model score an extended catalogue is :mod:`merlin_molar.models.catalogue`. This package builds on
both, one direction:

* :mod:`~merlin_molar.cold_start.scorers`: ``histories -> scores`` of a model and of the baselines (content
  kNN of the last item, popularity, random);
* :mod:`~merlin_molar.cold_start.prior`: the new items' log-prior offset, chosen on the validation split
  without test data (:func:`estimate_new_item_prior`);
* :mod:`~merlin_molar.cold_start.extension`: a model (:func:`model_for_catalogue`) or a saved model directory
  (:func:`extend_saved_model`, the CLI's ``extend-model``) made to score the current catalogue;
* :mod:`~merlin_molar.cold_start.evaluation`: full ranking over the extended catalogue (history masked),
  metrics for users whose test target is cold and users whose target is warm, for the model and the
  baselines in the same run (:func:`cold_start_evaluation`, the CLI's ``evaluate-cold-start`` and
  ``benchmarks/cold_start.py``).
"""
from merlin_molar.cold_start.evaluation import (
    OFFSET_GRID,
    cold_start_evaluation,
    cold_start_table,
    cold_test_split,
    evaluate_cold_start,
    summary,
    warm_cost_tradeoff,
)
from merlin_molar.cold_start.extension import extend_saved_model, model_for_catalogue
from merlin_molar.cold_start.prior import (
    PRIOR_GRID,
    PSEUDO_NEW_FRACTION,
    WARM_COST_BUDGET,
    PriorSearch,
    estimate_new_item_prior,
    item_arrival_order,
)
from merlin_molar.cold_start.scorers import (
    content_knn_scorer,
    first_items_scorer,
    known_items_scorer,
    model_scorer,
    new_items_on_model_scale,
    popularity_scorer,
    random_scorer,
)

__all__ = [
    "OFFSET_GRID",
    "PRIOR_GRID",
    "PSEUDO_NEW_FRACTION",
    "PriorSearch",
    "WARM_COST_BUDGET",
    "cold_start_evaluation",
    "cold_start_table",
    "cold_test_split",
    "content_knn_scorer",
    "estimate_new_item_prior",
    "evaluate_cold_start",
    "extend_saved_model",
    "first_items_scorer",
    "item_arrival_order",
    "known_items_scorer",
    "model_for_catalogue",
    "model_scorer",
    "new_items_on_model_scale",
    "popularity_scorer",
    "random_scorer",
    "summary",
    "warm_cost_tradeoff",
]
