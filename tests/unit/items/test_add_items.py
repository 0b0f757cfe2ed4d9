"""add-items: the vocabulary and item table extended in place, refusals, resume after an interruption."""
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import merlin_molar.items.add_items as add_items_module
from merlin_molar.data import load_prepared
from merlin_molar.data.holdout import COLD_ITEMS_FILE
from merlin_molar.data.workflow import item_id_mapping
from merlin_molar.errors import MolarDataError
from merlin_molar.ids import ITEM_SEQUENCE
from merlin_molar.items import item_id_fingerprint, load_item_table
from merlin_molar.items.add_items import add_items


def table_arrays(path):
    t = pq.read_table(path / "embeddings.parquet")
    return {c: t.column(c).combine_chunks() for c in t.column_names}


def test_add_items_extends_vocabulary_and_table_keeping_existing_rows(cold, minilm):
    import nvtabular as nvt

    before_vocab = item_id_mapping(cold.load_workflow())
    before = table_arrays(cold.root / "item_table")
    old_cardinality = cold.item_cardinality
    new_file = cold.root / COLD_ITEMS_FILE
    result = add_items(cold, new_file, progress=False)
    prepared = load_prepared(cold.root)
    new_raw = pd.read_csv(new_file)["item_id"].tolist()

    # vocabulary: old ids unchanged, new ids appended in file order, and the saved workflow maps them
    after_vocab = item_id_mapping(prepared.load_workflow())
    assert after_vocab[before_vocab.index].equals(before_vocab)
    assert after_vocab[new_raw].tolist() == list(range(old_cardinality, old_cardinality + len(new_raw)))
    wf = prepared.load_workflow()
    assert wf.output_schema[ITEM_SEQUENCE].int_domain.max == prepared.item_cardinality - 1
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [new_raw[0], before_vocab.index[0], new_raw[-1]],
                          "timestamp": [1, 2, 3], "interaction_order": [0, 1, 2]})
    encoded = wf.transform(nvt.Dataset(frame)).to_ddf().compute()[ITEM_SEQUENCE].iloc[0]
    assert list(encoded) == [after_vocab[new_raw[0]], before_vocab.iloc[0], after_vocab[new_raw[-1]]]

    # table: existing rows byte-identical, new rows = the same encoder on the same prompts
    after = table_arrays(prepared.root / "item_table")
    n = old_cardinality
    assert after["embedding"].slice(0, n).equals(before["embedding"])
    assert after["has_embedding"].slice(0, n).equals(before["has_embedding"])
    table = load_item_table(prepared.root / "item_table", prepared)
    prompts = minilm.prompts.with_columns(prepared.manifest["text_columns"])
    items = prepared.items()
    new_items = prompts.items_from_frame(items[items["item_id"] >= n])
    expected = minilm.encode(new_items).embeddings
    np.testing.assert_allclose(table[n:].numpy(), expected, atol=1e-5)

    # version + fingerprint recorded in the manifest and the table metadata
    fingerprint = item_id_fingerprint(prepared)
    assert result.version == 2 and result.id_mapping_fingerprint == fingerprint
    catalogue = prepared.manifest["catalogue"]
    assert catalogue["version"] == 2 and catalogue["id_mapping_fingerprint"] == fingerprint
    assert [v["version"] for v in catalogue["history"]] == [1, 2]
    assert catalogue["history"][0]["item_cardinality"] == old_cardinality
    # the same file again is a no-op
    again = add_items(prepared, new_file, progress=False)
    assert again.added == [] and len(again.skipped) == len(new_raw) and again.version == 2
    assert load_prepared(cold.root).item_cardinality == prepared.item_cardinality


