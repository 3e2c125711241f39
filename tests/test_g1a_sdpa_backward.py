"""_core.sdpa_backward, the flash-style SDPA backward kernel: against float64 central finite
differences of _core.sdpa, a plain NumPy backward written here from the formulas, and torch
autograd of torch.nn.functional.scaled_dot_product_attention; over masks, causal alignments,
windows, key lengths, stride-0 (GQA-style) keys, Ev != E, odd shapes, rows that see nothing
(also with NaN behind hidden entries), and for bit-identical results over thread counts."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import attnext
from attnext import _core

# ---------------------------------------------------------------------------------------------
# Helpers: one problem = the forward's arguments; the kernels are called positionally as the
# plan's interface says.


def make_problem(rng, batch, L, S, E, Ev, dtype=np.float64, *, mask=None, causal=False, offset=0, left=-1,
                 right=-1, lengths=None, scale=None):
    q = rng.standard_normal(batch + (L, E)).astype(dtype)
    k = rng.standard_normal(batch + (S, E)).astype(dtype)
    v = rng.standard_normal(batch + (S, Ev)).astype(dtype)
    if scale is None:
        scale = 1.0 / np.sqrt(E) if E else 1.0
    return dict(q=q, k=k, v=v, mask=mask, causal=causal, offset=offset, left=left, right=right, lengths=lengths,
                scale=float(scale))


def forward(pb, return_weights=False, dropout_p=0.0, seed=0):
    out, w, lse = _core.sdpa(pb["q"], pb["k"], pb["v"], pb["mask"], pb["causal"], pb["offset"], pb["left"],
                             pb["right"], pb["lengths"], pb["scale"], return_weights, True, dropout_p, seed)
    return out, w, lse


def backward(pb, out, lse, g, *, grad_weights=None, mask_grad=False, dropout_p=0.0, seed=0):
    return _core.sdpa_backward(pb["q"], pb["k"], pb["v"], pb["mask"], pb["causal"], pb["offset"], pb["left"],
                               pb["right"], pb["lengths"], pb["scale"], out, lse, g, dropout_p, seed, grad_weights,
                               mask_grad)


def visible(pb, L, S):
    """(batch..., L, S) bool: mask.hpp's visible-key rule (causal, window, lengths) and the mask."""
    batch = pb["q"].shape[:-2]
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    vis = np.ones((L, S), bool)
    if pb["causal"]:
        vis &= j <= i + pb["offset"]
    if pb["left"] >= 0:
        vis &= j >= i - pb["left"]
    if pb["right"] >= 0:
        vis &= j <= i + pb["right"]
    vis = np.broadcast_to(vis, batch + (L, S)).copy()
    if pb["lengths"] is not None:
        vis &= j < np.asarray(pb["lengths"])[..., None, None]
    m = pb["mask"]
    if m is not None and m.dtype == bool:
        vis &= m
    elif m is not None:
        vis &= m != -np.inf
    return vis


