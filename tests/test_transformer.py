"""MultiHeadAttention and SelfAttention against torch.nn.MultiheadAttention (weights copied),
against attnext.reference, and the C++ linear kernel behind their projections."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref
from attnext import transformer

from hardening.harness import DTYPES
from hardening.harness import TOLERANCE as TOL
from hardening.harness import assert_close as close

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# torch helpers


def torch_module(torch, e, h, *, kdim=None, vdim=None, bias=True, batch_first=True, dtype=np.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first)
    m = m.to(torch.float64 if dtype == np.float64 else torch.float32).eval()
    if bias:  # PyTorch initialises biases to zero; random ones test that they are applied
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


def torch_run(torch, m, q, k, v, **kw):
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        out, w = m(t(q), t(k), t(v), **{n: t(a) if isinstance(a, np.ndarray) else a for n, a in kw.items()})
    return out.numpy(), None if w is None else w.numpy()


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# MultiHeadAttention vs torch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_matches_torch(dtype, batch_first, bias, average):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    m = torch_module(torch, 24, 3, bias=bias, batch_first=batch_first, dtype=dtype)
    layer = attnext.MultiHeadAttention.from_torch(m, batch_first=m.batch_first)
    assert layer.dtype == dtype and layer.batch_first == batch_first and layer.bias == bias
    x = randn(rng, (2, 7, 24) if batch_first else (7, 2, 24), dtype)
    out, w = layer(x, need_weights=True, average_attn_weights=average)
    tout, tw = torch_run(torch, m, x, x, x, need_weights=True, average_attn_weights=average)
    assert out.dtype == dtype
    close(out, tout, dtype)
    close(w, tw, dtype)
    out2, none = layer(x)
    assert none is None
    close(out2, tout, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kdim,vdim", [(None, None), (20, 20), (12, 33)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_matches_torch(dtype, kdim, vdim, batch_first):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    e, h, lq, s, b = 32, 4, 5, 9, 3
    m = torch_module(torch, e, h, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=dtype)
    layer = attnext.MultiHeadAttention.from_torch(m, batch_first=m.batch_first)
    shape = (lambda n, f: (b, n, f)) if batch_first else (lambda n, f: (n, b, f))
    q = randn(rng, shape(lq, e), dtype)
    k = randn(rng, shape(s, kdim or e), dtype)
    v = randn(rng, shape(s, vdim or e), dtype)
    out, w = layer(q, k, v, need_weights=True, average_attn_weights=False)
    tout, tw = torch_run(torch, m, q, k, v, need_weights=True, average_attn_weights=False)
    close(out, tout, dtype)
    close(w, tw, dtype)
    if kdim == vdim:  # value defaults to key
        out_kv, _ = layer(q, k)
        tout_kv, _ = torch_run(torch, m, q, k, k)
        close(out_kv, tout_kv, dtype)


def test_unbatched_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for batch_first in (True, False):
        m = torch_module(torch, 16, 2, batch_first=batch_first)
        layer = attnext.MultiHeadAttention.from_torch(m, batch_first=m.batch_first)
        q, k = randn(rng, (6, 16), np.float32), randn(rng, (4, 16), np.float32)
        km = np.array([True, True, False, True])
        out, w = layer(q, k, key_mask=km, need_weights=True)
        tout, tw = torch_run(torch, m, q, k, k, key_padding_mask=~km, need_weights=True)
        assert out.shape == (6, 16) and w.shape == (6, 4)
        close(out, tout, np.float32)
        close(w, tw, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", [True, False])
def test_key_mask_matches_torch(dtype, prefix):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    b, lq, s, e, h = 3, 7, 33, 16, 4
    m = torch_module(torch, e, h, dtype=dtype)
    layer = attnext.MultiHeadAttention.from_torch(m)
    q, kv = randn(rng, (b, lq, e), dtype), randn(rng, (b, s, e), dtype)
    if prefix:  # padding: goes through key_lengths
        key_mask = np.arange(s) < np.array([33, 1, 20])[:, None]
    else:
        key_mask = rng.random((b, s)) < 0.6
        key_mask[:, 0] = True
    out, w = layer(q, kv, kv, key_mask=key_mask, need_weights=True, average_attn_weights=False)
    tout, tw = torch_run(torch, m, q, kv, kv, key_padding_mask=~key_mask, need_weights=True,
                         average_attn_weights=False)
    close(out, tout, dtype)
    close(w, tw, dtype)
    assert np.all(w[~np.broadcast_to(key_mask[:, None, None, :], w.shape)] == 0)


def test_key_mask_float_and_key_lengths_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, l, e, h = 2, 9, 12, 3
    m = torch_module(torch, e, h)
    layer = attnext.MultiHeadAttention.from_torch(m)
    x = randn(rng, (b, l, e), np.float32)
    lengths = np.array([9, 4])
    out, w = layer(x, key_lengths=lengths, need_weights=True)
    tout, tw = torch_run(torch, m, x, x, x, key_padding_mask=np.arange(l) >= lengths[:, None], need_weights=True)
    close(out, tout, np.float32)
    close(w, tw, np.float32)
    fmask = randn(rng, (b, l), np.float32)
    out, w = layer(x, key_mask=fmask, need_weights=True)
    tout, tw = torch_run(torch, m, x, x, x, key_padding_mask=fmask, need_weights=True)
    close(out, tout, np.float32)
    close(w, tw, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_attn_mask_matches_torch(dtype, kind, rank):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    b, lq, s, e, h = 2, 5, 7, 16, 4
    m = torch_module(torch, e, h, dtype=dtype)
    layer = attnext.MultiHeadAttention.from_torch(m)
    q, kv = randn(rng, (b, lq, e), dtype), randn(rng, (b, s, e), dtype)
    shape = {2: (lq, s), 3: (b * h, lq, s), 4: (b, h, lq, s)}[rank]
    if kind == "bool":
        mask = rng.random(shape) < 0.7
        mask[..., 0] = True
        torch_mask = ~mask  # torch's MultiheadAttention: True = NOT allowed
    else:
        mask = randn(rng, shape, dtype)
        mask[..., 2] = -np.inf
        torch_mask = mask
    if rank == 4:  # torch takes (B * H, L, S)
        torch_mask = torch_mask.reshape(b * h, lq, s)
    out, w = layer(q, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=False)
    tout, tw = torch_run(torch, m, q, kv, kv, attn_mask=torch_mask, need_weights=True, average_attn_weights=False)
    close(out, tout, dtype)
    close(w, tw, dtype)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attn_mask_with_key_mask_matches_torch(mask_kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    b, l, e, h = 3, 6, 8, 2
    m = torch_module(torch, e, h)
    layer = attnext.MultiHeadAttention.from_torch(m)
    x = randn(rng, (b, l, e), np.float32)
    key_mask = rng.random((b, l)) < 0.7
    key_mask[:, :2] = True
    if mask_kind == "bool":
        attn_mask = np.tril(np.ones((l, l), bool)) | (rng.random((l, l)) < 0.3)
        torch_mask = ~attn_mask
    else:
        attn_mask = torch_mask = randn(rng, (l, l), np.float32)
    out, w = layer(x, key_mask=key_mask, attn_mask=attn_mask, need_weights=True)
    kpm = ~key_mask if mask_kind == "bool" else np.where(key_mask, 0, -np.inf).astype(np.float32)
    tout, tw = torch_run(torch, m, x, x, x, key_padding_mask=kpm, attn_mask=torch_mask, need_weights=True)
    close(out, tout, np.float32)
    close(w, tw, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    b, l, e, h = 2, 33, 24, 4
    m = torch_module(torch, e, h, dtype=dtype)
    layer = attnext.MultiHeadAttention.from_torch(m)
    x = randn(rng, (b, l, e), dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(l, dtype=torch.float64 if dtype == np.float64
                                                                   else torch.float32)
    with torch.no_grad():
        tout, tw = m(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(x), attn_mask=causal,
                     is_causal=True, need_weights=True, average_attn_weights=False)
    out, w = layer(x, is_causal=True, need_weights=True, average_attn_weights=False)
    close(out, tout.numpy(), dtype)
    close(w, tw.numpy(), dtype)
    assert np.all(np.triu(w, 1) == 0)
    lengths = np.array([33, 10])
    out_kl, _ = layer(x, is_causal=True, key_lengths=lengths)
    kpm = np.where(np.arange(l) < lengths[:, None], 0, -np.inf).astype(dtype)
    tout_kl, _ = torch_run(torch, m, x, x, x, attn_mask=causal.numpy(), key_padding_mask=kpm)
    close(out_kl, tout_kl, dtype)


# --------------------------------------------------------------------------------------------
# grouped-query attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_matches_reference(dtype, num_kv_heads):
    rng = np.random.default_rng(9)
    e, h, b, lq, s = 32, 8, 2, 7, 129
    layer = attnext.MultiHeadAttention(e, h, num_kv_heads=num_kv_heads, dtype=dtype, rng=3)
    kv = num_kv_heads * (e // h)
    assert layer.in_proj_weight.shape == (e + 2 * kv, e)
    layer.load_projections(q=(randn(rng, (e, e), dtype), randn(rng, e, dtype)),
                           k=(randn(rng, (kv, e), dtype), randn(rng, kv, dtype)),
                           v=(randn(rng, (kv, e), dtype), randn(rng, kv, dtype)),
                           out=(randn(rng, (e, e), dtype), randn(rng, e, dtype)))
    q, kvx = randn(rng, (b, lq, e), dtype), randn(rng, (b, s, e), dtype)
    mask = rng.random((lq, s)) < 0.8
    mask[:, 0] = True
    out, w = layer(q, kvx, attn_mask=mask, need_weights=True, average_attn_weights=False)
    bq = layer.in_proj_bias
    rout, rw = ref.multi_head_attention(q, kvx, kvx, h, layer.q_proj_weight, layer.k_proj_weight,
                                        layer.v_proj_weight, layer.out_proj_weight, q_bias=bq[:e],
                                        k_bias=bq[e:e + kv], v_bias=bq[e + kv:], out_bias=layer.out_proj_bias,
                                        num_kv_heads=num_kv_heads, attn_mask=mask)
    close(out, rout, dtype)
    close(w, rw, dtype)
    # self-attention, causal, through the packed QKV GEMM
    out, w = layer(q, is_causal=True, need_weights=True, average_attn_weights=False)
    rout, rw = ref.multi_head_attention(q, q, q, h, layer.q_proj_weight, layer.k_proj_weight,
                                        layer.v_proj_weight, layer.out_proj_weight, q_bias=bq[:e],
                                        k_bias=bq[e:e + kv], v_bias=bq[e + kv:], out_bias=layer.out_proj_bias,
                                        num_kv_heads=num_kv_heads, is_causal=True)
    close(out, rout, dtype)
    close(w, rw, dtype)


def test_gqa_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    e, h, hk, b, l = 64, 8, 2, 2, 17
    d = e // h
    torch.manual_seed(0)
    lin = {n: torch.nn.Linear(e, o) for n, o in (("q", e), ("k", hk * d), ("v", hk * d), ("o", e))}
    layer = attnext.MultiHeadAttention(e, h, num_kv_heads=hk)
    pair = lambda m: (m.weight.detach().numpy(), m.bias.detach().numpy())
    layer.load_projections(q=pair(lin["q"]), k=pair(lin["k"]), v=pair(lin["v"]), out=pair(lin["o"]))
    x = randn(rng, (b, l, e), np.float32)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        split = lambda y, n: y.reshape(b, l, n, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(lin["q"](xt), h), split(lin["k"](xt), hk), split(lin["v"](xt), hk),
                                           is_causal=True, enable_gqa=True)
        expected = lin["o"](o.transpose(1, 2).reshape(b, l, e)).numpy()
    out, _ = layer(x, is_causal=True)
    close(out, expected, np.float32)


# --------------------------------------------------------------------------------------------
# weights: state dict, projections


def test_state_dict_round_trip_and_torch_names():
    torch = pytest.importorskip("torch")
    for kdim in (None, 10):
        m = torch_module(torch, 16, 4, kdim=kdim, vdim=kdim)
        layer = attnext.MultiHeadAttention.from_torch(m)
        sd = layer.state_dict()
        tsd = m.state_dict()
        assert set(sd) == set(tsd)
        for k in sd:
            np.testing.assert_array_equal(sd[k], tsd[k].numpy())
        other = attnext.MultiHeadAttention(16, 4, kdim=kdim, vdim=kdim, rng=5)
        other.load_state_dict(sd)
        x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
        kx = np.random.default_rng(1).standard_normal((2, 4, kdim or 16)).astype(np.float32)
        np.testing.assert_array_equal(other(x, kx)[0], layer(x, kx)[0])
        sd["out_proj.weight"][...] = 0  # a copy: the layer is unchanged
        assert np.any(layer.out_proj_weight != 0)
    no_bias = torch_module(torch, 8, 2, bias=False)
    layer = attnext.MultiHeadAttention.from_torch(no_bias)
    assert set(layer.state_dict()) == set(no_bias.state_dict()) == {"in_proj_weight", "out_proj.weight"}


def test_load_projections_bert_style():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    m = torch_module(torch, 16, 4)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    w, bias = sd["in_proj_weight"], sd["in_proj_bias"]
    layer = attnext.MultiHeadAttention(16, 4, rng=9)
    layer.load_projections(q=(w[:16], bias[:16]), k=(w[16:32], bias[16:32]), v=(w[32:], bias[32:]),
                           out=(sd["out_proj.weight"], sd["out_proj.bias"]))
    x = randn(rng, (2, 5, 16), np.float32)
    close(layer(x)[0], torch_run(torch, m, x, x, x)[0], np.float32)
    layer.load_projections(out=(sd["out_proj.weight"], None))  # None: zero bias
    assert np.all(layer.out_proj_bias == 0)
    np.testing.assert_array_equal(layer.q_proj_weight, w[:16])  # untouched


def test_heads_are_views_and_weights_only_when_asked(monkeypatch):
    calls = []
    real = transformer.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        calls.append((q, k, v, kw))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(transformer, "scaled_dot_product_attention", spy)
    layer = attnext.MultiHeadAttention(32, 4, num_kv_heads=2, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    layer(x)
    q, k, v, kw = calls[-1]
    assert q.shape == (2, 4, 5, 8) and k.shape == v.shape == (2, 2, 5, 8)
    root = lambda a: a if a.base is None else root(a.base)
    assert root(q) is root(k) is root(v)  # one QKV GEMM, heads as strided views of its output
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    assert kw["enable_gqa"] is True and kw["return_weights"] is False
    layer(x, need_weights=True)
    assert calls[-1][3]["return_weights"] is True
    layer(x, x, x)  # the same array three times is self-attention too: one packed GEMM
    q, k, v, _ = calls[-1]
    assert root(q) is root(k) is root(v)
    mem = np.random.default_rng(1).standard_normal((2, 9, 32)).astype(np.float32)
    layer(x, mem)  # cross-attention: Q from one GEMM, K and V from another
    q, k, v, _ = calls[-1]
    assert root(k) is root(v) and root(q) is not root(k)


@pytest.mark.parametrize("layout", ["F", "strided"])
def test_input_layouts(layout):
    rng = np.random.default_rng(12)
    layer = attnext.MultiHeadAttention(16, 2, kdim=8, vdim=8, rng=1)
    q = randn(rng, (3, 7, 16), np.float32)
    k = randn(rng, (3, 5, 8), np.float32)
    expected = layer(q, k, k * 2)[0]
    if layout == "F":
        q2, k2 = np.asfortranarray(q), np.asfortranarray(k)
    else:
        q2 = np.zeros((3, 14, 32), np.float32)[:, ::2, ::2]
        q2[...] = q
        k2 = np.zeros((5, 3, 8), np.float32).swapaxes(0, 1)
        k2[...] = k
    close(layer(q2, k2, k2 * 2)[0], expected, np.float32)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(13)
    layer = attnext.MultiHeadAttention(64, 4, rng=2)
    x = randn(rng, (2, 300, 64), np.float32)
    before = attnext.get_num_threads()
    try:
        attnext.set_num_threads(1)
        one = layer(x)[0]
        attnext.set_num_threads(3)
        three = layer(x)[0]
    finally:
        attnext.set_num_threads(before)
    np.testing.assert_array_equal(one, three)


def test_rows_with_nothing_to_attend_give_bias():
    layer = attnext.MultiHeadAttention(8, 2, rng=0)
    layer.out_proj_bias[...] = 0.5
    x = np.ones((1, 3, 8), np.float32)
    out, w = layer(x, key_lengths=np.array([0]), need_weights=True)
    assert np.all(out == 0.5) and np.all(w == 0)


# --------------------------------------------------------------------------------------------
# errors


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        attnext.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match=r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"):
        attnext.MultiHeadAttention(16, 8, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        attnext.MultiHeadAttention(16, 0)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        attnext.MultiHeadAttention(16, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="embed_dim must be an int"):
        attnext.MultiHeadAttention(16.0, 2)
    # sizes beyond 64 bits used to escape as OverflowError from the initialisation
    with pytest.raises(ValueError, match="kdim is too large"):
        attnext.MultiHeadAttention(16, 2, kdim=10**400)
    with pytest.raises(ValueError, match="qk_dim is too large"):
        attnext.SelfAttention(16, qk_dim=2**64)


def test_call_errors():
    layer = attnext.MultiHeadAttention(16, 4, kdim=8, vdim=12, rng=0)
    q, k, v = np.zeros((2, 3, 16), np.float32), np.zeros((2, 5, 8), np.float32), np.zeros((2, 5, 12), np.float32)
    with pytest.raises(ValueError, match=r"query has shape \(2, 3, 15\) but its last dimension must be embed_dim = 16"):
        layer(np.zeros((2, 3, 15), np.float32), k, v)
    with pytest.raises(ValueError, match=r"key has shape \(2, 5, 12\) but its last dimension must be kdim = 8"):
        layer(q, v, v)
    with pytest.raises(ValueError, match=r"value defaults to key, but kdim \(8\) != vdim \(12\)"):
        layer(q, k)
    with pytest.raises(ValueError, match=r"key has shape \(2, 5, 8\) but value has \(2, 4, 12\)"):
        layer(q, k, v[:, :4])
    with pytest.raises(ValueError, match="batch dimensions"):
        layer(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 4\) but must be \(L, S\) = \(3, 5\)"):
        layer(q, k, v, attn_mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(7, 3, 5\) but must be .*\(8, 3, 5\)"):
        layer(q, k, v, attn_mask=np.ones((7, 3, 5), bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        layer(q, k, v, attn_mask=np.ones((3, 5), np.int64))
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\) but must be \(B, S\) = \(2, 5\)"):
        layer(q, k, v, key_mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 5\]"):
        layer(q, k, v, key_lengths=np.array([6, 1]))
    with pytest.raises(ValueError, match=r"key_lengths has shape \(3,\)"):
        layer(q, k, v, key_lengths=np.array([1, 1, 1]))
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        layer(q.astype(int), k, v)
    with pytest.raises(ValueError, match="value given without key"):
        layer(q, value=v)


def test_load_errors():
    layer = attnext.MultiHeadAttention(8, 2, rng=0)
    sd = layer.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['out_proj.bias'\]"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "out_proj.bias"})
    with pytest.raises(ValueError, match=r"in_proj_weight has shape \(24, 7\) but this layer needs \(24, 8\)"):
        layer.load_state_dict({**sd, "in_proj_weight": np.zeros((24, 7))})
    with pytest.raises(ValueError, match="add_bias_kv"):
        layer.load_state_dict({**sd, "bias_k": np.zeros((1, 1, 8))})
    before = layer.state_dict()
    with pytest.raises(ValueError, match=r"out weight has shape \(8, 9\)"):
        layer.load_projections(q=(np.ones((8, 8)), None), out=(np.zeros((8, 9)), None))
    np.testing.assert_array_equal(layer.q_proj_weight, before["in_proj_weight"][:8])  # nothing changed
    no_bias = attnext.MultiHeadAttention(8, 2, bias=False)
    with pytest.raises(ValueError, match="q bias given but this layer was built with bias=False"):
        no_bias.load_projections(q=(np.ones((8, 8)), np.ones(8)))


# --------------------------------------------------------------------------------------------
# SelfAttention


def self_attention_reference(x, wq, wk, wv, bq, bk, bv, mask=None, is_causal=False):
    q, k, v = x @ wq, x @ wk, x @ wv
    if bq is not None:
        q, k, v = q + bq, k + bk, v + bv
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        s = np.where(ref.causal_mask(s.shape[-2], s.shape[-1], True), s, -np.inf)
    a = ref.softmax(s, mask=mask)
    return a @ v, a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 4), (7, 8), (2, 33, 8), (2, 3, 5, 8)])
def test_self_attention_layer(dtype, bias, shape):
    rng = np.random.default_rng(14)
    layer = attnext.SelfAttention(8, qk_dim=6, v_dim=5, bias=bias, dtype=dtype, rng=0)
    if shape[-1] != 8:
        with pytest.raises(ValueError, match="embed_dim = 8"):
            layer(randn(rng, shape, dtype))
        return
    if bias:
        layer.set_weights(b_query=randn(rng, 6, dtype), b_key=randn(rng, 6, dtype), b_value=randn(rng, 5, dtype))
    x = randn(rng, shape, dtype)
    out, w = layer(x, return_weights=True)
    rout, rw = self_attention_reference(x, layer.w_query, layer.w_key, layer.w_value, layer.b_query, layer.b_key,
                                        layer.b_value)
    assert out.shape == shape[:-1] + (5,)
    close(out, rout, dtype)
    close(w, rw, dtype)
    l = shape[-2]
    mask = rng.random((l, l)) < 0.6
    np.fill_diagonal(mask, True)
    out = layer(x, mask=mask, is_causal=True)
    close(out, self_attention_reference(x, layer.w_query, layer.w_key, layer.w_value, layer.b_query, layer.b_key,
                                        layer.b_value, mask=mask, is_causal=True)[0], dtype)


def test_self_attention_exclude_self():
    rng = np.random.default_rng(15)
    layer = attnext.SelfAttention(8, exclude_self=True, rng=1)
    x = randn(rng, (2, 6, 8), np.float64)
    out, w = layer(x, return_weights=True)
    assert np.all(np.diagonal(w, axis1=-2, axis2=-1) == 0)
    rout, rw = self_attention_reference(x, layer.w_query, layer.w_key, layer.w_value, None, None, None,
                                        mask=~np.eye(6, dtype=bool))
    close(out, rout, np.float32)
    close(w, rw, np.float32)
    fmask = randn(rng, (6, 6), np.float32)
    _, wf = layer(x, mask=fmask, is_causal=True, return_weights=True)
    assert np.all(wf[:, 0] == 0)  # position 0 sees only itself, which is excluded: zeros
    assert np.all(np.diagonal(wf, axis1=-2, axis2=-1) == 0)


def test_self_attention_set_weights_errors():
    layer = attnext.SelfAttention(4, qk_dim=3)
    with pytest.raises(ValueError, match=r"w_key has shape \(3, 4\) but this layer needs \(4, 3\)"):
        layer.set_weights(w_key=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="b_query given but this layer was built with bias=False"):
        layer.set_weights(b_query=np.zeros(3))
    layer.set_weights(w_query=np.ones((4, 3)))
    assert np.all(layer.w_query == 1)


# --------------------------------------------------------------------------------------------
# the C++ linear kernel behind the projections


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inp,out", [(1, 1, 1), (7, 33, 129), (300, 17, 260), (129, 64, 7),
                                          (23, 530, 70), (400, 40, 100), (16, 0, 5)])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_kernel(dtype, rows, inp, out, layout, with_bias):
    rng = np.random.default_rng(16)
    x = randn(rng, (2, rows, inp), dtype)
    w = randn(rng, (out, inp), dtype)
    b = randn(rng, out, dtype) if with_bias else None
    if layout == "F":
        x, w = np.asfortranarray(x), np.asfortranarray(w)
    elif layout == "strided":
        x = np.repeat(x, 2, axis=-1)[..., ::2]
        w = np.repeat(w, 3, axis=0)[::3, :]
        w = np.repeat(w, 2, axis=1)[:, ::2]  # neither axis unit-stride: the kernel copies W
    y = transformer._linear(x, w, b)
    expected = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)
    assert y.shape == (2, rows, out) and y.dtype == dtype and y.flags.c_contiguous
    close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_kernel_reads_heads_view(dtype):
    rng = np.random.default_rng(17)
    o = randn(rng, (3, 4, 33, 8), dtype)  # (B, H, L, D)
    w, b = randn(rng, (20, 32), dtype), randn(rng, 20, dtype)
    y = _core.linear(o.transpose(0, 2, 1, 3), w, b)
    expected = o.transpose(0, 2, 1, 3).reshape(3, 33, 32) @ w.T + b
    close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_kernel_packed_path_reads_heads_view_and_is_thread_independent(dtype):
    # 2 x 57 rows take the packed GEMM; features gathered through the (B, L, H, D) view; K = 300
    # spans two K blocks; 131 outputs leave a partial column panel.
    rng = np.random.default_rng(20)
    o = randn(rng, (2, 12, 57, 25), dtype)
    w, b = randn(rng, (131, 300), dtype), randn(rng, 131, dtype)
    heads = o.transpose(0, 2, 1, 3)
    expected = heads.reshape(2, 57, 300).astype(np.float64) @ w.T.astype(np.float64) + b
    saved = attnext.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            attnext.set_num_threads(n)
            results.append(_core.linear(heads, w, b))
    finally:
        attnext.set_num_threads(saved)
    close(results[0], expected, dtype)
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_linear_kernel_direct_call_errors():
    x = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got shape \(2, 4\)"):
        _core.linear(x[0, :, 0], np.zeros((3, 4), np.float32), None)
    with pytest.raises(ValueError, match=r"weight has \(3, 5\): weight must be \(out, in\)"):
        _core.linear(x, np.zeros((3, 5), np.float32), None)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        _core.linear(x, np.zeros((3, 4)), None)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\) but weight has \(3, 4\)"):
        _core.linear(x, np.zeros((3, 4), np.float32), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        _core.linear(x.astype(np.int32), np.zeros((3, 4), np.int32), None)
    with pytest.raises(TypeError):
        _core.linear([1.0], np.zeros((3, 4), np.float32), None)


# --------------------------------------------------------------------------------------------
# the example


def test_transformer_encoder_example_runs():
    # The child imports the attnext this test imported (installed or the developer tree).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "transformer_encoder.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "encoder block output" in proc.stdout


def test_linear_kernel_reversed_and_broadcast_inputs():
    rng = np.random.default_rng(18)
    x = randn(rng, (3, 9, 6), np.float32)
    w, b = randn(rng, (5, 6), np.float32), randn(rng, 5, np.float32)
    for view in (x[:, ::-1], x[..., ::-1], x[::-1, ::-2], np.broadcast_to(x[:, :1], (3, 9, 6))):
        close(transformer._linear(view, w, b), view @ w.T + b, np.float32)
    close(transformer._linear(x, w[::-1], b), x @ w[::-1].T + b, np.float32)


def test_gqa_with_key_lengths_and_per_head_mask():
    rng = np.random.default_rng(19)
    e, h, hk, b, l = 16, 4, 2, 2, 9
    layer = attnext.MultiHeadAttention(e, h, num_kv_heads=hk, dtype=np.float64, rng=4)
    x = rng.standard_normal((b, l, e))
    lengths = np.array([9, 5])
    per_head = rng.random((b, h, l, l)) < 0.7
    per_head[..., 0] = True
    out, w = layer(x, key_lengths=lengths, attn_mask=per_head, need_weights=True, average_attn_weights=False)
    kv = hk * (e // h)
    full_mask = per_head & (np.arange(l) < lengths[:, None, None, None])
    rout, rw = ref.multi_head_attention(x, x, x, h, layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight,
                                        layer.out_proj_weight, q_bias=layer.in_proj_bias[:e],
                                        k_bias=layer.in_proj_bias[e:e + kv], v_bias=layer.in_proj_bias[e + kv:],
                                        out_bias=layer.out_proj_bias, num_kv_heads=hk, attn_mask=full_mask)
    close(out, rout, np.float64)
    close(w, rw, np.float64)
    out_km, _ = layer(x, key_mask=np.arange(l) < lengths[:, None], attn_mask=per_head)  # prefix mask -> lengths
    close(out_km, rout, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rows_in_out", [(8, 4, 4), (9, 3, 6), (6, 6, 6), (2, 5, 7)], ids=str)
def test_few_rows_linear_does_not_depend_on_where_its_output_lands(dtype, rows_in_out):
    # A column-stride (transposed) weight takes Eigen's product, whose vectorised part started
    # at the output's first aligned element: its sums' order followed the output's address.
    rows, n_in, n_out = rows_in_out
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, rows, 1, n_in)).astype(dtype)
    weight = rng.standard_normal((n_in, n_out)).astype(dtype).T
    bias = rng.standard_normal(n_out).astype(dtype)
    first = _core.linear(x, weight, bias)
    held = []
    for size in rng.integers(1, 64, size=200):
        held.append(np.empty(size))  # moves where the next output is allocated
        np.testing.assert_array_equal(_core.linear(x, weight, bias), first)
