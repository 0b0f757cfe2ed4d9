"""merlin-molar: Molar (multimodal LLM + collaborative-filtering post-alignment) for Transformers4Rec.

Importing the package is cheap: the public names below load their module on first use, and the
compatibility overrides (:mod:`merlin_molar.compat`) are applied when ``transformers4rec.torch`` is first
imported, by this package or by the caller (``import merlin_molar, transformers4rec.torch as tr``).
"""
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
from merlin_molar._lazy import lazy_public_names as _lazy_public_names  # noqa: E402
from merlin_molar.version import __version__ as __version__  # noqa: E402

_compat.install()

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(["load_prepared", "prepare", "read_dataset"], "merlin_molar.data"),
    **dict.fromkeys(
        [
            "ContentItemEmbedding",
            "FullRankingNextItemTask",
            "GRU4RecConfig",
            "MolarBlock",
            "MolarBody",
            "MolarConfig",
            "MolarTask",
            "SASRecConfig",
            "SASRecEncoder",
            "build_llm",
            "content_item_inputs",
            "gru4rec_body",
            "gru4rec_model",
            "load_id_branch",
            "molar_model",
            "sasrec_body",
            "sasrec_model",
            "small_decoder_config",
        ],
        "merlin_molar.models",
    ),
    **dict.fromkeys(["load_model", "save_model"], "merlin_molar.persistence"),
}

__all__ = sorted([*_PUBLIC, "__version__"])


__getattr__, __dir__ = _lazy_public_names(__name__, _PUBLIC)
