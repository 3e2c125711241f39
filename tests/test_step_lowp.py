"""The decoding path: MultiHeadAttention.step with float32 and bfloat16 weights and caches, and the
few-rows linear kernels under it (M = 1..8 rows, odd sizes, both bfloat16 product paths).

step() runs its projections, cache append and attention without the public functions' checks
(on arrays it made itself), so these tests hold it to the full causal forward pass, which goes
through the checked public path, and the few-rows kernels to a float64 computation on the same
(already rounded) inputs.

linear bounds: float32 arithmetic, each output one dot product of n terms summed in float32,
is within n 2^-24 sum|terms| of the exact value (the classic bound for any summation order);
a 16-bit output adds one rounding at the store, u |ref| (u = 2^-8 bfloat16, 2^-11 float16).
"""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext.functional import _attention_of_checked
from hardening.harness import TOLERANCE, absolute_error, low_precision_tolerance, relative_error

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11, F32: 0.0}
LINEAR_DTYPES = [F32, BF16, F16]
ids = lambda dt: dt.name  # noqa: E731


@pytest.fixture
def threads():
    """Sets attnext's thread count inside a test; the count before is restored after."""
    before = attnext.get_num_threads()
    yield attnext.set_num_threads
    attnext.set_num_threads(before)


def f64(a):
    return np.asarray(a).astype(np.float64)


def linear64(x, w, b):
    """(exact float64 result, sum of |terms| per output) of x (B, L, C, D) w^T + b."""
    rows = f64(x).reshape(x.shape[0], x.shape[1], -1)
    ref = rows @ f64(w).T + (0.0 if b is None else f64(b))
    mag = np.abs(rows) @ np.abs(f64(w)).T + (0.0 if b is None else np.abs(f64(b)))
    return ref, mag


def check_linear(y, x, w, b, out_dtype):
    ref, mag = linear64(x, w, b)
    assert y.dtype == out_dtype and y.shape == ref.shape
    depth = x.shape[2] * x.shape[3] + 1  # the bias is one more term
    bound = UNIT_ROUNDOFF[np.dtype(out_dtype)] * np.abs(ref) + depth * 2.0**-24 * mag + 1e-30
    err = np.abs(f64(y) - ref)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}, max err {err.max():.3g}"


# --- the few-rows linear kernels -------------------------------------------------------------


@pytest.mark.parametrize("dt", LINEAR_DTYPES, ids=ids)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("out_in", [(1, 1), (17, 33), (33, 513), (513, 17), (9, 64)], ids=str)
def test_few_rows_linear_matches_float64(bf16_path, dt, rows, out_in):
    out, n_in = out_in
    rng = np.random.default_rng(rows * 1000 + out)
    x = rng.standard_normal((1, rows, 1, n_in)).astype(dt)
    w = rng.standard_normal((out, n_in)).astype(dt)
    b = rng.standard_normal(out).astype(F32)
    check_linear(_core.linear(x, w, b), x, w, b, dt)
    check_linear(_core.linear(x, w, None), x, w, None, dt)
    if dt != F32:
        check_linear(_core.linear(x, w, b, out_float32=True), x, w, b, F32)


@pytest.mark.parametrize("dt", LINEAR_DTYPES, ids=ids)
def test_few_rows_linear_reads_strided_rows_and_batches(bf16_path, dt):
    """x rows from several batch entries, read through a heads-last view (B, L, H, D) of a
    (B, H, L, D) array, as step's output projection does."""
    rng = np.random.default_rng(3)
    o = rng.standard_normal((3, 4, 2, 16)).astype(dt)  # (B, H, L, D)
    x = o.transpose(0, 2, 1, 3)  # (B, L, H, D): 64 features per row
    w = rng.standard_normal((37, 64)).astype(dt)
    b = rng.standard_normal(37).astype(F32)
    check_linear(_core.linear(x, w, b), x, w, b, dt)


@pytest.mark.parametrize("dt", [BF16, F16], ids=ids)
def test_a_16_bit_bias_is_read_exactly(bf16_path, dt):
    """A bias of x's own 16-bit type (how a 16-bit layer stores it) gives the same bits as that
    bias widened to float32 (the accumulation type) by the caller."""
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((2, 3, 1, 40)).astype(dt), rng.standard_normal((21, 40)).astype(dt)
    b = rng.standard_normal(21).astype(dt)
    np.testing.assert_array_equal(_core.linear(x, w, b).view(np.uint16),
                                  _core.linear(x, w, b.astype(F32)).view(np.uint16))
    with pytest.raises(ValueError, match=r"bias has shape \(20,\)"):
        _core.linear(x, w, b[:20])
    with pytest.raises(TypeError, match="bias has dtype float64"):
        _core.linear(x, w, b.astype(np.float64))


