"""BahdanauAttention, LuongAttention and SelfAttention in float16 and bfloat16 (issue 17): the
same contract as MultiHeadAttention. ``dtype=`` stores the weights (and state_dict) in the
16-bit type; calls take ``out_dtype=None | np.float32``; the attention weights are float32;
bfloat16 has no vjp, float16's gradients are computed in float32 and returned as float16.

Each layer is held to its reference twin (``attnext.reference``), which applies the layer's
rounding points (docs/precision.md) to an exact computation, within
``low_precision_tolerance(dtype, roundings) * scale``: one unit in the last place per rounding
point at which the two may land on either side of a boundary, times the magnitude of what is
rounded. Every bfloat16 test runs on both product paths (the ``bf16_path`` fixture); the
float16 ones run without ml_dtypes too.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import reference as ref
from hardening.harness import assert_low_precision_close as check
from hardening.harness import low_precision_tolerance

try:
    import ml_dtypes
except ImportError:  # the float16 tests still run
    ml_dtypes = None

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
BF16 = None if ml_dtypes is None else np.dtype(ml_dtypes.bfloat16)
_NEEDS_ML_DTYPES = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 arrays need ml_dtypes")

# (16-bit type, bfloat16 product path): float16 once, bfloat16 on both paths (the conftest
# fixture bf16_path, parametrized here so float16 does not run twice).
LOWP = pytest.mark.parametrize("dtype,bf16_path", [
    pytest.param("float16", "auto", id="float16"),
    pytest.param("bfloat16", "auto", id="bfloat16-auto", marks=_NEEDS_ML_DTYPES),
    pytest.param("bfloat16", "fallback", id="bfloat16-fallback", marks=_NEEDS_ML_DTYPES),
], indirect=["bf16_path"])

# Rounding points counted per layer (docs/precision.md, "Layers"):
# Bahdanau: the context's store, g v / ||v|| (normalize=True), the bias sum (bias=True).
BAHDANAU_ROUNDINGS = 3
# Luong's context: general's s W_a, then SDPA's store and P (bfloat16) or additive's store.
LUONG_CONTEXT_ROUNDINGS = 3
# Luong's h~: the context's points, the context as W_c reads it, and h~'s own store.
LUONG_HIDDEN_ROUNDINGS = 5
# SelfAttention: Q, K, V's stores, SDPA's store and P, and one for a near-boundary projection
# moving the softmax (as MultiHeadAttention counts it).
SELF_ROUNDINGS = 6


def as_dtype(name: str) -> np.dtype:
    return F16 if name == "float16" else BF16


def normal(rng, shape, dtype, scale=1.0):
    """Unit-normal values drawn as float32 first, so a draw of float32 converted to a 16-bit
    type equals the same draw of that type."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def largest(a) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64)).max(initial=0.0))


def randomized(layer, rng):
    """layer with every parameter redrawn (unit-normal biases and g, so each is exercised)."""
    layer.load_state_dict({name: normal(rng, a.shape, F64, 0.5) + (1.0 if name == "g" else 0.0)
                           for name, a in layer.state_dict().items()})
    return layer


# --- BahdanauAttention ---------------------------------------------------------------------


def bahdanau_reference(layer, query, keys, values, key_lengths, out_dtype=None):
    state = layer.state_dict()
    g = state.pop("g", None)
    return ref.bahdanau_attention(query, keys, values, g=g, key_lengths=key_lengths, out_dtype=out_dtype, **state)


