"""The serving step's parts on the synthetic catalogue (no server): the raw <-> encoded id codec for integer
and string ids, request checks, and the lean model against the saved model's own forward in every scoring
mode (fused, content only, ID only, infonce scoring, SASRec, GRU4Rec, Molar with a GRU4Rec branch)."""
import numpy as np
import pytest
import torch

from merlin_molar.data.synthetic import product_code, synthetic_frames
from merlin_molar.models.dueg import small_decoder_config
from merlin_molar.models.gru4rec import GRU4RecConfig, gru4rec_model
from merlin_molar.models.molar import MolarConfig, molar_model
from merlin_molar.models.sasrec import SASRecConfig, sasrec_model
from merlin_molar.persistence import save_model
from merlin_molar.serving.lean import LeanModel, export_lean, length_buckets
from merlin_molar.serving.ops import ItemCodec, MolarRequestError, as_bytes, check_histories

SASREC = dict(d_model=16, n_layers=2, n_heads=1, dropout=0.1, max_length=20, block="gpt2")
GRU4REC = dict(d_model=12, n_layers=2, dropout=0.1, max_length=20)  # narrower than the DUEG (16)


def test_product_codes_are_unique_asin_like_strings():
    codes = [product_code(i) for i in range(1, 5001)]
    assert len(set(codes)) == len(codes)
    assert all(len(c) == 10 and c.startswith("B") and c.isalnum() and c.upper() == c for c in codes)
    interactions, items = synthetic_frames(n_users=20, n_items=30, string_ids=True)
    assert set(interactions["item_id"]) <= set(items["item_id"]) and items["item_id"].map(len).eq(10).all()


def test_codec_for_string_ids():
    codec = ItemCodec(np.array(["B00004Z5M1", "B000001SOV", "A"], dtype=object), np.array([4, 3, 5]))
    assert codec.strings and codec.raw_dtype == np.dtype(object)
    values = np.array([b"B000001SOV", "A", b"B00004Z5M1"], dtype=object)  # bytes (Triton) or str (in-process)
    np.testing.assert_array_equal(codec.encode(values, np.array([0, 1, 3])), [3, 5, 4])
    assert codec.decode(np.array([[4, 5]])).tolist() == [[b"B00004Z5M1", b"A"]]
    with pytest.raises(MolarRequestError, match=r"2 unknown item id\(s\) \['nope', 'x'\] in row\(s\) \[0, 1\]"):
        codec.encode(np.array([b"nope", b"A", b"x"], dtype=object), np.array([0, 1, 3]))
    with pytest.raises(MolarRequestError, match="strings, got int64"):
        codec.encode(np.array([1, 2]), np.array([0, 2]))


