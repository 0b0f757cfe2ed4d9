"""Cold start on the synthetic catalogue: the prepare hold-out, add-items (vocabulary + table versions,
refusals, resume), a trained-once Molar model scoring new items, and the cold/warm evaluator."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import merlin_molar.items.add_items as add_items_module
from merlin_molar.cold_start import (
    COLD_ITEMS_FILE,
    COLD_TARGETS_FILE,
    OOV_ID,
    content_knn_scorer,
    evaluate_cold_start,
    extend_catalogue,
    hold_out_items,
    impute_id_embeddings,
    model_for_catalogue,
    model_scorer,
    new_items_on_model_scale,
    popularity_scorer,
    random_scorer,
    warm_cost_tradeoff,
)
from merlin_molar.data import ITEM_SEQUENCE, load_prepared, prepare, read_dataset
from merlin_molar.errors import MolarDataError
from merlin_molar.items import embed_catalogue, item_id_fingerprint, load_item_table
from merlin_molar.items.add_items import add_items
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.models.task import calibrated_new_item_scores


@pytest.fixture(scope="module")
def minilm():
    from merlin_molar.items import build_encoder

    return build_encoder(device="cpu")


@pytest.fixture(scope="module")
def cold_base(tmp_path_factory, tiny_dir, minilm):
    """Synthetic data prepared with 10% cold items, warm catalogue embedded with MiniLM (never mutated)."""
    root = tmp_path_factory.mktemp("cold") / "prepared"
    prepared = prepare(read_dataset(tiny_dir), root, max_length=20, cold_items=0.1)
    embed_catalogue(prepared, minilm, root / "item_table", progress=False)
    return prepared


@pytest.fixture
def cold(cold_base, tmp_path):
    """A private copy of the cold prepared dir that a test may extend."""
    root = tmp_path / "prepared"
    shutil.copytree(cold_base.root, root)
    return load_prepared(root)


def vocabulary(prepared) -> pd.Series:

    from merlin_molar.data.workflow import item_id_mapping

    return item_id_mapping(prepared.load_workflow())


def table_arrays(path):
    t = pq.read_table(path / "embeddings.parquet")
    return {c: t.column(c).combine_chunks() for c in t.column_names}


# --- prepare --cold-items --------------------------------------------------------------------------------------
def test_cold_items_are_the_latest_to_appear_and_only_test_targets(cold_base, tiny_dir):
    raw = read_dataset(tiny_dir)
    inter = raw.interactions.assign(order=np.arange(len(raw.interactions)))
    first_seen = inter.sort_values(["timestamp", "order"]).drop_duplicates("item_id")["item_id"].tolist()
    cold_file = pd.read_csv(cold_base.root / COLD_ITEMS_FILE)
    n_cold = int(np.ceil(0.1 * len(first_seen)))
    assert cold_file["item_id"].tolist() == first_seen[-n_cold:]
    assert cold_base.manifest["cold_start"]["cold_items"] == n_cold

    mapping = vocabulary(cold_base)
    assert not set(cold_file["item_id"]) & set(mapping.index)  # Categorify never saw them
    assert cold_base.item_cardinality == 3 + len(first_seen) - n_cold
    for split in ("train", "valid"):
        codes = np.concatenate(cold_base.split_frame(split)[ITEM_SEQUENCE].map(np.asarray).tolist())
        assert (codes >= 3).all()  # no OOV: no cold interaction left in training or validation histories
    test = cold_base.split_frame("test").set_index("user_id")
    targets = pd.read_parquet(cold_base.root / COLD_TARGETS_FILE)
    assert len(targets) == cold_base.manifest["cold_start"]["cold_target_users"] > 0
    for user, raw_id in zip(targets["user_id"], targets["item_id_raw"]):
        seq = np.asarray(test.loc[user, ITEM_SEQUENCE])
        assert seq[-1] == OOV_ID and (seq[:-1] >= 3).all()
        last = inter[inter["user_id"] == user].sort_values(["timestamp", "order"])["item_id"].iloc[-1]
        assert last == raw_id
    warm_users = test.index.difference(targets["user_id"])
    assert all(np.asarray(test.loc[u, ITEM_SEQUENCE])[-1] >= 3 for u in warm_users)


# --- add-items ----------------------------------------------------------------------------------------------------
def test_add_items_extends_vocabulary_and_table_keeping_existing_rows(cold, minilm):
    import nvtabular as nvt

    before_vocab = vocabulary(cold)
    before = table_arrays(cold.root / "item_table")
    old_cardinality = cold.item_cardinality
    new_file = cold.root / COLD_ITEMS_FILE
    result = add_items(cold, new_file, progress=False)
    prepared = load_prepared(cold.root)
    new_raw = pd.read_csv(new_file)["item_id"].tolist()

    # vocabulary: old ids unchanged, new ids appended in file order, and the saved workflow maps them
    after_vocab = vocabulary(prepared)
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


def test_a_prepared_directory_reads_its_own_vocabulary_from_anywhere(cold_base, tmp_path, monkeypatch):
    """The saved workflow records the vocabulary path prepare/add-items were given (here relative to their
    working directory): the prepared directory still works from another one, and after a move."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cold_base.root, "here/prepared")
    relative = load_prepared(Path("here/prepared"))
    add_items(relative, relative.root / COLD_ITEMS_FILE, progress=False)  # records catalogue/v2 relatively
    want = vocabulary(load_prepared(Path("here/prepared")))
    assert len(want) > len(vocabulary(cold_base))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "here" / "prepared"), str(moved))
    pd.testing.assert_series_equal(vocabulary(load_prepared(moved)), want)
    (moved / "catalogue" / "v2" / "unique.item_id.parquet").unlink()
    with pytest.raises(MolarDataError, match="item vocabulary .* is missing"):
        load_prepared(moved).load_workflow()


