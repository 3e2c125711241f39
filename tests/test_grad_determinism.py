"""Issue 15: gradients are bit-identical for 1, 2, 3 and 8 threads, a pullback gives the same
bits when called twice, and it keeps its own copies (changing the caller's arrays after vjp
does not change the gradients).

Inputs are large enough to be split into many parallel blocks (130 query rows, 200 keys: several
64-row query blocks and key blocks per (batch, head)), so a reduction whose order depends on the
thread count (atomics, per-thread partial sums of dK/dV) shows up as differing bits.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnext

THREADS = (1, 2, 3, 8)
SDPA = attnext.scaled_dot_product_attention


def _bits(grads) -> list:
    out = []
    for g in grads if isinstance(grads, (tuple, list)) else [grads]:
        if isinstance(g, dict):
            out.extend(_bits([g[k] for k in sorted(g)]))
        elif g is None:
            out.append(None)
        else:
            out.append((g.shape, g.dtype.str, np.ascontiguousarray(g).tobytes()))
    return out


def _sdpa_problem(rng, dtype, opts):
    hq, hk = (6, 2) if opts.get("enable_gqa") else (3, 3)
    q = rng.standard_normal((2, hq, 130, 16)).astype(dtype)
    k = rng.standard_normal((2, hk, 200, 16)).astype(dtype)
    v = rng.standard_normal((2, hk, 200, 12)).astype(dtype)
    args = [q, k, v]
    if opts.pop("float_mask", False):
        m = rng.standard_normal((2, hq, 130, 200)).astype(dtype)
        m[rng.random(m.shape) < 0.2] = -np.inf
        args.append(m)
    return tuple(args), opts


SDPA_OPTIONS = {
    "plain": {},
    "float_mask_causal": dict(float_mask=True, is_causal=True),
    "bottom_right_window_lengths": dict(is_causal="bottom_right", window=(40, 3), key_lengths=np.array([150, 77])),
    "gqa": dict(enable_gqa=True),
    "dropout": dict(dropout_p=0.3, seed=42, float_mask=True),
    "weights_and_lse": dict(return_weights=True, return_lse=True),
}


def _across_threads(compute):
    with attnext.threads(1):
        want = _bits(compute())
    for n in THREADS[1:] + (1,):
        with attnext.threads(n):
            assert _bits(compute()) == want, f"gradients differ with {n} threads"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", SDPA_OPTIONS)
def test_sdpa_gradients_identical_across_threads(name, dtype, rng):
    args, kw = _sdpa_problem(rng, dtype, dict(SDPA_OPTIONS[name]))
    out = SDPA(*args, **kw)
    ct = tuple(rng.standard_normal(o.shape).astype(dtype) for o in out) if isinstance(out, tuple) else \
        rng.standard_normal(out.shape).astype(dtype)
    if isinstance(ct, tuple):  # no cotangent for the lse of a row that might be empty
        ct = ct[:2] + (None,)
    _across_threads(lambda: attnext.vjp(SDPA, *args, **kw)[1](ct))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sdpa_backward_function_identical_across_threads(dtype, rng):
    (q, k, v, m), kw = _sdpa_problem(rng, dtype, dict(float_mask=True, is_causal=True))
    out, w, lse = SDPA(q, k, v, m, return_weights=True, return_lse=True, dropout_p=0.2, seed=9, **kw)
    g, gw = rng.standard_normal(out.shape).astype(dtype), rng.standard_normal(w.shape).astype(dtype)
    _across_threads(lambda: attnext.scaled_dot_product_attention_backward(
        g, q, k, v, out, lse, m, 0.2, seed=9, grad_weights=gw, **kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [{}, dict(bias=True, float_mask=True, key_lengths=np.array([200, 31]))],
                         ids=["plain", "bias_mask_lengths"])
def test_additive_gradients_identical_across_threads(opts, dtype, rng):
    opts = dict(opts)
    q = rng.standard_normal((2, 130, 12)).astype(dtype)
    k = rng.standard_normal((2, 200, 10)).astype(dtype)
    v = rng.standard_normal((2, 200, 7)).astype(dtype)
    params = (rng.standard_normal((12, 24)).astype(dtype) * 0.3, rng.standard_normal((10, 24)).astype(dtype) * 0.3,
              rng.standard_normal(24).astype(dtype))
    if opts.pop("bias", False):
        opts["bias"] = rng.standard_normal(24).astype(dtype)
    if opts.pop("float_mask", False):
        opts["attn_mask"] = rng.standard_normal((2, 130, 200)).astype(dtype)
    out = attnext.additive_attention(q, k, v, *params, **opts)
    ct = rng.standard_normal(out.shape).astype(dtype)
    _across_threads(lambda: attnext.vjp(attnext.additive_attention, q, k, v, *params, **opts)[1](ct))


@pytest.mark.parametrize("fn", ["attention_general", "score_additive", "softmax", "weighted_sum"])
def test_other_functions_identical_across_threads(fn, rng):
    q, k, v = (rng.standard_normal((3, 130, 8)), rng.standard_normal((3, 200, 8)), rng.standard_normal((3, 200, 5)))
    call = {
        "attention_general": (attnext.attention, (q, k, v), dict(method="general", weight=rng.standard_normal((8, 8)),
                                                                  is_causal=True)),
        "score_additive": (attnext.score, (q, k, "additive"), dict(w_query=rng.standard_normal((8, 16)),
                                                                   w_key=rng.standard_normal((8, 16)),
                                                                   v=rng.standard_normal(16))),
        "softmax": (attnext.softmax, (rng.standard_normal((3, 130, 200)),), dict(axis=-2)),
        "weighted_sum": (attnext.weighted_sum, (rng.random((3, 130, 200)), v), {}),
    }[fn]
    f, args, kw = call
    ct = rng.standard_normal(np.shape(f(*args, **kw)))
    _across_threads(lambda: _with_names(attnext.vjp(f, *args, **kw)[1](ct), kw))


def _with_names(grads, kw):
    """The positional gradients and those of the float keyword arrays, by name."""
    return list(grads) + [grads[n] for n in sorted(kw) if isinstance(kw[n], np.ndarray)]


def test_multihead_attention_layer_gradients_identical_across_threads(rng):
    layer = attnext.MultiHeadAttention(48, 6, num_kv_heads=2, rng=3, dtype=np.float64)
    x = rng.standard_normal((2, 130, 48))
    out, pb = layer.vjp(x, is_causal=True)
    ct = (rng.standard_normal(out[0].shape), None) if isinstance(out, tuple) else rng.standard_normal(out.shape)

    def grads():
        inputs, params = pb(ct)
        return list(inputs) + [params[n] for n in sorted(params)]

    _across_threads(grads)


# --- pullback twice; pullback keeps its own copies -----------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pullback_twice_and_after_the_caller_changes_inputs(dropout, rng):
    q, k, v = rng.standard_normal((2, 2, 20, 8)), rng.standard_normal((2, 2, 30, 8)), rng.standard_normal((2, 2, 30, 4))
    m = rng.standard_normal((20, 30))
    kw = dict(dropout_p=dropout, seed=8) if dropout else {}
    out, pb = attnext.vjp(SDPA, q, k, v, m, **kw)
    ct = rng.standard_normal(out.shape)
    first = _bits(pb(ct))
    assert _bits(pb(ct)) == first
    for a in (q, k, v, m):  # the caller reuses its buffers
        a[...] = 0.0
    grads = pb(ct)
    assert _bits(grads) == first
    for g in grads:  # nor do the returned arrays alias what the pullback keeps
        if g is not None:
            g[...] = 7.0
    assert _bits(pb(ct)) == first


def test_pullback_after_the_caller_changes_additive_inputs(rng):
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 2))
    wq, wk, vv, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(5), \
        rng.standard_normal(5)
    out, pb = attnext.vjp(attnext.additive_attention, q, k, v, wq, wk, vv, bias=b)
    ct = rng.standard_normal(out.shape)
    first = _bits(list(pb(ct)) + [pb(ct)["bias"]])
    for a in (q, k, v, wq, wk, vv, b):
        a[...] = 0.0
    grads = pb(ct)
    assert _bits(list(grads) + [grads["bias"]]) == first


def test_bits_helper_sees_a_one_ulp_change(rng):
    g = rng.standard_normal(10)
    h = g.copy()
    h[3] = np.nextafter(h[3], np.inf)
    assert _bits((g,)) != _bits((h,))
