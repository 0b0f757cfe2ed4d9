"""Export a saved merlin-molar model, with the Categorify mapping fitted by ``prepare``, as a Triton model
repository (merlin-systems ``Ensemble.export``; one Python-backend model, one hop per request)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

from merlin_molar.data.workflow import item_id_mapping, load_prepared
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import FIRST_ITEM_ID, ITEM_SEQUENCE
from merlin_molar.io import atomic_path, read_json, write_json
from merlin_molar.serving.columns import ITEM_IDS, SCORES
from merlin_molar.serving.ops import LEAN_DIR, PIN_CORES, MolarRecommend, is_string_dtype
from merlin_molar.version import __version__

SERVING_MANIFEST = "molar_serving.json"
# merlin-systems' executor model, answering bad requests with INVALID_ARG (see executor_model.py)
EXECUTOR_MODEL = "from merlin_molar.serving.executor_model import TritonPythonModel  # noqa: F401\n"


def export_triton(
    model_dir,
    prepared_dir,
    repository_path,
    top_k: int = 10,
    max_batch_size: int = 256,
    model_name: str = "molar",
    overwrite: bool = False,
    torch_threads: int = 1,
    instances: int = 1,
    pin_cores: bool = False,
) -> Path:
    """Write a Triton model repository that serves ``model_dir`` (a :func:`merlin_molar.persistence.save_model`
    directory) for the catalogue prepared in ``prepared_dir``.

    The repository is built with merlin-systems (``Ensemble(...).export``) and holds one Python-backend model,
    ``<model_name>``: merlin-systems' executor running :class:`~merlin_molar.serving.ops.MolarRecommend`, which
    encodes raw item ids with the fitted Categorify mapping (no NVTabular workflow model, no second hop) and
    runs the lean model precomputed here (:mod:`merlin_molar.serving.lean`: projected tables, traced user
    towers, one scoring matmul). Request and response:

    * in:  ``item_id-list__values`` (raw item ids of all histories, concatenated: INT64, or BYTES for a
      catalogue with string ids such as product codes) and ``item_id-list__offsets`` (INT32, ``rows + 1`` row
      boundaries starting at 0), at most ``max_batch_size`` rows; :mod:`merlin_molar.serving.client` builds them.
    * out: ``item_ids`` (raw ids, ``[rows, top_k]``, INT64 or BYTES) and ``scores`` (FP32, ``[rows, top_k]``),
      best first, with every item of the history excluded.

    Bad requests get an INVALID_ARG error (HTTP 400) naming the problem (malformed offsets, empty history,
    unknown item id, too many rows; Triton itself rejects wrong dtypes and shapes). Histories longer than the
    model's ``max_length`` keep their last ``max_length`` items, as in training.

    ``instances``: Triton instances of the model (``instance_group``, KIND_CPU), each its own Python-backend
    process with its own copy of the model; requests are spread over them. ``torch_threads``: torch intra-op
    threads in each instance (0 = torch's default). Keep ``instances * torch_threads`` at most the number of
    cores: one instance per core with 1 thread each is the default advice for batch-1 traffic.
    ``pin_cores``: each instance binds itself to one core of those the server may use (instance ``i`` to the
    ``i``-th, modulo their number), so that its tables stay in that core's cache. On the 2-core machines here
    it took the served-minus-in-process p50 from 1.63 ms to 1.07 ms in one quiet window
    (``benchmarks/results/serving_load/serving_load_unpinned.json`` and ``serving_load.json``). Leave it off where other
    work shares the server's cores.

    In NVIDIA's Merlin/Triton containers install this package into the container's Python and start
    ``tritonserver --model-repository PATH``; here :class:`merlin_molar.serving.TritonServer` runs the server
    bundled with PyPI ``nvidia-pytriton``. CLI-friendly: every argument is a path, an int, a bool or a string;
    returns the repository path.
    """
    model_dir, repository_path = Path(model_dir), Path(repository_path)
    if repository_path.exists() and any(repository_path.iterdir()) and not overwrite:
        raise MolarDataError("--repository", f"{repository_path} already exists and is not empty: choose another "
                                             "directory, or replace it with --overwrite (overwrite=True in Python)")
    if int(instances) < 1:
        raise MolarDataError("instances", f"must be at least 1, got {instances}")
    ensemble = build_ensemble(
        model_dir, prepared_dir, top_k=top_k, max_batch_size=max_batch_size, torch_threads=torch_threads
    )
    meta = read_json(model_dir / "molar_model.json")
    strings = is_string_dtype(ensemble.graph.output_node.op.raw_dtype)
    id_type = "BYTES" if strings else "INT64"
    with atomic_path(repository_path, is_dir=True) as tmp:
        ensemble.export(str(tmp), name=model_name)
        (tmp / model_name / "1" / "model.py").write_text(EXECUTOR_MODEL)
        set_instances(tmp / model_name / "config.pbtxt", int(instances), bool(pin_cores))
        write_json(
            tmp / SERVING_MANIFEST,
            {
                "model_name": model_name,
                "model_kind": meta.get("kind"),
                "source_model": str(model_dir.resolve()),
                "prepared": str(Path(prepared_dir).resolve()),
                "item_ids": "string" if strings else "int64",
                "inputs": {f"{ITEM_SEQUENCE}__values": id_type, f"{ITEM_SEQUENCE}__offsets": "INT32"},
                "outputs": {ITEM_IDS: id_type, SCORES: "FP32"},
                "lean_model": f"{model_name}/1/ensemble/{LEAN_DIR}",
                "top_k": int(top_k),
                "max_batch_size": int(max_batch_size),
                "instances": int(instances),
                "torch_threads": int(torch_threads),
                "pin_cores": bool(pin_cores),
                "merlin_molar": __version__,
                "exported_at": datetime.now(timezone.utc).isoformat(),
            },
        )
    return repository_path


def set_instances(config_path: Path, count: int, pin_cores: bool = False) -> None:
    """Give the model in ``config_path`` an ``instance_group`` of ``count`` CPU instances, and the
    ``pin_cores`` parameter that the executor model reads (:func:`~merlin_molar.serving.ops.pinned_core`)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    del config.instance_group[:]
    config.instance_group.add(count=count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    config.parameters[PIN_CORES].string_value = "true" if pin_cores else "false"
    config_path.write_text(text_format.MessageToString(config))


def build_ensemble(
    model_dir, prepared_dir, top_k: int = 10, max_batch_size: int = 256, torch_threads: int = 1
):
    """The merlin-systems ``Ensemble`` that :func:`export_triton` writes: raw histories -> MolarRecommend.
    ``ensemble.transform(TensorTable)`` runs the same graph in-process."""
    # merlin-systems imports tritonclient, which is only installed with requirements/serving.txt
    from merlin.systems.dag import Ensemble

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

    vocabulary = item_id_mapping(prepared.load_workflow())
    op = MolarRecommend(
        model_dir, vocabulary, top_k=top_k, max_batch_size=max_batch_size, torch_threads=torch_threads
    )
    raw_dtype = str if is_string_dtype(op.raw_dtype) else op.raw_dtype
    input_schema = Schema([ColumnSchema(ITEM_SEQUENCE, dtype=raw_dtype, is_list=True, is_ragged=True,
                                        tags=[Tags.ITEM_ID, Tags.ITEM, Tags.LIST])])
    return Ensemble([ITEM_SEQUENCE] >> op, input_schema)


def _model_cardinality(model_dir: Path) -> int:
    schema_file = model_dir / "schema.json"
    if not schema_file.is_file():
        raise MolarDataError(schema_file, "file not found (not a saved merlin-molar model?)")
    schema = TensorflowMetadata.from_json(schema_file.read_text()).to_merlin_schema()
    item = schema.select_by_tag(Tags.ITEM_ID).first
    return int(item.int_domain.max) + 1
