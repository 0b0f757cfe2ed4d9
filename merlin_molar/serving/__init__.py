"""Serving: export a trained model + its NVTabular workflow to a Triton model repository, and run it.

* :func:`export_triton` writes the repository with merlin-systems (Python backend only).
* :class:`TritonServer` starts the ``tritonserver`` bundled with PyPI ``nvidia-pytriton`` on 127.0.0.1.
* :mod:`merlin_molar.serving.client` sends histories with ``tritonclient`` over HTTP or gRPC.

Install the serving extras first: ``bash scripts/install_serving.sh`` (see ``requirements/serving.txt``).
"""
from merlin_molar.serving.export import build_ensemble, export_triton, serving_workflow  # noqa: F401
from merlin_molar.serving.ops import MolarRequestError, MolarTopK, ValidateHistory  # noqa: F401
from merlin_molar.serving.server import TritonServer  # noqa: F401
