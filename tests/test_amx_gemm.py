"""The AMX-BF16 path of packed_gemm (gemm.hpp's AmxLayout), through _core.linear, score_product
and weighted_sum with bfloat16 inputs, on the shapes where its tiles are partial.

The tiles are 16 rows x 32 k (x), 16 pair rows x 16 columns (W), 32 x 32 blocks of y, 64 rows
per task, K blocks of 512: rows, columns and k are chosen around those edges. Inputs are
exact bfloat16 values, products are exact in float32 and sums float32, so the float64 product
is the truth within the float32 accumulation bound (test_l3_gemm_lowp's rule)
    |y - y64| <= (K + 2) * 2^-24 * (sum_k |x_k w_k| + |b|).
Determinism: an element's value may depend on K only, not on the thread count nor on where its
row and column fall in the tiles and tasks. Zero padding must never meet an Inf or NaN.
Every test runs on the AMX path; they are skipped where the build or CPU has none.
"""

import numpy as np
import pytest

import attnext
from attnext import _core
from conftest import BF16_CAPS, bf16_cap

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32_ROUNDOFF = 2.0**-24


def _amx_available():
    with bf16_cap("auto"):
        return _core.get_bf16_path() == "amx_bf16"


pytestmark = pytest.mark.skipif("auto" not in BF16_CAPS or not _amx_available(),
                                reason="no AMX-BF16 tiles in this build or CPU")


@pytest.fixture(autouse=True)
def amx():
    with bf16_cap("auto"):
        yield


def _bf16(rng, *shape):
    return rng.standard_normal(shape).astype(BF16)


def _x_layout(x, layout, rng):
    """x (B, L, 1, K) as given ("C"), as every other row and feature of a larger array
    ("strided"), or with its features read through a transposed array ("transposed")."""
    if layout == "strided":
        b, l, _, k = x.shape
        big = _bf16(rng, b, 2 * l, 1, 2 * k)
        big[:, ::2, :, ::2] = x
        return big[:, ::2, :, ::2]
    if layout == "transposed":  # features L apart
        return np.ascontiguousarray(x[:, :, 0, :].transpose(0, 2, 1)).transpose(0, 2, 1)[:, :, None, :]
    return x


def _reference(x, weight, bias):
    """The float64 product of the exact inputs and the float32-accumulation bound per element."""
    b, l = x.shape[:2]
    x64 = x.astype(np.float64).reshape(b * l, -1)
    w64 = weight.astype(np.float64)
    b64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    y = x64 @ w64.T + b64
    magnitude = np.abs(x64) @ np.abs(w64).T + np.abs(b64)
    return y, (x64.shape[-1] + 2) * F32_ROUNDOFF * magnitude


# (B, L, K, N): M = B * L from the first packed row count (32) past one task (64) and a block
# of 32; K odd, below and across one tile (32) and one K block (512); N around 16, 32, 64, 256.
SHAPES = [
    (1, 32, 1, 1),
    (1, 33, 31, 17),
    (2, 20, 33, 15),  # M = 40
    (1, 47, 64, 31),
    (1, 64, 63, 33),
    (3, 22, 97, 65),  # M = 66: a second task of 2 rows
    (1, 100, 513, 100),  # K past one K block by one
    (2, 65, 1031, 257),  # three K blocks, N past kNc
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["C", "strided", "transposed"])
@pytest.mark.parametrize("bias_dtype", [None, np.float32, BF16])
def test_linear_matches_float64(shape, layout, bias_dtype):
    b, l, k, n = shape
    rng = np.random.default_rng([b, l, k, n])
    x = _x_layout(_bf16(rng, b, l, 1, k), layout, rng)
    weight = _bf16(rng, n, k)
    if layout == "transposed":
        weight = np.asfortranarray(weight)
    bias = None if bias_dtype is None else _bf16(rng, n).astype(bias_dtype)
    y32 = _core.linear(x, weight, bias, out_float32=True)
    y16 = _core.linear(x, weight, bias)
    assert y32.dtype == np.float32 and y16.dtype == BF16
    ref, bound = _reference(x, weight, bias)
    err = np.abs(y32.reshape(b * l, n).astype(np.float64) - ref)
    assert np.all(err <= bound), f"worst error/bound {np.max(err / bound):.3g}"
    # the bfloat16 output is the float32 result rounded once, at the store
    np.testing.assert_array_equal(y16.view(np.uint16), y32.astype(BF16).view(np.uint16))
    if bias_dtype is BF16:  # a bfloat16 bias is its float32 value, exactly
        same = _core.linear(x, weight, bias.astype(np.float32), out_float32=True)
        np.testing.assert_array_equal(same.view(np.uint32), y32.view(np.uint32))


