"""Issue 15: float32 gradients against PyTorch autograd of the same forward (relative error
<= 1e-5, the project's float32 tolerance): torch's scaled_dot_product_attention backward (bool
and float masks, causal, GQA via enable_gqa, scale), autograd of the usual additive-attention
formula (the (..., Lq, Lk, U) tanh tensor), and torch.nn.MultiheadAttention (train mode,
dropout 0) against MultiHeadAttention.vjp, parameters included.

Shapes avoid rows with nothing to attend (PyTorch returns NaN there, attnext zeros).
"""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from hardening.harness import relative_error

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-5  # float32
SDPA = attnext.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny calls: on one thread (results do not depend on the count; on a busy
    # machine waking a second thread per tiny call costs milliseconds).
    with attnext.threads(1):
        yield


def t(a, grad=True):
    return torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def close(what, got, want):
    want = want.detach().numpy() if hasattr(want, "detach") else want
    assert got is not None, f"{what}: no gradient"
    assert got.shape == want.shape and got.dtype == np.float32, f"{what}: {got.shape} {got.dtype}"
    err = relative_error(got, want)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL:g} against torch autograd"


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- scaled dot-product attention --------------------------------------------------------------

SDPA_CASES = {
    "plain": {},
    "bool_mask": dict(mask="bool"),
    "float_mask": dict(mask="float"),
    "float_mask_broadcast": dict(mask="float_rows"),
    "causal": dict(is_causal=True),
    "scale": dict(scale=0.37),
    "gqa": dict(gqa=True),
    "gqa_causal_mask": dict(gqa=True, is_causal=True, mask="float"),
    "long": dict(lq=140, lk=150),  # several 64-row blocks
}


def _sdpa_inputs(rng, opts):
    opts = dict(opts)
    hq, hk = (6, 2) if opts.pop("gqa", False) else (3, 3)
    lq, lk = opts.pop("lq", 17), opts.pop("lk", 23)
    q, k, v = randn(rng, 2, hq, lq, 8), randn(rng, 2, hk, lk, 8), randn(rng, 2, hk, lk, 6)
    mask = opts.pop("mask", None)
    m = None
    if mask == "bool":
        m = rng.random((2, hq, lq, lk)) < 0.6
        m[..., 0] = True
    elif mask == "float":
        m = randn(rng, 2, hq, lq, lk)
    elif mask == "float_rows":
        m = randn(rng, lq, lk)
    return q, k, v, m, hq != hk, opts


@pytest.mark.parametrize("name", SDPA_CASES)
def test_sdpa_gradients_match_torch(name, rng):
    q, k, v, m, gqa, opts = _sdpa_inputs(rng, SDPA_CASES[name])
    out, pb = attnext.vjp(SDPA, q, k, v, m, enable_gqa=gqa, **opts)
    g = randn(rng, *out.shape)
    dq, dk, dv, dm = pb(g)
    tq, tk, tv = t(q), t(k), t(v)
    tm = None if m is None else t(m, grad=m.dtype != np.bool_)
    topts = dict(opts)
    tmask = tm
    if tm is not None and topts.pop("is_causal", False):  # torch takes a mask or is_causal, not both
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        tmask = tm.masked_fill(~tril, float("-inf")) if tm.dtype != torch.bool else tm & tril
    tout = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, enable_gqa=gqa, **topts)
    close("output", out, tout)
    tout.backward(torch.tensor(g))
    close("dquery", dq, tq.grad)
    close("dkey", dk, tk.grad)
    close("dvalue", dv, tv.grad)
    if m is not None and m.dtype != np.bool_:
        close("dattn_mask", dm, tm.grad)


def test_sdpa_bottom_right_and_weights_cotangent_match_torch_math(rng):
    # causal "bottom_right" as torch's explicit lower-right mask; the weights differentiated too.
    q, k, v = randn(rng, 2, 3, 9, 8), randn(rng, 2, 3, 14, 8), randn(rng, 2, 3, 14, 5)
    m = randn(rng, 2, 3, 9, 14)
    (out, w), pb = attnext.vjp(SDPA, q, k, v, m, is_causal="bottom_right", return_weights=True)
    g, gw = randn(rng, *out.shape), randn(rng, *w.shape)
    dq, dk, dv, dm = pb((g, gw))
    tq, tk, tv, tm = t(q), t(k), t(v), t(m)
    keep = torch.ones(9, 14, dtype=torch.bool).tril(diagonal=14 - 9)
    s = (tq @ tk.transpose(-1, -2)) / np.sqrt(8) + tm
    tw = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    tout = tw @ tv
    close("output", out, tout)
    close("weights", w, tw)
    ((tout * torch.tensor(g)).sum() + (tw * torch.tensor(gw)).sum()).backward()
    for what, got, want in (("dquery", dq, tq.grad), ("dkey", dk, tk.grad), ("dvalue", dv, tv.grad),
                            ("dattn_mask", dm, tm.grad)):
        close(what, got, want)