# --- scoring new items ----------------------------------------------------------------------------------------
def test_quantile_scores_put_new_items_at_the_id_score_of_their_content_rank():
    torch.manual_seed(0)
    known, new = 13, 3
    content = torch.log_softmax(torch.randn(2, known + new), -1)
    ident = torch.log_softmax(3 * torch.randn(2, known), -1)
    # new item 0 ties with the best known content score, new item 1 is above all, 2 is below all; a new item
    # in the middle gets the ID score of the known item it ranks with
    best = content[:, 3:known].max(-1).values
    content[:, known] = best
    content[:, known + 1] = best + 1
    content[:, known + 2] = content[:, 3:known].min(-1).values - 1
    got = calibrated_new_item_scores(content, ident, 0.5, "quantile")
    top_id = ident[:, 3:known].max(-1).values
    # a tie with the best known item gets that item's rank, hence the best ID score
    torch.testing.assert_close(got[:, 0], 0.5 * content[:, known] + 0.5 * top_id)
    torch.testing.assert_close(got[:, 1], 0.5 * content[:, known + 1] + 0.5 * top_id)
    torch.testing.assert_close(got[:, 2], 0.5 * content[:, known + 2] + 0.5 * ident[:, 3:known].min(-1).values)
    c, d = content[:, 3:known], ident[:, 3:known]
    middle = torch.cat([content, c.sort(-1).values[:, 4:5] + 1e-6], dim=1)  # just above the 5th lowest
    got = calibrated_new_item_scores(middle, ident, 0.5, "quantile")
    torch.testing.assert_close(got[:, -1], 0.5 * middle[:, -1] + 0.5 * d.sort(-1).values[:, 5])
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "content"), content[:, known:])
    with pytest.raises(ValueError):
        calibrated_new_item_scores(content, ident, 0.5, "nope")


def random_user_scores(users: int, known: int, new: int):
    """Content log-probabilities over ``known + new`` items, ID log-probabilities over the known ones, and
    logits against every item's imputed ID embedding, for ``users`` users."""
    torch.manual_seed(0)
    content = torch.log_softmax(torch.randn(users, known + new), -1)
    ident = torch.log_softmax(torch.randn(users, known), -1)
    return content, ident, 2 * torch.randn(users, known + new)


def test_imputed_scores_are_the_id_log_probability_of_the_imputed_embedding_among_the_known_items():
    known = 13
    content, ident, imputed_logits = random_user_scores(2, known, 3)
    got = calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits)
    # log-softmax over the known items' imputed logits (reserved ids 0..2 left out), read at the new items
    normaliser = torch.logsumexp(imputed_logits[:, 3:known], -1, keepdim=True)
    torch.testing.assert_close(got, 0.75 * content[:, known:] + 0.25 * (imputed_logits[:, known:] - normaliser))
    # a user's logits shifted by a constant change nothing: the scale is the known items' own
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits + 5.0), got)
    with pytest.raises(ValueError, match="imputed ID embedding"):
        calibrated_new_item_scores(content, ident, 0.25, "imputed")
    with pytest.raises(ValueError, match="imputed ID embedding"):
        calibrated_new_item_scores(content, ident, 0.25, "imputed", imputed_logits[:, :known])


