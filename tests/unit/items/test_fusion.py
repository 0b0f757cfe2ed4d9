"""The text+image join: whitening fitted on the catalogue, its saved statistics, and the l2 join."""
import numpy as np
import pytest

from merlin_molar.errors import MolarDataError
from merlin_molar.items.fusion import JoinStatistics, fit_join, fit_whitening, join_parts


def correlated(rng, n, dim, offset=0.0):
    """Rows with correlated, unequal-variance coordinates around a common ``offset`` (a narrow cone when large)."""
    mixing = rng.normal(size=(dim, dim)) * np.linspace(0.1, 3.0, dim)[:, None]
    return rng.normal(size=(n, dim)) @ mixing + offset


def test_whitening_makes_the_catalogue_covariance_the_identity():
    rows = correlated(np.random.default_rng(0), 500, 6, offset=5.0)
    white = fit_whitening(rows)(rows)
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(6), atol=1e-4)


def test_directions_the_catalogue_does_not_span_are_dropped_not_amplified():
    rng = np.random.default_rng(1)
    rows = np.zeros((20, 8))
    rows[:, :3] = rng.normal(size=(20, 3))  # the catalogue spans 3 of 8 directions
    whitening = fit_whitening(rows)
    unseen = np.zeros((1, 8))
    unseen[0, 5] = 1.0  # a new item varying only where no catalogue item does
    np.testing.assert_allclose(whitening(unseen), whitening(np.zeros((1, 8))), atol=1e-6)
    assert np.linalg.matrix_rank(whitening.transform) == 3


def test_a_part_fitted_on_fewer_than_two_rows_joins_as_zeros():
    whitening = fit_whitening(np.ones((1, 4)))
    assert not whitening(np.random.default_rng(2).normal(size=(3, 4))).any()


def test_the_whitened_join_keeps_both_parts_where_raw_scales_let_one_drown_the_other():
    """Text vectors in a narrow cone (as SmolLM2's hidden states): raw cosines are all near 1, so after the
    l2 join every item looks alike in its text part; whitened, the parts' differences come through."""
    rng = np.random.default_rng(3)
    text = correlated(rng, 300, 12, offset=50.0)
    image = correlated(rng, 300, 5)
    used = np.ones(300, bool)
    used[::10] = False  # every tenth item has no image
    image[~used] = 0.0
    raw = np.concatenate([text, image], axis=1)
    l2 = join_parts(raw, used, 12)
    whitened = join_parts(raw, used, 12, fit_join(raw, used, 12))

    def mean_text_cosine(rows):
        part = rows[:, :12] / np.linalg.norm(rows[:, :12], axis=1, keepdims=True)
        cosines = part @ part.T
        return cosines[~np.eye(len(part), dtype=bool)].mean()

    assert mean_text_cosine(l2) > 0.95 and abs(mean_text_cosine(whitened)) < 0.05
    for rows in (l2, whitened):
        assert not rows[~used, 12:].any()  # no image: zeros in the image part
        np.testing.assert_allclose(np.linalg.norm(rows[used], axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(rows[~used], axis=1), np.sqrt(0.5), atol=1e-5)


def test_join_statistics_round_trip_and_refuse_a_changed_or_missing_file(tmp_path):
    rng = np.random.default_rng(4)
    raw = np.concatenate([correlated(rng, 50, 4), correlated(rng, 50, 3)], axis=1)
    used = np.ones(50, bool)
    statistics = fit_join(raw, used, 4)
    path = tmp_path / "join.npz"
    sha = statistics.save(path)
    loaded = JoinStatistics.load(path, sha)
    np.testing.assert_array_equal(join_parts(raw, used, 4, loaded), join_parts(raw, used, 4, statistics))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MolarDataError, match="does not match the checksum"):
        JoinStatistics.load(path, sha)
    with pytest.raises(MolarDataError, match="file not found"):
        JoinStatistics.load(tmp_path / "gone.npz", sha)
    with pytest.raises(ValueError, match="statistics for parts of 4 \\+ 3 dims"):
        join_parts(raw[:, :6], used, 4, statistics)