def test_sdpa_backward_function_matches_torch(rng):
    q, k, v, m, _, _ = _sdpa_inputs(rng, dict(mask="float", lq=70, lk=90))
    out, lse = SDPA(q, k, v, m, is_causal=True, return_lse=True)
    g = randn(rng, *out.shape)
    dq, dk, dv, dm = attnext.scaled_dot_product_attention_backward(g, q, k, v, out, lse, m, is_causal=True)
    tq, tk, tv, tm = t(q), t(k), t(v), t(m)
    causal = torch.ones(70, 90, dtype=torch.bool).tril()
    F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm.masked_fill(~causal, float("-inf"))).backward(
        torch.tensor(g))
    for what, got, want in (("dquery", dq, tq.grad), ("dkey", dk, tk.grad), ("dvalue", dv, tv.grad),
                            ("dattn_mask", dm, tm.grad)):
        close(what, got, want)


# --- additive attention: the usual formula, autograd ---------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(bias=True), dict(mask="float", bias=True), dict(mask="bool"),
                                  dict(key_lengths=True)], ids=["plain", "bias", "float_mask", "bool_mask",
                                                                 "key_lengths"])
def test_additive_gradients_match_torch_usual_formula(opts, rng):
    b, lq, lk, dq, dk, units, dv = 3, 11, 13, 6, 5, 16, 4
    q, k, val = randn(rng, b, lq, dq), randn(rng, b, lk, dk), randn(rng, b, lk, dv)
    wq, wk, v = randn(rng, dq, units) * 0.4, randn(rng, dk, units) * 0.4, randn(rng, units)
    kw = {}
    if opts.get("bias"):
        kw["bias"] = randn(rng, units)
    if opts.get("mask") == "float":
        kw["attn_mask"] = randn(rng, b, lq, lk)
    elif opts.get("mask") == "bool":
        m = rng.random((b, lq, lk)) < 0.6
        m[..., 0] = True
        kw["attn_mask"] = m
    if opts.get("key_lengths"):
        kw["key_lengths"] = np.array([13, 1, 7])
    out, pb = attnext.vjp(attnext.additive_attention, q, k, val, wq, wk, v, **kw)
    g = randn(rng, *out.shape)
    grads = pb(g)
    tensors = [t(a) for a in (q, k, val, wq, wk, v)]
    tq, tk, tval, twq, twk, tv = tensors
    qp = tq @ twq
    tb = t(kw["bias"]) if "bias" in kw else None
    if tb is not None:
        qp = qp + tb
    e = torch.tanh(qp[:, :, None, :] + (tk @ twk)[:, None, :, :]) @ tv  # (B, Lq, Lk): the U-wide tensor
    tm = None
    if "attn_mask" in kw:
        m = kw["attn_mask"]
        if m.dtype == np.bool_:
            e = e.masked_fill(~torch.tensor(m), float("-inf"))
        else:
            tm = t(m)
            e = e + tm
    if "key_lengths" in kw:
        e = e.masked_fill(torch.arange(lk)[None, None, :] >= torch.tensor(kw["key_lengths"])[:, None, None],
                          float("-inf"))
    tout = torch.softmax(e, dim=-1) @ tval
    close("output", out, tout)
    tout.backward(torch.tensor(g))
    for i, name in enumerate(("query", "key", "value", "w_query", "w_key", "v")):
        close(name, grads[i], tensors[i].grad)
    if tb is not None:
        close("bias", grads["bias"], tb.grad)
    if tm is not None:
        close("attn_mask", grads["attn_mask"], tm.grad)


# --- MultiHeadAttention vs torch.nn.MultiheadAttention -----------------------------------------

@pytest.mark.parametrize("config", ["self_packed", "cross_packed", "kdim_vdim", "no_bias_causal"])
def test_multihead_attention_matches_torch(config, rng):
    e, heads, b, lq, lk = 32, 4, 2, 9, 12
    kdim = vdim = e
    if config == "kdim_vdim":
        kdim, vdim = 20, 12
    bias = config != "no_bias_causal"
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(e, heads, bias=bias, batch_first=True, kdim=kdim, vdim=vdim, dropout=0.0)
    mha.train()
    layer = attnext.MultiHeadAttention.from_torch(mha)
    x = randn(rng, b, lq, e)
    if config == "self_packed" or config == "no_bias_causal":
        args = (x,)
        targs = [t(x)] * 3
        lk = lq
    else:
        kv = (randn(rng, b, lk, kdim), randn(rng, b, lk, vdim))
        args = (x,) + kv
        targs = [t(a) for a in args]
    kw, tkw = {}, {}
    if config == "no_bias_causal":
        kw["is_causal"] = True
        tkw["attn_mask"] = ~torch.ones(lq, lk, dtype=torch.bool).tril()  # torch: True = not allowed
    out, pb = layer.vjp(*args, **kw)
    y = out[0] if isinstance(out, tuple) else out
    g = randn(rng, *y.shape)
    inputs, params = pb((g, None) if isinstance(out, tuple) else g)
    ty, _ = mha(*targs, need_weights=False, **tkw)
    close("output", y, ty)
    ty.backward(torch.tensor(g))
    if len(args) == 1:
        close("dquery (self-attention)", inputs[0], targs[0].grad)
    else:
        for i, name in enumerate(("dquery", "dkey", "dvalue")):
            close(name, inputs[i], targs[i].grad)
    torch_params = dict(mha.named_parameters())
    assert set(params) == set(layer.state_dict()), "param grads must be keyed like state_dict()"
    for name in params:
        close(name, params[name], torch_params[name].grad)
