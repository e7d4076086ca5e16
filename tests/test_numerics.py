"""deqref.numerics: the overflow-safe scaling every module uses.

Oracles: NumPy's own norm on ordinary values (the scaling by a power of two must change no bit),
and math.hypot, which is computed without overflow by the C library, on huge and tiny values.
"""
import math

import numpy as np
import pytest

from deqref.numerics import norm_no_overflow, pow2_exponent, pow2_scale, scaled_to_unit


def test_ordinary_values_give_numpys_bits():
    v = np.random.default_rng(0).standard_normal((5, 7))
    assert norm_no_overflow(v) == np.linalg.norm(v)
    assert np.array_equal(norm_no_overflow(v, axis=1), np.linalg.norm(v, axis=1))


@pytest.mark.parametrize("size", [1e300, 1e-310, 1e200, 1e-170])
def test_huge_and_tiny_values_stay_finite_and_right(size):
    v = np.array([3.0, -4.0, 12.0]) * size
    want = math.hypot(*v)                          # 13 · size, without overflow or underflow
    with np.errstate(all="ignore"):
        naive = float(np.sqrt(v @ v))
    got = float(norm_no_overflow(v))
    # subnormal inputs (1e-310) carry only ~14 significant bits: a relative error of 2^-40 is
    # their own rounding; normal ones agree to a few ulps
    assert abs(got - want) <= (2.0 ** -40 if size < 1e-300 else 4 * np.finfo(float).eps) * want
    assert naive != want        # each size is one that the plain √(v·v) gets wrong (inf or 0)


def test_pow2_exponent_and_scale():
    m = np.array([0.0, np.inf, np.nan, 0.75, 3.0, 1e300])
    e = pow2_exponent(m)
    assert e.tolist() == [0, 0, 0, 0, 2, math.frexp(1e300)[1]]
    s = pow2_scale(m, "float64")
    assert np.all((m[3:] / s[3:] >= 0.5) & (m[3:] / s[3:] < 1)) and s[:3].tolist() == [1, 1, 1]


def test_scaled_to_unit_is_exact_and_keeps_the_cosine():
    a = np.random.default_rng(1).standard_normal(9) * 1e250
    b = np.random.default_rng(2).standard_normal(9) * 1e-250
    sa, sb = scaled_to_unit(a), scaled_to_unit(b)
    assert 0.5 <= np.max(np.abs(sa)) < 1 and 0.5 <= np.max(np.abs(sb)) < 1
    ratio = a / sa                                  # one power of two for every entry
    assert np.all(ratio == ratio[0]) and math.frexp(ratio[0])[0] == 0.5
    assert np.array_equal(scaled_to_unit(np.zeros(3)), np.zeros(3))