def reference_backward(pb, g, grad_weights=None, z=None):
    """The textbook backward in float64, from the formulas (hidden entries exactly 0); z the
    dropout factors (0 or 1/(1 - p)) of the weights, or None."""
    q, k, v = (pb[n].astype(np.float64) for n in "qkv")
    L, S = q.shape[-2], k.shape[-2]
    vis = visible(pb, L, S)
    s = pb["scale"] * q @ np.swapaxes(k, -1, -2)
    m = pb["mask"]
    if m is not None and m.dtype != bool:
        s = s + np.where(vis, m, 0.0)
    s = np.where(vis, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    e = np.where(vis, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    tot = e.sum(-1, keepdims=True)
    p = np.where(tot > 0, e / np.where(tot > 0, tot, 1.0), 0.0)
    gg = g.astype(np.float64)
    z = np.ones_like(p) if z is None else z
    dv = np.swapaxes(p * z, -1, -2) @ gg
    vv = np.where(np.isfinite(v), v, 0.0)  # hidden values never matter; visible ones are finite here
    dp = gg @ np.swapaxes(vv, -1, -2)
    if grad_weights is not None:
        dp = dp + grad_weights
    dp = dp * z
    d = np.sum(p * dp, axis=-1, keepdims=True)
    ds = np.where(vis, p * (dp - d), 0.0)
    dq = pb["scale"] * ds @ k
    dk = pb["scale"] * np.swapaxes(ds, -1, -2) @ q
    return dq, dk, dv, ds, p


def loss_of(pb, g, gw=None, dropout=(0.0, 0)):
    out, w, _ = forward(pb, gw is not None, *dropout)
    total = float(np.sum(out * g))
    if gw is not None:
        total += float(np.sum(w * gw))
    return total


def directional_fd(pb, g, name, direction, gw=None, h=1e-5, dropout=(0.0, 0)):
    plus, minus = dict(pb), dict(pb)
    plus[name] = pb[name] + h * direction
    minus[name] = pb[name] - h * direction
    return (loss_of(plus, g, gw, dropout) - loss_of(minus, g, gw, dropout)) / (2 * h)


def assert_close_rel(a, b, rel, what=""):
    scale = max(np.max(np.abs(b)), 1e-3) if b.size else 1.0  # gradients that cancel to 0 keep roundoff
    err = np.max(np.abs(a - b)) / scale if a.size else 0.0
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"


# ---------------------------------------------------------------------------------------------
# Option grid, float64 against the reference and finite differences.

CASES = {
    "plain": dict(batch=(2,), L=7, S=9, E=5, Ev=3),
    "long_keys": dict(batch=(1,), L=70, S=300, E=8, Ev=8),
    "causal_top_left": dict(batch=(2,), L=67, S=40, E=6, Ev=4, causal=True),
    "causal_bottom_right": dict(batch=(2,), L=20, S=150, E=6, Ev=9, causal=True, offset=130),
    "window": dict(batch=(3,), L=80, S=80, E=4, Ev=4, left=5, right=2),
    "window_causal": dict(batch=(1,), L=130, S=140, E=4, Ev=4, left=20, right=0, causal=True),
    "lengths": dict(batch=(3,), L=11, S=140, E=5, Ev=6, lengths=np.array([0, 77, 140])),
    "L1": dict(batch=(2,), L=1, S=33, E=4, Ev=2),
    "S1": dict(batch=(2,), L=19, S=1, E=3, Ev=5),
}


def build(case, rng, dtype=np.float64):
    c = dict(CASES[case])
    batch, L, S, E, Ev = c.pop("batch"), c.pop("L"), c.pop("S"), c.pop("E"), c.pop("Ev")
    return make_problem(rng, batch, L, S, E, Ev, dtype, **c)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_and_finite_differences(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # hash() of a str is salted per process
    pb = build(case, rng)
    out, _, lse = forward(pb)
    g = rng.standard_normal(out.shape)
    dq, dk, dv, dm = backward(pb, out, lse, g)
    assert dm is None
    rq, rk, rv, _, _ = reference_backward(pb, g)
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert a.shape == b.shape and a.dtype == np.float64 and a.flags.c_contiguous
        assert_close_rel(a, b, 1e-10, n)
    for name, grad in (("q", dq), ("k", dk), ("v", dv)):
        d = rng.standard_normal(pb[name].shape)
        fd = directional_fd(pb, g, name, d)
        an = float(np.sum(grad * d))
        # relative, with a floor: a gradient that cancels to ~0 keeps roundoff
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1e-6), (name, fd, an)


@pytest.mark.parametrize("kind", ["bool", "float", "float_broadcast", "bool_broadcast"])
def test_masks_and_mask_gradient(kind):
    rng = np.random.default_rng(3)
    batch, L, S = (2, 3), 40, 130
    if kind.startswith("bool"):
        shape = (1, 1, L, S) if kind == "bool_broadcast" else batch + (L, S)
        mask = rng.random(shape) < 0.7
        mask[..., 3, :] = False  # a row that sees nothing
    else:
        shape = (1, 3, 1, S) if kind == "float_broadcast" else batch + (L, S)
        mask = rng.standard_normal(shape)
        mask[rng.random(shape) < 0.2] = -np.inf
    mask = np.broadcast_to(mask, batch + (L, S))  # stride 0 on the broadcast axes
    pb = make_problem(rng, batch, L, S, 6, 5, mask=mask)
    out, _, lse = forward(pb)
    g = rng.standard_normal(out.shape)
    dq, dk, dv, dm = backward(pb, out, lse, g, mask_grad=True)
    rq, rk, rv, rds, _ = reference_backward(pb, g)
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv"), (dm, rds, "dmask")):
        assert_close_rel(a, b, 1e-10, n)
    if kind == "bool":
        assert np.all(dq[..., 3, :] == 0)
    if kind.startswith("float"):
        full = np.ascontiguousarray(mask)
        d = rng.standard_normal(full.shape)
        d[~np.isfinite(full)] = 0
        pb_fd = dict(pb, mask=full)
        fd = directional_fd(pb_fd, g, "mask", d)
        an = float(np.sum(dm * d))
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1e-9)
        assert np.all(dm[~np.isfinite(full)] == 0)


def test_grad_weights_against_reference_and_finite_differences():
    rng = np.random.default_rng(5)
    pb = make_problem(rng, (2,), 70, 150, 6, 4, causal=True, offset=80, mask=rng.random((2, 70, 150)) < 0.8)
    out, w, lse = forward(pb, return_weights=True)
    g = rng.standard_normal(out.shape)
    gw = rng.standard_normal(w.shape)
    dq, dk, dv, dm = backward(pb, out, lse, g, grad_weights=gw, mask_grad=True)
    rq, rk, rv, rds, _ = reference_backward(pb, g, gw)
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv"), (dm, rds, "dmask")):
        assert_close_rel(a, b, 1e-10, n)
    for name, grad in (("q", dq), ("k", dk), ("v", dv)):
        d = rng.standard_normal(pb[name].shape)
        fd = directional_fd(pb, g, name, d, gw)
        an = float(np.sum(grad * d))
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1e-9), (name, fd, an)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_dropout_against_reference_and_finite_differences(p):
    from attnext import _philox

    rng = np.random.default_rng(29)
    batch, L, S, seed = (2, 3), 70, 150, 2**63 + 12345
    pb = make_problem(rng, batch, L, S, 6, 5, causal=True, offset=90, mask=rng.standard_normal(batch + (L, S)))
    out, w, lse = forward(pb, True, p, seed)
    g = rng.standard_normal(out.shape)
    gw = rng.standard_normal(w.shape)
    z = _philox.keep_mask(seed, p, batch, L, S) * (1.0 / (1.0 - p) if p < 1 else 0.0)
    dq, dk, dv, dm = backward(pb, out, lse, g, grad_weights=gw, mask_grad=True, dropout_p=p, seed=seed)
    rq, rk, rv, rds, _ = reference_backward(pb, g, gw, z)
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv"), (dm, rds, "dmask")):
        assert_close_rel(a, b, 1e-10, n)
    if p == 1.0:
        assert not np.any(dv) and not np.any(dq) and not np.any(dk)
        return
    for name, grad in (("q", dq), ("k", dk), ("v", dv), ("mask", dm)):
        d = rng.standard_normal(pb[name].shape)
        fd = directional_fd(pb, g, name, d, gw, dropout=(p, seed))
        an = float(np.sum(grad * d))
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1e-6), (name, fd, an)
    other = backward(pb, out, lse, g, grad_weights=gw, dropout_p=p, seed=seed + 1)
    assert not np.array_equal(other[2], dv)  # the seed decides the mask


