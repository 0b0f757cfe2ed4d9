"""The pretrained item encoders that ship with the install, loaded for real: SmolLM2-135M-Instruct from its GGUF
file (~30-60 s on one CPU thread) and EfficientNet-Lite0 with its ImageNet weights, on MovieLens-1M titles and
posters."""
import numpy as np
import pytest

from merlin_molar.items import ItemContent, build_encoder

FILMS = {  # ML-1M item id: (title, genres)
    1: ("Toy Story (1995)", "Animation|Children's|Comedy"),
    3114: ("Toy Story 2 (1999)", "Animation|Children's|Comedy"),
    527: ("Schindler's List (1993)", "Drama|War"),
    858: ("Godfather, The (1972)", "Action|Crime|Drama"),
    1221: ("Godfather: Part II, The (1974)", "Action|Crime|Drama"),
    1214: ("Alien (1979)", "Action|Horror|Sci-Fi|Thriller"),
    2858: ("American Beauty (1999)", "Comedy|Drama"),
    1721: ("Titanic (1997)", "Drama|Romance"),
}


def films(ml1m_dir=None):
    return [ItemContent(i, (("title", t), ("genres", g)),
                        str(ml1m_dir / "images" / f"{i}.jpg") if ml1m_dir is not None else None)
            for i, (t, g) in FILMS.items()]


def centred_cosines(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.fixture(scope="module")
def smollm2():
    return build_encoder("smollm2", device="cpu")


def test_smollm2_puts_toy_story_next_to_its_sequel(smollm2):
    assert smollm2.kind == "text-llm" and smollm2.dim == 576 and smollm2.window == 8192
    assert smollm2.model.config.model_type == "llama" and smollm2.describe()["name_or_path"].endswith(".gguf")
    items = films()
    batch = smollm2.encode(items).embeddings
    cos = centred_cosines(batch)
    toy, sequel = 0, 1
    others = [j for j in range(len(items)) if j not in (toy, sequel)]
    assert cos[toy, sequel] > max(cos[toy, j] for j in others), cos[toy]
    godfather, part_two = 3, 4
    assert cos[godfather, part_two] > max(cos[godfather, j] for j in range(len(items)) if j not in (3, 4))
    for i, item in enumerate(items[:3]):  # right padding: an item's vector is the same alone or in a batch
        np.testing.assert_allclose(smollm2.encode([item]).embeddings[0], batch[i], rtol=1e-4, atol=1e-3)


def test_efficientnet_posters_are_batch_independent_and_not_random(ml1m_dir):
    encoder = build_encoder("efficientnet-lite0", device="cpu")
    items = [item for item in films(ml1m_dir) if item.image and (ml1m_dir / "images" / f"{item.item_id}.jpg").exists()]
    assert len(items) >= 6
    batch = encoder.encode(items)
    assert batch.embeddings.shape == (len(items), 1280) and batch.used_image.all()
    for i, item in enumerate(items):
        np.testing.assert_allclose(encoder.encode([item]).embeddings[0], batch.embeddings[i], rtol=1e-4, atol=1e-4)
    cos = centred_cosines(batch.embeddings)
    assert np.all(cos[~np.eye(len(items), dtype=bool)] < 0.999)  # the posters are told apart
