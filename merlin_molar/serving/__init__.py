"""Serving: export a trained model with its fitted Categorify mapping to a Triton model repository, and run it.

* :func:`export_triton` writes the repository with merlin-systems (Python backend only, one model, one hop).
* :mod:`merlin_molar.serving.lean` precomputes the tables and traces the user towers for the per-request path.
* :class:`TritonServer` starts the ``tritonserver`` bundled with PyPI ``nvidia-pytriton`` on 127.0.0.1.
* :mod:`merlin_molar.serving.client` sends histories (integer or string ids) with ``tritonclient`` over HTTP
  or gRPC.

Install the serving extras first: ``bash scripts/install_serving.sh`` (see ``requirements/serving.txt``).
"""
from merlin_molar.serving.export import build_ensemble, export_triton  # noqa: F401
from merlin_molar.serving.lean import LeanModel, export_lean  # noqa: F401
from merlin_molar.serving.ops import ItemCodec, MolarRecommend, MolarRequestError  # noqa: F401
from merlin_molar.serving.server import TritonServer  # noqa: F401
