"""The bfloat16/float16 matrix products of gemm.hpp, through _core.linear (y = x W^T + b).

Inputs are exact bfloat16/float16 values, so a float64 product of the same values is the truth.
Both bfloat16 paths (vdpbf16ps where the build has it, and the float32 fallback) multiply
exactly and sum in float32, so every element is within the float32 accumulation bound
    |y - y64| <= (K + 2) * 2^-24 * (sum_k |x_k w_k| + |b|)
(K + 1 additions, each with relative error at most 2^-24, with slack for the bias). The 16-bit
output is that float32 value rounded once, at the store: the same bits as rounding the
out_float32 result (asserted exactly), so within the bound plus half an output unit,
u |y| with u = 2^-8 (bfloat16) or 2^-11 (float16), and 2^-25 for a float16 subnormal.
Shapes cover both kernels: M = B * L rows below kPackedGemmMinRows (32) take the few-rows
product, from 32 on the packed GEMM; K, N and M odd, K = 1, K across one K block (512).
"""

import numpy as np
import pytest

import attnext
from attnext import _core

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11}
F32_ROUNDOFF = 2.0**-24

# (B, L, K, N): M = B * L rows
SHAPES = [
    (1, 1, 512, 1536),  # one decoding step of a 512-wide layer's fused projection
    (1, 3, 7, 5),
    (2, 9, 33, 65),  # M = 18
    (1, 31, 513, 130),  # the last few-rows M, K past one block of 512
    (1, 32, 1, 64),  # the first packed M, K = 1
    (2, 17, 31, 67),  # M = 34
    (3, 40, 1031, 200),  # three K blocks, odd everything
    (1, 64, 2, 3),
]


def _operands(shape, dtype, seed, layout="C"):
    """x (B, L, 1, K) in the given layout, weight (N, K), bias (N,) float32: exact 16-bit values."""
    b, l, k, n = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, l, 1, k)).astype(dtype)
    if layout == "strided":  # every other row and feature of a larger array
        big = rng.standard_normal((b, 2 * l, 1, 2 * k)).astype(dtype)
        big[:, ::2, :, ::2] = x
        x = big[:, ::2, :, ::2]
    elif layout == "heads":  # (B, L, H, D) read through a transposed (B, H, L, D) array
        heads = 4 if k % 4 == 0 else 1
        x = np.ascontiguousarray(x.reshape(b, l, heads, k // heads).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    weight = rng.standard_normal((n, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, weight, bias


def _reference(x, weight, bias):
    """The float64 product of the exact inputs and the float32-accumulation bound per element."""
    b, l = x.shape[:2]
    x64 = x.astype(np.float64).reshape(b, l, -1)
    w64 = weight.astype(np.float64)
    y = x64 @ w64.T + bias
    magnitude = np.abs(x64) @ np.abs(w64).T + np.abs(bias)
    return y, (x64.shape[-1] + 2) * F32_ROUNDOFF * magnitude


def _check(x, weight, bias, dtype):
    y32 = _core.linear(x, weight, bias, out_float32=True)
    y16 = _core.linear(x, weight, bias)
    assert y32.dtype == np.float32 and y16.dtype == dtype
    ref, bound = _reference(x, weight, bias)
    err32 = np.abs(y32.astype(np.float64) - ref)
    assert np.all(err32 <= bound), f"float32 output: worst error/bound {np.max(err32 / bound):.3g}"
    # one rounding, at the store: the 16-bit output is the float32 result rounded
    np.testing.assert_array_equal(y16.view(np.uint16), y32.astype(dtype).view(np.uint16))
    err16 = np.abs(y16.astype(np.float64) - ref)
    tiny = 2.0**-25 if dtype == F16 else 0.0
    assert np.all(err16 <= bound + UNIT_ROUNDOFF[dtype] * (np.abs(ref) + bound) + tiny)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["C", "strided", "heads"])
def test_bf16_linear_matches_float64(shape, layout, bf16_path):
    _check(*_operands(shape, BF16, seed=sum(shape), layout=layout), BF16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["C", "strided"])
def test_f16_linear_matches_float64(shape, layout):
    _check(*_operands(shape, F16, seed=sum(shape) + 1, layout=layout), F16)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", [(1, 5, 40, 9), (2, 30, 96, 70)])
def test_transposed_weight(shape, dtype, bf16_path):
    """A weight whose features are not unit-stride (W^T stored) takes the general packers."""
    x, weight, bias = _operands(shape, dtype, seed=7)
    weight_t = np.asfortranarray(weight)
    assert weight_t.strides[1] != weight_t.itemsize
    _check(x, weight_t, bias, dtype)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", [(1, 3, 512, 1536), (2, 100, 515, 300)])
def test_same_bits_for_any_thread_count(shape, dtype, bf16_path):
    x, weight, bias = _operands(shape, dtype, seed=3)
    before = attnext.get_num_threads()
    try:
        attnext.set_num_threads(1)
        one = _core.linear(x, weight, bias, out_float32=True)
        attnext.set_num_threads(2)
        two = _core.linear(x, weight, bias, out_float32=True)
    finally:
        attnext.set_num_threads(before)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))


def test_no_bias_and_empty():
    x, weight, _ = _operands((1, 40, 24, 10), BF16, seed=5)
    ref, bound = _reference(x, weight, np.zeros(10))
    y = _core.linear(x, weight, None, out_float32=True)
    assert np.all(np.abs(y - ref) <= bound)
    empty = _core.linear(x[:, :0], weight, None)
    assert empty.shape == (1, 0, 10) and empty.dtype == BF16