def test_gqa_stride0_keys_strided_inputs_and_ev_ne_e():
    rng = np.random.default_rng(7)
    B, Hk, G, L, S, E, Ev = 2, 2, 3, 45, 70, 12, 20
    q = rng.standard_normal((B, Hk, G, L, E + 3))[..., ::1, :E]  # strided rows
    k = np.broadcast_to(rng.standard_normal((B, Hk, 1, S, E)), (B, Hk, G, S, E))
    v = np.broadcast_to(np.asfortranarray(rng.standard_normal((B, Hk, 1, S, Ev))), (B, Hk, G, S, Ev))
    pb = dict(q=q, k=k, v=v, mask=None, causal=True, offset=25, left=-1, right=-1, lengths=None, scale=0.3)
    out, _, lse = forward(pb)
    g = rng.standard_normal((2 * L, B, Hk, G, Ev)).transpose(1, 2, 3, 0, 4)[:, :, :, ::2]  # strided cotangent
    dq, dk, dv, _ = backward(pb, out, lse, g)
    assert dk.shape == (B, Hk, G, S, E) and dv.shape == (B, Hk, G, S, Ev)
    rq, rk, rv, _, _ = reference_backward(dict(pb, q=np.ascontiguousarray(q)), np.ascontiguousarray(g))
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert_close_rel(a, b, 1e-10, n)


