"""MIRM: multimodal item representations, stage-1 alignment fine-tuning, and the item embedding table.

Importing this package loads no model and no deep-learning library; backbones load when an encoder is
built.

    >>> from merlin_molar.data import load_prepared
    >>> from merlin_molar.items import build_encoder, embed_catalogue, load_item_table
    >>> prepared = load_prepared("/tmp/p1m")                                  # doctest: +SKIP
    >>> encoder = build_encoder()  # packaged all-MiniLM-L6-v2; or a Qwen2-VL path / a stage-1 output
    >>> encoder = build_encoder("smollm2+efficientnet-lite0")  # SmolLM2 text + EfficientNet posters  # doctest: +SKIP
    >>> embed_catalogue(prepared, encoder, "/tmp/p1m/item_table")              # doctest: +SKIP
    >>> table = load_item_table("/tmp/p1m/item_table", prepared)  # torch [item_cardinality, dim]
"""
from merlin_molar.items.encoders import (  # noqa: F401
    EncodedBatch,
    ImageEncoder,
    ItemEncoder,
    MultimodalEncoder,
    PreparedBatch,
    SentenceEncoder,
    TextLLMEncoder,
    VisionLanguageEncoder,
    build_encoder,
    detect_kind,
)
from merlin_molar.items.prompts import (  # noqa: F401
    CUR_ITEM_TOKEN,
    DEFAULT_TEMPLATE,
    DEFAULT_TEXT_ONLY_TEMPLATE,
    ItemContent,
    ItemPromptBuilder,
)
from merlin_molar.items.stage1 import (  # noqa: F401
    STAGE1_TASKS,
    SentenceStage1Config,
    Stage1Config,
    Stage1Example,
    attribute_description_examples,
    behaviour_windows,
    build_stage1_mixture,
    finetune,
    finetune_sentence_encoder,
    image_description_examples,
    sentence_behaviour_examples,
    user_behaviour_examples,
)
from merlin_molar.items.table import (  # noqa: F401
    CatalogueResult,
    embed_catalogue,
    encode_batches,
    encode_items,
    item_id_fingerprint,
    load_item_table,
    merge_shards,
    read_table_metadata,
    torchrun_shard,
)