@pytest.mark.parametrize("dt", LINEAR_DTYPES, ids=ids)
def test_each_output_is_one_dot_product_whatever_computes_it(bf16_path, dt):
    """An output element has the same bits computed alone (one row, one column of W) as inside a
    tile of many: the tiles of eight columns and of two rows sum in the single sum's order."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 5, 1, 70)).astype(dt)
    w = rng.standard_normal((19, 70)).astype(dt)
    b = rng.standard_normal(19).astype(F32)
    whole = _core.linear(x, w, b, out_float32=dt != F32)
    for r in (0, 3, 4):
        for c in (0, 7, 8, 15, 18):
            alone = _core.linear(x[:, r:r + 1], w[c:c + 1], b[c:c + 1], out_float32=dt != F32)
            assert alone[0, 0, 0].tobytes() == whole[0, r, c].tobytes(), (r, c)


@pytest.mark.parametrize("dt", LINEAR_DTYPES, ids=ids)
@pytest.mark.parametrize("rows_out_in", [(1, 1536, 512), (3, 513, 257), (1, 100, 2000)], ids=str)
def test_few_rows_linear_is_independent_of_the_thread_count(bf16_path, threads, dt, rows_out_in):
    """Sizes above the parallel threshold: the same bits on 1, 2 and 3 threads."""
    rows, out, n_in = rows_out_in
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, rows, 1, n_in)).astype(dt)
    w = rng.standard_normal((out, n_in)).astype(dt)
    b = rng.standard_normal(out).astype(F32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(_core.linear(x, w, b))
    for y in results[1:]:
        assert y.tobytes() == results[0].tobytes()


# --- step ------------------------------------------------------------------------------------


def make_layer(dtype, num_kv_heads=None, batch_first=True, embed=32, heads=4, seed=0):
    layer = attnext.MultiHeadAttention(embed, heads, num_kv_heads=num_kv_heads, batch_first=batch_first,
                                       dtype=dtype, rng=seed)
    rng = np.random.default_rng(seed + 100)
    layer.in_proj_bias[...] = rng.standard_normal(layer.in_proj_bias.shape)
    layer.out_proj_bias[...] = rng.standard_normal(layer.out_proj_bias.shape)
    return layer


def check_step(got, full, dtype):
    """step's tokens against the full causal pass: float32 to its usual tolerance; bfloat16 with
    the same rounding points in both (projections, cache, Q*scale, P, the output), only the
    kernels' tiling and the attention path differ, so within a few bfloat16 ulps of the scale."""
    assert got.dtype == full.dtype and got.shape == full.shape
    if dtype == F32:
        assert relative_error(got, full) <= TOLERANCE[F32]
    else:
        scale = float(np.abs(f64(full)).max())
        tol = low_precision_tolerance(dtype, 4) * scale
        assert absolute_error(f64(got), f64(full)) <= tol


@pytest.mark.parametrize("dtype", [F32, BF16], ids=ids)
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("batch_first", [True, False])
def test_step_token_by_token_equals_the_causal_pass(bf16_path, dtype, num_kv_heads, batch_first):
    layer = make_layer(dtype, num_kv_heads, batch_first)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 21, 32) if batch_first else (21, 3, 32)).astype(dtype)
    full, _ = layer(x, is_causal=True)
    cache = attnext.KVCache(dtype=dtype)
    steps = [layer.step(x[:, t] if batch_first else x[t], cache) for t in range(21)]
    assert steps[0].shape == (3, 32) and steps[0].dtype == dtype and len(cache) == 21
    check_step(np.stack(steps, axis=1 if batch_first else 0), full, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=ids)
@pytest.mark.parametrize("chunks", [[1, 3, 5, 12], [21], [8, 1, 12]], ids=str)
def test_step_in_chunks_equals_the_causal_pass(bf16_path, dtype, chunks):
    layer = make_layer(dtype, 2)
    x = np.random.default_rng(2).standard_normal((2, 21, 32)).astype(dtype)
    full, _ = layer(x, is_causal=True)
    cache = attnext.KVCache(capacity=4, dtype=dtype)
    outs, t = [], 0
    for n in chunks:
        outs.append(layer.step(x[:, t:t + n], cache))
        t += n
    check_step(np.concatenate(outs, axis=1), full, dtype)


