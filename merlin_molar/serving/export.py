"""Export a saved merlin-molar model and its fitted NVTabular workflow as a Triton model repository."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import nvtabular as nvt
from merlin.dag import Graph
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

import merlin_molar
from merlin_molar.data.workflow import FIRST_ITEM_ID, ITEM_SEQUENCE, item_id_mapping, load_prepared
from merlin_molar.errors import MolarDataError
from merlin_molar.io import atomic_path, read_json, write_json
from merlin_molar.serving.ops import ITEM_IDS, SCORES, MolarTopK, ValidateHistory

SERVING_MANIFEST = "molar_serving.json"
# merlin-systems' executor model, answering bad requests with INVALID_ARG (see executor_model.py)
EXECUTOR_MODEL = "from merlin_molar.serving.executor_model import TritonPythonModel  # noqa: F401\n"


def serving_workflow(fitted: nvt.Workflow) -> nvt.Workflow:
    """A workflow that encodes a raw ``item_id-list`` column with the fitted Categorify op of ``fitted``.

    The training workflow Categorifies single ``item_id`` values and then groups them into lists; a request
    already holds the list. The same fitted op (same vocabulary file, same reserved ids 0/1/2) is applied to
    the list column, so encoded ids are exactly the training ones. Unknown raw ids would become 2 (OOV);
    the served graph rejects them before this workflow runs (:class:`ValidateHistory`).
    """
    categorify = [n.op for n in Graph.get_nodes_by_op_type([fitted.output_node], nvt.ops.Categorify)]
    if len(categorify) != 1:
        raise MolarDataError("workflow", f"expected one fitted Categorify op, found {len(categorify)}")
    raw_dtype = fitted.input_schema["item_id"].dtype
    encoded = (
        [ITEM_SEQUENCE]
        >> nvt.ops.Rename(name="item_id")
        >> categorify[0]
        >> nvt.ops.Rename(name=ITEM_SEQUENCE)
        >> nvt.ops.AddTags([Tags.ITEM_ID, Tags.ITEM, Tags.LIST])
    )
    workflow = nvt.Workflow(encoded)
    workflow.fit_schema(Schema([ColumnSchema(ITEM_SEQUENCE, dtype=raw_dtype, is_list=True, is_ragged=True)]))
    return workflow


def export_triton(
    model_dir,
    prepared_dir,
    repository_path,
    top_k: int = 10,
    max_batch_size: int = 256,
    model_name: str = "molar",
    overwrite: bool = False,
    torch_threads: int = 1,
) -> Path:
    """Write a Triton model repository that serves ``model_dir`` (a :func:`merlin_molar.persistence.save_model`
    directory) with the NVTabular workflow fitted by ``prepare`` in ``prepared_dir``.

    The repository is built with merlin-systems (``Ensemble(...).export``) and holds two Python-backend
    models: ``<model_name>`` (merlin-systems' executor: request checks, then the model and top-k) and
    ``0_transformworkflowtriton`` (the workflow, called by the executor). Request and response of
    ``<model_name>``:

    * in:  ``item_id-list__values`` (raw item ids of all histories, concatenated, INT64) and
      ``item_id-list__offsets`` (INT32, ``rows + 1`` row boundaries starting at 0), at most
      ``max_batch_size`` rows; :mod:`merlin_molar.serving.client` builds them.
    * out: ``item_ids`` (raw ids, ``[rows, top_k]``) and ``scores`` (FP32, ``[rows, top_k]``), best first, with
      every item of the history excluded.

    Bad requests get an INVALID_ARG error (HTTP 400) naming the problem (malformed offsets, empty history,
    unknown item id, too many rows; Triton itself rejects wrong dtypes and shapes). Histories longer than the
    model's ``max_length`` keep their last ``max_length`` items, as in training.

    The saved model is copied into the repository and loaded there with ``load_model``; every model runs on
    Triton's Python backend, which needs ``merlin_molar`` (and its pinned stack) importable by the backend's
    Python. In NVIDIA's Merlin/Triton containers the libtorch backend also exists, but this export does not
    use it: the model runs in Python, so its custom modules and history masking need no TorchScript. There,
    install this package into the container's Python and start ``tritonserver --model-repository PATH``.
    Here (no container), :class:`merlin_molar.serving.TritonServer` runs the server bundled with PyPI
    ``nvidia-pytriton``.

    ``torch_threads``: torch intra-op threads in the serving process (see :class:`MolarTopK`; 0 = torch's
    default). CLI-friendly: every argument is a path, an int, a bool or a string; returns the repository path.
    """
    model_dir, repository_path = Path(model_dir), Path(repository_path)
    if repository_path.exists() and any(repository_path.iterdir()) and not overwrite:
        raise MolarDataError(repository_path, "already exists and is not empty (pass overwrite=True to replace it)")
    ensemble = build_ensemble(
        model_dir, prepared_dir, top_k=top_k, max_batch_size=max_batch_size, torch_threads=torch_threads
    )
    meta = read_json(model_dir / "molar_model.json")
    with atomic_path(repository_path, is_dir=True) as tmp:
        ensemble.export(str(tmp), name=model_name)
        (tmp / model_name / "1" / "model.py").write_text(EXECUTOR_MODEL)
        write_json(
            tmp / SERVING_MANIFEST,
            {
                "model_name": model_name,
                "model_kind": meta.get("kind"),
                "source_model": str(model_dir.resolve()),
                "prepared": str(Path(prepared_dir).resolve()),
                "inputs": {f"{ITEM_SEQUENCE}__values": "INT64", f"{ITEM_SEQUENCE}__offsets": "INT32"},
                "outputs": {ITEM_IDS: "INT64", SCORES: "FP32"},
                "top_k": int(top_k),
                "max_batch_size": int(max_batch_size),
                "torch_threads": int(torch_threads),
                "merlin_molar": merlin_molar.__version__,
                "exported_at": datetime.now(timezone.utc).isoformat(),
            },
        )
    return repository_path


def build_ensemble(
    model_dir, prepared_dir, top_k: int = 10, max_batch_size: int = 256, torch_threads: int = 1
):
    """The merlin-systems ``Ensemble`` that :func:`export_triton` writes: raw histories -> ValidateHistory ->
    serving workflow -> MolarTopK. ``ensemble.transform(TensorTable)`` runs the same graph in-process."""
    # merlin-systems imports tritonclient, which is only installed with requirements/serving.txt
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    model_dir = Path(model_dir)
    prepared = load_prepared(prepared_dir)
    from merlin_molar.validation import check_model_matches

    check_model_matches(model_dir, prepared)  # same item id mapping as the data the model was trained on
    cardinality = _model_cardinality(model_dir)
    if cardinality != prepared.item_cardinality:
        raise MolarDataError(
            model_dir,
            f"the model scores {cardinality} item ids but {prepared_dir} has {prepared.item_cardinality}: "
            "export a model trained on this prepared directory",
        )
    n_items = prepared.item_cardinality - FIRST_ITEM_ID
    if not 1 <= int(top_k) <= n_items:
        raise MolarDataError("top_k", f"must be between 1 and the number of items ({n_items}), got {top_k}")
    if int(max_batch_size) < 1:
        raise MolarDataError("max_batch_size", f"must be at least 1, got {max_batch_size}")

    fitted = nvt.Workflow.load(str(prepared.workflow_path))
    vocabulary = item_id_mapping(fitted)
    if not np.issubdtype(np.asarray(vocabulary.index).dtype, np.integer):
        raise MolarDataError(
            prepared_dir, "the Triton export supports integer item ids only (this dataset has string ids)"
        )
    workflow = serving_workflow(fitted)
    graph = (
        [ITEM_SEQUENCE]
        >> ValidateHistory(ITEM_SEQUENCE, vocabulary, max_batch_size=max_batch_size)
        >> TransformWorkflow(workflow)
        >> MolarTopK(model_dir, vocabulary, top_k=top_k, torch_threads=torch_threads)
    )
    return Ensemble(graph, workflow.input_schema)


def _model_cardinality(model_dir: Path) -> int:
    schema_file = model_dir / "schema.json"
    if not schema_file.is_file():
        raise MolarDataError(schema_file, "file not found (not a saved merlin-molar model?)")
    schema = TensorflowMetadata.from_json(schema_file.read_text()).to_merlin_schema()
    item = schema.select_by_tag(Tags.ITEM_ID).first
    return int(item.int_domain.max) + 1