@LOWP
@pytest.mark.parametrize("normalize,bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("single", [False, True], ids=["steps", "one_step"])
def test_bahdanau_matches_its_reference(rng, dtype, bf16_path, normalize, bias, single):
    dtype = as_dtype(dtype)
    layer = randomized(attnext.BahdanauAttention(6, 5, 7, normalize=normalize, bias=bias, dtype=dtype, rng=1), rng)
    query = normal(rng, (2, 6) if single else (2, 4, 6), dtype)
    keys, values = normal(rng, (2, 9, 5), dtype), normal(rng, (2, 9, 3), dtype)
    lengths = np.array([9, 0])  # the second sentence has nothing to attend: zeros
    memory = layer.precompute(keys, values, key_lengths=lengths)
    for out_dtype in (None, np.float32):
        context, weights = layer(query, memory, out_dtype=out_dtype)
        want, want_w = bahdanau_reference(layer, query, keys, values, lengths, out_dtype)
        assert context.dtype == (F32 if out_dtype else dtype) and weights.dtype == F32
        check(context, want, dtype, BAHDANAU_ROUNDINGS, largest(values), "context")
        check(weights, want_w, dtype, 0, 1.0, "weights")
        assert not np.any(context[1].astype(F32)) and not np.any(weights[1])


@LOWP
def test_bahdanau_decoder_loop_reuses_a_16_bit_memory(rng, dtype, bf16_path):
    dtype = as_dtype(dtype)
    layer = randomized(attnext.BahdanauAttention(4, 4, 5, bias=True, dtype=dtype, rng=2), rng)
    keys = normal(rng, (3, 8, 4), dtype)
    memory = layer.precompute(keys, key_lengths=[8, 5, 1])
    steps = normal(rng, (3, 6, 4), dtype)
    for t in range(6):
        context, weights = layer(steps[:, t], memory)
        want, want_w = bahdanau_reference(layer, steps[:, t], keys, keys, [8, 5, 1])
        check(context, want, dtype, BAHDANAU_ROUNDINGS, largest(keys), f"step {t}")
        check(weights, want_w, dtype, 0, 1.0, f"step {t} weights")
    assert memory.values.dtype == dtype  # the memory keeps the values in the layer's type


# --- LuongAttention ------------------------------------------------------------------------


def luong_mask(rng, kind, shape):
    if kind == "bool":
        m = rng.random(shape) < 0.7
        m[0, ...] = False  # the first sentence has nothing to attend: zeros, never NaN
        return m
    return rng.standard_normal(shape).astype(np.float32) if kind == "float" else None


@LOWP
@pytest.mark.parametrize("method", ["dot", "general", "concat"])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "scale"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("single", [False, True], ids=["steps", "one_step"])
def test_luong_matches_its_reference(rng, dtype, bf16_path, method, scale, mask, single):
    dtype = as_dtype(dtype)
    key_dim = 6 if method == "dot" else 5
    layer = randomized(attnext.LuongAttention(6, key_dim, method, scale=scale, value_dim=3, attentional_units=4,
                                              units=7, dtype=dtype, rng=3), rng)
    lead = (2,) if single else (2, 5)
    query = normal(rng, lead + (6,), dtype)
    keys, values = normal(rng, (2, 11, key_dim), dtype), normal(rng, (2, 11, 3), dtype)
    m = luong_mask(rng, mask, lead + (11,))
    lengths = np.array([11, 4])
    for out_dtype in (None, np.float32):
        hidden, context, weights = layer(query, keys, values, attn_mask=m, key_lengths=lengths, warn=False,
                                         out_dtype=out_dtype)
        want = ref.luong_attention(query, keys, values, method=method, attn_mask=m, key_lengths=lengths,
                                   out_dtype=out_dtype, **layer.state_dict())
        wide = F32 if out_dtype else dtype
        assert (hidden.dtype, context.dtype, weights.dtype) == (wide, wide, F32)
        check(hidden, want[0], dtype, LUONG_HIDDEN_ROUNDINGS, 1.0, "hidden")
        check(context, want[1], dtype, LUONG_CONTEXT_ROUNDINGS, largest(values), "context")
        check(weights, want[2], dtype, 0, 1.0, "weights")
        if mask == "bool":
            assert not np.any(context[0].astype(F32)) and not np.any(weights[0])


@LOWP
def test_luong_one_step_decoding_matches_the_many_step_call(rng, dtype, bf16_path):
    dtype = as_dtype(dtype)
    layer = randomized(attnext.LuongAttention(8, 8, "general", scale=True, dtype=dtype, rng=4), rng)
    keys = normal(rng, (2, 13, 8), dtype)
    steps = normal(rng, (2, 5, 8), dtype)
    many = layer(steps, keys, key_lengths=[13, 6])
    for t in range(5):
        one = layer(steps[:, t], keys, key_lengths=[13, 6])
        # A query of one row may take the decode kernel (other key tiling): the same rounding
        # points, so within the context's points of each other.
        check(one[1], many[1][:, t], dtype, LUONG_CONTEXT_ROUNDINGS, largest(keys), f"context {t}")
        check(one[0], many[0][:, t], dtype, LUONG_HIDDEN_ROUNDINGS, 1.0, f"hidden {t}")


# --- SelfAttention -------------------------------------------------------------------------


def self_reference(layer, x, out_dtype=None, **kw):
    return ref.self_attention(x, layer.w_query, layer.w_key, layer.w_value, b_query=layer.b_query,
                              b_key=layer.b_key, b_value=layer.b_value, exclude_self=layer.exclude_self,
                              return_weights=True, out_dtype=out_dtype, **kw)


@LOWP
@pytest.mark.parametrize("case", [dict(is_causal=True), dict(key_lengths=np.array([9, 3])),
                                  dict(window=(2, 1)), dict(attn_mask="bool"), dict(attn_mask="float")],
                         ids=["causal", "key_lengths", "window", "bool_mask", "float_mask"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_self_attention_matches_its_reference(rng, dtype, bf16_path, case, exclude_self):
    dtype = as_dtype(dtype)
    layer = randomized(attnext.SelfAttention(12, qk_dim=8, v_dim=6, bias=True, exclude_self=exclude_self,
                                             dtype=dtype, rng=5), rng)
    x = normal(rng, (2, 9, 12), dtype)
    kw = dict(case)
    if "attn_mask" in kw:
        kw["attn_mask"] = luong_mask(rng, kw["attn_mask"], (2, 9, 9))
    for out_dtype in (None, np.float32):
        out, weights = layer(x, return_weights=True, warn=False, out_dtype=out_dtype, **kw)
        want, want_w = self_reference(layer, x, out_dtype, **kw)
        assert out.dtype == (F32 if out_dtype else dtype) and weights.dtype == F32
        check(out, want, dtype, SELF_ROUNDINGS, largest(want), "output")
        # The weights after rounded projections: float32 arithmetic, plus a near-boundary Q or K
        # rounding moving the softmax (as MultiHeadAttention's weights are held).
        np.testing.assert_allclose(weights, want_w, rtol=0, atol=low_precision_tolerance(dtype, SELF_ROUNDINGS))


# --- every layer: dtype, state_dict, inputs, errors, gradients -----------------------------

LAYERS = {
    "bahdanau": lambda dtype: attnext.BahdanauAttention(4, 3, 5, normalize=True, bias=True, dtype=dtype, rng=6),
    "luong_general": lambda dtype: attnext.LuongAttention(4, 3, "general", scale=True, dtype=dtype, rng=7),
    "luong_concat": lambda dtype: attnext.LuongAttention(4, 3, "concat", units=5, scale=True, dtype=dtype, rng=8),
    "self_attention": lambda dtype: attnext.SelfAttention(4, bias=True, dtype=dtype, rng=9),
}


def call(name, layer, rng, dtype, **kw):
    """The layer's main output on inputs of ``dtype`` (drawn from rng), with kw."""
    if name == "self_attention":
        return layer(normal(rng, (2, 5, 4), dtype), **kw)
    keys = normal(rng, (2, 6, 3), dtype)
    query = normal(rng, (2, 4), dtype)
    if name == "bahdanau":
        return layer(query, layer.precompute(keys), **kw)[0]
    return layer(query, keys, **kw)[0]


@_NEEDS_ML_DTYPES
@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trips_in_bfloat16(rng, name):
    layer = LAYERS[name](BF16)
    assert layer.dtype == BF16 and "dtype=bfloat16" in repr(layer)
    state = layer.state_dict()
    assert {a.dtype for a in state.values()} == {BF16}
    wide = {k: normal(rng, a.shape, F64) for k, a in state.items()}
    layer.load_state_dict(wide)  # cast: each value rounded to bfloat16
    for k, a in layer.state_dict().items():
        assert a.dtype == BF16
        np.testing.assert_array_equal(a, wide[k].astype(BF16))
    twin = LAYERS[name](BF16)
    twin.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(call(name, twin, np.random.default_rng(1), BF16),
                                  call(name, layer, np.random.default_rng(1), BF16))


@_NEEDS_ML_DTYPES
@pytest.mark.parametrize("name", LAYERS)
def test_other_inputs_are_rounded_to_the_layers_type(name):
    layer = LAYERS[name](BF16)
    wide = call(name, layer, np.random.default_rng(2), F32)  # float32 inputs: converted on entry
    narrow = call(name, layer, np.random.default_rng(2), BF16)
    assert wide.dtype == narrow.dtype == BF16
    np.testing.assert_array_equal(wide, narrow)


@pytest.mark.parametrize("name", LAYERS)
def test_out_dtype_and_dtype_errors(rng, name):
    with pytest.raises(ValueError, match=r"out_dtype must be None, the inputs' dtype \(float64\), got float32"):
        call(name, LAYERS[name](np.float64), rng, F64, out_dtype=np.float32)
    with pytest.raises(ValueError, match=r"out_dtype must be None, the inputs' dtype \(float16\) or float32, "
                                         r"got float64"):
        call(name, LAYERS[name](np.float16), rng, F16, out_dtype=np.float64)
    with pytest.raises(TypeError, match="out_dtype must be a NumPy dtype"):
        call(name, LAYERS[name](np.float16), rng, F16, out_dtype="not a dtype")
    assert call(name, LAYERS[name](np.float32), rng, F32, out_dtype=np.float32).dtype == F32  # its own type
    for bad in (np.int8, "no such dtype", np.complex64):
        with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
            LAYERS[name](bad)


@_NEEDS_ML_DTYPES
def test_bfloat16_layers_refuse_gradients_before_any_work(rng):
    message = "bfloat16 backward is not supported; cast to float32"
    bahdanau = LAYERS["bahdanau"](BF16)
    keys, query = normal(rng, (2, 6, 3), BF16), normal(rng, (2, 4), BF16)
    memory = bahdanau.precompute(keys)
    with pytest.raises(TypeError, match="BahdanauAttention.dtype is bfloat16: " + message):
        bahdanau.vjp(query, memory)
    with pytest.raises(TypeError, match=message):
        bahdanau.vjp(query, keys)
    with pytest.raises(TypeError, match=message):
        bahdanau.precompute_vjp(keys)
    for name in ("luong_general", "luong_concat"):
        with pytest.raises(TypeError, match="LuongAttention.dtype is bfloat16: " + message):
            LAYERS[name](BF16).vjp(query, keys)
    with pytest.raises(TypeError, match="SelfAttention.dtype is bfloat16: " + message):
        LAYERS["self_attention"](BF16).vjp(normal(rng, (2, 5, 4), F32))


def float16_and_float32_vjp(name, rng):
    """(pullback results of a float16 layer, of the float32 layer with the same weights)."""
    narrow = LAYERS[name](np.float16)
    wide = LAYERS[name](np.float32)
    wide.load_state_dict(narrow.state_dict())
    if name == "self_attention":
        args = (normal(rng, (2, 5, 4), F16),)
    else:
        args = (normal(rng, (2, 3, 4), F16), normal(rng, (2, 6, 3), F16))
    results = []
    for layer in (narrow, wide):
        out, pullback = layer.vjp(*(a.astype(layer.dtype) for a in args))
        main = out[0] if isinstance(out, tuple) else out
        cotangent = np.ones(main.shape, layer.dtype)
        results.append(pullback(cotangent if not isinstance(out, tuple) else (cotangent,) + (None,) * (len(out) - 1)))
    return results


@pytest.mark.parametrize("name", LAYERS)
def test_float16_gradients_are_computed_in_float32_and_returned_as_float16(rng, name):
    (inputs, params), (wide_inputs, wide_params) = float16_and_float32_vjp(name, rng)
    assert {g.dtype for g in inputs} == {g.dtype for g in params.values()} == {F16}
    # Every intermediate gradient of the float16 layer is a float16 array (the layer's stores,
    # as in its forward) rounded from float32 arithmetic: a few of its ulps of the largest.
    for got, want in list(zip(inputs, wide_inputs)) + [(params[k], wide_params[k]) for k in params]:
        np.testing.assert_allclose(got.astype(F32), want, rtol=0, atol=16 * 2.0 ** -11 * max(largest(want), 1.0))
