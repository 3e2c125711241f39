"""_core with float16 and bfloat16 inputs (issue 17): every forward entry against a float64
computation on the same inputs, the output dtype rules, out_float32, the backward refusal and the
bfloat16 path switch.

Inputs are drawn as float64 and rounded to the 16-bit type first, so the float64 reference sees
exactly the values the kernel reads. The kernels compute in float32 and round once, at the store:
  |out - ref| <= u |ref| + (float32 accumulation error)
with u the unit roundoff of the output type: 2^-8 for bfloat16 (8 significant bits), 2^-11 for
float16 (11 bits). The float32 part is bounded by n 2^-24 sum|terms| for a sum of n terms (dot
products) and a few float32 ulp for exp/tanh; ACC = 1e-5 relative to the sum of |terms| covers
both for the sizes used here. With out_float32 only the float32 part remains. SDPA rounds Q*scale
and P to bfloat16 inside (l2's rounding points, tested exactly in test_l2_sdpa_lowp.py): its
bound here is loose, 8 u max|value|, which those roundings stay well inside.
"""

import ml_dtypes
import numpy as np
import pytest

from attnext import _core
from conftest import bf16_cap

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
UNIT_ROUNDOFF = {BF16: 2.0**-8, F16: 2.0**-11}
ACC = 1e-5  # float32 accumulation, relative to the sum of |terms| (see the module docstring)
LOWP = [BF16, F16]
ids = lambda dt: dt.name  # noqa: E731


