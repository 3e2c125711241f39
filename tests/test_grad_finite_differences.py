"""Issue 15: every gradient against float64 central finite differences (relative error <= 1e-6).

attnext.vjp over scaled_dot_product_attention (bool/float masks, broadcast masks, a positional
float mask's own gradient, causal in both alignments, window, key_lengths, GQA, Ev != E,
broadcast batches, F-order/strided/negative-stride inputs, return_weights/return_lse cotangents,
dropout with a fixed seed), additive_attention (bias, masks, key_lengths, causal, broadcast
keys), attention() with every method, score with every method, softmax and weighted_sum; the
public backward functions and their NumPy twins in attnext.reference, the same way.

Each check perturbs every entry of every float argument (small shapes), see hardening/gradcheck.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnext
from attnext import reference as ref
from hardening.gradcheck import check_gradient, check_vjp, loss, numeric_gradient, random_cotangent
from hardening.harness import layout

SDPA = attnext.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny calls: on one thread (results do not depend on the count; on a busy
    # machine waking a second thread per tiny call costs milliseconds).
    with attnext.threads(1):
        yield


def bool_mask(rng, shape, empty_row=True):
    """A bool mask (True = may attend) that leaves key 0 visible to every row except, when
    `empty_row`, the first row of every batch entry (a row with nothing to attend; no batch
    entry is hidden entirely, so no MaskWarning)."""
    m = rng.random(shape) < 0.6
    m[..., 0] = True
    if empty_row and len(shape) >= 2 and shape[-2] > 1:
        m[..., 0, :] = False
    return m


def float_mask(rng, shape, ninf=False):
    m = rng.standard_normal(shape)
    if ninf:
        m[rng.random(shape) < 0.3] = -np.inf
        m[..., 0] = 0.5  # key 0 visible to every row
    return m


def qkv(rng, batch=(2,), hq=2, hk=None, lq=5, lk=6, e=4, ev=3, kv_batch=None):
    hk = hq if hk is None else hk
    kb = batch if kv_batch is None else kv_batch
    return (rng.standard_normal(batch + (hq, lq, e)), rng.standard_normal(kb + (hk, lk, e)),
            rng.standard_normal(kb + (hk, lk, ev)))


# --- scaled_dot_product_attention through attnext.vjp ---------------------------------------

def _sdpa_case(name, rng):
    """(args, kwargs) of one SDPA option; float64."""
    q, k, v = qkv(rng)
    full = (2, 2, 5, 6)
    cases = {
        "plain": lambda: ((q, k, v), {}),
        "ev_equals_e": lambda: (qkv(rng, ev=4), {}),
        "one_by_one": lambda: (qkv(rng, lq=1, lk=1, e=1, ev=1), {}),
        "scale": lambda: ((q, k, v), dict(scale=0.7)),
        "scale_positional": lambda: ((q, k, v, None, 0.0, False, 1.9), {}),
        "no_batch_3d": lambda: (tuple(a[0] for a in (q, k, v)), {}),
        "bool_mask": lambda: ((q, k, v, bool_mask(rng, full)), {}),
        "bool_mask_broadcast": lambda: ((q, k, v, bool_mask(rng, (5, 6))), {}),
        "bool_mask_keyword": lambda: ((q, k, v), dict(attn_mask=bool_mask(rng, (2, 1, 5, 6)))),
        "float_mask_positional": lambda: ((q, k, v, float_mask(rng, full)), {}),
        "float_mask_broadcast_rows": lambda: ((q, k, v, float_mask(rng, (5, 6))), {}),
        "float_mask_broadcast_heads": lambda: ((q, k, v, float_mask(rng, (2, 1, 1, 6))), {}),
        "float_mask_ninf": lambda: ((q, k, v, float_mask(rng, full, ninf=True)), {}),
        "float_mask_keyword": lambda: ((q, k, v), dict(attn_mask=float_mask(rng, (1, 2, 5, 6)))),
        "causal": lambda: ((q, k, v), dict(is_causal=True)),
        "causal_positional": lambda: ((q, k, v, None, 0.0, True), {}),
        "causal_more_queries": lambda: (qkv(rng, lq=7, lk=4), dict(is_causal=True)),
        "causal_bottom_right": lambda: (qkv(rng, lq=4, lk=7), dict(is_causal="bottom_right")),
        "causal_bottom_right_empty_rows": lambda: (qkv(rng, lq=7, lk=4), dict(is_causal="bottom_right")),
        "window": lambda: ((q, k, v), dict(window=(1, 2))),
        "window_left_only": lambda: ((q, k, v), dict(window=(1, None))),
        "window_causal": lambda: ((q, k, v), dict(window=(2, None), is_causal=True)),
        "key_lengths": lambda: ((q, k, v), dict(key_lengths=np.array([4, 0]))),
        "key_lengths_scalar": lambda: ((q, k, v), dict(key_lengths=3)),
        "key_lengths_and_float_mask": lambda: ((q, k, v, float_mask(rng, full)), dict(key_lengths=np.array([2, 6]))),
        "gqa": lambda: (qkv(rng, hq=4, hk=2), dict(enable_gqa=True)),
        "gqa_one_kv_head": lambda: (qkv(rng, hq=3, hk=1), dict(enable_gqa=True)),
        "gqa_float_mask": lambda: (qkv(rng, hq=4, hk=2) + (float_mask(rng, (2, 4, 5, 6)),),
                                   dict(enable_gqa=True, is_causal=True)),
        "broadcast_kv_batch": lambda: (qkv(rng, kv_batch=(1,)), {}),
        "broadcast_kv_no_batch": lambda: (qkv(rng, kv_batch=()), {}),
        "broadcast_query_batch": lambda: ((q[:1], k, v), {}),
        "two_batch_axes_broadcast": lambda: (qkv(rng, batch=(2, 1), kv_batch=(1, 3)), dict(is_causal=True)),
        "dropout": lambda: ((q, k, v), dict(dropout_p=0.3, seed=12345)),
        "dropout_positional": lambda: ((q, k, v, None, 0.5), dict(seed=7)),
        "dropout_mask_causal": lambda: ((q, k, v, float_mask(rng, full)), dict(dropout_p=0.2, seed=2**63 + 5,
                                                                             is_causal=True)),
        "dropout_gqa": lambda: (qkv(rng, hq=4, hk=2), dict(enable_gqa=True, dropout_p=0.4, seed=99)),
        "dropout_broadcast": lambda: (qkv(rng, kv_batch=(1,)), dict(dropout_p=0.25, seed=3)),
    }
    return cases[name]()


SDPA_CASES = ["plain", "ev_equals_e", "one_by_one", "scale", "scale_positional", "no_batch_3d", "bool_mask",
              "bool_mask_broadcast", "bool_mask_keyword", "float_mask_positional", "float_mask_broadcast_rows",
              "float_mask_broadcast_heads", "float_mask_ninf", "float_mask_keyword", "causal", "causal_positional",
              "causal_more_queries", "causal_bottom_right", "causal_bottom_right_empty_rows", "window",
              "window_left_only", "window_causal", "key_lengths", "key_lengths_scalar", "key_lengths_and_float_mask",
              "gqa", "gqa_one_kv_head", "gqa_float_mask", "broadcast_kv_batch", "broadcast_kv_no_batch",
              "broadcast_query_batch", "two_batch_axes_broadcast", "dropout", "dropout_positional",
              "dropout_mask_causal", "dropout_gqa", "dropout_broadcast"]


@pytest.mark.parametrize("name", SDPA_CASES)
def test_sdpa_vjp(name, rng):
    args, kwargs = _sdpa_case(name, rng)
    check_vjp(attnext.vjp, SDPA, args, kwargs, rng)


@pytest.mark.parametrize("outputs", ["weights", "lse", "weights_and_lse", "weights_only_cotangent",
                                     "lse_only_cotangent"])
@pytest.mark.parametrize("extra", [{}, dict(is_causal="bottom_right", key_lengths=np.array([5, 3])),
                                   dict(dropout_p=0.3, seed=11)], ids=["plain", "masked", "dropout"])
def test_sdpa_vjp_extra_output_cotangents(outputs, extra, rng):
    q, k, v = qkv(rng, lq=6, lk=5)
    m = float_mask(rng, (2, 2, 6, 5))
    kw = dict(extra, return_weights="weights" in outputs, return_lse="lse" in outputs)
    out = SDPA(q, k, v, m, **kw)
    ct = list(random_cotangent(out, rng))
    if outputs.endswith("only_cotangent"):
        ct[0] = None  # the output itself not differentiated
    check_vjp(attnext.vjp, SDPA, (q, k, v, m), kw, rng, cotangent=tuple(ct))


@pytest.mark.parametrize("kind", ["F", "strided", "negative"])
def test_sdpa_vjp_layouts(kind, rng):
    q, k, v = qkv(rng, hq=4, hk=2)
    m = float_mask(rng, (2, 4, 5, 6))
    args = tuple(layout(a, kind) for a in (q, k, v, m))
    _, grads = check_vjp(attnext.vjp, SDPA, args, dict(enable_gqa=True, is_causal=True, window=(3, 1)), rng)
    # The same gradients as from C-ordered copies of the same values.
    _, pb = attnext.vjp(SDPA, q, k, v, m, enable_gqa=True, is_causal=True, window=(3, 1))
    ct = random_cotangent(SDPA(q, k, v, m, enable_gqa=True, is_causal=True, window=(3, 1)), np.random.default_rng(1))
    _, pb2 = attnext.vjp(SDPA, *args, enable_gqa=True, is_causal=True, window=(3, 1))
    for a, b in zip(pb(ct), pb2(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_sdpa_fully_hidden_rows_have_zero_gradients(rng):
    q, k, v = qkv(rng)
    m = bool_mask(rng, (2, 2, 5, 6))  # row 0 of every batch entry sees nothing
    out, pb = attnext.vjp(SDPA, q, k, v, m, key_lengths=np.array([6, 0]))
    dq, dk, dv, dm = pb(random_cotangent(out, rng))
    assert dm is None  # a bool mask has no gradient
    assert not dq[:, :, 0].any() and not dq[1].any()
    assert not dk[1].any() and not dv[1].any()  # batch 1: key_lengths 0 hides every key
    # Keys hidden from every row get exactly zero gradient.
    hidden_keys = ~m[0].any(axis=-2)  # (H, S)
    assert not dk[0][hidden_keys].any() and not dv[0][hidden_keys].any()


SHAPES = st.fixed_dictionaries(dict(batch=st.sampled_from([(), (1,), (2,), (2, 1)]), hk=st.integers(1, 2),
                                    group=st.integers(1, 2), lq=st.integers(1, 6), lk=st.integers(1, 6),
                                    e=st.integers(1, 5), ev=st.integers(1, 4)))


@given(shape=SHAPES, mask=st.sampled_from(["none", "bool", "float", "float_broadcast", "float_ninf"]),
       causal=st.sampled_from([False, True, "bottom_right"]), window=st.sampled_from([None, (1, 1), (0, None)]),
       lengths=st.booleans(), dropout=st.sampled_from([0.0, 0.0, 0.3]),
       extra=st.sampled_from(["", "weights", "lse"]), seed=st.integers(0, 2**32))
def test_sdpa_vjp_drawn(shape, mask, causal, window, lengths, dropout, extra, seed):
    rng = np.random.default_rng(seed)
    hk, hq = shape["hk"], shape["hk"] * shape["group"]
    batch = shape["batch"]
    q, k, v = qkv(rng, batch=batch, hq=hq, hk=hk, lq=shape["lq"], lk=shape["lk"], e=shape["e"], ev=shape["ev"])
    scores = batch + (hq, shape["lq"], shape["lk"])
    args = [q, k, v]
    if mask == "bool":
        args.append(bool_mask(rng, scores, empty_row=False))
    elif mask.startswith("float"):
        args.append(float_mask(rng, scores[-2:] if mask == "float_broadcast" else scores, ninf=mask == "float_ninf"))
    kw = dict(is_causal=causal, window=window, enable_gqa=shape["group"] > 1)
    if lengths:
        kw["key_lengths"] = rng.integers(0, shape["lk"] + 1, size=batch)
    if dropout:
        kw.update(dropout_p=dropout, seed=int(rng.integers(0, 2**63)))
    if extra:
        kw["return_" + extra] = True
    check_vjp(attnext.vjp, SDPA, tuple(args), kw, rng)


# --- the public SDPA backward function and its NumPy twin -----------------------------------

SDPA_BACKWARD_OPTIONS = {
    "plain": {},
    "float_mask": dict(mask="float"),
    "bool_mask": dict(mask="bool"),
    "causal_bottom_right": dict(is_causal="bottom_right"),
    "window_key_lengths": dict(window=(1, 1), key_lengths=np.array([5, 2])),
    "gqa": dict(gqa=True),
    "dropout": dict(dropout_p=0.3, seed=1234),
    "grad_weights": dict(grad_weights=True, mask="float"),
    "grad_weights_dropout": dict(grad_weights=True, dropout_p=0.5, seed=77),
}


def _sdpa_backward_inputs(opts, rng):
    opts = dict(opts)
    gqa = opts.pop("gqa", False)
    q, k, v = qkv(rng, hq=4 if gqa else 2, hk=2)
    mask = opts.pop("mask", None)
    scores = q.shape[:-1] + (k.shape[-2],)
    attn_mask = bool_mask(rng, scores) if mask == "bool" else float_mask(rng, scores) if mask else None
    want_gw = opts.pop("grad_weights", False)
    fw = dict(attn_mask=attn_mask, enable_gqa=gqa, **opts)
    out, w, lse = SDPA(q, k, v, return_weights=True, return_lse=True, **fw)
    g = rng.standard_normal(out.shape)
    gw = rng.standard_normal(w.shape) if want_gw else None
    return (q, k, v), fw, out, lse, g, gw


@pytest.mark.parametrize("module", [attnext, ref], ids=["attnext", "reference"])
@pytest.mark.parametrize("name", SDPA_BACKWARD_OPTIONS)
def test_sdpa_backward_function(module, name, rng):
    (q, k, v), fw, out, lse, g, gw = _sdpa_backward_inputs(SDPA_BACKWARD_OPTIONS[name], rng)
    fwd = module.scaled_dot_product_attention
    if module is ref:  # the twin's own forward, so the twin is checked on its own
        out, lse = fwd(q, k, v, return_lse=True, **fw)
    dq, dk, dv, dm = module.scaled_dot_product_attention_backward(g, q, k, v, out, lse, grad_weights=gw, **fw)
    ct = (g, gw) if gw is not None else g
    outs = dict(return_weights=gw is not None)
    for x, grad, what in ((q, dq, "dquery"), (k, dk, "dkey"), (v, dv, "dvalue")):
        check_gradient(what, grad, x, numeric_gradient(lambda: fwd(q, k, v, **outs, **fw), x, ct))
    m = fw["attn_mask"]
    if m is not None and m.dtype != np.bool_:
        check_gradient("dattn_mask", dm, m, numeric_gradient(lambda: fwd(q, k, v, **outs, **fw), m, ct))
    else:
        assert dm is None


# --- additive attention ---------------------------------------------------------------------

def _additive(rng, batch=(2,), lq=4, lk=5, dq=3, dk=4, units=6, dv=3, key_batch=None, scale=1.0):
    kb = batch if key_batch is None else key_batch
    return (rng.standard_normal(batch + (lq, dq)) * scale, rng.standard_normal(kb + (lk, dk)) * scale,
            rng.standard_normal(kb + (lk, dv)), rng.standard_normal((dq, units)) / math.sqrt(dq),
            rng.standard_normal((dk, units)) / math.sqrt(dk), rng.standard_normal(units))


ADDITIVE_CASES = {
    "plain": ({}, {}),
    "bias": ({}, dict(bias=True)),
    "bool_mask": ({}, dict(mask="bool")),
    "float_mask": ({}, dict(mask="float")),
    "float_mask_broadcast": ({}, dict(mask="float_broadcast", bias=True)),
    "key_lengths": ({}, dict(key_lengths=np.array([3, 0]))),
    "causal": ({}, dict(is_causal=True)),
    "bottom_right_window": (dict(lq=6, lk=4), dict(is_causal="bottom_right", window=(1, None))),
    "broadcast_keys": (dict(key_batch=()), dict(bias=True)),
    "broadcast_keys_batch1": (dict(key_batch=(1,)), dict(mask="float")),
    "saturated_tanh": (dict(scale=6.0), dict(bias=True)),  # pre-activations far into tanh's flat tails
    "no_batch": (dict(batch=()), {}),
    "return_weights": ({}, dict(return_weights=True, mask="float")),
}


def _additive_kwargs(rng, opts, lq, lk, batch):
    kw = dict(opts)
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal(6)
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = bool_mask(rng, batch + (lq, lk))
    elif mask == "float":
        kw["attn_mask"] = float_mask(rng, batch + (lq, lk))
    elif mask == "float_broadcast":
        kw["attn_mask"] = float_mask(rng, (lq, lk))
    return kw


@pytest.mark.parametrize("name", ADDITIVE_CASES)
def test_additive_vjp(name, rng):
    shape, opts = ADDITIVE_CASES[name]
    args = _additive(rng, **shape)
    kw = _additive_kwargs(rng, opts, shape.get("lq", 4), shape.get("lk", 5), shape.get("batch", (2,)))
    check_vjp(attnext.vjp, attnext.additive_attention, args, kw, rng)


@pytest.mark.parametrize("kind", ["F", "strided", "negative"])
def test_additive_vjp_layouts(kind, rng):
    args = tuple(layout(a, kind) for a in _additive(rng))
    check_vjp(attnext.vjp, attnext.additive_attention, args,
              dict(bias=rng.standard_normal(6), attn_mask=layout(float_mask(rng, (2, 4, 5)), kind)), rng)


def additive_lse(q, k, w_query, w_key, v, bias=None, attn_mask=None, key_lengths=None, is_causal=False, window=None):
    """The additive forward's log-sum-exp per query row, from the textbook formula (-inf for a
    row with no visible key)."""
    q_proj = q @ w_query + (0 if bias is None else bias)
    e = np.tanh(q_proj[..., :, None, :] + (k @ w_key)[..., None, :, :]) @ v
    hidden = np.zeros(e.shape, bool)
    if attn_mask is not None:
        hidden |= ~attn_mask if attn_mask.dtype == np.bool_ else attn_mask == -np.inf
        if attn_mask.dtype != np.bool_:
            e = e + attn_mask
    if key_lengths is not None:
        hidden |= np.arange(e.shape[-1]) >= np.asarray(key_lengths)[..., None, None]
    if is_causal or window is not None:
        hidden |= ref.dense_mask(e.shape[-2], e.shape[-1], is_causal=is_causal, window=window) == -np.inf
    e = np.where(hidden, -np.inf, e)
    top = np.max(e, axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(e - top), axis=-1)) + top[..., 0]


@pytest.mark.parametrize("module", [attnext, ref], ids=["attnext", "reference"])
@pytest.mark.parametrize("name", ["plain", "bias", "float_mask", "key_lengths", "bottom_right_window",
                                  "return_weights"])
def test_additive_backward_function(module, name, rng):
    shape, opts = ADDITIVE_CASES[name]
    q, k, val, wq, wk, v = args = _additive(rng, **shape)
    kw = _additive_kwargs(rng, opts, shape.get("lq", 4), shape.get("lk", 5), shape.get("batch", (2,)))
    want_gw = kw.pop("return_weights", False)
    fwd = module.additive_attention
    out, w = fwd(*args, return_weights=True, **kw)
    lse = additive_lse(q, k, wq, wk, v, **kw)
    g = rng.standard_normal(out.shape)
    gw = rng.standard_normal(w.shape) if want_gw else None
    grads = module.additive_attention_backward(g, q, k, val, wq, wk, v, out, lse, grad_weights=gw, **kw)
    ct = (g, gw) if want_gw else g
    named = dict(query=q, key=k, value=val, w_query=wq, w_key=wk, v=v)
    for name_, x in named.items():
        check_gradient(name_, grads[name_], x,
                       numeric_gradient(lambda: fwd(*args, return_weights=want_gw, **kw), x, ct))
    for name_ in ("bias", "attn_mask"):
        x = kw.get(name_)
        if x is not None and x.dtype != np.bool_:
            check_gradient(name_, grads[name_], x,
                           numeric_gradient(lambda: fwd(*args, return_weights=want_gw, **kw), x, ct))
        else:
            assert grads.get(name_) is None


# --- attention(), score, softmax, weighted_sum ---------------------------------------------

def _method_args(rng, method, dq=3, dk=3, units=4):
    if method == "general":
        return dict(weight=rng.standard_normal((dq, dk)))
    if method == "additive":
        return dict(w_query=rng.standard_normal((dq, units)), w_key=rng.standard_normal((dk, units)),
                    v=rng.standard_normal(units))
    return {}


METHODS = ["dot", "scaled_dot", "general", "additive"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opts", [{}, dict(mask="float"), dict(mask="bool", is_causal=True),
                                  dict(key_lengths=np.array([2, 5]), window=(1, 1)),
                                  dict(return_weights=True, is_causal="bottom_right"), dict(scale=0.6)],
                         ids=["plain", "float_mask", "bool_mask_causal", "lengths_window", "weights", "scale"])
def test_attention_vjp(method, opts, rng):
    opts = dict(opts)
    q, k, val = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 2))
    kw = dict(method=method, **_method_args(rng, method), **opts)
    mask = kw.pop("mask", None)
    if mask == "float":
        kw["attn_mask"] = float_mask(rng, (2, 4, 5))
    elif mask == "bool":
        kw["attn_mask"] = bool_mask(rng, (2, 4, 5))
    check_vjp(attnext.vjp, attnext.attention, (q, k, val), kw, rng)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [((2,), (2,)), ((2, 1), (3,)), ((), ())], ids=["same", "broadcast", "none"])
def test_score_vjp(method, batch, rng):
    q = rng.standard_normal(batch[0] + (4, 3))
    k = rng.standard_normal(batch[1] + (5, 3 if method in ("dot", "scaled_dot") else 2))
    check_vjp(attnext.vjp, attnext.score, (q, k, method), _method_args(rng, method, 3, k.shape[-1]), rng)


def test_score_vjp_scale(rng):
    q, k = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3))
    check_vjp(attnext.vjp, attnext.score, (q, k), dict(scale=0.3), rng)


@pytest.mark.parametrize("axis", [-1, -2, 0])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "float_ninf"])
def test_softmax_vjp(axis, mask, rng):
    x = rng.standard_normal((2, 4, 5)) * 2
    kw = dict(axis=axis)
    if mask == "bool":
        m = rng.random(x.shape) < 0.6
        m[0, 0] = m[1, :, 2] = True
        m[0, 1] = False  # an empty row (along axis -1)
        kw["mask"] = m
    elif mask != "none":
        kw["mask"] = float_mask(rng, x.shape[-2:], ninf=mask == "float_ninf")
    check_vjp(attnext.vjp, attnext.softmax, (x,), kw, rng)


@pytest.mark.parametrize("shapes", [((2, 4, 5), (2, 5, 3)), ((2, 1, 4, 5), (3, 5, 3)), ((4, 5), (2, 5, 3))],
                         ids=["same", "broadcast", "shared_weights"])
def test_weighted_sum_vjp(shapes, rng):
    w, val = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    check_vjp(attnext.vjp, attnext.weighted_sum, (w, val), {}, rng)


@pytest.mark.parametrize("module", [attnext, ref], ids=["attnext", "reference"])
def test_softmax_and_weighted_sum_backward_functions(module, rng):
    x = rng.standard_normal((2, 4, 5))
    for axis in (-1, -2):
        w = module.softmax(x, axis=axis)
        g = rng.standard_normal(w.shape)
        check_gradient(f"softmax_backward axis {axis}", module.softmax_backward(g, w, axis=axis), x,
                       numeric_gradient(lambda: module.softmax(x, axis=axis), x, g))
    w, val = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 5, 3))
    g = rng.standard_normal((2, 4, 3))
    dw, dval = module.weighted_sum_backward(g, w, val)
    check_gradient("dweights", dw, w, numeric_gradient(lambda: module.weighted_sum(w, val), w, g))
    check_gradient("dvalue", dval, val, numeric_gradient(lambda: module.weighted_sum(w, val), val, g))


@pytest.mark.parametrize("module", [attnext, ref], ids=["attnext", "reference"])
@pytest.mark.parametrize("method", METHODS)
def test_score_backward_function(module, method, rng):
    q = rng.standard_normal((2, 4, 3))
    k = rng.standard_normal((2, 5, 3 if method in ("dot", "scaled_dot") else 2))
    params = _method_args(rng, method, 3, k.shape[-1])
    g = rng.standard_normal((2, 4, 5))
    grads = module.score_backward(g, q, k, method, **params)
    for name, x in dict(query=q, key=k, **params).items():
        check_gradient(name, grads[name], x,
                       numeric_gradient(lambda: module.score(q, k, method, **params), x, g))


@pytest.mark.parametrize("module", [attnext, ref], ids=["attnext", "reference"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward_function(module, bias, rng):
    x, weight = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    b = rng.standard_normal(5) if bias else None

    def linear():
        return x @ weight.T + (0 if b is None else b)

    g = rng.standard_normal((2, 3, 5))
    dx, dw, db = module.linear_backward(g, x, weight, b)
    check_gradient("dx", dx, x, numeric_gradient(linear, x, g))
    check_gradient("dweight", dw, weight, numeric_gradient(linear, weight, g))
    if bias:
        check_gradient("dbias", db, b, numeric_gradient(linear, b, g))
    else:
        assert db is None


# --- the tolerance is tight enough to catch a wrong gradient --------------------------------

def test_finite_differences_catch_a_wrong_gradient(rng):
    # A gradient off by 1e-5 relative in one entry fails the 1e-6 check; the exact one passes.
    q, k, v = qkv(rng)
    out, pb = attnext.vjp(SDPA, q, k, v)
    g = random_cotangent(out, rng)
    dq = pb(g)[0]
    numeric = numeric_gradient(lambda: SDPA(q, k, v), q, g)
    check_gradient("dq", dq, q, numeric)
    bad = dq.copy()
    bad.flat[7] += 1e-5 * np.abs(dq).max()
    with pytest.raises(AssertionError, match="relative error"):
        check_gradient("dq", bad, q, numeric)
    assert abs(loss(out, g)) > 0


def test_additive_vjp_projected_keys(rng):
    # A ProjectedKeys key gets the memory-shaped gradient d(key W_k) (..., Lk, U); through
    # project_keys it gives key's and w_key's gradients by the chain rule.
    q, k, val, wq, wk, v = _additive(rng)
    b = rng.standard_normal(6)
    m = float_mask(rng, (2, 4, 5))

    def f():
        return attnext.additive_attention(q, attnext.project_keys(k, wk), val, wq, None, v, bias=b, attn_mask=m)

    out, pb = attnext.vjp(attnext.additive_attention, q, attnext.project_keys(k, wk), val, wq, None, v, bias=b,
                          attn_mask=m)
    ct = random_cotangent(out, rng)
    grads = pb(ct)
    dproj = grads[1]
    assert dproj.shape == (2, 5, 6) and grads[4] is None
    check_gradient("key through project_keys", dproj @ wk.T, k, numeric_gradient(f, k, ct))
    check_gradient("w_key through project_keys", np.einsum("bki,bku->iu", k, dproj), wk, numeric_gradient(f, wk, ct))
    for i, x in ((0, q), (2, val), (3, wq), (5, v)):
        check_gradient(f"argument {i}", grads[i], x, numeric_gradient(f, x, ct))
    check_gradient("bias", grads["bias"], b, numeric_gradient(f, b, ct))
    check_gradient("attn_mask", grads["attn_mask"], m, numeric_gradient(f, m, ct))
    # The same through the public backward function.
    direct = attnext.additive_attention_backward(ct, q, attnext.project_keys(k, wk), val, wq, None, v, out, None,
                                                 bias=b, attn_mask=m)
    np.testing.assert_allclose(direct["key"], dproj, rtol=1e-12, atol=1e-14)
