"""The fused additive (Bahdanau) attention backward (_core.additive_attention_backward and
_core.additive_attention_keys_backward) and the linear backward (_core.linear_backward), against
a NumPy backward of the usual formula written here, float64 central finite differences of
attnext.additive_attention, and torch autograd of the usual formula."""

import numpy as np
import pytest

import attnext
from attnext import _core

DTYPES = (np.float32, np.float64)
# Gradients against the float64 formula: float32 accumulates over Lk x U terms.
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make(rng, dtype, batch=(2,), lq=5, lk=7, dq=4, dk=3, units=6, dv=3, scale=1.0):
    f = lambda *s: rng.standard_normal(s)
    return dict(q=f(*batch, lq, dq).astype(dtype), k=f(*batch, lk, dk).astype(dtype),
                val=f(*batch, lk, dv).astype(dtype), wq=(scale * f(dq, units) / np.sqrt(dq)).astype(dtype),
                wk=(scale * f(dk, units) / np.sqrt(dk)).astype(dtype), v=f(units).astype(dtype))


def hidden_keys(batch, lq, lk, mask, lengths):
    """Bool (batch, Lq, Lk): True where a key is hidden (False mask entry, -inf, beyond the length)."""
    hide = np.zeros(batch + (lq, lk), bool)
    if mask is not None:
        m = np.broadcast_to(mask, batch + (lq, lk))
        hide |= ~m if m.dtype == bool else np.isneginf(m)
    if lengths is not None:
        hide |= np.arange(lk) >= np.asarray(lengths)[..., None, None]
    return hide


def ref_forward_backward(a, go, bias=None, mask=None, lengths=None, gw=None):
    """The usual formula in float64, with the (..., Lq, Lk, U) tensor, and its backward."""
    q, k, val, wq, wk, v = (np.asarray(a[n], np.float64) for n in ("q", "k", "val", "wq", "wk", "v"))
    qp = q @ wq + (0 if bias is None else np.asarray(bias, np.float64))
    kp = k @ wk
    t = np.tanh(qp[..., :, None, :] + kp[..., None, :, :])
    s = t @ v
    if mask is not None and np.asarray(mask).dtype != bool:
        s = s + np.where(np.isneginf(mask), 0, mask)
    hide = hidden_keys(q.shape[:-2], q.shape[-2], k.shape[-2], mask, lengths)
    s = np.where(hide, -np.inf, s)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(hide, 0.0, np.exp(s - np.where(np.isinf(m), 0, m)))
    tot = e.sum(-1, keepdims=True)
    p = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)
    out = p @ val
    go = np.asarray(go, np.float64)
    dval = np.swapaxes(p, -1, -2) @ go
    dp = go @ np.swapaxes(val, -1, -2) + (0 if gw is None else np.asarray(gw, np.float64))
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    g = ds[..., None] * (1 - t * t) * v
    dqp, dkp = g.sum(-2), g.sum(-3)
    flat = lambda x: x.reshape(-1, x.shape[-1])
    grads = dict(query=dqp @ wq.T, w_query=flat(q).T @ flat(dqp), bias=flat(dqp).sum(0),
                 v=(ds[..., None] * t).reshape(-1, t.shape[-1]).sum(0), keys_raw=dkp, key=dkp @ wk.T,
                 w_key=flat(k).T @ flat(dkp), value=dval, mask=ds)
    return out, p, grads


def core_backward(a, go, bias=None, mask=None, lengths=None, gw=None, projected=False, mask_grad=False):
    """The kernel on arrays of one batch shape, as functional.additive_attention hands them over."""
    batch, lq, lk = a["q"].shape[:-2], a["q"].shape[-2], a["k"].shape[-2]
    m = None if mask is None else np.broadcast_to(mask, batch + (lq, lk))
    kl = None if lengths is None else np.broadcast_to(np.asarray(lengths, np.int64), batch)
    if projected:
        raw, expo, ok = _core.additive_keys(a["k"], a["wk"])
        return _core.additive_attention_backward(a["q"], a["wq"], bias, raw, expo, ok, a["val"], a["v"], m, kl, go,
                                                 gw, mask_grad)
    return _core.additive_attention_keys_backward(a["q"], a["wq"], bias, a["k"], a["wk"], a["val"], a["v"], m, kl,
                                                  go, gw, mask_grad)