def test_new_item_scores_are_tempered_around_each_users_new_item_log_mass():
    from merlin_molar.models.task import scores_with_new_items

    known = 13
    content, ident, imputed_logits = random_user_scores(3, known, 4)
    plain = calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, 1.0), plain)
    got = calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, 2.0)
    mass = torch.logsumexp(plain, -1, keepdim=True)
    torch.testing.assert_close(got, mass + (plain - mass) / 2)
    assert torch.equal(got.argsort(-1), plain.argsort(-1))  # the order among the new items stays
    torch.testing.assert_close(got.std(-1), plain.std(-1) / 2)  # their spread halves, per user
    # the known items' fused scores are untouched; the prior is added after the tempering
    fused = scores_with_new_items(content, ident, 0.5, "imputed", 0.3, imputed_logits, 2.0)
    torch.testing.assert_close(fused[:, :known], 0.5 * content[:, :known] + 0.5 * ident)
    torch.testing.assert_close(fused[:, known:], got + 0.3)
    # the quantile rule is tempered the same way; a model without an ID branch is not tempered at all
    quantile = calibrated_new_item_scores(content, ident, 0.5, "quantile")
    q_mass = torch.logsumexp(quantile, -1, keepdim=True)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.5, "quantile", temperature=2.0),
                               q_mass + (quantile - q_mass) / 2)
    torch.testing.assert_close(calibrated_new_item_scores(content, ident, 0.0, "imputed", imputed_logits, 2.0),
                               content[:, known:])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="new_item_temperature"):
            calibrated_new_item_scores(content, ident, 0.5, "imputed", imputed_logits, bad)


def test_imputed_id_embeddings_recover_a_linear_content_to_id_map():
    """The ridge map from content rows to ID rows, fitted on the known items only (reserved rows left out)."""
    generator = torch.Generator().manual_seed(0)
    known, new, width, dim = 200, 20, 12, 5
    content = torch.randn(known + new, width, generator=generator)
    truth = torch.randn(width, dim, generator=generator)
    ids = content @ truth + 0.5
    ids[:3] = 100.0  # reserved rows (padding, OOV, ...): must not pull the fit
    imputed = impute_id_embeddings(content, ids[:known], known, shrinkage=1e-6, neighbour_weight=0.0)
    assert imputed.shape == (known + new, dim)
    torch.testing.assert_close(imputed[3:], (content @ truth + 0.5)[3:], atol=1e-3, rtol=0)
    # shrinkage pulls every imputed embedding towards the known items' mean
    shrunk = impute_id_embeddings(content, ids[:known], known, shrinkage=10.0, neighbour_weight=0.0)
    centre = ids[3:known].mean(0)
    assert (shrunk[known:] - centre).norm(dim=1).mean() < (imputed[known:] - centre).norm(dim=1).mean()
    with pytest.raises(MolarDataError, match="impute ID embeddings"):
        impute_id_embeddings(content[:50], ids[:known], known)


def test_imputed_id_embeddings_mix_in_the_content_neighbours_id_embeddings():
    """A new item whose content repeats a known item's takes (nearly) that item's ID embedding from the
    neighbour mean, however far it is from the linear trend; the default mixes the two halves."""
    generator = torch.Generator().manual_seed(1)
    known, width, dim = 100, 16, 4
    content = torch.randn(known, width, generator=generator)
    ids = torch.randn(known, dim, generator=generator)  # no linear relation at all
    twin = torch.cat([content, 2.0 * content[10:11]])  # same direction as item 10: cosine 1
    only_neighbours = impute_id_embeddings(twin, ids, known, neighbour_weight=1.0)
    torch.testing.assert_close(only_neighbours[known], ids[10], atol=1e-3, rtol=0)
    ridge = impute_id_embeddings(twin, ids, known, neighbour_weight=0.0)
    mixed = impute_id_embeddings(twin, ids, known)
    torch.testing.assert_close(mixed, 0.5 * ridge + 0.5 * only_neighbours)
    # the cosines are computed in blocks: the block size changes nothing
    torch.testing.assert_close(impute_id_embeddings(twin, ids, known, batch_size=7), mixed)


def tiny_molar(prepared, table, adaptor="moe"):
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20,
                         content_adaptor=adaptor)
    torch.manual_seed(0)
    return molar_model(prepared.schema, table, config).eval()


@pytest.mark.parametrize("adaptor", ["moe", "linear"])
def test_trained_model_scores_new_items_without_retraining(cold, adaptor):
    old_table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, old_table, adaptor)
    histories = torch.zeros(4, 20, dtype=torch.long)
    histories[:, :3] = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    with torch.no_grad():
        before = model({"item_id-list": histories})
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    extended = model_for_catalogue(model, "molar", prepared)
    n_old, n_new = old_table.size(0), prepared.item_cardinality
    with torch.no_grad():
        after = extended({"item_id-list": histories})
    assert after.shape == (4, n_new)
    # known items keep their order (their fused scores move by one constant per user)
    finite = torch.isfinite(before)
    diff = (after[:, :n_old] - before)[finite].view(4, -1)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-4, rtol=0)
    # new items get finite scores on the same scale: some rank in the top 10, not all of it
    assert torch.isfinite(after[:, n_old:]).all()
    if adaptor == "linear":  # calibrated (no prior), this seeded untrained model puts some in the top 10, not all
        task = extended.heads[0].prediction_task_dict["next-item"]
        prior, task.new_item_prior = task.new_item_prior, 0.0
        with torch.no_grad():
            top = torch.topk(extended({"item_id-list": histories}), 10, dim=1).indices
        task.new_item_prior = prior
        share = float((top >= n_old).float().mean())
        assert 0 < share < 1
    # a history holding a new item: the content tower reads it, the ID branch sees OOV
    histories[0, 3] = n_new - 1
    with torch.no_grad():
        out = extended({"item_id-list": histories})
    assert torch.isfinite(out[0, 3:]).any() and out[0, n_new - 1] == float("-inf")