def test_rows_that_see_nothing_and_nan_behind_hidden_entries():
    rng = np.random.default_rng(11)
    B, L, S, E = 2, 70, 140, 8
    mask = np.ones((B, L, S), bool)
    mask[:, :, 60] = False  # key 60 hidden from every row
    pb = make_problem(rng, (B,), L, S, E, E, lengths=np.array([0, 100]), causal=True, offset=-5, mask=mask)
    clean = {n: pb[n].copy() for n in "qkv"}
    pb["k"][0], pb["v"][0], pb["q"][0] = np.nan, np.inf, np.nan  # batch entry 0 sees nothing
    pb["k"][1, 100:], pb["v"][1, 100:] = np.nan, np.inf  # padding keys
    pb["k"][1, 60], pb["v"][1, 60] = np.inf, np.nan
    pb["q"][1, :3] = np.nan  # rows 0..4 see nothing (offset -5)
    out, _, lse = forward(pb)
    g = rng.standard_normal(out.shape)
    g_clean = g.copy()
    g[0], g[1, :3] = np.nan, np.nan  # cotangents of rows that see nothing
    dq, dk, dv, _ = backward(pb, out, lse, g)
    assert not np.any(dq[0]) and not np.any(dk[0]) and not np.any(dv[0])
    assert not np.any(dq[1, :5])
    assert not np.any(dk[1, 100:]) and not np.any(dv[1, 100:])
    assert not np.any(dk[1, 60]) and not np.any(dv[1, 60])
    rq, rk, rv, _, _ = reference_backward(dict(pb, **clean), g_clean)
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert_close_rel(a, b, 1e-10, n)


def test_float32_against_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    cases = [
        dict(batch=(2, 3), L=70, S=130, E=16, Ev=16, causal=False, mask="bool"),
        dict(batch=(1, 2), L=150, S=150, E=32, Ev=8, causal=True, mask=None),
        dict(batch=(2,), L=9, S=200, E=8, Ev=24, causal=False, mask="float"),
    ]
    for c in cases:
        batch, L, S = c["batch"], c["L"], c["S"]
        mask = None
        if c["mask"] == "bool":
            mask = rng.random(batch + (L, S)) < 0.8
        elif c["mask"] == "float":
            mask = rng.standard_normal(batch + (L, S)).astype(np.float32)
        pb = make_problem(rng, batch, L, S, c["E"], c["Ev"], np.float32, mask=mask, causal=c["causal"])
        out, _, lse = forward(pb)
        g = rng.standard_normal(out.shape).astype(np.float32)
        dq, dk, dv, dm = backward(pb, out, lse, g, mask_grad=mask is not None and mask.dtype != bool)
        tq, tk, tv = (torch.tensor(pb[n], requires_grad=True) for n in "qkv")
        tm = None if mask is None else torch.tensor(mask, requires_grad=mask.dtype != bool)
        to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, is_causal=c["causal"],
                                                              scale=pb["scale"])
        to.backward(torch.tensor(g))
        np.testing.assert_allclose(out, to.detach().numpy(), rtol=1e-5, atol=1e-5)
        for a, t, n in ((dq, tq, "dq"), (dk, tk, "dk"), (dv, tv, "dv")):
            assert_close_rel(a, t.grad.numpy(), 1e-5, n)
        if dm is not None:
            assert_close_rel(dm, tm.grad.numpy(), 1e-5, "dmask")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(17)
    cases = [
        make_problem(rng, (1,), 300, 1500, 16, 16, dtype, causal=True, offset=1200),  # key chunks
        make_problem(rng, (5,), 90, 200, 8, 12, dtype, mask=rng.random((5, 90, 200)) < 0.9),
    ]
    for pb, p in zip(cases, (0.0, 0.2)):
        out, w, lse = forward(pb, True, p, 7)
        g = rng.standard_normal(out.shape).astype(dtype)
        gw = rng.standard_normal(w.shape).astype(dtype)
        results = []
        for n in (1, 2, 3, 8):
            with attnext.threads(n) if n <= 2 else _oversubscribed(n):
                results.append(backward(pb, out, lse, g, grad_weights=gw, mask_grad=True, dropout_p=p, seed=7))
        for r in results[1:]:
            for a, b in zip(r, results[0]):
                assert a.tobytes() == b.tobytes()