def rand(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


def f64(a):
    return np.asarray(a).astype(np.float64)


def strided(a):
    """The same values as a non-contiguous view (last axis reversed, every other column of a wider array)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a[..., ::-1]
    view = wide[..., ::2][..., ::-1]
    assert not view.flags.c_contiguous
    return view


def check(out, ref, scale, dt, out_float32=False):
    """|out - ref| <= u |ref| + ACC scale elementwise (u = 0 for a float32 output)."""
    u = 0.0 if out_float32 else UNIT_ROUNDOFF[dt]
    assert out.dtype == (np.float32 if out_float32 else dt)
    err = np.abs(f64(out) - ref)
    bound = u * np.abs(ref) + ACC * scale + 1e-30
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}, max err {err.max()}"


def softmax64(s, hidden=None):
    s = np.where(hidden, -np.inf, s) if hidden is not None else s
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


# --- softmax ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_softmax_matches_float64(bf16_path, dt, layout):
    rng = np.random.default_rng(1)
    x = rand(rng, (3, 5, 37), dt, 3.0)
    xs = strided(x) if layout == "strided" else x
    ref = softmax64(f64(x))
    check(_core.softmax(xs), ref, 1.0, dt)
    check(_core.softmax(xs, out_float32=True), ref, 1.0, dt, out_float32=True)


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_softmax_masks_and_causal(dt):
    rng = np.random.default_rng(2)
    x = rand(rng, (2, 6, 9), dt)
    keep = rng.random((2, 6, 9)) > 0.3
    keep[0, 1] = False  # a row that sees nothing: zeros
    check(_core.softmax(x, keep), softmax64(f64(x), ~keep), 1.0, dt)
    add = np.where(keep, rng.standard_normal((2, 6, 9)), -np.inf).astype(np.float32)  # float mask: float32
    check(_core.softmax(x, add), softmax64(f64(x) + f64(add)), 1.0, dt)
    causal = np.triu(np.ones((6, 9), bool), k=3)  # hidden: j > i + 2
    check(_core.softmax(x, causal=True, causal_offset=2), softmax64(f64(x), causal), 1.0, dt)
    assert not np.any(f64(_core.softmax(x, keep))[0, 1])


# --- score and weighted sum ----------------------------------------------------------------------


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_score_product_matches_float64(bf16_path, dt, layout):
    rng = np.random.default_rng(3)
    q, k = rand(rng, (2, 70, 19), dt), rand(rng, (2, 41, 19), dt)  # 70 rows: two row blocks
    qs, ks = (strided(q), strided(k)) if layout == "strided" else (q, k)
    scale = 0.375
    ref = scale * f64(q) @ np.swapaxes(f64(k), -1, -2)
    mag = scale * np.abs(f64(q)) @ np.swapaxes(np.abs(f64(k)), -1, -2)
    check(_core.score_product(qs, ks, scale=scale), ref, mag, dt)
    check(_core.score_product(qs, ks, scale=scale, out_float32=True), ref, mag, dt, out_float32=True)


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_score_product_general(dt):
    rng = np.random.default_rng(4)
    q, k, w = rand(rng, (3, 11, 7), dt), rand(rng, (3, 13, 5), dt), rand(rng, (7, 5), dt)
    ref = f64(q) @ f64(w) @ np.swapaxes(f64(k), -1, -2)
    mag = np.abs(f64(q)) @ np.abs(f64(w)) @ np.swapaxes(np.abs(f64(k)), -1, -2)
    check(_core.score_product(q, k, w), ref, mag, dt)


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_weighted_sum_matches_float64(bf16_path, dt, layout):
    rng = np.random.default_rng(5)
    w, v = rand(rng, (2, 3, 67, 45), dt), rand(rng, (2, 3, 45, 17), dt)
    ws, vs = (strided(w), strided(v)) if layout == "strided" else (w, v)
    ref = f64(w) @ f64(v)
    mag = np.abs(f64(w)) @ np.abs(f64(v))
    check(_core.weighted_sum(ws, vs), ref, mag, dt)
    check(_core.weighted_sum(ws, vs, out_float32=True), ref, mag, dt, out_float32=True)


def additive_scores64(q, k, wq, wk, v, bias):
    t = np.tanh((f64(q) @ f64(wq) + f64(bias))[..., :, None, :] + (f64(k) @ f64(wk))[..., None, :, :])
    return t @ f64(v), np.abs(t) @ np.abs(f64(v))


def additive_operands(rng, dt, lq=37, lk=29, batch=(2,)):
    q, k = rand(rng, batch + (lq, 6), dt), rand(rng, batch + (lk, 5), dt)
    wq, wk = rand(rng, (6, 13), dt, 0.4), rand(rng, (5, 13), dt, 0.4)
    v, bias = rand(rng, (13,), dt), rand(rng, (13,), np.float32)  # bias: the accumulation type
    return q, k, wq, wk, v, bias


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_score_additive_matches_float64(bf16_path, dt):
    rng = np.random.default_rng(6)
    q, k, wq, wk, v, bias = additive_operands(rng, dt)
    ref, mag = additive_scores64(q, k, wq, wk, v, bias)
    check(_core.score_additive(strided(q), k, wq, wk, v, bias, 0.5), 0.5 * ref, 0.5 * mag, dt)
    check(_core.score_additive(q, k, wq, wk, v, None, 1.0, True), additive_scores64(q, k, wq, wk, v, 0 * bias)[0],
          mag, dt, out_float32=True)


# --- additive attention --------------------------------------------------------------------------


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("lq", [1, 37])
def test_additive_attention_matches_float64(bf16_path, dt, lq):
    rng = np.random.default_rng(7)
    q, k, wq, wk, v, bias = additive_operands(rng, dt, lq=lq)
    value = rand(rng, (2, 29, 11), dt)
    keep = rng.random((2, lq, 29)) > 0.2
    lengths = np.array([29, 17])
    s, _ = additive_scores64(q, k, wq, wk, v, bias)
    hidden = ~keep | (np.arange(29) >= lengths[:, None, None])
    p = softmax64(s, hidden)
    ref = p @ f64(value)
    mag = p @ np.abs(f64(value))
    out, w = _core.additive_attention_keys(q, wq, bias, strided(k), wk, value, v, keep, lengths, True)
    check(out, ref, mag, dt)
    check(w, p, 1.0, dt, out_float32=True)  # weights: float32 for 16-bit inputs
    raw, expo, ok = _core.additive_keys(k, wk)
    assert raw.dtype == expo.dtype == np.float32 and ok.dtype == bool
    check(raw, f64(k) @ f64(wk), np.abs(f64(k)) @ np.abs(f64(wk)), dt, out_float32=True)
    out = _core.additive_attention(strided(q), wq, bias, raw, expo, ok, value, v, keep, lengths, False, True)
    check(out, ref, mag, dt, out_float32=True)


# --- linear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("rows", [3, 45])  # the few-rows path and the packed GEMM
def test_linear_matches_float64(bf16_path, dt, rows):
    rng = np.random.default_rng(8)
    x = rand(rng, (2, 3, rows, 8), dt)  # (B, H, L, D) seen as (B, L, H, D): C = 3 heads of 8
    xv = np.swapaxes(x, 1, 2)
    w, b = rand(rng, (21, 24), dt, 0.3), rand(rng, (21,), np.float32)
    xr = f64(xv).reshape(2, rows, 24)
    ref = xr @ f64(w).T + b
    mag = np.abs(xr) @ np.abs(f64(w)).T + np.abs(b)
    check(_core.linear(xv, w, b), ref, mag, dt)
    check(_core.linear(xv, w, b, out_float32=True), ref, mag, dt, out_float32=True)
    check(_core.linear(np.ascontiguousarray(xv), w, None), ref - b, mag, dt)


# --- SDPA (loose: Q*scale and P are rounded to bfloat16 inside, see the docstring) ----------------


def sdpa64(q, k, v, scale, hidden=None):
    s = scale * f64(q) @ np.swapaxes(f64(k), -1, -2)
    p = softmax64(s, hidden)
    return p @ f64(v), p


def check_sdpa(out, ref, v, dt, out_float32=False):
    u = UNIT_ROUNDOFF[dt]
    assert out.dtype == (np.float32 if out_float32 else dt)
    assert np.abs(f64(out) - ref).max() <= 8 * u * np.abs(f64(v)).max()


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("lq", [3, 70])  # the decode path and the blocked path
def test_sdpa_matches_float64(bf16_path, dt, lq):
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, (2, 3, lq, 24), dt), rand(rng, (2, 3, 53, 24), dt), rand(rng, (2, 3, 53, 9), dt)
    scale = 24**-0.5
    ref, p = sdpa64(q, k, v, scale)
    out, w, lse = _core.sdpa(strided(q), k, strided(v), scale=scale, return_lse=True)
    check_sdpa(out, ref, v, dt)
    assert w is None and lse.dtype == np.float32
    out, w, lse = _core.sdpa(q, k, v, scale=scale, return_weights=True, return_lse=True, out_float32=True)
    check_sdpa(out, ref, v, dt, out_float32=True)
    assert w.dtype == lse.dtype == np.float32
    assert np.abs(w - p).max() <= 8 * UNIT_ROUNDOFF[dt]


@pytest.mark.parametrize("dt", LOWP, ids=ids)
@pytest.mark.parametrize("lq", [3, 70])
def test_sdpa_masks_lengths_causal_and_empty_rows(bf16_path, dt, lq):
    rng = np.random.default_rng(10)
    q, k, v = rand(rng, (2, lq, 16), dt), rand(rng, (2, 40, 16), dt), rand(rng, (2, 40, 7), dt)
    keep = rng.random((2, lq, 40)) > 0.25
    keep[1, 0] = False  # sees nothing: zeros
    lengths = np.array([40, 23])
    hidden = ~keep | (np.arange(40) >= lengths[:, None, None])
    ref, _ = sdpa64(q, k, v, 0.25, hidden)
    out, _, _ = _core.sdpa(q, k, v, keep, key_lengths=lengths, scale=0.25)
    check_sdpa(out, ref, v, dt)
    assert not np.any(f64(out)[1, 0])
    add = np.where(keep, rng.standard_normal(keep.shape), -np.inf).astype(np.float32)  # float mask: float32
    s = 0.25 * f64(q) @ np.swapaxes(f64(k), -1, -2) + f64(add)
    check_sdpa(_core.sdpa(q, k, v, add, scale=0.25)[0], softmax64(s) @ f64(v), v, dt)
    causal = np.arange(40)[None, :] > np.arange(lq)[:, None] + (40 - lq)  # bottom-right alignment
    ref, _ = sdpa64(q, k, v, 0.25, causal)
    check_sdpa(_core.sdpa(q, k, v, causal=True, causal_offset=40 - lq, scale=0.25)[0], ref, v, dt)


# --- one rounding, at the store --------------------------------------------------------------------


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_16_bit_output_is_the_float32_output_rounded_once(bf16_path, dt):
    # The same float32 computation, stored two ways: the 16-bit output must be exactly the
    # float32 one rounded by the round-to-nearest-even rule (ml_dtypes' and NumPy's casts).
    rng = np.random.default_rng(11)
    q, k, v = rand(rng, (2, 40, 12), dt), rand(rng, (2, 33, 12), dt), rand(rng, (2, 33, 5), dt)
    w = rand(rng, (2, 40, 33), dt)
    aq, ak, wq, wk, av, bias = additive_operands(rng, dt)
    x, lw, lb = rand(rng, (2, 40, 1, 12), dt), rand(rng, (9, 12), dt), rand(rng, (9,), np.float32)
    calls = [
        lambda **o: _core.softmax(q, **o),
        lambda **o: _core.score_product(q, k, scale=0.3, **o),
        lambda **o: _core.weighted_sum(w, v, **o),
        lambda **o: _core.score_additive(aq, ak, wq, wk, av, bias, **o),
        lambda **o: _core.additive_attention_keys(aq, wq, bias, ak, wk, rand(rng, (2, 29, 4), dt) * 0 + 1, av,
                                                  None, None, **o),
        lambda **o: _core.linear(x, lw, lb, **o),
        lambda **o: _core.sdpa(q, k, v, scale=0.3, **o)[0],
        lambda **o: _core.sdpa(q[:, :2], k, v, scale=0.3, **o)[0],
    ]
    for call in calls:
        low, wide = call(), call(out_float32=True)
        assert low.dtype == dt and wide.dtype == np.float32
        np.testing.assert_array_equal(low.view(np.uint16), wide.astype(dt).view(np.uint16))


# --- dtype rules -----------------------------------------------------------------------------------


def test_out_float32_is_ignored_for_float32_and_refused_for_float64():
    x = np.ones((2, 3), np.float32)
    assert _core.softmax(x, out_float32=True).dtype == np.float32
    with pytest.raises(ValueError, match="out_float32"):
        _core.softmax(x.astype(np.float64), out_float32=True)
    with pytest.raises(ValueError, match="out_float32"):
        _core.sdpa(*(np.ones((1, 2, 4)),) * 3, out_float32=True)


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_one_dtype_per_call(dt):
    rng = np.random.default_rng(12)
    q = rand(rng, (2, 4, 8), dt)
    with pytest.raises(TypeError, match="key has dtype float32"):
        _core.score_product(q, q.astype(np.float32))
    with pytest.raises(TypeError, match="attn_mask must be bool .* or float32"):
        _core.sdpa(q, q, q, np.zeros((2, 4, 4), dt))  # a float mask of a 16-bit call is float32
    aq, ak, wq, wk, v, bias = additive_operands(rng, dt)
    with pytest.raises(TypeError, match="bias .*float32"):
        _core.score_additive(aq, ak, wq, wk, v, bias.astype(np.float64))
    with pytest.raises(TypeError, match="w_query"):
        _core.score_additive(aq, ak, wq.astype(np.float32), wk, v, bias)
    with pytest.raises(TypeError, match="keys_raw"):
        raw, expo, ok = _core.additive_keys(ak.astype(np.float64), wk.astype(np.float64))
        _core.additive_attention(aq, wq, bias, raw, expo, ok, rand(rng, (2, 29, 3), dt), v, None, None)


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_a_bias_of_the_inputs_16_bit_type_is_read_exactly(dt):
    # A 16-bit layer stores its bias in its own type; the bindings widen it exactly, so it
    # gives the bits of the same values passed as float32.
    rng = np.random.default_rng(13)
    aq, ak, wq, wk, v, bias = additive_operands(rng, dt)
    narrow = bias.astype(dt)
    wide = narrow.astype(np.float32)
    np.testing.assert_array_equal(_core.score_additive(aq, ak, wq, wk, v, narrow),
                                  _core.score_additive(aq, ak, wq, wk, v, wide))
    value = rand(rng, (2, 29, 3), dt)
    np.testing.assert_array_equal(_core.additive_attention_keys(aq, wq, narrow, ak, wk, value, v, None, None, False),
                                  _core.additive_attention_keys(aq, wq, wide, ak, wk, value, v, None, None, False))


def test_non_native_16_bit_is_refused():
    with pytest.raises(TypeError, match="big-endian"):
        _core.softmax(np.ones((2, 3), ">f2"))


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_backward_entries_refuse_16_bit(dt):
    rng = np.random.default_rng(13)
    q = rand(rng, (1, 4, 8), dt)
    z = np.zeros((1, 4), np.float32)
    msg = r"takes float32 or float64 \(bfloat16 training is not supported\); cast with \.astype\(np\.float32\)"
    with pytest.raises(TypeError, match="sdpa_backward " + msg):
        _core.sdpa_backward(q, q, q, None, False, 0, -1, -1, None, 1.0, q, z, q)
    with pytest.raises(TypeError, match="linear_backward " + msg):
        _core.linear_backward(q, q[:, :, None, :], rand(rng, (8, 8), dt), True)
    aq, ak, wq, wk, v, bias = additive_operands(rng, dt, lq=3, lk=4)
    value, grad = rand(rng, (2, 4, 2), dt), rand(rng, (2, 3, 2), dt)
    with pytest.raises(TypeError, match="additive_attention_keys_backward " + msg):
        _core.additive_attention_keys_backward(aq, wq, bias, ak, wk, value, v, None, None, grad)
    raw, expo, ok = _core.additive_keys(ak, wk)
    with pytest.raises(TypeError, match="additive_attention_backward " + msg):
        _core.additive_attention_backward(aq, wq, bias, raw, expo, ok, value, v, None, None, grad)


# --- the bfloat16 path switch ------------------------------------------------------------------------


def test_bf16_path_switch_and_build_info():
    with bf16_cap("auto"):
        auto = _core.get_bf16_path()
        assert auto in ("amx_bf16", "avx512_bf16", "float32 fallback")
        assert _core.build_info()["bf16"] == auto and _core.get_bf16_cap() == "auto"
        _core.set_bf16_path("avx512_bf16")
        capped = _core.get_bf16_path()
        assert capped == {"amx_bf16": "avx512_bf16 (capped)", "avx512_bf16": "avx512_bf16 (capped)",
                          "float32 fallback": "float32 fallback"}[auto]
        assert _core.get_bf16_cap() == "avx512_bf16"
        _core.set_bf16_path("fallback")
        forced = _core.get_bf16_path()
        assert forced == ("float32 fallback" if auto == "float32 fallback" else "float32 fallback (forced)")
        assert _core.build_info()["bf16"] == forced and _core.get_bf16_cap() == "fallback"
        for bad in ("AUTO", "native", "amx_bf16", ""):
            with pytest.raises(ValueError, match='"auto", "avx512_bf16" or "fallback"'):
                _core.set_bf16_path(bad)
        assert _core.get_bf16_path() == forced  # a refused call changes nothing


@pytest.mark.parametrize("dt", LOWP, ids=ids)
def test_store_rounds_special_values_as_numpy_and_ml_dtypes(dt):
    # weighted_sum of rows [a, b] with a value column of ones returns a + b, a float32 sum of
    # 16-bit values rounded at the store: ties, NaN, inf and overflow (float16: 60000 + 60000)
    # must come out as NumPy's / ml_dtypes' round to nearest even of the float32 result. 40 rows
    # go through both the 16-lane store and its scalar tail.
    finfo_max = float(ml_dtypes.finfo(dt).max) if dt == BF16 else float(np.finfo(dt).max)
    specials = [(np.nan, 1.0), (np.inf, 1.0), (-np.inf, 2.0), (finfo_max, finfo_max), (-finfo_max, -finfo_max),
                (1.0, 2.0**-8), (1.0, 3 * 2.0**-9), (-1.0, -(2.0**-8)), (0.0, -0.0), (-0.0, -0.0)]
    rng = np.random.default_rng(14)
    pairs = np.array(specials + [tuple(p) for p in rng.standard_normal((30, 2)) * 100.0])
    w = pairs.astype(dt)[None]  # (1, 40, 2): one store of 40 values
    v = np.ones((1, 2, 1), dt)
    low, wide = _core.weighted_sum(w, v), _core.weighted_sum(w, v, out_float32=True)
    with np.errstate(over="ignore"):  # the overflow to inf is the point
        expected = wide.astype(dt)
    np.testing.assert_array_equal(low.view(np.uint16), expected.view(np.uint16))
    assert np.isinf(f64(low)[0, 3:5]).all() and np.isnan(f64(low)[0, 0]).all()
