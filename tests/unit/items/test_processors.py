import numpy as np
import pytest
from PIL import Image

from merlin_molar.items.processors import image_only_processor_class, load_processor, processor_class_for


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_saved_processor_reloads_and_processes_real_posters(backbones, poster_paths, model_type):
    processor = load_processor(backbones[model_type])
    expected = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    assert type(processor).__name__ == expected
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    images = [Image.open(p).convert("RGB").resize((224, 224)) for p in poster_paths[:2]]
    text = ["a <|vision_start|><|image_pad|><|vision_end|>", "b <|vision_start|><|image_pad|><|vision_end|> c"]
    out = processor(text=text, images=images, padding=True, return_tensors="pt")
    # 224 px / 14 px patches = 16 x 16 patches, merged 2 x 2 -> 64 image tokens per poster
    assert out["image_grid_thw"].tolist() == [[1, 16, 16], [1, 16, 16]]
    assert (out["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [64, 64]
    assert out["pixel_values"].shape == (2 * 256, 3 * 2 * 14 * 14)
    assert np.isfinite(out["pixel_values"].numpy()).all()


def test_processor_class_read_from_saved_config(backbones):
    assert processor_class_for(backbones["qwen2_5_vl"]).__name__ == "Qwen2_5_VLProcessor"


def test_image_only_class_drops_only_the_video_processor():
    from transformers import Qwen2VLProcessor

    cls = image_only_processor_class(Qwen2VLProcessor)
    assert cls.attributes == ["image_processor", "tokenizer"]
    assert issubclass(cls, Qwen2VLProcessor) and cls.__name__ == "Qwen2VLProcessor"
    assert image_only_processor_class(Qwen2VLProcessor) is cls