class _oversubscribed:
    """attnext.threads(n) beyond the cores, without its ThreadWarning (expected here)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = attnext.get_num_threads()
        _core.set_num_threads(self.n)

    def __exit__(self, *exc):
        _core.set_num_threads(self.before)


def test_empty_shapes():
    rng = np.random.default_rng(19)
    for batch, L, S, E, Ev in [((0,), 5, 6, 3, 2), ((2,), 0, 6, 3, 2), ((2,), 5, 0, 3, 2), ((2,), 5, 6, 0, 2),
                               ((2,), 5, 6, 3, 0)]:
        pb = make_problem(rng, batch, L, S, E, Ev)
        out, _, lse = forward(pb)
        g = rng.standard_normal(out.shape)
        dq, dk, dv, dm = backward(pb, out, lse, g, mask_grad=True)
        assert dq.shape == batch + (L, E) and dk.shape == batch + (S, E) and dv.shape == batch + (S, Ev)
        assert dm.shape == batch + (L, S)
        if S == 0 or L == 0 or Ev == 0:
            assert not np.any(dq) and not np.any(dk) and not np.any(dv) and not np.any(dm)
        else:
            rq, rk, rv, _, _ = reference_backward(pb, g)
            for a, b in ((dq, rq), (dk, rk), (dv, rv)):
                assert_close_rel(a, b, 1e-10)


def test_argument_errors():
    rng = np.random.default_rng(23)
    pb = make_problem(rng, (2,), 4, 5, 3, 2)
    out, _, lse = forward(pb)
    g = rng.standard_normal(out.shape)
    with pytest.raises(ValueError, match="grad_out has shape"):
        backward(pb, out, lse, g[:, :3])
    with pytest.raises(ValueError, match="lse has shape"):
        backward(pb, out, lse[:1], g)
    with pytest.raises(TypeError, match="out has dtype"):
        backward(pb, out.astype(np.float32), lse, g)
    with pytest.raises(ValueError, match="grad_weights has shape"):
        backward(pb, out, lse, g, grad_weights=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="dropout_p"):
        backward(pb, out, lse, g, dropout_p=1.5)
    with pytest.raises(ValueError, match="seed"):
        backward(pb, out, lse, g, seed=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_whose_lse_is_huge(dtype):
    # Every key of some rows carries finfo.min (or -1e9): lse = m + log(l) has lost log(l) to
    # rounding there, so exp(s - lse) would be wrong; those rows use the row max and sum.
    rng = np.random.default_rng(31)
    batch, L, S = (2,), 40, 70
    mask = np.where(rng.random(batch + (L, S)) < 0.5, np.finfo(dtype).min, 0.0).astype(dtype)
    mask[:, ::3] = np.finfo(dtype).min  # rows whose every key has finfo.min: uniform weights
    if dtype == np.float64:  # -1e9 keeps the scores' differences in float64 only
        mask[:, 1::3] = -1e9 + rng.standard_normal(mask[:, 1::3].shape)
    pb = make_problem(rng, batch, L, S, 8, 6, dtype, mask=mask)
    out, w, lse = forward(pb, return_weights=True)
    g = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv, dm = backward(pb, out, lse, g, mask_grad=True)
    rq, rk, rv, rds, rp = reference_backward(pb, g)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert_close_rel(w, rp, tol, "weights")
    for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv"), (dm, rds, "dmask")):
        assert_close_rel(a, b, tol, n)


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_grad_weights_at_dropped_entries_reach_nothing(special, dtype):
    # A dropped entry's gW contributes exactly nothing (dW ∘ Z is 0 there, as the plain formula
    # has it): D's rowsum(P ∘ (gW ∘ Z)) must not form 0 * NaN, which made the whole row NaN.
    from attnext import _philox

    rng = np.random.default_rng(41)
    batch, L, S, p, seed = (2,), 37, 80, 0.3, 1234
    pb = make_problem(rng, batch, L, S, 8, 6, dtype, causal=True, offset=20)
    out, w, lse = forward(pb, True, p, seed)
    g = rng.standard_normal(out.shape).astype(dtype)
    gw = rng.standard_normal(w.shape).astype(dtype)
    keep = _philox.keep_mask(seed, p, batch, L, S)
    vis = visible(pb, L, S)
    dropped = np.argwhere(~keep & vis)
    bad = gw.copy()
    for b, i, j in dropped[rng.choice(len(dropped), size=5, replace=False)]:
        bad[b, i, j] = special
    got = backward(pb, out, lse, g, grad_weights=bad, dropout_p=p, seed=seed)
    want = backward(pb, out, lse, g, grad_weights=np.where(np.isfinite(bad), bad, 0).astype(dtype), dropout_p=p,
                    seed=seed)
    for a, b, n in zip(got[:3], want[:3], ("dq", "dk", "dv")):
        assert np.isfinite(a).all(), n
        assert_close_rel(a, b, 1e-10 if dtype == np.float64 else 2e-5, n)