@pytest.mark.parametrize("heads", [(8, None), (8, 2)], ids=["mha", "gqa"])
def test_step_at_the_benchmark_size(bf16_path, heads):
    """E = 512, 8 heads (the decoding benchmark's layer), 40 tokens one at a time, in bfloat16
    and float32; the output of bfloat16 steps asked for as float32 too."""
    h, hk = heads
    x = np.random.default_rng(3).standard_normal((1, 40, 512)).astype(F32)
    for dtype in (F32, BF16):
        layer = make_layer(dtype, hk, embed=512, heads=h, seed=7)
        xd = x.astype(dtype)
        full, _ = layer(xd, is_causal=True)
        cache = attnext.KVCache(dtype=dtype)
        check_step(np.stack([layer.step(xd[:, t], cache) for t in range(40)], axis=1), full, dtype)
        if dtype == BF16:
            cache = attnext.KVCache(dtype=dtype)
            wide = np.stack([layer.step(xd[:, t], cache, out_dtype=np.float32) for t in range(40)], axis=1)
            assert wide.dtype == F32
            # the float32 output is the bfloat16 one before its last rounding
            np.testing.assert_array_equal(wide.astype(BF16), np.stack(
                [layer.step(xd[:, t], c) for c in [attnext.KVCache(dtype=dtype)] for t in range(40)], axis=1))


def test_step_with_a_bfloat16_cache_beside_float32_weights(bf16_path):
    layer = make_layer(F32, 2)
    x = np.random.default_rng(4).standard_normal((2, 9, 32)).astype(F32)
    wide, narrow = attnext.KVCache(), attnext.KVCache(dtype=BF16)
    a = np.stack([layer.step(x[:, t], wide) for t in range(9)], axis=1)
    b = np.stack([layer.step(x[:, t], narrow) for t in range(9)], axis=1)
    assert a.dtype == b.dtype == F32 and narrow.keys.dtype == BF16
    np.testing.assert_allclose(b, a, rtol=0, atol=16 * 2.0**-8 * np.abs(a).max())


def test_step_still_checks_what_it_is_given():
    layer = make_layer(BF16, 2)
    cache = attnext.KVCache()
    layer.step(np.zeros((2, 32), BF16), cache)
    with pytest.raises(ValueError, match=r"key has shape \(3, 2, 1, 8\).*call reset\(\)"):
        layer.step(np.zeros((3, 32), BF16), cache)  # another batch size against the same cache
    other = make_layer(BF16, 4)
    with pytest.raises(ValueError, match="call reset"):
        other.step(np.zeros((2, 32), BF16), cache)  # another layer's heads
    with pytest.raises(ValueError, match="embed_dim = 32"):
        layer.step(np.zeros((2, 31), BF16), cache)
    with pytest.raises(ValueError, match="x_t must be"):
        layer.step(np.zeros((1, 2, 3, 32), BF16), cache)
    with pytest.raises(ValueError, match="out_dtype must be"):
        layer.step(np.zeros((2, 32), BF16), cache, out_dtype=np.float64)
    assert len(cache) == 1  # nothing appended by the failed calls
    out = layer.step(np.ones((2, 32), np.float64), cache)  # converted to the layer's dtype
    assert out.dtype == BF16 and len(cache) == 2


@pytest.mark.parametrize("dtype", [F32, BF16], ids=ids)
@pytest.mark.parametrize("hq_hk_t", [(4, 4, 1), (4, 2, 3), (6, 1, 2)], ids=str)
def test_the_unchecked_attention_equals_the_public_function(bf16_path, dtype, hq_hk_t):
    hq, hk, t = hq_hk_t
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, hq, t, 16)).astype(dtype)
    k, v = rng.standard_normal((2, hk, 11, 16)).astype(dtype), rng.standard_normal((2, hk, 11, 8)).astype(dtype)
    causal = "bottom_right" if t > 1 else False
    want = attnext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    got = _attention_of_checked(q, k, v, causal)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    if dtype == BF16:
        want = attnext.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, out_dtype=np.float32)
        assert _attention_of_checked(q, k, v, causal, True).tobytes() == want.tobytes()


def test_weights_and_cache_start_on_cache_lines():
    """The decoding step's operands start on 64-byte boundaries (its loads then never straddle
    two cache lines), also after a pickle round trip, and hold the same values."""
    import pickle

    layer = make_layer(BF16, 2, embed=64, heads=4)
    twin = pickle.loads(pickle.dumps(layer))
    for a, b in ((layer.in_proj_weight, twin.in_proj_weight), (layer.out_proj_weight, twin.out_proj_weight)):
        assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
        np.testing.assert_array_equal(a, b)
    assert np.shares_memory(layer.q_proj_weight, layer.in_proj_weight)
    cache = attnext.KVCache(dtype=BF16)
    twin.step(np.ones((2, 64), BF16), cache)
    assert cache.keys.ctypes.data % 64 == 0 and cache.values.ctypes.data % 64 == 0
