import pandas as pd
import pytest

from merlin_molar.errors import MolarDataError
from merlin_molar.items import CUR_ITEM_TOKEN, DEFAULT_TEMPLATE, ItemContent, ItemPromptBuilder


def test_default_template_is_the_papers():
    assert DEFAULT_TEMPLATE == (
        "Compress the text and image into embedding. Item information: {text}. Item Image: {image}. [Cur_Item]"
    )


def test_prompt_with_and_without_image():
    builder = ItemPromptBuilder(text_columns=("clean_title", "genres"))
    item = ItemContent(7, (("clean_title", "Toy Story"), ("genres", "Animation")), "/x.jpg")
    assert builder.item_text(item) == "clean_title: Toy Story; genres: Animation"
    with_image = builder.prompt(item, image_placeholder="<IMG>")
    assert with_image.endswith(f"Item Image: <IMG>. {CUR_ITEM_TOKEN}")
    assert "clean_title: Toy Story; genres: Animation" in with_image
    text_only = builder.prompt(item, image_placeholder=None)
    assert "Image" not in text_only and text_only.endswith(CUR_ITEM_TOKEN)


def test_configurable_fields_and_template():
    builder = ItemPromptBuilder(
        text_columns=("year", "title"), text_only_template="Item: {text} [Cur_Item]", field_template="{value}",
        field_separator=" | ",
    )
    frame = pd.DataFrame({"item_id": [3], "title": ["Heat"], "year": ["1995"], "image": [None]})
    (item,) = builder.items_from_frame(frame)
    assert builder.prompt(item, None) == "Item: 1995 | Heat [Cur_Item]"


def test_empty_fields_are_skipped_and_order_kept():
    frame = pd.DataFrame({"item_id": [3, 4], "title": ["Heat", ""], "year": [None, "1995"], "image": [None, "/p.jpg"]})
    items = ItemPromptBuilder(text_columns=("title", "year")).items_from_frame(frame)
    assert items[0].fields == (("title", "Heat"),) and items[0].image is None
    assert items[1].fields == (("year", "1995"),) and items[1].image == "/p.jpg"


def test_item_with_neither_text_nor_image_is_an_error():
    frame = pd.DataFrame({"item_id": [3, 9], "title": ["Heat", " "], "image": [None, float("nan")]})
    with pytest.raises(MolarDataError, match=r"neither text nor an image.*\[9\]"):
        ItemPromptBuilder(text_columns=("title",)).items_from_frame(frame, "items.parquet")


def test_missing_text_column_names_the_source():
    frame = pd.DataFrame({"item_id": [3], "name": ["Heat"]})
    with pytest.raises(MolarDataError, match="items.parquet: missing text column"):
        ItemPromptBuilder(text_columns=("title",)).items_from_frame(frame, "items.parquet")


def test_templates_are_validated():
    with pytest.raises(ValueError, match="{image}"):
        ItemPromptBuilder(template="no image slot {text}")
    with pytest.raises(ValueError, match="{text}"):
        ItemPromptBuilder(text_only_template="nothing")


def test_with_columns_fills_only_open_columns():
    assert ItemPromptBuilder().with_columns(["a"]).text_columns == ("a",)
    assert ItemPromptBuilder(text_columns=("b",)).with_columns(["a"]).text_columns == ("b",)


class WordTokenizer:
    """One token per whitespace-separated word: enough to check the arithmetic of fitted_text."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


def test_fitted_text_within_budget_is_unchanged():
    builder = ItemPromptBuilder(text_columns=("title", "year"))
    item = ItemContent(3, (("title", "Toy Story"), ("year", "1995")))
    assert builder.fitted_text(item, WordTokenizer(), 100) == builder.item_text(item)
    assert builder.fitted_text(item, WordTokenizer(), None) == builder.item_text(item)


def test_fitted_text_cuts_the_longest_values_and_keeps_every_field():
    builder = ItemPromptBuilder(text_columns=("description", "title", "brand"))
    description = " ".join(f"w{i}" for i in range(500))
    features = " ".join(f"f{i}" for i in range(60))
    item = ItemContent(3, (("description", description), ("title", "Trailblazer X9 Boot"), ("brand", "Acme"),
                           ("features", features)))
    text = builder.fitted_text(item, WordTokenizer(), 50)
    assert len(text.split()) <= 50
    # every field in its place; the short ones whole; the two long ones cut to the same length
    assert text.startswith("description: w0 w1 ")
    assert "; title: Trailblazer X9 Boot; brand: Acme; features: f0 f1 " in text
    kept_description = text.split("; title:")[0].split()[1:]
    kept_features = text.split("features: ")[1].split()
    assert len(kept_description) == len(kept_features) >= 15
    assert kept_description == description.split()[: len(kept_description)]


def test_fitted_text_with_a_budget_below_the_field_names_still_names_each_field():
    builder = ItemPromptBuilder(text_columns=("a", "b"))
    item = ItemContent(3, (("a", "x " * 30), ("b", "y " * 30)))
    text = builder.fitted_text(item, WordTokenizer(), 3)
    assert text.startswith("a: x") and "; b: y" in text
