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

from merlin_molar.data import load_prepared, prepare, read_dataset  # noqa: E402
from merlin_molar.models import (  # noqa: E402
    ContentItemEmbedding,
    FullRankingNextItemTask,
    GRU4RecConfig,
    MolarBlock,
    MolarBody,
    MolarConfig,
    MolarTask,
    SASRecConfig,
    build_llm,
    content_item_inputs,
    gru4rec_body,
    gru4rec_model,
    load_id_branch,
    molar_model,
    sasrec_body,
    sasrec_model,
    small_decoder_config,
)
from merlin_molar.persistence import load_model, save_model  # noqa: E402

__all__ = [
    "ContentItemEmbedding",
    "FullRankingNextItemTask",
    "GRU4RecConfig",
    "MolarBlock",
    "MolarBody",
    "MolarConfig",
    "MolarTask",
    "SASRecConfig",
    "__version__",
    "build_llm",
    "content_item_inputs",
    "gru4rec_body",
    "gru4rec_model",
    "load_id_branch",
    "load_model",
    "load_prepared",
    "molar_model",
    "prepare",
    "read_dataset",
    "sasrec_body",
    "sasrec_model",
    "save_model",
    "small_decoder_config",
]
