"""Serving: export a trained model with its fitted Categorify mapping to a Triton model repository, and run it.

* :func:`export_triton` writes the repository with merlin-systems (Python backend only, one model, one hop).
* :mod:`merlin_molar.serving.lean` precomputes the tables and traces the user towers for the per-request path.
* :class:`TritonServer` starts the ``tritonserver`` bundled with PyPI ``nvidia-pytriton`` on 127.0.0.1.
* :mod:`merlin_molar.serving.client` sends histories (integer or string ids) with ``tritonclient`` over HTTP
  or gRPC.

Install the serving extras first: ``bash scripts/install_serving.sh`` (see ``requirements/serving.txt``).
"""
from merlin_molar._lazy import lazy_public_names as _lazy_public_names

# public name -> the module that defines it; nothing loads until used, so the client needs no torch
_PUBLIC = {
    "build_ensemble": "merlin_molar.serving.export",
    "export_triton": "merlin_molar.serving.export",
    "LeanModel": "merlin_molar.serving.lean",
    "export_lean": "merlin_molar.serving.lean",
    "ItemCodec": "merlin_molar.serving.ops",
    "MolarRecommend": "merlin_molar.serving.ops",
    "MolarRequestError": "merlin_molar.serving.ops",
    "TritonServer": "merlin_molar.serving.server",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = _lazy_public_names(__name__, _PUBLIC)
