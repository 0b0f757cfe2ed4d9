"""The executor model of an exported repository: merlin-systems' executor, with a direct path for the one-step
graph and request errors answered as such.

merlin-systems 23.8 answers every failure with an internal error whose message is the server-side
traceback. Here a request the model cannot answer (malformed ragged tensors, empty history, unknown item
ids, too many rows, item ids of the wrong kind) gets Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
with the message alone; anything else stays an internal error.

Loading is merlin-systems' own code (``initialize``: the exported ensemble and its operators' artifacts).
The graph that :func:`~merlin_molar.serving.export_triton` writes is a single
:class:`~merlin_molar.serving.ops.MolarRecommend` step; for it, ``execute`` reads the two request tensors and
calls that step directly instead of going through merlin's DAG executor and tensor-table conversions (which
cost ~1 ms per request on these CPUs, about as much as the model itself). Any other graph runs through
merlin-systems' runtime as usual. Output tensors are written as they are: merlin's
``tensor_table_to_triton_response`` casts string ids to numpy unicode, which Triton's BYTES tensors do not
take (they hold object arrays of bytes).

The repository's ``<model_name>/1/model.py`` imports :class:`TritonPythonModel` from here, so this module
runs only inside Triton's Python backend (``triton_python_backend_utils`` exists only there).

Measured inside the server (quickstart-size model, batch 1, 2 busy cores): reading the request tensors ~15 us
and building the response ~50 us per request, against ~1 ms for the step itself (which runs ~15% slower
than back-to-back in-process calls: the client and Triton run between requests and evict its tables from
the caches); the rest of served minus in-process latency is Triton, its Python-backend IPC and the client.
"""
import gc
import json
import os
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from merlin.dag.ops.selection import SelectionOp
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import triton_request_to_tensor_table
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel

from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.serving.columns import ITEM_IDS, SCORES
from merlin_molar.serving.ops import PIN_CORES, MolarRecommend, MolarRequestError, pinned_core

VALUES, OFFSETS = f"{ITEM_SEQUENCE}__values", f"{ITEM_SEQUENCE}__offsets"


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel(MerlinExecutorModel):
    def initialize(self, args):
        super().initialize(args)
        output = self.ensemble.graph.output_node
        single = isinstance(output.op, MolarRecommend) and all(  # the request columns, then the step
            isinstance(node.op, SelectionOp) for node in output.parents_with_dependencies
        )
        self._step = output.op if single else None
        parameters = json.loads(args["model_config"]).get("parameters", {})
        if parameters.get(PIN_CORES, {}).get("string_value") == "true":  # export_triton(pin_cores=True)
            os.sched_setaffinity(0, {pinned_core(args["model_instance_name"], os.sched_getaffinity(0))})
        # everything loaded so far (torch, transformers, merlin, the model: ~580k objects) lives as long as the
        # process: keep it out of the cyclic garbage collector, whose full collections otherwise walk all of
        # it (measured: 300-450 ms each, a stalled request whenever one falls due; frozen: < 0.1 ms)
        gc.collect()
        gc.freeze()

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        if self._step is not None:
            return self._answer_direct(request)
        try:
            inputs = triton_request_to_tensor_table(request, self.ensemble.input_schema)
        except (ValueError, TypeError) as exc:  # merlin's checks of the values / offsets tensors
            return _error(f"malformed request: {exc}", pb_utils.TritonError.INVALID_ARG)
        try:
            outputs = self.ensemble.transform(inputs, runtime=TritonExecutorRuntime())
            return pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, outputs[name].values) for name in self.ensemble.output_schema.column_names]
            )
        except MolarRequestError as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception:  # noqa: BLE001  (one bad request must not take the model down)
            return _error(traceback.format_exc(), pb_utils.TritonError.INTERNAL)

    def _answer_direct(self, request):
        try:
            values = pb_utils.get_input_tensor_by_name(request, VALUES).as_numpy()
            offsets = pb_utils.get_input_tensor_by_name(request, OFFSETS).as_numpy().astype(np.int64)
            item_ids, scores = self._step.recommend(values, offsets)
            return pb_utils.InferenceResponse([pb_utils.Tensor(ITEM_IDS, item_ids), pb_utils.Tensor(SCORES, scores)])
        except MolarRequestError as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception:  # noqa: BLE001  (one bad request must not take the model down)
            return _error(traceback.format_exc(), pb_utils.TritonError.INTERNAL)
