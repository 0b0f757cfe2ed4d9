"""Loading Hugging Face multimodal processors where torchvision is missing.

transformers 4.57 builds every video processor on torchvision, and processors such as
``Qwen2VLProcessor`` refuse to exist without one, even for images only. PyTorch ships no CPU build
of torchvision, so on CPU machines ``AutoProcessor.from_pretrained`` fails for Qwen2-VL / Qwen2.5-VL.
Item encoding never uses video, so where torchvision is absent the same processor class is used with
its video slot removed: images still go through the model's real image processor (the slow,
PIL/numpy ``Qwen2VLImageProcessor``) and text through its real tokenizer, and ``__call__`` is the
upstream one. With torchvision installed, plain ``AutoProcessor`` is used.

    >>> from merlin_molar.items.processors import load_processor
    >>> processor = load_processor("/path/to/Qwen2-VL-2B-Instruct")  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import json
from pathlib import Path


@functools.lru_cache(maxsize=None)
def image_only_processor_class(processor_class: type) -> type:
    """``processor_class`` without its ``video_processor`` attribute (same name, same ``__call__``).

    ``ProcessorMixin.__init__`` pairs positional components with ``attributes``, so the parent's
    ``__init__`` passing ``video_processor=None`` as a third positional argument is simply not stored."""
    attributes = [a for a in processor_class.attributes if a != "video_processor"]
    if attributes == list(processor_class.attributes):
        return processor_class
    return type(processor_class.__name__, (processor_class,), {"attributes": attributes, "__module__": __name__})


def processor_class_for(name_or_path) -> type:
    """The processor class saved at ``name_or_path`` (``processor_class`` in its processor or image
    processor config), else the one registered for its model type."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

    for filename in ("processor_config.json", "preprocessor_config.json"):
        found = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False)
        if found:
            class_name = json.loads(Path(found).read_text()).get("processor_class")
            if class_name and hasattr(transformers, class_name):
                return getattr(transformers, class_name)
    model_type = AutoConfig.from_pretrained(str(name_or_path)).model_type
    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if class_name is None:
        raise ValueError(f"{name_or_path}: no processor registered for model type {model_type!r}")
    return getattr(transformers, class_name)


def load_processor(name_or_path, **kwargs):
    """``AutoProcessor.from_pretrained`` where torchvision exists; the image-only processor otherwise."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
    cls = image_only_processor_class(processor_class_for(name_or_path))
    kwargs.setdefault("use_fast", False)  # the fast image processors need torchvision too
    return cls.from_pretrained(str(name_or_path), **kwargs)
