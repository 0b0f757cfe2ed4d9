import gzip
import json

import pandas as pd
import pytest

from merlin_molar.data import read_amazon, read_dataset, read_table
from merlin_molar.errors import MolarDataError


def write_csv_layout(root, interactions=None, items=None):
    root.mkdir(parents=True, exist_ok=True)
    interactions = interactions if interactions is not None else pd.DataFrame(
        {"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": [5, 6, 7], "rating": [4, 5, 3]}
    )
    items = items if items is not None else pd.DataFrame(
        {"item_id": [10, 11], "title": ["A (1999)", "B (2000)"], "clean_title": ["A", "B"], "year": [1999, 2000],
         "genres": ["Drama", "Comedy"], "image": ["images/10.jpg", ""]}
    )
    interactions.to_csv(root / "interactions.csv", index=False)
    items.to_csv(root / "items.csv", index=False)
    return root


def test_csv_layout_resolves_relative_images(tmp_path):
    raw = read_dataset(write_csv_layout(tmp_path / "d"))
    assert raw.items.loc[0, "image"] == str((tmp_path / "d" / "images" / "10.jpg").resolve())
    assert raw.items.loc[1, "image"] is None


def test_movielens_dat(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::3::978300761\n2::10::4::978300762\n")
    movies = "10::Am\xe9lie (2001)::Comedy|Romance\n11::Heat (1995)::Action\n"
    (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
    raw = read_dataset(tmp_path)
    assert raw.items.loc[raw.items.item_id == 10, "title"].item() == "Amélie (2001)"
    assert raw.items.loc[raw.items.item_id == 10, "genres"].item() == "Comedy, Romance"
    assert raw.interactions["timestamp"].dtype == "int64"


def test_recbole_atomic(tmp_path):
    (tmp_path / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t5\t4\t10\n1\t6\t3\t11\n"
    )
    (tmp_path / "x.item").write_text(
        "item_id:token\tmovie_title:token_seq\tgenre:token_seq\n5\tHeat\tAction\n6\tUp\tKids\n"
    )
    raw = read_dataset(tmp_path)
    assert raw.text_columns == ["movie_title", "genre"]
    assert raw.interactions["item_id"].tolist() == [5, 6]


def test_amazon_jsonl(tmp_path):
    reviews = tmp_path / "reviews.jsonl.gz"
    with gzip.open(reviews, "wt") as f:
        for r in [("u1", "B01", 1600000000000), ("u1", "B02", 1600000001000), ("u2", "B01", 1600000002000)]:
            f.write(json.dumps({"user_id": r[0], "parent_asin": r[1], "timestamp": r[2], "rating": 5}) + "\n")
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        json.dumps({"parent_asin": "B01", "title": "Lamp", "description": ["Bright", "LED"], "categories": ["Home"]})
        + "\n"
        + json.dumps({"parent_asin": "B02", "title": "Mug", "description": [], "categories": ["Kitchen"]}) + "\n"
    )
    raw = read_amazon(reviews, meta)
    assert raw.interactions["item_id"].tolist() == ["B01", "B02", "B01"]
    assert raw.interactions["timestamp"].tolist() == [1600000000, 1600000001, 1600000002]
    assert raw.items.set_index("item_id").loc["B01", "description"] == "Bright, LED"


def test_generic_table_with_column_map(tmp_path):
    pd.DataFrame({"uid": ["a", "a"], "sku": ["x", "y"], "ts": [1, 2]}).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"sku": ["x", "y"], "name": ["X", "Y"]}).to_csv(tmp_path / "c.csv", index=False)
    columns = {"uid": "user_id", "sku": "item_id", "ts": "timestamp"}
    raw = read_table(tmp_path / "i.parquet", tmp_path / "c.csv", columns)
    assert raw.text_columns == ["name"]
    assert raw.interactions["user_id"].tolist() == ["a", "a"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda i, t: (i.drop(columns=["timestamp"]), t), "missing column(s) ['timestamp']"),
        (lambda i, t: (i.iloc[:0], t), "empty table"),
        (lambda i, t: (i.assign(timestamp=["x", 1, 2]), t), "timestamp: numbers mixed with non-numbers, e.g. ['x']"),
        (lambda i, t: (i.assign(timestamp=["2024-03-01", "soon", "2024-03-02"]), t),
         "timestamp: 1 value(s) neither a number nor an ISO 8601 date, e.g. ['soon']"),
        (lambda i, t: (i.assign(item_id=[10, 1.5, 10]), t), "item_id: 1 non-integer value(s) among integer ids"),
        (lambda i, t: (i, pd.concat([t, t])), "duplicate item id"),
        (lambda i, t: (i, t[["item_id"]]), "no content columns"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path, mutate, message):
    base = write_csv_layout(tmp_path / "base")
    inter, items = mutate(pd.read_csv(base / "interactions.csv"), pd.read_csv(base / "items.csv"))
    root = write_csv_layout(tmp_path / "bad", inter, items)
    with pytest.raises(MolarDataError) as err:
        read_dataset(root)
    assert message in str(err.value)
    assert str(root) in str(err.value)