def test_extension_refuses_a_foreign_table_and_sasrec(cold):
    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    foreign = torch.cat([table.clone(), torch.randn(2, table.size(1))])
    foreign[5] += 1
    with pytest.raises(MolarDataError, match="are not the table this model was trained with"):
        extend_catalogue(model, "molar", foreign)
    sasrec = sasrec_model(cold.schema, SASRecConfig(d_model=16, n_layers=1, n_heads=1, max_length=20))
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    with pytest.raises(MolarDataError, match="SASRec model has no embedding for items added after training"):
        model_for_catalogue(sasrec, "sasrec", load_prepared(cold.root))


# --- evaluation -------------------------------------------------------------------------------------------------
def test_cold_and_warm_metrics_with_baselines(cold):
    old_table = load_item_table(cold.root / "item_table", cold)
    old_model = tiny_molar(cold, old_table)
    with pytest.raises(MolarDataError, match="not in the vocabulary yet"):
        evaluate_cold_start(cold, {"random": random_scorer(cold.item_cardinality)}, progress=False)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    width, n_old = prepared.item_cardinality, old_table.size(0)
    table = load_item_table(prepared.root / "item_table", prepared)
    model = model_for_catalogue(tiny_molar(cold, old_table), "molar", prepared)
    results = evaluate_cold_start(prepared, {
        "molar": model_scorer(model, width), "molar_old_catalogue": model_scorer(old_model, width),
        "content_knn": content_knn_scorer(table), "popularity": popularity_scorer(prepared, width),
        "random": random_scorer(width),
    }, progress=False, known_items=n_old)
    n_cold = prepared.manifest["cold_start"]["cold_target_users"]
    assert all(r["cold"]["users"] == n_cold and r["all"]["users"] == prepared.manifest["users"]
               for r in results.values())
    # a model that does not know the new items, and popularity (zero for them), never retrieve a cold target
    assert results["molar_old_catalogue"]["cold"]["recall@50"] == 0
    assert results["popularity"]["cold"]["recall@50"] == 0
    assert results["molar_old_catalogue"]["warm"]["new_item_share@10"] == 0
    assert results["molar"]["all"]["new_item_share@10"] > 0
    assert results["popularity"]["warm"]["recall@10"] > results["random"]["warm"]["recall@10"]
    # content kNN: each user's scores are the cosine to their last item
    normed = torch.nn.functional.normalize(table, dim=1)
    h = torch.zeros(1, 20, dtype=torch.long)
    h[0, :2] = torch.tensor([5, 9])
    torch.testing.assert_close(content_knn_scorer(table)(h)[0], normed @ normed[9])


def test_new_items_placed_on_the_model_scale_by_the_other_scorers_rank(cold):
    old_table = load_item_table(cold.root / "item_table", cold)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    known, width = old_table.size(0), prepared.item_cardinality
    table = load_item_table(prepared.root / "item_table", prepared)
    molar = model_scorer(model_for_catalogue(tiny_molar(cold, old_table), "molar", prepared), width)
    knn = content_knn_scorer(table)
    h = torch.zeros(3, 20, dtype=torch.long)
    h[:, :2] = torch.tensor([[3, 4], [5, 9], [7, 8]])
    mixed, base, other = new_items_on_model_scale(molar, knn, known)(h), molar(h), knn(h)
    torch.testing.assert_close(mixed[:, :known], base[:, :known])  # known items keep the model's scores
    for u in range(3):
        known_scores = set(base[u, 3:known].tolist())
        assert all(v in known_scores for v in mixed[u, known:].tolist())  # on the model's own scale
        order = other[u, known:].argsort()
        assert (mixed[u, known:][order].diff() >= 0).all()  # in the other scorer's order
        # a new item lands at the model score of the known item the other scorer ranks just below it
        j = int(other[u, known:].argmax())
        below = other[u, 3:known] < other[u, known + j]
        expected = base[u, 3:known].sort().values[min(int(below.sum()), known - 4)]
        assert float(mixed[u, known + j]) == float(expected)


