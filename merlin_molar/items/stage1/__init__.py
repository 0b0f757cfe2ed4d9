"""Stage 1 of Molar: align the MIRM backbone with item content before recommendation training.

Three task mixtures are built from the prepared data (paper: 10k examples each):

* ``image_description`` — item image -> detailed description of the item;
* ``attribute_description`` — structured attributes -> description;
* ``user_behaviour`` — titles of a user's recent items (train split) -> title of the next item.

MovieLens has no item descriptions, so there (and wherever the item table has no ``description``
column) the target description is written from the item's own text fields ("Toy Story. Year: 1995.
Genres: Animation, Children's, Comedy."): the image task then teaches the model to name a film and its
genres from the poster, and the attribute task is a verbalisation of the fields. Item-level prompts end
with ``[Cur_Item]`` so the description is generated from that token's state — the same token whose
hidden state becomes the item embedding, which trains it (as a LoRA trainable token) to carry the item.

:func:`finetune` (:mod:`.generative`) trains the backbone (a VLM, or a decoder LLM: a model directory, a GGUF
file dequantised to float32, or the packaged ``smollm2``) on the mixture with the causal-LM loss on the target
tokens only, with LoRA (peft) or fully, bf16 autocast on GPU, in a small plain loop with a progress bar and
resumable checkpoints (``checkpoint_every``); the output directory is a peft adapter (or full model) plus the
processor/tokenizer, and :func:`build_encoder` accepts it. The task mixtures are :mod:`.tasks`; the
sentence-encoder stage 1 is :mod:`.sentence`.

    >>> from merlin_molar.items import build_stage1_mixture, finetune, build_encoder
    >>> examples = build_stage1_mixture(prepared, examples_per_task=10_000)             # doctest: +SKIP
    >>> adapter = finetune("/models/Qwen2-VL-2B-Instruct", examples, "/tmp/mirm-stage1")  # doctest: +SKIP
    >>> encoder = build_encoder(adapter)                                                 # doctest: +SKIP

A sentence encoder (the default packaged all-MiniLM-L6-v2) cannot generate text, so its stage 1 is the
``user_behaviour`` task made contrastive: :func:`sentence_behaviour_examples` pairs the text of a user's
last few **train** items (joined, newest last) with the next item's text, and
:func:`finetune_sentence_encoder` trains every weight with in-batch InfoNCE through the model's own mean
pooling; its output is a sentence-transformers directory that :func:`build_encoder` loads.

    >>> examples = sentence_behaviour_examples(prepared, n=10_000, history_length=3)   # doctest: +SKIP
    >>> tuned = finetune_sentence_encoder(None, examples, "outputs/minilm-stage1", max_steps=200)  # doctest: +SKIP
"""
from merlin_molar.items.stage1.generative import Stage1Config, finetune
from merlin_molar.items.stage1.sentence import (
    QUERY_SEPARATOR,
    SentenceStage1Config,
    finetune_sentence_encoder,
    in_batch_info_nce,
    sentence_behaviour_examples,
)
from merlin_molar.items.stage1.tasks import (
    STAGE1_TASKS,
    Stage1Example,
    attribute_description_examples,
    behaviour_windows,
    build_stage1_mixture,
    describe_item,
    image_description_examples,
    user_behaviour_examples,
)

__all__ = [
    "QUERY_SEPARATOR",
    "STAGE1_TASKS",
    "SentenceStage1Config",
    "Stage1Config",
    "Stage1Example",
    "attribute_description_examples",
    "behaviour_windows",
    "build_stage1_mixture",
    "describe_item",
    "finetune",
    "finetune_sentence_encoder",
    "image_description_examples",
    "in_batch_info_nce",
    "sentence_behaviour_examples",
    "user_behaviour_examples",
]