def test_add_items_refuses_changed_content_other_encoder_and_no_content(cold, tmp_path, capsys):
    from merlin_molar.cli import main

    items = cold.items()
    known = items[items["has_content"]].iloc[0]
    changed = pd.DataFrame({"item_id": [known["item_id_raw"]], "clean_title": ["A different title"],
                            "year": [known["year"]], "genres": [known["genres"]]})
    changed.to_csv(tmp_path / "changed.csv", index=False)
    with pytest.raises(MolarDataError, match=f"item_id {known['item_id_raw']} is already in the catalogue with "
                                             "different content"):
        add_items(cold, tmp_path / "changed.csv", progress=False)

    with pytest.raises(MolarDataError, match="differs from the item table's encoder"):
        add_items(cold, cold.root / COLD_ITEMS_FILE, encoder="/some/other/encoder", progress=False)

    pd.DataFrame({"item_id": [99991, 99992], "price": [1, 2]}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(MolarDataError, match="no usable content"):
        add_items(cold, tmp_path / "empty.csv", progress=False)
    pd.DataFrame({"item_id": [99991], "clean_title": [""], "genres": [""]}).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(MolarDataError, match="no usable content"):
        add_items(cold, tmp_path / "blank.csv", progress=False)

    # nothing was changed by the refused calls; the CLI says it on one line and exits 2
    assert load_prepared(cold.root).item_cardinality == cold.item_cardinality
    assert not (cold.root / add_items_module.WORK_DIR).exists()
    code = main(["add-items", "--prepared", str(cold.root), "--items", str(tmp_path / "changed.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"merlin-molar add-items: error: {tmp_path / 'changed.csv'}: item_id ")


def test_add_items_resumes_after_interruption(cold, cold_base, tmp_path, monkeypatch):
    monkeypatch.setattr(add_items_module, "CHUNK_ITEMS", 4)
    new_file = cold.root / COLD_ITEMS_FILE
    partial = add_items(cold, new_file, max_chunks=1, progress=False)
    assert partial.added == [] and load_prepared(cold.root).item_cardinality == cold.item_cardinality
    chunks = sorted((cold.root / add_items_module.WORK_DIR).glob("chunk-*.npz"))
    assert len(chunks) == 1

    # a crash in the middle of the final moves: the re-run finishes them
    real_replace = add_items_module._replace
    calls = []

    def crash_after_first(staged, final):
        calls.append(final)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(staged, final)

    monkeypatch.setattr(add_items_module, "_replace", crash_after_first)
    with pytest.raises(OSError):
        add_items(cold, new_file, progress=False)
    monkeypatch.setattr(add_items_module, "_replace", real_replace)
    result = add_items(load_prepared(cold.root), new_file, progress=False)
    assert result.added == [] and result.version == 2  # finished by the re-run, nothing left to add
    resumed = load_prepared(cold.root)

    # same outcome as one uninterrupted run
    other = tmp_path / "oneshot"
    shutil.copytree(cold_base.root, other)
    add_items(load_prepared(other), other / COLD_ITEMS_FILE, progress=False)
    oneshot = load_prepared(other)
    assert resumed.item_cardinality == oneshot.item_cardinality
    assert resumed.manifest["catalogue"]["id_mapping_fingerprint"] == oneshot.manifest["catalogue"][
        "id_mapping_fingerprint"]
    torch.testing.assert_close(load_item_table(resumed.root / "item_table", resumed),
                               load_item_table(other / "item_table", oneshot), atol=1e-5, rtol=0)
    assert not (cold.root / add_items_module.WORK_DIR).exists()


def test_add_items_refuses_a_table_embedded_under_another_text_rule(cold, tmp_path):
    """A table written before long item texts were fitted field by field records no ``text_fit``: its rows
    and the new ones would not be embedded alike, so it is refused, with the way out."""
    import json
    import shutil

    root = tmp_path / "older_table"
    shutil.copytree(cold.root, root)
    metadata_path = root / "item_table" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["encoder"]["text_fit"]
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(MolarDataError, match=r"text_fit.*embed-items"):
        add_items(load_prepared(root), root / COLD_ITEMS_FILE, progress=False)


def test_add_items_joins_new_rows_with_the_catalogue_statistics(cold, minilm_efficientnet):
    """A whitened text+image table: the new rows are joined with the statistics fitted on the catalogue (not
    refitted, not left raw), and those statistics travel with the extended table."""
    from merlin_molar.items import embed_catalogue, read_table_metadata
    from merlin_molar.items.fusion import JoinStatistics, join_parts

    table_dir = cold.root / "item_table_mm"
    embed_catalogue(cold, minilm_efficientnet, table_dir, progress=False)
    join = read_table_metadata(table_dir)["join"]
    statistics = JoinStatistics.load(table_dir / join["file"], join["sha256"])
    n = cold.item_cardinality
    add_items(cold, cold.root / COLD_ITEMS_FILE, item_table=table_dir, progress=False)
    prepared = load_prepared(cold.root)
    assert read_table_metadata(table_dir)["join"] == join
    assert (table_dir / join["file"]).read_bytes() == statistics_bytes(statistics, cold.root / "copy.npz")
    items = prepared.items()
    prompts = minilm_efficientnet.prompts.with_columns(prepared.manifest["text_columns"])
    new_items = prompts.items_from_frame(items[items["item_id"] >= n])
    raw = minilm_efficientnet.encode(new_items)
    assert raw.used_image.any()  # the held-out items have posters: the image part is exercised
    expected = join_parts(raw.embeddings, raw.used_image, 384, statistics)
    np.testing.assert_allclose(load_item_table(table_dir, prepared)[n:].numpy(), expected, atol=1e-4)


def statistics_bytes(statistics, path):
    statistics.save(path)
    return path.read_bytes()


def test_add_items_refuses_a_whitened_table_whose_statistics_changed(cold, minilm_efficientnet):
    from merlin_molar.items import embed_catalogue, read_table_metadata

    table_dir = cold.root / "item_table_mm"
    embed_catalogue(cold, minilm_efficientnet, table_dir, progress=False)
    join_file = table_dir / read_table_metadata(table_dir)["join"]["file"]
    data = bytearray(join_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the whitening matrix
    join_file.write_bytes(bytes(data))
    before = sorted(p.name for p in cold.root.iterdir())
    with pytest.raises(MolarDataError, match="does not match the checksum"):
        add_items(cold, cold.root / COLD_ITEMS_FILE, item_table=table_dir, progress=False)
    assert sorted(p.name for p in cold.root.iterdir()) == before  # refused before anything was written