def test_warm_cost_tradeoff_counts_cold_hits_against_the_known_only_ranking(cold):
    old_table = load_item_table(cold.root / "item_table", cold)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    known = old_table.size(0)
    knn = content_knn_scorer(load_item_table(prepared.root / "item_table", prepared))
    out = warm_cost_tradeoff(prepared, {"knn": knn}, known, offsets=(-100.0, 0.0, 100.0), progress=False)["knn"]
    low, zero, high = out["curve"]
    # (cosines lie in [-1, 1]: an offset of 100 puts the new items below or above every known item)
    # new items pushed out of every top-10: nothing gained, nothing lost
    assert (low["cold_hits@10"], low["warm_cost"]) == (0, 0.0)
    # offset 0 is the scorer as it is: the same numbers as the cold-start evaluation
    plain = evaluate_cold_start(prepared, {"knn": knn}, progress=False, known_items=known)["knn"]
    assert zero["cold_hits@10"] == plain["cold"]["hits@10"]
    assert zero["warm_ndcg@10"] == pytest.approx(plain["warm"]["ndcg@10"], abs=1e-6)
    assert out["warm_ndcg@10_known_items_only"] >= zero["warm_ndcg@10"] - 1e-9  # adding items never lifts warm
    # new items first for everyone: every cold target in the new items' top 10 is a hit, warm users lose
    assert high["cold_hits@10"] >= zero["cold_hits@10"] and high["warm_cost"] >= zero["warm_cost"]
    assert out["cold_users"] == prepared.manifest["cold_start"]["cold_target_users"]
    # with the new items first for everyone, a cold hit is a target in the top 10 of the new items alone
    assert high["cold_recall@10"] == pytest.approx(out["cold_recall@10_among_new_items"])
    assert out["best_within_budget"] == max((c for c in out["curve"] if c["warm_cost"] <= 0.02),
                                            key=lambda c: (c["cold_hits@10"], -c["warm_cost"]))