@pytest.mark.parametrize("lq", [1, 2, 15, 16, 17, 31, 32, 33, 40])
def test_scores_few_rows_match_float64(lq):
    """score_product and weighted_sum reach the AMX path with any row count: rows 1 to 40."""
    rng = np.random.default_rng(lq)
    q, k = _bf16(rng, 2, lq, 37), _bf16(rng, 2, 19, 37)
    scores = _core.score_product(q, k, None, 1.0, out_float32=True)
    for bq, bk, s in zip(q, k, scores):
        ref, bound = _reference(bq[None, :, None, :], bk, None)
        assert np.all(np.abs(s - ref) <= bound)
    w, v = _bf16(rng, 2, lq, 45), _bf16(rng, 2, 45, 18)
    out = _core.weighted_sum(w, v, out_float32=True)
    for bw, bv, o in zip(w, v, out):
        ref, bound = _reference(bw[None, :, None, :], bv.T, None)
        assert np.all(np.abs(o - ref) <= bound)


def _linear_bits(x, weight, bias):
    return _core.linear(x, weight, bias, out_float32=True).view(np.uint32)


@pytest.mark.parametrize("shape", [(1, 200, 1100, 600), (1, 1000, 96, 70)])
def test_same_bits_for_any_thread_count(shape):
    """200 rows split columns across tasks, 1000 rows take 16 row tasks; 1100 k = 3 K blocks."""
    b, l, k, n = shape
    rng = np.random.default_rng(k)
    x, weight, bias = _bf16(rng, b, l, 1, k), _bf16(rng, n, k), _bf16(rng, n).astype(np.float32)
    before = attnext.get_num_threads()
    try:
        attnext.set_num_threads(1)
        one = _linear_bits(x, weight, bias)
        attnext.set_num_threads(2)
        two = _linear_bits(x, weight, bias)
    finally:
        attnext.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_same_bits_wherever_a_row_or_column_falls_in_the_tiles():
    """Rows and columns shifted against the 16/32/64-row and 16/32/64-column edges (and the
    column split of a call with few rows) keep their bits: an element depends on K only."""
    rng = np.random.default_rng(11)
    x, weight, bias = _bf16(rng, 1, 150, 1, 545), _bf16(rng, 300, 545), _bf16(rng, 300).astype(np.float32)
    full = _linear_bits(x, weight, bias)[0]
    for r0, c0 in [(5, 0), (0, 7), (17, 33), (40, 1), (118, 250)]:
        part = _linear_bits(x[:, r0:], weight[c0:], bias[c0:])[0]
        np.testing.assert_array_equal(part, full[r0:, c0:], err_msg=f"rows from {r0}, columns from {c0}")


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_stays_in_its_row_and_column(value):
    """An Inf or NaN in x's last row and last k (both in partial tiles, next to zero padding)
    and in W's last column reaches only its own row and column of y; every other element
    keeps its bits."""
    rng = np.random.default_rng(5)
    m, k, n = 45, 33, 37
    x, weight = _bf16(rng, 1, m, 1, k), _bf16(rng, n, k)
    bias = _bf16(rng, n).astype(np.float32)
    clean = _linear_bits(x, weight, bias)[0]
    x_bad, w_bad = x.copy(), weight.copy()
    x_bad[0, m - 1, 0, k - 1] = value
    w_bad[n - 1, k - 1] = value
    y = _core.linear(x_bad, w_bad, bias, out_float32=True)[0]
    assert not np.isfinite(y[m - 1]).any() and not np.isfinite(y[:, n - 1]).any()
    np.testing.assert_array_equal(y[:m - 1, :n - 1].view(np.uint32), clean[:m - 1, :n - 1])


def test_every_path_within_float32_summation():
    """The cap switches paths in one process ("auto" is AMX, the others are not); every path is
    within the bound of the float64 truth (they may differ from each other in the last bits)."""
    rng = np.random.default_rng(2)
    x, weight = _bf16(rng, 1, 64, 1, 512), _bf16(rng, 96, 512)
    ref, bound = _reference(x, weight, None)
    for cap in BF16_CAPS:
        with bf16_cap(cap):
            assert (_core.get_bf16_path() == "amx_bf16") == (cap == "auto")
            y = _core.linear(x, weight, None, out_float32=True)
        assert np.all(np.abs(y[0].astype(np.float64) - ref) <= bound), cap
