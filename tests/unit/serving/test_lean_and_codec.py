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
from merlin_molar.serving.ops import ItemCodec, MolarRequestError, check_histories

SASREC = dict(d_model=16, n_layers=1, n_heads=1, dropout=0.1, max_length=20)
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
    for offsets, n, message in [([0, 2, 2], 2, "empty history"), ([0, 3, 1], 3, "increasing"),
                                ([0, 1, 2], 3, "must match"), ([0] + [1] * 5, 1, "exceeds"), ([0], 0, "no history")]:
        with pytest.raises(MolarRequestError, match=message):
            check_histories(np.array(offsets), n, 4)


def test_length_buckets():
    assert length_buckets(200) == [8, 16, 32, 64, 128, 200] and length_buckets(16) == [8, 16]


def _molar(prepared, **overrides):
    torch.manual_seed(0)
    config = MolarConfig(llm=small_decoder_config("qwen2", hidden_size=16, num_layers=1).to_dict(), sasrec=SASREC,
                         max_length=20, **overrides)
    table = torch.randn(prepared.item_cardinality, 24)
    return molar_model(prepared.schema, table, config).eval(), config, table


@pytest.mark.parametrize("variant, mode", [
    ("fused", "fused"),
    ("infonce", "fused"),
    ("content only", "content"),
    ("id only", "id"),
    ("user token", "fused"),
    ("moe adaptor", "fused"),
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
                     "moe adaptor": {"content_adaptor": "moe"},
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
    generator = torch.Generator().manual_seed(1)
    for lengths in ([1], [3, 8], [9, 20, 2], [16]):
        window = torch.zeros(len(lengths), 20, dtype=torch.long)
        for row, n in enumerate(lengths):
            window[row, :n] = torch.randint(3, lean.n_items, (n,), generator=generator)
        with torch.no_grad():
            want = model({"item_id-list": window})
            got = lean.scores(window)
        got[:, :3] = float("-inf")
        got.scatter_(1, window, float("-inf"))
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
