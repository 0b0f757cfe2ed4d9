
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from merlin_molar.errors import MolarDataError
from merlin_molar.items import (
    ItemContent,
    ItemPromptBuilder,
    embed_catalogue,
    item_id_fingerprint,
    load_item_table,
    merge_shards,
    read_table_metadata,
)
from merlin_molar.items.encoders import ItemEncoder
from merlin_molar.items.fusion import JoinStatistics, join_parts
from merlin_molar.items.table import EMBEDDINGS_FILE, SCHEMA_FILE, catalogue_items

BATCH, CHUNK_BATCHES = 4, 2  # 8 items per chunk: 5 chunks for the 40-item slice


def run(prepared, encoder, out, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("chunk_batches", CHUNK_BATCHES)
    return embed_catalogue(prepared, encoder, out, progress=False, **kwargs)


def table_bytes(path):
    return (path / EMBEDDINGS_FILE).read_bytes(), (path / SCHEMA_FILE).read_bytes()


class CrashingEncoder(ItemEncoder):
    """The real encoder, killed after ``calls`` batches (a job dying half-way)."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls
        self.kind, self.prompts, self.dim = inner.kind, inner.prompts, inner.dim

    def lengths(self, items):
        return self.inner.lengths(items)

    def describe(self):
        return self.inner.describe()

    def prepare(self, items):
        return self.inner.prepare(items)

    def forward(self, batch):
        if self.calls == 0:
            raise RuntimeError("killed")
        self.calls -= 1
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_prepared, minilm):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "item_table"
    result = run(small_prepared, minilm, out)
    assert result.complete and result.chunks_total == 5 and result.items_encoded == 40
    return out


def test_table_rows_are_categorify_ids_with_the_right_items(reference, small_prepared, small_raw, minilm):

    from merlin_molar.data.workflow import item_id_mapping

    table = load_item_table(reference, small_prepared)
    assert table.dtype == torch.float32 and table.shape == (small_prepared.item_cardinality, 384) == (43, 384)
    assert torch.all(table[:3] == 0)
    # Independently: raw item -> Categorify id from the fitted workflow; raw row -> MiniLM vector.
    mapping = item_id_mapping(small_prepared.load_workflow())
    prompts = ItemPromptBuilder(text_columns=tuple(small_raw.text_columns))
    raw_items = small_raw.items.set_index("item_id")
    raw_ids = list(mapping.index)
    expected = minilm.encode([
        ItemContent(int(r), tuple((c, str(raw_items.at[r, c])) for c in prompts.text_columns), None) for r in raw_ids
    ]).embeddings
    np.testing.assert_allclose(table[mapping.values].numpy(), expected, atol=1e-5)


def test_parquet_columns_schema_and_metadata(reference, small_prepared):
    arrow = pq.read_table(reference / EMBEDDINGS_FILE)
    assert arrow.column_names == ["item_id", "embedding", "has_embedding", "used_image"]
    embedding_type = arrow.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding_type) and embedding_type.list_size == 384
    assert embedding_type.value_type == pa.float32()
    assert arrow.column("has_embedding").to_pylist() == [False] * 3 + [True] * 40
    from merlin.io import Dataset
    from merlin.schema import Tags

    schema = Dataset(str(reference / EMBEDDINGS_FILE), engine="parquet").schema
    assert schema.select_by_tag(Tags.EMBEDDING).column_names == ["embedding"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    meta = read_table_metadata(reference)
    assert meta["id_mapping_fingerprint"] == item_id_fingerprint(small_prepared)
    assert meta["item_cardinality"] == 43 and meta["dim"] == 384 and meta["items_embedded"] == 40
    assert meta["zero_rows"] == [0, 1, 2] and meta["missing_image_ids"] == [] and not meta["encoder_reads_images"]
    assert meta["prompt_template"]["text_columns"] == small_prepared.manifest["text_columns"]
    assert "all_minilm" in meta["backbone"] and meta["created"]
    assert not reference.with_name("item_table.work").exists()


def test_resume_after_max_chunks_is_byte_identical(tmp_path, reference, small_prepared, minilm):
    out = tmp_path / "item_table"
    first = run(small_prepared, minilm, out, max_chunks=2)
    assert not first.complete and first.chunks_done == 2 and not out.exists()
    second = run(small_prepared, minilm, out)
    assert second.complete and second.chunks_encoded == 3 and second.items_encoded == 24
    assert table_bytes(out) == table_bytes(reference)


def test_resume_after_a_crash_is_byte_identical(tmp_path, reference, small_prepared, minilm):
    out = tmp_path / "item_table"
    with pytest.raises(RuntimeError, match="killed"):
        run(small_prepared, CrashingEncoder(minilm, calls=5), out)  # dies inside the third chunk
    assert len(list(out.with_name("item_table.work").glob("chunks/*.npz"))) == 2
    resumed = run(small_prepared, minilm, out)
    assert resumed.chunks_encoded == 3
    assert table_bytes(out) == table_bytes(reference)


def test_a_finished_table_of_the_same_plan_is_reused_not_encoded_again(tmp_path, reference, small_prepared, minilm):
    out = tmp_path / "item_table"
    shutil.copytree(reference, out)
    before = table_bytes(out)
    again = run(small_prepared, CrashingEncoder(minilm, calls=0), out)  # would raise if it encoded anything
    assert again.reused and again.complete and again.items_encoded == 0 and table_bytes(out) == before
    # another batch size computes the same table: reused too (issue 31: a rerun with only --batch-size changed)
    other_batches = run(small_prepared, CrashingEncoder(minilm, calls=0), out, batch_size=8)
    assert other_batches.reused and other_batches.items_encoded == 0 and table_bytes(out) == before
    # resume=False embeds anew, replacing the table atomically
    forced = run(small_prepared, minilm, out, resume=False, batch_size=8)
    assert not forced.reused and forced.items_encoded == 40 and table_bytes(out) == before
    assert read_table_metadata(out)["batch_size"] == 8


def test_a_finished_table_is_not_reused_after_the_item_text_or_the_encoder_weights_change(
        tmp_path, reference, small_raw, minilm):
    from merlin_molar.data import RawDataset, prepare

    prepared = prepare(small_raw, tmp_path / "prepared", max_length=20)
    out = prepared.root / "item_table"
    shutil.copytree(reference, out)
    assert run(prepared, minilm, out).reused
    # the user edits a title in their item file and prepares again: same ids, same interactions, new text
    items = small_raw.items.copy()
    title = next(c for c in small_raw.text_columns if c in items)
    items.loc[items.index[5], title] = "a title edited after the table was made"
    edited_raw = RawDataset(small_raw.interactions, items, small_raw.source, small_raw.text_columns)
    prepared = prepare(edited_raw, tmp_path / "prepared", max_length=20)
    edited = run(prepared, minilm, out)
    assert not edited.reused and edited.items_encoded == 40 and table_bytes(out) != table_bytes(reference)
    assert run(prepared, minilm, out).reused
    # the same encoder path, its files rewritten (a stage-1 run into the same directory)
    model = tmp_path / "encoder"
    shutil.copytree(minilm.name_or_path, model)
    from merlin_molar.items import build_encoder

    assert not run(prepared, build_encoder(str(model), device="cpu"), out).reused
    assert run(prepared, build_encoder(str(model), device="cpu"), out).reused
    weights = next(p for p in sorted(model.rglob("*.safetensors")))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not run(prepared, build_encoder(str(model), device="cpu"), out).reused


def test_a_crash_before_the_first_chunk_leaves_nothing_that_refuses_another_run(tmp_path, reference, small_prepared,
                                                                              minilm):
    out = tmp_path / "item_table"
    with pytest.raises(RuntimeError, match="killed"):
        run(small_prepared, CrashingEncoder(minilm, calls=0), out)
    assert not out.exists() and not out.with_name("item_table.work").exists()
    assert run(small_prepared, minilm, out, batch_size=8).complete  # other arguments: not refused


def test_two_shards_merged_equal_one_process(tmp_path, reference, small_prepared, minilm):
    out = tmp_path / "item_table"
    zero = run(small_prepared, minilm, out, shard_index=0, num_shards=2)
    assert zero.complete and zero.chunks_total == 3 and not out.exists()
    with pytest.raises(MolarDataError, match=r"shard\(s\) \[1\] of 2"):
        merge_shards(out)
    with pytest.raises(RuntimeError):
        run(small_prepared, CrashingEncoder(minilm, calls=1), out, shard_index=1, num_shards=2)
    one = run(small_prepared, minilm, out, shard_index=1, num_shards=2)  # the failed shard, re-run alone
    assert one.complete and one.chunks_encoded == 2
    merge_shards(out)
    assert table_bytes(out) == table_bytes(reference)


def test_work_dir_of_another_run_is_refused(tmp_path, small_prepared, minilm):
    out = tmp_path / "item_table"
    run(small_prepared, minilm, out, max_chunks=1)
    with pytest.raises(MolarDataError, match=r"different run \(differs in \['batch_size', 'chunks'\]\)"):
        run(small_prepared, minilm, out, batch_size=8)
    assert run(small_prepared, minilm, out, batch_size=8, resume=False).complete


def test_loader_refuses_tables_of_other_data(reference, remapped_prepared, tiny_prepared):
    assert remapped_prepared.item_cardinality == 43
    with pytest.raises(MolarDataError, match="item id mapping differs"):
        load_item_table(reference, remapped_prepared)
    with pytest.raises(MolarDataError, match="made for 43 item ids"):
        load_item_table(reference, tiny_prepared)


def test_loader_refuses_reordered_rows(tmp_path, reference, small_prepared):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    arrow = pq.read_table(bad / EMBEDDINGS_FILE)
    pq.write_table(arrow.take(list(range(42, -1, -1))), bad / EMBEDDINGS_FILE)
    with pytest.raises(MolarDataError, match="rows are not item ids 0..42 in order"):
        load_item_table(bad, small_prepared)


def test_vlm_table_reports_missing_and_corrupt_images(tmp_path, small_prepared, vlm, broken_image_ids):
    out = tmp_path / "vlm_table"
    with pytest.warns(UserWarning, match="2 item\\(s\\) had a missing or unreadable image"):
        run(small_prepared, vlm, out)
    meta = read_table_metadata(out)
    broken = sorted(broken_image_ids.values())
    assert meta["missing_image_ids"] == broken and meta["missing_image_count"] == 2
    assert "file not found" in meta["missing_image_examples"][str(broken_image_ids["missing"])]
    assert meta["items_with_image"] == 38 and meta["encoder"]["image_size"] == 224 and meta["encoder_reads_images"]
    used = pq.read_table(out / EMBEDDINGS_FILE).column("used_image").to_numpy(zero_copy_only=False)
    assert not used[broken].any() and used[3:].sum() == 38
    table = load_item_table(out, small_prepared)
    assert table.shape == (43, 32) and torch.all(table[3:].abs().sum(1) > 0)


def test_prefetching_batches_gives_the_same_vectors_in_order(vlm, poster_paths, broken_images):
    from merlin_molar.items import encode_batches

    items = [ItemContent(3 + i, (("title", f"Movie {i}"),), p) for i, p in enumerate(poster_paths)]
    items.append(ItemContent(9, (("title", "Heat"),), broken_images["corrupt"]))
    batches = [items[:2], items[2:4], items[4:]]
    plain = list(encode_batches(vlm, batches, prefetch=False))
    prefetched = list(encode_batches(vlm, batches, prefetch=True))
    for a, b in zip(plain, prefetched):
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
        assert a.used_image.tolist() == b.used_image.tolist() and a.image_problems == b.image_problems
    assert list(prefetched[2].image_problems) == [9]


def test_torchrun_shard_reads_rank_and_world_size(monkeypatch):
    from merlin_molar.items import torchrun_shard

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_shard() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert torchrun_shard() == (3, 8)


# --- the pretrained image encoder and the text + image join -----------------------------------------------

def _no_poster_ids(prepared):
    items = prepared.items()
    return sorted(int(i) for i in items.loc[items["image"].isna(), "item_id"])


def test_image_encoder_table_leaves_items_without_a_poster_as_zero_rows(tmp_path, small_prepared_some_posters,
                                                                        efficientnet):
    out = tmp_path / "image_table"
    run(small_prepared_some_posters, efficientnet, out)
    meta = read_table_metadata(out)
    no_poster = _no_poster_ids(small_prepared_some_posters)
    assert len(no_poster) == 2 and meta["no_content_ids"] == no_poster and meta["missing_image_count"] == 0
    assert meta["zero_rows"] == [0, 1, 2, *no_poster] and meta["items_with_image"] == 38
    assert meta["encoder_reads_images"] and meta["encoder"]["kind"] == "image" and meta["dim"] == 1280
    table = load_item_table(out, small_prepared_some_posters)
    assert not table[no_poster].any() and bool((table[3:].abs().sum(1) > 0).sum() == 38)


def test_multimodal_table_embeds_items_without_a_poster_from_their_text(tmp_path, small_prepared_some_posters,
                                                                        minilm_efficientnet):
    from merlin_molar.items.add_items import _check_encoder

    out = tmp_path / "mm_table"
    run(small_prepared_some_posters, minilm_efficientnet, out)
    meta = read_table_metadata(out)
    no_poster = _no_poster_ids(small_prepared_some_posters)
    assert meta["zero_rows"] == [0, 1, 2] and meta["items_with_image"] == 38 and meta["dim"] == 1664
    used = pq.read_table(out / EMBEDDINGS_FILE).column("used_image").to_numpy(zero_copy_only=False)
    assert not used[no_poster].any() and used[3:].sum() == 38
    table = load_item_table(out, small_prepared_some_posters)
    assert not table[no_poster, 384:].any() and bool(table[no_poster, :384].abs().sum(1).gt(0).all())
    # the default join: each part whitened with statistics fitted on this catalogue, saved beside the table
    assert meta["join"]["fusion"] == "whiten" and meta["join"]["fitted_on"] == {"text_rows": 40, "image_rows": 38}
    statistics = JoinStatistics.load(out / meta["join"]["file"], meta["join"]["sha256"])
    rows = table[3:].numpy()
    white_text = rows[:, :384] * np.sqrt(2)  # unit rows of the whitened text part
    np.testing.assert_allclose(np.linalg.norm(white_text, axis=1), 1.0, atol=1e-5)
    items, _, _ = catalogue_items(small_prepared_some_posters, minilm_efficientnet)
    raw = minilm_efficientnet.encode(items[:4])
    np.testing.assert_allclose(table[[i.item_id for i in items[:4]]].numpy(),
                               join_parts(raw.embeddings, raw.used_image, 384, statistics), atol=1e-4)
    rebuilt = _check_encoder(meta, None, out)  # add-items rebuilds the same encoder from the metadata
    assert rebuilt.describe() == {k: v for k, v in meta["encoder"].items()}
    assert _check_encoder(meta, "minilm+efficientnet-lite0", out).dim == 1664


@pytest.mark.parametrize("name", ["efficientnet-lite0", "minilm+efficientnet-lite0"])
def test_an_unreadable_poster_stops_the_run_before_anything_is_written(tmp_path, small_prepared, name, capsys,
                                                                       broken_images):
    from merlin_molar.cli import main

    out = tmp_path / "table"
    assert main(["embed-items", "--prepared", str(small_prepared.root), "--output", str(out), "--encoder", name,
                 "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("merlin-molar embed-items: error: ")
    assert broken_images["missing"] in lines[0] or broken_images["corrupt"] in lines[0]
    assert not out.exists() and not out.with_name("table.work").exists()