# --- a saved model after add-items: extend-model, recommend ---------------------------------------------------
def test_extended_saved_model_reloads_scores_new_items_and_recommends_them(cold, tmp_path):
    from merlin_molar.io import read_json
    from merlin_molar.persistence import extend_saved_model, load_model, save_model
    from merlin_molar.pipeline import recommend

    old_table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, old_table)
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20)
    saved = save_model(model, tmp_path / "model", "molar", config, cold.schema, old_table)
    sasrec = sasrec_model(cold.schema, SASRecConfig(d_model=16, n_layers=1, n_heads=1, max_length=20))
    sasrec_dir = save_model(sasrec, tmp_path / "sasrec", "sasrec", SASRecConfig(d_model=16, n_layers=1, n_heads=1,
                                                                                  max_length=20), cold.schema)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    out = extend_saved_model(saved, prepared, tmp_path / "extended")
    reloaded, kind, _, schema = load_model(out)
    assert schema.select_by_name(["item_id-list"]).first.int_domain.max == prepared.item_cardinality - 1
    in_memory = model_for_catalogue(load_model(saved)[0], "molar", prepared)
    histories = torch.zeros(3, 20, dtype=torch.long)
    histories[:, :2] = torch.tensor([[3, 4], [7, 9], [20, 30]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded({"item_id-list": histories}), in_memory({"item_id-list": histories}))
    task = reloaded.heads[0].prediction_task_dict["next-item"]
    assert task.new_item_scoring == "imputed" and task.imputed_id_table.shape == (prepared.item_cardinality, 16)
    # the scoring method is saved with the extension and comes back on load (the CLI offers the same choices)
    from merlin_molar.cli import NEW_ITEM_SCORING_CHOICES
    from merlin_molar.models.task import NEW_ITEM_SCORING

    assert NEW_ITEM_SCORING_CHOICES == NEW_ITEM_SCORING
    quantile = extend_saved_model(saved, prepared, tmp_path / "quantile", new_item_scoring="quantile",
                                  new_item_prior=0.0)
    assert read_json(quantile / "molar_model.json")["catalogue_extension"]["new_item_scoring"] == "quantile"
    task = load_model(quantile)[0].heads[0].prediction_task_dict["next-item"]
    assert task.new_item_scoring == "quantile" and task.imputed_id_table is None
    # an extension saved before the tempering existed is scored as it was then: temperature 1
    from merlin_molar.cli import NEW_ITEM_TEMPERATURE as CLI_TEMPERATURE
    from merlin_molar.io import write_json
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    assert CLI_TEMPERATURE == NEW_ITEM_TEMPERATURE
    assert load_model(out)[0].heads[0].prediction_task_dict["next-item"].new_item_temperature == NEW_ITEM_TEMPERATURE
    meta = read_json(quantile / "molar_model.json")
    del meta["catalogue_extension"]["new_item_temperature"]
    write_json(quantile / "molar_model.json", meta)
    assert load_model(quantile)[0].heads[0].prediction_task_dict["next-item"].new_item_temperature == 1.0

    mapping = vocabulary(prepared)
    new_raw = set(pd.read_csv(cold.root / COLD_ITEMS_FILE)["item_id"])
    old_raw = [r for r in mapping.index if r not in new_raw]
    histories = [old_raw[i : i + 3] for i in range(0, 60, 3)]
    recs = recommend(saved, prepared, histories, top_k=10)  # the original model, extended on the fly
    recs_ext = recommend(out, prepared, histories, top_k=10)
    pd.testing.assert_frame_equal(recs, recs_ext)
    # this random tiny model's validation-chosen prior may keep new items out of these top-10s; a high one must not
    boosted = extend_saved_model(saved, prepared, tmp_path / "boosted", new_item_prior=3.0)
    assert set(recommend(boosted, prepared, histories, top_k=10)["item_id"]) & new_raw
    with pytest.raises(MolarDataError, match="SASRec model has no embedding"):
        recommend(sasrec_dir, prepared, histories[:1])
    with pytest.raises(MolarDataError, match="SASRec model has no embedding"):
        extend_saved_model(sasrec_dir, prepared, tmp_path / "nope")


def test_cold_hold_out_does_not_depend_on_partitioning(cold_base, tiny_dir, tmp_path):
    split = prepare(read_dataset(tiny_dir), tmp_path / "p2", max_length=20, cold_items=0.1, partitions=3)
    assert vocabulary(split).equals(vocabulary(cold_base))
    for name in ("train", "valid", "test"):
        a = split.split_frame(name).sort_values("user_id").reset_index(drop=True)
        b = cold_base.split_frame(name).sort_values("user_id").reset_index(drop=True)
        assert a["user_id"].tolist() == b["user_id"].tolist()
        assert [list(x) for x in a[ITEM_SEQUENCE]] == [list(x) for x in b[ITEM_SEQUENCE]]
    pd.testing.assert_frame_equal(pd.read_parquet(split.root / COLD_TARGETS_FILE),
                                  pd.read_parquet(cold_base.root / COLD_TARGETS_FILE))


# --- the new-item prior ---------------------------------------------------------------------------------------------
def test_item_arrival_order_is_first_training_interaction_of_known_items(cold_base, tiny_dir):
    from merlin_molar.cold_start import item_arrival_order

    order = item_arrival_order(cold_base)
    mapping = vocabulary(cold_base)
    assert sorted(order.tolist()) == sorted(mapping.tolist())  # every known item once, no cold item
    raw = read_dataset(tiny_dir)
    inter = raw.interactions.assign(order=np.arange(len(raw.interactions)))
    inter, _ = hold_out_items(inter, 0.1, "order")  # a cold item stays only as its user's test target
    inter = inter.sort_values(["timestamp", "order"])
    before_test = inter[inter.groupby("user_id").cumcount(ascending=False) >= 1]  # the test targets dropped
    first = before_test.drop_duplicates("item_id")["item_id"].map(mapping).tolist()
    assert order[: len(first)].tolist() == first
    # those are the interactions of the validation split (whose histories this data never truncates)
    valid = cold_base.split_frame("valid")[ITEM_SEQUENCE]
    assert max(len(s) for s in valid) < cold_base.max_length
    assert set(first) == set(np.concatenate([np.asarray(s) for s in valid]).tolist())
    foreign = read_dataset(tiny_dir)
    foreign.interactions = foreign.interactions.iloc[1:]
    with pytest.raises(MolarDataError, match="fingerprint"):
        item_arrival_order(cold_base, foreign)


def test_new_item_prior_is_chosen_on_validation_data_only(cold, monkeypatch):
    from merlin_molar.cold_start import PRIOR_GRID, estimate_new_item_prior
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    first = estimate_new_item_prior(model, cold)
    real_split = type(cold).split_frame

    def no_test(self, split):
        assert split != "test", "the prior must not read the test split"
        return real_split(self, split)

    monkeypatch.setattr(type(cold), "split_frame", no_test)
    again = estimate_new_item_prior(model, cold)
    assert again == first  # deterministic
    assert first["prior"] in PRIOR_GRID and first["rule"] == "both"
    # no items added yet: the default rule is the simulation's budget alone
    assert first["by_rule"]["both"] == first["by_rule"]["budget"] == first["prior"]
    assert first["new_item_temperature"] == NEW_ITEM_TEMPERATURE
    curve = first["curve"]
    assert [c["prior"] for c in curve] == sorted(PRIOR_GRID)
    # budget rule: the largest offset whose warm cost is within 2%; warm NDCG only falls as the offset grows
    warm = [c["warm_ndcg@10"] for c in curve]
    assert all(a >= b - 1e-9 for a, b in zip(warm, warm[1:]))
    within = [c["prior"] for c in curve if c["warm_cost"] <= 0.02 + 1e-12]
    assert first["prior"] == (max(within) if within else min(PRIOR_GRID))
    assert first["at_grid_edge"] == (first["prior"] == max(PRIOR_GRID))
    # a grid whose top is within the budget: the grid set the prior, and the estimate says so
    capped = estimate_new_item_prior(model, cold, grid=(-4.0, -3.95))
    assert capped["prior"] == -3.95 and capped["at_grid_edge"]
    # ndcg rule: the best NDCG@10 over all users, ties to the offset closest to 0
    best = max(c["ndcg@10"] for c in curve)
    by_ndcg = first["by_rule"]["ndcg"]
    assert next(c["ndcg@10"] for c in curve if c["prior"] == by_ndcg) == best
    assert all(abs(c["prior"]) >= abs(by_ndcg) for c in curve if c["ndcg@10"] == best)
    assert estimate_new_item_prior(model, cold, rule="ndcg")["prior"] == by_ndcg
    assert first["validation_users"] == cold.manifest["users"]
    shares = [c["new_item_share@10"] for c in curve]
    assert shares == sorted(shares)  # a larger offset puts more pseudo-new items in the top 10


def test_new_item_prior_follows_how_often_the_pseudo_new_items_are_targets(cold):
    """Pseudo-new items that are never validation targets are pushed down (a negative prior); items that are
    the validation targets get a higher one: the estimate reads the validation targets, nothing else."""
    from merlin_molar.cold_start import estimate_new_item_prior

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    targets = {int(s[-1]) for s in cold.split_frame("valid")[ITEM_SEQUENCE]}
    known = list(range(3, table.size(0)))
    never = [i for i in known if i not in targets]
    assert never and targets
    low = estimate_new_item_prior(model, cold, pseudo_new=never, rule="ndcg")
    high = estimate_new_item_prior(model, cold, pseudo_new=sorted(targets), rule="ndcg")
    assert low["prior"] < 0
    assert high["prior"] > low["prior"]
    assert low["validation_targets_pseudo_new"] == 0
    with pytest.raises(MolarDataError, match="trained item ids"):
        estimate_new_item_prior(model, cold, pseudo_new=[table.size(0)])


def test_actual_budget_rule_reads_the_added_items_own_warm_cost(cold):
    """With the added items in the catalogue, ``rule="actual_budget"`` reads their own warm cost on the
    validation split (all of whose targets are known items), not the pseudo-new simulation's; the model passed
    in is untouched."""
    from merlin_molar.cold_start import PRIOR_GRID, estimate_new_item_prior, model_scorer
    from merlin_molar.evaluation import mask_seen_items, reference_metrics

    table = load_item_table(cold.root / "item_table", cold)
    model = tiny_molar(cold, table)
    before = estimate_new_item_prior(model, cold)
    assert "actual_new_items" not in before and "actual_budget" not in before["by_rule"]
    with pytest.raises(ValueError, match="rule"):
        estimate_new_item_prior(model, cold, rule="actual_budget")
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    estimate = estimate_new_item_prior(model, prepared)
    task = model.heads[0].prediction_task_dict["next-item"]
    assert not hasattr(task, "known_items")  # estimated on a copy
    assert estimate["by_rule"]["budget"] == before["prior"]  # the simulation is unchanged by the added items
    assert estimate["curve"] == before["curve"]
    # the default rule: within the budget on both estimates
    assert estimate["rule"] == "both"
    assert estimate["prior"] == min(estimate["by_rule"]["budget"], estimate["by_rule"]["actual_budget"])
    actual = estimate["actual_new_items"]
    assert actual["new_items"] == prepared.item_cardinality - table.size(0) > 0
    curve = actual["curve"]
    assert [c["prior"] for c in curve] == sorted(PRIOR_GRID)
    within = [c["prior"] for c in curve if c["warm_cost"] <= 0.02 + 1e-12]
    assert estimate["by_rule"]["actual_budget"] == (max(within) if within else min(PRIOR_GRID))
    assert estimate_new_item_prior(model, prepared, rule="actual_budget")["prior"] == estimate["by_rule"][
        "actual_budget"]
    warm = [c["warm_ndcg@10"] for c in curve]
    assert all(a >= b - 1e-9 for a, b in zip(warm, warm[1:]))
    shares = [c["new_item_share@10"] for c in curve]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    # the reference: the untouched model's validation NDCG@10 over the known items
    sequences = [np.asarray(v, dtype=np.int64) for v in prepared.split_frame("valid")[ITEM_SEQUENCE]]
    histories = torch.zeros(len(sequences), prepared.max_length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        histories[i, : len(seq) - 1] = torch.from_numpy(seq[:-1][-prepared.max_length:])
    targets = torch.tensor([int(seq[-1]) for seq in sequences])
    scores = mask_seen_items(model_scorer(model, table.size(0))(histories), histories, targets)
    expected = float(reference_metrics(scores, targets, (10,))["ndcg_at_10"].mean())
    assert actual["validation_ndcg@10_known_items_only"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_prior_is_saved_with_the_extended_model_and_scored_alike_by_task_lean_and_recommend(cold, tmp_path):
    from merlin_molar.cold_start import cold_start_evaluation
    from merlin_molar.io import read_json
    from merlin_molar.models.task import NEW_ITEM_TEMPERATURE
    from merlin_molar.persistence import extend_saved_model, load_model, save_model
    from merlin_molar.serving.lean import LeanModel, export_lean

    old_table = load_item_table(cold.root / "item_table", cold)
    n_old = old_table.size(0)
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(),
                         sasrec=dict(d_model=16, n_layers=1, n_heads=1, dropout=0.0, max_length=20), max_length=20)
    saved = save_model(tiny_molar(cold, old_table), tmp_path / "model", "molar", config, cold.schema, old_table)
    add_items(cold, cold.root / COLD_ITEMS_FILE, progress=False)
    prepared = load_prepared(cold.root)
    auto = extend_saved_model(saved, prepared, tmp_path / "auto")
    extension = read_json(auto / "molar_model.json")["catalogue_extension"]
    assert extension["new_item_prior"] == extension["new_item_prior_estimate"]["prior"]
    assert load_model(auto)[0].heads[0].prediction_task_dict["next-item"].new_item_prior == extension[
        "new_item_prior"]

    assert extension["new_item_temperature"] == NEW_ITEM_TEMPERATURE
    out = extend_saved_model(saved, prepared, tmp_path / "fixed", new_item_prior=-0.75, new_item_temperature=1.5)
    zero = extend_saved_model(saved, prepared, tmp_path / "zero", new_item_prior=0, new_item_temperature=1.5)
    model = load_model(out)[0]
    histories = torch.zeros(4, 20, dtype=torch.long)
    histories[:, :3] = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    histories[3, 3] = n_old + 1  # a new item in the history: read by the content tower
    with torch.no_grad():
        with_prior = model({"item_id-list": histories})
        without = load_model(zero)[0]({"item_id-list": histories})
    finite = torch.isfinite(without)
    torch.testing.assert_close(with_prior[:, :n_old][finite[:, :n_old]], without[:, :n_old][finite[:, :n_old]])
    shift = (with_prior - without)[:, n_old:][finite[:, n_old:]]
    torch.testing.assert_close(shift, torch.full_like(shift, -0.75))

    assert model.heads[0].prediction_task_dict["next-item"].new_item_temperature == 1.5
    lean = LeanModel.load(export_lean(out, tmp_path / "lean"))
    assert lean.meta["new_item_prior"] == -0.75 and lean.meta["known_items"] == n_old
    assert lean.meta["new_item_temperature"] == 1.5
    with torch.no_grad():
        got = lean.scores(histories)
    got[:, :3] = float("-inf")
    got.scatter_(1, histories, float("-inf"))
    assert torch.equal(torch.isfinite(got), torch.isfinite(with_prior))
    finite = torch.isfinite(with_prior)
    torch.testing.assert_close(got[finite], with_prior[finite], rtol=1e-5, atol=1e-5)

    # the evaluation of the saved, extended model uses its saved prior; molar_no_prior is the prior-0 model
    results = cold_start_evaluation(out, prepared, diagnostics=True, progress=False)
    results_zero = cold_start_evaluation(zero, prepared, progress=False)
    assert results["molar_no_prior"] == results_zero["molar"]
    assert results["molar_old_catalogue"]["cold"]["recall@50"] == 0
    assert results["molar_old_catalogue"]["all"]["new_item_share@10"] == 0
    assert results["molar"]["all"]["new_item_share@10"] < results["molar_no_prior"]["all"]["new_item_share@10"]


def test_prior_without_the_raw_data_asks_for_an_explicit_value(cold):
    from merlin_molar.cold_start import item_arrival_order
    from merlin_molar.io import read_json, write_json

    manifest = read_json(cold.root / "molar_manifest.json")
    write_json(cold.root / "molar_manifest.json", {**manifest, "source": str(cold.root / "gone")})
    with pytest.raises(MolarDataError, match="extend-model --new-item-prior NUMBER"):
        item_arrival_order(load_prepared(cold.root))


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