def test_codec_for_integer_ids():
    codec = ItemCodec(np.array([50, 7, 1000]), np.array([3, 4, 5]))
    np.testing.assert_array_equal(codec.encode(np.array([1000, 50]), np.array([0, 2])), [5, 3])
    assert codec.decode(np.array([4, 3])).tolist() == [7, 50] and codec.raw.dtype == np.int64
    with pytest.raises(MolarRequestError, match=r"1 unknown item id\(s\) \[8\] in row\(s\) \[1\]"):
        codec.encode(np.array([50, 8]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="duplicate"):
        ItemCodec(np.array([50, 50]), np.array([3, 4]))


def test_check_histories():
    check_histories(np.array([0, 2, 3]), 3, 4)
    check_histories(np.array([0, 3], dtype=np.int32), 3, 1)
    for offsets, n, message in [([0, 2, 2], 2, "empty history"), ([0, 3, 1], 3, "increasing"),
                                ([0, 1, 2], 3, "must match"), ([0] + [1] * 5, 1, "exceeds"), ([0], 0, "no history"),
                                ([0, 0], 0, r"empty history in row\(s\) \[0\]"), ([0, -1], 0, "increasing"),
                                ([1, 2], 2, "must start at 0"), ([0, 2], 3, r"last offset \(2\) must match")]:
        with pytest.raises(MolarRequestError, match=message):
            check_histories(np.array(offsets), n, 4)


def test_length_buckets():
    assert length_buckets(200) == [8, 16, 32, 64, 128, 200] and length_buckets(16) == [8, 16]


def _molar(prepared, **overrides):
    torch.manual_seed(0)
    config = MolarConfig(**{"llm": small_decoder_config("qwen2", hidden_size=16, num_layers=2).to_dict(),
                            "sasrec": SASREC, "max_length": 20, **overrides})
    table = torch.randn(prepared.item_cardinality, 24)
    return molar_model(prepared.schema, table, config).eval(), config, table


@pytest.mark.parametrize("variant, mode", [
    ("fused", "fused"),
    ("infonce", "fused"),
    ("content only", "content"),
    ("id only", "id"),
    ("user token", "fused"),
    ("linear adaptor", "fused"),
    ("sasrec", "id"),
    ("gru4rec", "id"),
    ("molar gru4rec", "fused"),
])
def test_lean_scores_equal_the_model(tiny_prepared, tmp_path, variant, mode):
    if variant == "sasrec":
        torch.manual_seed(0)
        config = SASRecConfig(**SASREC)
        model, kind, table = sasrec_model(tiny_prepared.schema, config).eval(), "sasrec", None
    elif variant == "gru4rec":
        torch.manual_seed(0)
        config = GRU4RecConfig(**GRU4REC)
        model, kind, table = gru4rec_model(tiny_prepared.schema, config).eval(), "gru4rec", None
    else:
        overrides = {"fused": {}, "infonce": {"rec_loss": "infonce"}, "content only": {"id_branch": "none"},
                     "id only": {"id_weight": 1.0}, "user token": {"user_token": True},
                     "linear adaptor": {"content_adaptor": "linear"},
                     "molar gru4rec": {"id_model": "gru4rec", "gru4rec": GRU4REC}}[variant]
        (model, config, table), kind = _molar(tiny_prepared, **overrides), "molar"
    if variant == "infonce":  # a scale away from its initial value, so that it must be carried over
        task = model.heads[0].prediction_task_dict["next-item"]
        with torch.no_grad():
            task.content_loss.scale.log_scale.fill_(1.7)
            task.id_loss.scale.log_scale.fill_(2.3)
    saved = save_model(model, tmp_path / "model", kind, config, tiny_prepared.schema, table)
    lean = LeanModel.load(export_lean(saved, tmp_path / "lean"))
    assert lean.mode == mode
    # the slim forwards cover the default towers; GRU4Rec's GRU is traced
    assert lean.kinds == {n: "traced" if n == "id" and "gru4rec" in variant else "slim" for n in lean.kinds}
    _assert_lean_equals_the_model(lean, model)


def _windows(n_items, generator):
    for lengths in ([1], [3, 8], [9, 20, 2], [16], [20], [5, 5]):
        window = torch.zeros(len(lengths), 20, dtype=torch.long)
        for row, n in enumerate(lengths):
            window[row, :n] = torch.randperm(n_items - 3, generator=generator)[:n] + 3
        yield window, torch.tensor(lengths)


def _assert_lean_equals_the_model(lean, model, k=10):
    """Scores and the served top-k (``LeanModel.top_k`` on ragged histories, batch 1 and larger) equal the
    saved model's own forward."""
    generator = torch.Generator().manual_seed(1)
    for window, lengths in _windows(lean.n_items, generator):
        with torch.no_grad():
            want = model({"item_id-list": window})
            got = lean.scores(window)
        got[:, :3] = float("-inf")
        got.scatter_(1, window, float("-inf"))
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
        want[:, :3] = float("-inf")
        want.scatter_(1, window, float("-inf"))
        want_scores, want_ids = torch.topk(want, k, dim=-1)
        values = torch.cat([row[:n] for row, n in zip(window, lengths)]).numpy()
        offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
        top_scores, top_ids = lean.top_k(values, offsets, k)
        np.testing.assert_array_equal(top_ids, want_ids.numpy())
        np.testing.assert_allclose(top_scores, want_scores.numpy(), rtol=1e-5, atol=1e-5)


SASREC_OPTIONS = [{"positions": "last"}, {"scale_embeddings": True}, {"positions": "last", "scale_embeddings": True},
                  {"block": "encoder"}]


def _sasrec_with(prepared, kind, option):
    if kind == "sasrec":
        torch.manual_seed(0)
        config = SASRecConfig(**{**SASREC, **option})
        return sasrec_model(prepared.schema, config).eval(), config, None
    return _molar(prepared, sasrec={**SASREC, **option})


@pytest.mark.parametrize("option", SASREC_OPTIONS)
@pytest.mark.parametrize("kind", ["sasrec", "molar"])
def test_lean_serves_a_sasrec_with_scaled_inputs_or_positions_from_the_last_item(tiny_prepared, tmp_path, option,
                                                                                  kind):
    """The slim GPT-2 tower prepares its inputs as SASRecPrepare does: ragged histories get the positions the
    model's own forward gives them."""
    model, config, table = _sasrec_with(tiny_prepared, kind, option)
    saved = save_model(model, tmp_path / "model", kind, config, tiny_prepared.schema, table)
    lean = LeanModel.load(export_lean(saved, tmp_path / "lean"))
    assert lean.kinds["id"] == "slim"
    _assert_lean_equals_the_model(lean, model)


@pytest.mark.parametrize("option", [{"positions": "last"}, {"block": "encoder"}])
@pytest.mark.parametrize("kind", ["sasrec", "molar"])
def test_lean_refuses_positions_from_the_last_item_without_the_slim_tower(tiny_prepared, tmp_path, kind, option,
                                                                          monkeypatch):
    """A traced bucket does not see each row's length, so it cannot count positions from the last item: with no
    slim tower, the export refuses such a SASRec instead of serving it silently wrong."""
    import merlin_molar.serving.lean as lean_module
    from merlin_molar.errors import MolarDataError

    monkeypatch.setattr(lean_module, "slim_tower", lambda *args, **kwargs: None)
    model, config, table = _sasrec_with(tiny_prepared, kind, option)
    saved = save_model(model, tmp_path / "model", kind, config, tiny_prepared.schema, table)
    with pytest.raises(MolarDataError, match="only the slim tower implements") as error:
        export_lean(saved, tmp_path / "lean")
    assert error.value.source == str(saved)


def test_lean_falls_back_to_traced_towers(tiny_prepared, tmp_path, monkeypatch):
    """An architecture the slim forwards do not cover is traced as it is, with the same scores."""
    import merlin_molar.serving.lean as lean_module

    monkeypatch.setattr(lean_module, "slim_tower", lambda *args, **kwargs: None)
    model, config, table = _molar(tiny_prepared, sasrec={**SASREC, "scale_embeddings": True})
    saved = save_model(model, tmp_path / "model", "molar", config, tiny_prepared.schema, table)
    lean = LeanModel.load(export_lean(saved, tmp_path / "lean"))
    assert lean.kinds == {"content": "traced", "id": "traced"}
    _assert_lean_equals_the_model(lean, model)


@pytest.mark.parametrize("scoring", ["imputed", "quantile", "content"])
def test_lean_scores_new_items_as_the_extended_model(tiny_prepared, tmp_path, scoring):
    """Items added after training (extend-model): the lean path scores them as MolarTask does."""
    from merlin_molar.persistence import load_model, with_item_cardinality

    model, config, table = _molar(tiny_prepared)
    trained, new = table.size(0), 7
    extended = torch.cat([table, torch.randn(new, table.size(1), generator=torch.Generator().manual_seed(3))])
    schema = with_item_cardinality(tiny_prepared.schema, trained + new)
    extension = {"trained_items": trained, "items": trained + new, "new_item_scoring": scoring}
    saved = save_model(model, tmp_path / "model", "molar", config, schema, extended,
                       extra={"catalogue_extension": extension})
    model, *_ = load_model(saved)
    lean = LeanModel.load(export_lean(saved, tmp_path / "lean"))
    assert lean.n_items == trained + new and lean.meta["known_items"] == trained
    _assert_lean_equals_the_model(lean, model.eval())


@pytest.mark.parametrize("strings", [False, True])
def test_codec_equals_the_pandas_lookup(strings):
    """The vectorised / dict lookups against pandas' ``Index.get_indexer`` on the same vocabulary, for every
    form the ids arrive in (int32 or int64; bytes from Triton, str or numpy str in-process)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    raw = rng.choice(10**6, size=500, replace=False)
    if strings:
        raw = np.array([product_code(int(i)) for i in raw], dtype=object)
    encoded = rng.permutation(500) + 3
    codec = ItemCodec(raw, encoded)
    reference = pd.Index(as_bytes(raw) if strings else raw)
    picks = rng.integers(500, size=200)
    forms = ([as_bytes(raw[picks]), raw[picks], raw[picks].astype(str), as_bytes(raw[picks]).astype("S")]
             if strings else [raw[picks], raw[picks].astype(np.int32)])
    for values in forms:
        keys = as_bytes(values) if strings else values.astype(np.int64)
        want = encoded[reference.get_indexer(keys)]
        np.testing.assert_array_equal(codec.encode(values, np.array([0, 150, 200])), want)
        np.testing.assert_array_equal(codec.decode(want), as_bytes(raw[picks]) if strings else raw[picks])
    unknown = np.concatenate([raw[picks[:3]], [b"NOPE" if strings else 10**7]])
    with pytest.raises(MolarRequestError, match=r"1 unknown item id\(s\).* in row\(s\) \[1\]"):
        codec.encode(unknown, np.array([0, 3, 4]))
    if strings:  # ids that are neither bytes nor str are compared as their UTF-8 text
        numeric = ItemCodec(np.array(["12", "7"], dtype=object), np.array([3, 4]))
        np.testing.assert_array_equal(numeric.encode(np.array([7, "12"], dtype=object), np.array([0, 2])), [4, 3])


def test_pinned_core_maps_instances_onto_the_allowed_cores():
    from merlin_molar.serving.ops import pinned_core

    assert [pinned_core(f"molar_0_{i}", {4, 2}) for i in range(3)] == [2, 4, 2]
    assert pinned_core("my_model_1_0", [7]) == 7
    with pytest.raises(ValueError, match="cannot pin"):
        pinned_core("molar", {0, 1})
    with pytest.raises(ValueError, match="cannot pin"):
        pinned_core("molar_0_0", set())
