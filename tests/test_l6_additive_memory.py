"""The additive backward reading the forward's weights (vjp, grad.additive_attention_backward
weights=), and attnext.torch's projected memory (project_keys, BahdanauAttention.precompute):
same results and gradients as recomputing / projecting per call."""
import numpy as np
import pytest

import attnext
from attnext import grad

F64 = np.float64


def _additive_args(rng, dtype, batch=2, lq=3, lk=5, d=4, u=6):
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return r(batch, lq, d), r(batch, lk, d), r(batch, lk, d), r(d, u), r(d, u), r(u)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_backward_with_the_forwards_weights_is_bit_identical(dtype, mask):
    rng = np.random.default_rng(0)
    q, k, v, wq, wk, vv = _additive_args(rng, dtype)
    m = None if mask is None else (rng.random((2, 3, 5)) > 0.3 if mask == "bool" else rng.standard_normal((1, 3, 5)))
    m = m if mask != "float" else m.astype(dtype)
    g, gw = rng.standard_normal((2, 3, 4)).astype(dtype), rng.standard_normal((2, 3, 5)).astype(dtype)
    _, weights = attnext.additive_attention(q, k, v, wq, wk, vv, attn_mask=m, return_weights=True)
    args = (g, q, k, v, wq, wk, vv, None, None)
    recomputed = grad.additive_attention_backward(*args, attn_mask=m, grad_weights=gw)
    read = grad.additive_attention_backward(*args, attn_mask=m, grad_weights=gw, weights=weights)
    for name, d in recomputed.items():
        assert (d is None) == (read[name] is None), name
        if d is not None:
            assert np.array_equal(d, read[name]), name


def test_vjp_gradients_unchanged_and_weights_only_returned_when_asked():
    rng = np.random.default_rng(1)
    args = _additive_args(rng, F64)
    g = rng.standard_normal((2, 3, 4))
    out, pullback = attnext.vjp(attnext.additive_attention, *args)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 4)
    ref_out, ref_pullback = attnext.vjp(attnext.reference.additive_attention, *args)
    for ours, theirs in zip(pullback(g), ref_pullback(g)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    (out2, w), pullback2 = attnext.vjp(attnext.additive_attention, *args, return_weights=True)
    w[...] = 0.0  # the caller's copy: the pullback keeps its own
    for a, b in zip(pullback(g), pullback2((g, None))):
        assert np.array_equal(a, b)


torch = pytest.importorskip("torch")
import attnext.torch as at  # noqa: E402


def _torch_args(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, dtype=dtype, generator=gen, requires_grad=True)

    return r(2, 3, 4), r(2, 5, 4), r(2, 5, 4), r(4, 6), r(4, 6), r(6)


def test_gradcheck_through_a_projected_memory():
    q, k, v, wq, wk, vv = _torch_args(2)

    def fn(q, k, v, wq, wk, vv):
        return at.additive_attention(q, at.project_keys(k, wk), v, wq, None, vv, return_weights=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, wq, wk, vv), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_memory_reused_over_steps_matches_projecting_every_step():
    q, k, v, wq, wk, vv = _torch_args(3)
    g = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def decode(per_step):
        memory = None if per_step else at.project_keys(k, wk)
        outs = [at.additive_attention(q[:, t:t + 1], (k if per_step else memory), v, wq, wk if per_step else None, vv)
                for t in range(3)]
        return torch.cat(outs, dim=1)

    a, b = decode(True), decode(False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(a, (q, k, v, wq, wk, vv), g)
    gb = torch.autograd.grad(b, (q, k, v, wq, wk, vv), g)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_bahdanau_precompute_matches_raw_keys_with_lengths():
    torch.manual_seed(5)
    layer = at.BahdanauAttention(4, 4, 6, bias=True, dtype=torch.float64)
    q, k, _, _, _, _ = _torch_args(6)
    lengths = torch.tensor([5, 2])
    memory = layer.precompute(k, key_lengths=lengths)
    for t in range(3):
        c1, w1 = layer(q[:, t], k, key_lengths=lengths)
        c2, w2 = layer(q[:, t], memory)
        torch.testing.assert_close(c1, c2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)
        assert torch.all(w2[1, 2:] == 0)
    with pytest.raises(ValueError, match="come from the memory"):
        layer(q[:, 0], memory, key_lengths=lengths)


def test_memory_with_w_key_or_raw_keys_without_it_raise():
    q, k, v, wq, wk, vv = _torch_args(7)
    memory = at.project_keys(k, wk)
    with pytest.raises(ValueError, match="already projected"):
        at.additive_attention(q, memory, v, wq, wk, vv)
    with pytest.raises(ValueError, match="w_key is required"):
        at.additive_attention(q, k, v, wq, None, vv)
    with pytest.raises(ValueError, match="number of units"):
        at.additive_attention(q, k, v, wq, wk[:, :5], vv)


@pytest.mark.parametrize("lq", [1, 3, 31, 32, 40])
@pytest.mark.parametrize("layout", ["C", "strided", "transposed"])
def test_backward_both_value_product_paths_match_the_reference(lq, layout):
    """Below 32 query rows per block the value gradients are Eigen products reading value and
    grad_out in place, from 32 on packed GEMMs: both against the reference, odd strides too."""
    rng = np.random.default_rng(lq)
    q, k, v, wq, wk, vv = _additive_args(rng, F64, batch=2, lq=lq, lk=9, d=5, u=32)
    g = rng.standard_normal((2, lq, 5))
    gw = rng.standard_normal((2, lq, 9))
    if layout == "strided":
        v, g = np.repeat(v, 2, axis=-1)[..., ::2], np.repeat(g, 3, axis=-2)[..., ::3, :]
    elif layout == "transposed":
        v, g = np.ascontiguousarray(np.swapaxes(v, -1, -2)).swapaxes(-1, -2), np.asfortranarray(g)
    lengths = np.array([9, 4])
    _, weights = attnext.additive_attention(q, k, v, wq, wk, vv, key_lengths=lengths, return_weights=True)
    ours = grad.additive_attention_backward(g, q, k, v, wq, wk, vv, None, None, key_lengths=lengths, grad_weights=gw,
                                            weights=weights)
    theirs = attnext.reference.additive_attention_backward(g, q, k, v, wq, wk, vv, None, None, key_lengths=lengths,
                                                           grad_weights=gw)
    for name in ("query", "key", "value", "w_query", "w_key", "v"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-11, err_msg=name)
