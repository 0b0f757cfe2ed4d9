"""merlin-molar: Molar (multimodal LLM + collaborative-filtering post-alignment) for Transformers4Rec."""
import os as _os
import warnings as _warnings

# merlin-core warns at import that TensorFlow / Triton dtype tables are missing; both are optional here.
_warnings.filterwarnings("ignore", message=".*dtype mappings did not load successfully.*")
# dask 2024.12 warns that query planning needs dask-expr, which breaks merlin-core (see requirements/).
_warnings.filterwarnings("ignore", message="(?s).*Dask dataframe query planning is disabled.*")
# Printed for every NVTabular Dataset on a machine without cuDF; CPU mode is this project's documented default.
_warnings.filterwarnings("ignore", message="Initializing an NVTabular Dataset in CPU mode")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from merlin_molar import compat as _compat  # noqa: E402

_compat.apply()

__version__ = "0.1.0"

from merlin_molar.data import load_prepared, prepare, read_dataset  # noqa: E402,F401
from merlin_molar.id_models import SASRecConfig, sasrec_body, sasrec_model  # noqa: E402,F401
from merlin_molar.model import MolarConfig, molar_model  # noqa: E402,F401
from merlin_molar.persistence import load_model, save_model  # noqa: E402,F401
from merlin_molar.task import FullRankingNextItemTask, MolarTask  # noqa: E402,F401
from merlin_molar.user import ContentItemEmbedding, MolarBlock, content_item_inputs, small_decoder_config  # noqa: E402,F401
