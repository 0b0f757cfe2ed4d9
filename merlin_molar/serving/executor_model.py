"""The executor model of an exported repository: merlin-systems' executor, with request errors answered as
such.

merlin-systems 23.8 answers every failure with an internal error whose message is the server-side
traceback. Here a request the model cannot answer (malformed ragged tensors, empty history, unknown item
ids, too many rows, item ids of the wrong kind) gets Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)
with the message alone;
anything else stays an internal error. Loading and running the ensemble is merlin-systems' own code.

The repository's ``<model_name>/1/model.py`` imports :class:`TritonPythonModel` from here, so this module
runs only inside Triton's Python backend (``triton_python_backend_utils`` exists only there).
"""
import traceback

import triton_python_backend_utils as pb_utils
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import triton_request_to_tensor_table
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel

from merlin_molar.serving.ops import MolarRequestError


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel(MerlinExecutorModel):
    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            inputs = triton_request_to_tensor_table(request, self.ensemble.input_schema)
        except (ValueError, TypeError) as exc:  # merlin's checks of the values / offsets tensors
            return _error(f"malformed request: {exc}", pb_utils.TritonError.INVALID_ARG)
        try:
            outputs = self.ensemble.transform(inputs, runtime=TritonExecutorRuntime())
            # the output tensors as they are: merlin's tensor_table_to_triton_response casts string ids to
            # numpy unicode, which Triton's BYTES tensors do not take (they hold object arrays of bytes)
            return pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, outputs[name].values) for name in self.ensemble.output_schema.column_names]
            )
        except MolarRequestError as exc:
            return _error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception:  # noqa: BLE001  (one bad request must not take the model down)
            return _error(traceback.format_exc(), pb_utils.TritonError.INTERNAL)
