"""gpurnn.testing, the one relative error and tolerance table: its zero handling, NaN, shapes,
and the spellings of a dtype the tables take."""
import numpy as np
import pytest

from gpurnn.testing import FD_TOL, GRAD_TOL, TOL, UNIT_ROUNDOFF, assert_close, rel_err


def test_norm_relative_in_float64():
    b = np.array([3.0, 4.0], np.float32)
    assert rel_err(b + np.float32([0, 1e-3]), b) == pytest.approx(1e-3 / 5, rel=1e-3)
    assert rel_err(b, b) == 0.0
    assert isinstance(rel_err(b, b), float)


def test_zero_reference_is_measured_absolutely():
    assert rel_err(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_err([3e-6, 4e-6], [0.0, 0.0]) == pytest.approx(5e-6)
    assert rel_err(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0       # empty: nothing differs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_never_passes(bad):
    assert rel_err([1.0, bad], [1.0, 2.0]) == np.inf
    assert rel_err([1.0, 2.0], [1.0, bad]) == np.inf
    assert rel_err([np.nan], [np.nan]) == np.inf            # not even NaN against NaN
    with pytest.raises(AssertionError, match="relative error inf"):
        assert_close([bad], [1.0], 1e300, "y")


def test_shapes_must_match():
    with pytest.raises(AssertionError, match=r"shape mismatch: \(2,\) vs \(1, 2\)"):
        rel_err(np.ones(2), np.ones((1, 2)))


def test_assert_close_names_what_and_the_numbers():
    assert_close([1.0, 2.0], [1.0, 2.0], 0.0, "y")
    with pytest.raises(AssertionError, match=r"dw_hh: relative error 1.000e\+00 > 1.0e-05"):
        assert_close([0.0], [1.0], TOL["float32"], "dw_hh")


def test_tables_take_every_spelling_of_a_dtype():
    assert TOL["float32"] == TOL[np.float32] == TOL[np.dtype(np.float32)] == 1e-5
    assert TOL[np.float64] == GRAD_TOL["float64"] == 1e-10
    assert TOL["float16"] == 8 * UNIT_ROUNDOFF["float16"] and GRAD_TOL[np.float16] == 16 * 2.0 ** -11
    assert GRAD_TOL["bfloat16"] == 16 * 2.0 ** -8
    with pytest.raises(KeyError, match="int8"):
        TOL[np.int8]
    assert set(TOL) == set(GRAD_TOL) == {"float64", "float32", "float16", "bfloat16"}
    assert FD_TOL > TOL["float64"]


def test_bfloat16_and_torch_tensors():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert TOL[ml_dtypes.bfloat16] == TOL["bfloat16"]
    assert rel_err(np.ones(3, ml_dtypes.bfloat16), np.ones(3)) == 0.0
    torch = pytest.importorskip("torch")
    assert TOL[torch.bfloat16] == TOL["bfloat16"] and TOL[torch.float32] == TOL["float32"]
    t = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    assert rel_err(t * 2, torch.full((3,), 2.0)) == 0.0