def check_against_reference(a, dtype, bias=None, mask=None, lengths=None, gw=None, projected=False, seed=0, tol=None):
    rng = np.random.default_rng(seed)
    go = rng.standard_normal(a["q"].shape[:-1] + (a["val"].shape[-1],)).astype(dtype)
    got = core_backward(a, go, bias, mask, lengths, gw, projected, mask_grad=True)
    _, _, want = ref_forward_backward(a, go, bias, mask, lengths, gw)
    names = ["query", "w_query", "v", "keys_raw", "value", "mask"] + ([] if projected else ["key", "w_key"])
    names += [] if bias is None else ["bias"]
    for name in names:
        assert got[name].dtype == dtype and got[name].shape == want[name].shape, name
        assert rel(got[name], want[name]) <= (tol or TOL[dtype]), name
    assert (got["bias"] is None) == (bias is None)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1, 1, 1, 1), (5, 7, 4, 3, 6, 3, 2), (3, 17, 5, 9, 19, 1, 1),
                                   (70, 33, 8, 5, 32, 7, 1), (150, 20, 3, 4, 16, 2, 1), (4, 40, 40, 33, 70, 130, 2)])
def test_matches_reference_backward(dtype, sizes):
    lq, lk, dq, dk, units, dv, b = sizes
    a = make(np.random.default_rng(1), dtype, batch=(b,), lq=lq, lk=lk, dq=dq, dk=dk, units=units, dv=dv)
    check_against_reference(a, dtype)
    check_against_reference(a, dtype, projected=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_masks_lengths_and_weights_cotangent(dtype):
    rng = np.random.default_rng(2)
    a = make(rng, dtype, batch=(3,), lq=6, lk=11, units=9)
    bias = rng.standard_normal(9).astype(dtype)
    bool_mask = rng.random((3, 6, 11)) < 0.7
    float_mask = np.where(rng.random((6, 11)) < 0.3, -np.inf, rng.standard_normal((6, 11))).astype(dtype)
    lengths = np.array([11, 4, 1])
    gw = rng.standard_normal((3, 6, 11)).astype(dtype)
    for kwargs in [dict(bias=bias), dict(mask=bool_mask), dict(mask=float_mask), dict(lengths=lengths),
                   dict(bias=bias, mask=bool_mask, lengths=lengths), dict(mask=float_mask, lengths=[3, 3, 3]),
                   dict(mask=bool_mask[:, :1, :]), dict(gw=gw), dict(gw=gw, mask=float_mask, lengths=lengths, bias=bias)]:
        check_against_reference(a, dtype, **kwargs)
        check_against_reference(a, dtype, projected=True, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_keys_and_empty_rows_get_zero_gradients(dtype):
    rng = np.random.default_rng(3)
    a = make(rng, dtype, batch=(2,), lq=4, lk=6)
    mask = np.ones((2, 4, 6), bool)
    mask[0, 1] = False          # a row that sees nothing
    mask[:, :, 2] = False       # a key nobody sees
    a["val"][:, 2] = np.nan     # ...whose value row must not leak
    lengths = np.array([6, 0])  # batch entry 1 sees nothing
    go = rng.standard_normal((2, 4, 3)).astype(dtype)
    g = core_backward(a, go, mask=mask, lengths=lengths, mask_grad=True)
    assert np.all(g["query"][0, 1] == 0) and np.all(g["query"][1] == 0)
    assert np.all(g["keys_raw"][:, 2] == 0) and np.all(g["key"][:, 2] == 0) and np.all(g["value"][:, 2] == 0)
    assert np.all(g["keys_raw"][1] == 0) and np.all(g["value"][1] == 0)
    assert np.all(g["mask"][0, 1] == 0) and np.all(g["mask"][:, :, 2] == 0) and np.all(g["mask"][1] == 0)
    for name in ("query", "w_query", "v", "keys_raw", "value", "key", "w_key"):
        assert np.all(np.isfinite(g[name])), name
    a["val"][:, 2] = 0
    _, _, want = ref_forward_backward(a, go, mask=mask, lengths=lengths)
    for name in ("query", "w_query", "v", "keys_raw", "value", "key", "w_key"):
        assert rel(g[name], want[name]) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_batch_views_give_full_size_gradients(dtype):
    rng = np.random.default_rng(4)
    a = make(rng, dtype, batch=(1, 3), lq=5, lk=8)
    full = dict(a)
    full["q"] = np.broadcast_to(a["q"], (2, 3, 5, 4))  # stride 0 on the first axis
    full["k"] = np.broadcast_to(a["k"], (2, 3, 8, 3))
    full["val"] = np.broadcast_to(a["val"], (2, 3, 8, 3))
    got = check_against_reference(full, dtype, mask=rng.random((5, 8)) < 0.8)
    assert got["query"].shape == (2, 3, 5, 4) and got["query"].flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    rng = np.random.default_rng(5)
    a = make(rng, dtype, batch=(2,), lq=9, lk=7, dq=4, dk=3)
    strided = {n: (np.asfortranarray(x) if x.ndim == 2 else x) for n, x in a.items()}
    strided["q"] = np.ascontiguousarray(np.swapaxes(a["q"], 0, 1)).swapaxes(0, 1)
    strided["k"] = np.repeat(a["k"], 2, axis=-1)[..., ::2]
    go = np.repeat(rng.standard_normal((2, 9, 3)).astype(dtype), 2, axis=-1)[..., ::2]
    got = core_backward(strided, go)
    want = core_backward(a, np.ascontiguousarray(go))
    for name in ("query", "w_query", "v", "keys_raw", "value", "key", "w_key"):
        assert rel(got[name], want[name]) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_projected_and_raw_keys_give_the_same_bits(dtype):
    rng = np.random.default_rng(6)
    a = make(rng, dtype, batch=(3,), lq=40, lk=45, units=20)
    go = rng.standard_normal((3, 40, 3)).astype(dtype)
    raw_path = core_backward(a, go)
    projected = core_backward(a, go, projected=True)
    assert set(projected) == {"query", "w_query", "bias", "v", "keys_raw", "value", "mask"}
    for name in projected:
        if projected[name] is not None:
            assert np.array_equal(projected[name], raw_path[name]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_weights_give_the_same_bits(dtype):
    rng = np.random.default_rng(15)
    a = make(rng, dtype, batch=(2,), lq=70, lk=9, units=11)
    mask = rng.random((2, 70, 9)) < 0.8
    lengths = np.array([9, 5])
    go = rng.standard_normal((2, 70, 3)).astype(dtype)
    _, w = _core.additive_attention_keys(a["q"], a["wq"], None, a["k"], a["wk"], a["val"], a["v"], mask, lengths,
                                         True)
    recomputed = core_backward(a, go, mask=mask, lengths=lengths)
    kl = lengths.astype(np.int64)
    saved = _core.additive_attention_keys_backward(a["q"], a["wq"], None, a["k"], a["wk"], a["val"], a["v"], mask,
                                                   kl, go, weights=np.asfortranarray(w))
    for name, x in recomputed.items():
        if x is not None:
            assert np.array_equal(x, saved[name]), name
    with pytest.raises(ValueError, match="weights has shape"):
        _core.additive_attention_keys_backward(a["q"], a["wq"], None, a["k"], a["wk"], a["val"], a["v"], mask, kl,
                                               go, weights=w[:, :5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_projections_use_plain_tanh(dtype):
    """Projections beyond the factored form's range (and a mix within one call) still give the formula's gradients."""
    rng = np.random.default_rng(7)
    limit = _core.additive_exp_form_limit[np.dtype(dtype).name]
    a = make(rng, dtype, batch=(2,), lq=6, lk=5, units=7)
    a["q"][0, 2] *= 3 * limit   # one row out of range: plain form for that row only
    a["k"][1] *= 3 * limit      # one batch entry's keys out of range
    # float32's tanh (Eigen's rational form) is a few ulp; the 60x inputs magnify it in the weight gradients
    tol = 1e-4 if dtype == np.float32 else None
    check_against_reference(a, dtype, tol=tol)
    check_against_reference(a, dtype, projected=True, tol=tol)


def loss(a, go, gw, **kw):
    out, w = attnext.additive_attention(a["q"], a["k"], a["val"], a["wq"], a["wk"], a["v"], return_weights=True,
                                        **kw)
    return float(np.sum(out * go) + (0.0 if gw is None else np.sum(w * gw)))


@pytest.mark.parametrize("case", ["plain", "bias_mask_lengths", "weights_cotangent"])
def test_central_finite_differences(case):
    """Directional derivatives along random directions, float64, relative error <= 1e-6."""
    rng = np.random.default_rng(8)
    a = make(rng, np.float64, batch=(2,), lq=5, lk=6, units=5)
    go = rng.standard_normal((2, 5, 3))
    bias = rng.standard_normal(5) if case != "plain" else None
    fmask = np.where(rng.random((2, 5, 6)) < 0.2, -np.inf, 0.3 * rng.standard_normal((2, 5, 6)))
    mask = fmask if case == "bias_mask_lengths" else None
    lengths = np.array([6, 4]) if case == "bias_mask_lengths" else None
    gw = rng.standard_normal((2, 5, 6)) if case == "weights_cotangent" else None
    g = core_backward(a, go, bias, mask, lengths, gw, mask_grad=mask is not None)
    params = dict(a)
    names = {"q": "query", "k": "key", "val": "value", "wq": "w_query", "wk": "w_key", "v": "v"}
    if bias is not None:
        params["bias"], names["bias"] = bias, "bias"
    if mask is not None:
        params["mask"], names["mask"] = mask, "mask"

    def f(p):
        kw = dict(bias=p.get("bias"), attn_mask=p.get("mask"), key_lengths=lengths)
        return loss(p, go, gw, **kw)

    h = 1e-6
    for name, grad_name in names.items():
        direction = rng.standard_normal(params[name].shape)
        if name == "mask":
            direction = np.where(np.isneginf(mask), 0, direction)
        plus, minus = dict(params), dict(params)
        plus[name] = params[name] + h * direction
        minus[name] = params[name] - h * direction
        numeric = (f(plus) - f(minus)) / (2 * h)
        analytic = float(np.sum(g[grad_name] * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (name, numeric, analytic)


def test_matches_torch_autograd_of_the_usual_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    a = make(rng, np.float32, batch=(2,), lq=9, lk=13, dq=8, dk=6, units=16, dv=5)
    bias = rng.standard_normal(16).astype(np.float32)
    mask = rng.random((2, 9, 13)) < 0.8
    mask[..., 0] = True
    go = rng.standard_normal((2, 9, 5)).astype(np.float32)
    t = {n: torch.tensor(x, requires_grad=True) for n, x in dict(a, bias=bias).items()}
    s = torch.tanh((t["q"] @ t["wq"] + t["bias"])[..., :, None, :] + (t["k"] @ t["wk"])[..., None, :, :]) @ t["v"]
    s = s.masked_fill(~torch.tensor(mask), float("-inf"))
    out = torch.softmax(s, dim=-1) @ t["val"]
    out.backward(torch.tensor(go))
    g = core_backward(a, go, bias, mask)
    for name, ours in [("q", "query"), ("k", "key"), ("val", "value"), ("wq", "w_query"), ("wk", "w_key"),
                       ("v", "v"), ("bias", "bias")]:
        assert rel(g[ours], t[name].grad.numpy()) <= 1e-5, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_for_any_thread_count(dtype):
    rng = np.random.default_rng(10)
    a = make(rng, dtype, batch=(3,), lq=150, lk=70, units=21, dv=5)
    go = rng.standard_normal((3, 150, 5)).astype(dtype)
    mask = rng.random((3, 150, 70)) < 0.9
    before = attnext.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            attnext.set_num_threads(n)
            results.append(core_backward(a, go, mask=mask, lengths=np.array([70, 33, 1]), mask_grad=True))
    finally:
        attnext.set_num_threads(before)
    for other in results[1:]:
        for name, x in results[0].items():
            if x is not None:
                assert np.array_equal(x, other[name]), name


def test_argument_errors():
    rng = np.random.default_rng(11)
    a = make(rng, np.float64)
    go = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="grad_out has shape"):
        core_backward(a, go[:, :4])
    with pytest.raises(TypeError, match="grad_out has dtype"):
        core_backward(a, go.astype(np.float32))
    with pytest.raises(ValueError, match="grad_weights has shape"):
        core_backward(a, go, gw=np.zeros((2, 5, 6)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys_and_no_queries(dtype):
    rng = np.random.default_rng(12)
    a = make(rng, dtype, lq=3, lk=0)
    g = core_backward(a, np.ones((2, 3, 3), dtype), mask_grad=True)
    assert np.all(g["query"] == 0) and np.all(g["w_query"] == 0) and np.all(g["w_key"] == 0) and np.all(g["v"] == 0)
    a = make(rng, dtype, lq=0, lk=4)
    g = core_backward(a, np.ones((2, 0, 3), dtype))
    assert np.all(g["value"] == 0) and np.all(g["key"] == 0) and np.all(g["w_query"] == 0)


# --- linear backward ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 1, 5, 4), (2, 40, 2, 3, 70), (1, 1, 1, 1, 1), (3, 17, 4, 8, 33)])
@pytest.mark.parametrize("layout", ["C", "heads_view", "F_weight"])
def test_linear_backward_matches_numpy(dtype, shape, layout):
    b, length, heads, d, out = shape
    rng = np.random.default_rng(13)
    x = rng.standard_normal((b, length, heads, d)).astype(dtype)
    if layout == "heads_view":  # a (B, H, L, D) array read as (B, L, H, D), as the attention output is
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    w = rng.standard_normal((out, heads * d)).astype(dtype)
    if layout == "F_weight":
        w = np.asfortranarray(w)
    grad = rng.standard_normal((b, length, out)).astype(dtype)
    dx, dw, db = _core.linear_backward(grad, x, w, True)
    x2 = np.asarray(x, np.float64).reshape(b * length, heads * d)
    g2 = np.asarray(grad, np.float64).reshape(-1, out)
    assert dx.shape == x.shape and dx.flags.c_contiguous and dw.shape == w.shape
    assert rel(dx.reshape(-1, heads * d), g2 @ w) <= TOL[dtype]
    assert rel(dw, g2.T @ x2) <= TOL[dtype]
    assert rel(db, g2.sum(0)) <= TOL[dtype]
    assert _core.linear_backward(grad, x, w, False)[2] is None
    y = _core.linear(x, w, None)
    assert rel(y.reshape(-1, out), x2 @ np.asarray(w, np.float64).T) <= TOL[dtype]


def test_linear_backward_same_bits_for_any_thread_count_and_errors():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 100, 1, 48)).astype(np.float32)
    w = rng.standard_normal((70, 48)).astype(np.float32)
    grad = rng.standard_normal((3, 100, 70)).astype(np.float32)
    before = attnext.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            attnext.set_num_threads(n)
            results.append(_core.linear_backward(grad, x, w, True))
    finally:
        attnext.set_num_threads(before)
    for other in results[1:]:
        for mine, theirs in zip(results[0], other):
            assert np.array_equal(mine, theirs)
    with pytest.raises(ValueError, match="grad has shape"):
        _core.linear_backward(grad[:, :, :5], x, w, True)
    with pytest.raises(ValueError, match="weight must be"):
        _core.linear_backward(grad, x, w[:, :5], True)
