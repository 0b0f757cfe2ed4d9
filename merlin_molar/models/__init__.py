"""The trained networks: Molar's content tower (item tower + DUEG), ID-based sequential bodies, the Molar
composition, its prediction task and losses. All are Transformers4Rec blocks, heads and tasks.

    item_tower.py  frozen MIRM table -> trainable projection (the content item tower)
    dueg.py        MolarBlock: an LLM over a history of content item embeddings (the content user tower)
    sasrec.py      ID-based sequence bodies (SASRec: SASRecEncoder or GPT-2) and the SASRec baseline model
    gru4rec.py     GRU4Rec: the same inputs and task as SASRec, a GRU instead of the transformer
    id_models.py   ID_MODELS: the ID models by name (``train --model``, ``MolarConfig.id_model``)
    molar.py       MolarConfig, MolarBody and molar_model: content + ID branch in one tr.Model
    task.py        full-ranking next-item task and the Molar head (rec loss + post-alignment)
    losses.py      next-item losses and the symmetric InfoNCE alignment loss
"""
from merlin_molar.models.dueg import MolarBlock, build_llm, small_decoder_config
from merlin_molar.models.gru4rec import GRU4RecConfig, gru4rec_body, gru4rec_model
from merlin_molar.models.id_models import ID_MODELS
from merlin_molar.models.item_tower import ContentItemEmbedding, content_item_inputs
from merlin_molar.models.molar import MolarBody, MolarConfig, load_id_branch, molar_model
from merlin_molar.models.sasrec import SASRecConfig, SASRecEncoder, sasrec_body, sasrec_model
from merlin_molar.models.task import FullRankingNextItemTask, MolarTask

__all__ = [
    "ContentItemEmbedding",
    "FullRankingNextItemTask",
    "GRU4RecConfig",
    "ID_MODELS",
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
]