def test_missing_files_and_unknown_layout(tmp_path):
    with pytest.raises(MolarDataError, match="dataset directory not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(MolarDataError, match="no known layout"):
        read_dataset(tmp_path)
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(MolarDataError, match="items.csv: file not found"):
        read_dataset(tmp_path)


def test_movielens_100k_original_files(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t874965758\n1\t11\t3\t876893171\n2\t10\t4\t878542960\n")
    flags = "|".join(["0"] * 19)
    comedy = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
    (tmp_path / "u.item").write_bytes(
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{comedy}\n11|GoldenEye (1995)|01-Jan-1995||http://y|{flags}\n".encode(
            "latin-1"
        )
    )
    raw = read_dataset(tmp_path)
    assert raw.items.set_index("item_id").loc[10, "genres"] == "Comedy"
    assert len(raw.interactions) == 3


def product_catalogue(root):
    items = pd.DataFrame({
        "item_id": ["B01", "B02"], "title": ["Lamp", "Mug"], "brand": ["Lumo", ""],
        "attributes": ["colour: white | LED", "ceramic"], "price": [12.5, 3.0], "image": ["", ""],
    })
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": ["B01", "B02", "B01"], "timestamp": [1, 2, 3]})
    return write_csv_layout(root, inter, items)


def test_csv_layout_takes_every_item_column_as_text_in_file_order(tmp_path):
    raw = read_dataset(product_catalogue(tmp_path))
    assert raw.text_columns == ["title", "brand", "attributes", "price"]
    row = raw.items.set_index("item_id").loc["B02"]
    assert (row["brand"], row["attributes"], row["price"]) == ("", "ceramic", "3.0")


def test_text_columns_option_selects_and_orders_the_item_text(tmp_path):
    raw = read_dataset(product_catalogue(tmp_path), text_columns=["attributes", "title"])
    assert raw.text_columns == ["attributes", "title"]
    with pytest.raises(MolarDataError, match=r"--text-columns: unknown column\(s\) \['colour'\]"):
        read_dataset(tmp_path, text_columns=["colour"])


def test_prompt_names_every_field(tmp_path):
    from merlin_molar.items import ItemPromptBuilder

    raw = read_dataset(product_catalogue(tmp_path))
    builder = ItemPromptBuilder(text_columns=raw.text_columns)
    lamp = builder.items_from_frame(raw.items.assign(item_id=[1, 2]))[0]
    assert builder.item_text(lamp) == "title: Lamp; brand: Lumo; attributes: colour: white | LED; price: 12.5"


def test_iso_8601_timestamps_are_read_as_seconds_in_the_same_order(tmp_path):
    """Most exported logs write dates (issue 30): they are parsed (no zone = UTC), to seconds since 1970."""
    dates = ["2024-03-01T12:30:00Z", "2024-03-01 13:30:00+02:00", "2024-03-01T12:29:59"]
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": dates})
    raw = read_dataset(write_csv_layout(tmp_path / "d", inter))
    assert raw.interactions["timestamp"].tolist() == [1709296200, 1709292600, 1709296199]
    fractions = inter.assign(timestamp=["2024-03-01T12:30:00.5Z", "2024-03-01T12:30:00.25+00:00", "2024-03-01"])
    ts = read_dataset(write_csv_layout(tmp_path / "f", fractions)).interactions["timestamp"].tolist()
    assert ts == [1709296200_500_000_000, 1709296200_250_000_000, 1709251200_000_000_000]  # fractions: ns


def test_identifier_columns_stay_out_of_the_default_text_with_a_warning(tmp_path, caplog):
    items = pd.DataFrame({"item_id": [10, 11, 12], "asin": ["B00004Z5M1", "B00005JKZY", "B0000AQS0F"],
                          "sku": ["lamp", "mug", "desk"], "title": ["Lamp", "Mug", "Desk"],
                          "code": ["X1-9", "Y2-8", "Z3-7"], "genres": ["Home", "Kitchen", "Home"]})
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 12], "timestamp": [5, 6, 7]})
    root = write_csv_layout(tmp_path / "d", inter, items)
    raw = read_dataset(root)
    assert raw.text_columns == ["title", "genres"] and raw.identifier_columns == ["asin", "sku", "code"]
    assert "column(s) ['asin', 'sku', 'code'] look like identifiers" in caplog.text
    caplog.clear()
    assert read_dataset(root, text_columns=["title", "asin"]).text_columns == ["title", "asin"]  # asked for
    assert "identifiers" not in caplog.text
    only_codes = items[["item_id", "asin"]]
    assert read_dataset(write_csv_layout(tmp_path / "o", inter, only_codes)).text_columns == ["asin"]
