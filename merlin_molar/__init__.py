"""merlin-molar: Molar (multimodal LLM + collaborative-filtering post-alignment) for Transformers4Rec."""
import os as _os
import warnings as _warnings

# merlin-core warns at import that TensorFlow / Triton dtype tables are missing; both are optional here.
_warnings.filterwarnings("ignore", message=".*dtype mappings did not load successfully.*")
# dask 2024.12 warns that query planning needs dask-expr, which breaks merlin-core (see requirements/).
_warnings.filterwarnings("ignore", message="(?s).*Dask dataframe query planning is disabled.*")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from merlin_molar import compat as _compat  # noqa: E402

_compat.apply()

__version__ = "0.1.0"
