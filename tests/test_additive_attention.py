"""Fused additive (Bahdanau) attention against the NumPy reference and a PyTorch composition."""

import os

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref
from hardening.harness import DTYPES, layout, peak_rss_growth
from hardening.harness import TOLERANCE as TOL
from hardening.harness import relative_error as rel_err


def make(rng, dtype, batch=(2,), lq=7, lk=33, dq=13, dk=9, units=19, dv=5, scale=1.0):
    q = rng.standard_normal(batch + (lq, dq)).astype(dtype)
    k = rng.standard_normal(batch + (lk, dk)).astype(dtype)
    val = rng.standard_normal(batch + (lk, dv)).astype(dtype)
    wq = (scale * rng.standard_normal((dq, units)) / np.sqrt(dq)).astype(dtype)
    wk = (scale * rng.standard_normal((dk, units)) / np.sqrt(dk)).astype(dtype)
    v = rng.standard_normal(units).astype(dtype)
    return q, k, val, wq, wk, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["C", "F", "strided"])
# (40, 37, 70, 130): packed products whose weights (70 units) and values (130 columns) have
# full 64-column panels read in place and a partial last panel that is packed.
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (7, 33, 19, 5), (33, 7, 16, 1), (3, 129, 33, 7), (1, 50, 64, 8),
                                   (40, 37, 70, 130)])
def test_matches_reference(dtype, kind, sizes):
    lq, lk, units, dv = sizes
    rng = np.random.default_rng(1)
    q, k, val, wq, wk, v = make(rng, dtype, lq=lq, lk=lk, units=units, dv=dv)
    q, k, val, wq, wk = (layout(x, kind) for x in (q, k, val, wq, wk))
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    r_out, r_w = ref.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype
    assert out.shape == r_out.shape and w.shape == r_w.shape
    assert rel_err(out, r_out) <= TOL[dtype]
    assert rel_err(w, r_w) <= TOL[dtype]
    assert np.array_equal(out, attnext.additive_attention(q, k, val, wq, wk, v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_masks_and_lengths(dtype):
    rng = np.random.default_rng(2)
    q, k, val, wq, wk, v = make(rng, dtype, batch=(3,), lq=6, lk=11)
    bias = rng.standard_normal(19).astype(dtype)
    bool_mask = rng.random((3, 6, 11)) < 0.7
    float_mask = np.where(rng.random((6, 11)) < 0.3, -np.inf, rng.standard_normal((6, 11))).astype(dtype)
    lengths = np.array([11, 4, 1])
    for kwargs in [dict(bias=bias), dict(mask=bool_mask), dict(mask=float_mask), dict(key_lengths=lengths),
                   dict(bias=bias, mask=bool_mask, key_lengths=lengths), dict(mask=float_mask, key_lengths=3),
                   dict(mask=bool_mask[:, :1, :])]:
        out, w = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True, **kwargs)
        r_out, r_w = ref.additive_attention(q, k, val, wq, wk, v, return_weights=True, **kwargs)
        assert rel_err(out, r_out) <= TOL[dtype], kwargs.keys()
        assert rel_err(w, r_w) <= TOL[dtype], kwargs.keys()
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, key_lengths=lengths, return_weights=True)
    assert np.all(w[1, :, 4:] == 0) and np.all(w[2, :, 1:] == 0)
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nothing_to_attend_gives_zeros(dtype):
    rng = np.random.default_rng(3)
    q, k, val, wq, wk, v = make(rng, dtype, lq=4, lk=6)
    mask = np.ones((2, 4, 6), bool)
    mask[0, 2] = False
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, mask=mask, key_lengths=[6, 0], return_weights=True)
    assert np.all(out[0, 2] == 0) and np.all(w[0, 2] == 0)
    assert np.all(out[1] == 0) and np.all(w[1] == 0)
    assert np.all(np.isfinite(out)) and np.all(w[0, [0, 1, 3]].sum(-1) > 0.99)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_projections_use_plain_tanh(dtype):
    # Projections far outside the exp-factored range take the plain-tanh path; same formula.
    rng = np.random.default_rng(4)
    q, k, val, wq, wk, v = make(rng, dtype, lq=5, lk=9, scale=60.0)
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    r_out, r_w = ref.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    assert rel_err(w, r_w) <= TOL[dtype] and rel_err(out, r_out) <= TOL[dtype]
    # only the queries out of range
    out, w = attnext.additive_attention(q, k, val, wq, wk * 0.02, v, return_weights=True)
    r_out, r_w = ref.additive_attention(q, k, val, wq, wk * 0.02, v, return_weights=True)
    assert rel_err(w, r_w) <= TOL[dtype] and rel_err(out, r_out) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units", [1, 7, 16, 33])
def test_score_additive_matches_reference(dtype, units):
    rng = np.random.default_rng(5)
    q, k, _, wq, wk, v = make(rng, dtype, lq=9, lk=13, units=units)
    s = attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v)
    assert rel_err(s, ref.score(q, k, "additive", w_query=wq, w_key=wk, v=v)) <= TOL[dtype]
    s = attnext.score(q, k, "additive", w_query=wq * 50, w_key=wk, v=v)
    assert rel_err(s, ref.score(q, k, "additive", w_query=wq * 50, w_key=wk, v=v)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_projected_keys_and_broadcast_batch(dtype):
    rng = np.random.default_rng(6)
    q, k, val, wq, wk, v = make(rng, dtype, batch=(3, 2), lq=4, lk=10)
    keys = attnext.project_keys(k, wk)
    assert isinstance(keys, attnext.ProjectedKeys) and keys.projected.shape == (3, 2, 10, 19)
    np.testing.assert_allclose(keys.projected, k @ wk, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    a = attnext.additive_attention(q, keys, val, wq, None, v)
    b = attnext.additive_attention(q, k, val, wq, wk, v)
    assert np.array_equal(a, b)
    # keys and values shared by every batch entry (batch axes of size 1 broadcast, not copied)
    k1, val1 = k[:1, :1], val[:1, :1]
    out = attnext.additive_attention(q, k1, val1, wq, wk, v)
    assert out.shape == (3, 2, 4, 5)
    assert rel_err(out, ref.additive_attention(q, np.broadcast_to(k1, k.shape), np.broadcast_to(val1, val.shape),
                                               wq, wk, v)) <= TOL[dtype]
    out = attnext.additive_attention(q[0, 0], attnext.project_keys(k1, wk), val1, wq, None, v)
    assert out.shape == (1, 1, 4, 5)


def test_promotion():
    rng = np.random.default_rng(7)
    q, k, val, wq, wk, v = make(rng, np.float32, lq=3, lk=5)
    assert attnext.additive_attention(q.astype(np.float16), k, val, wq, wk, v).dtype == np.float32
    out = attnext.additive_attention(q.astype(np.float64), k, val, wq, wk, v)
    assert out.dtype == np.float64
    keys = attnext.project_keys(k, wk)
    out2 = attnext.additive_attention(q.astype(np.float64), keys, val, wq, None, v)
    assert out2.dtype == np.float64 and rel_err(out2, out) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_composition(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    q, k, val, wq, wk, v = make(rng, dtype, batch=(3,), lq=17, lk=29, units=24, dv=6)
    bias = rng.standard_normal(24).astype(dtype)
    keep = rng.random((3, 17, 29)) < 0.8
    keep[:, :, 0] = True
    lengths = np.array([29, 12, 1])
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, bias=bias, mask=keep, key_lengths=lengths,
                                        return_weights=True)
    keep = keep & (np.arange(29) < lengths[:, None, None])
    t = {name: torch.from_numpy(x) for name, x in dict(q=q, k=k, val=val, wq=wq, wk=wk, v=v, b=bias).items()}
    qp, kp = t["q"] @ t["wq"] + t["b"], t["k"] @ t["wk"]
    scores = torch.tanh(qp[:, :, None] + kp[:, None]) @ t["v"]
    scores = scores.masked_fill(~torch.from_numpy(keep), float("-inf"))
    tw = torch.softmax(scores, dim=-1)
    tout = torch.bmm(tw, t["val"])
    assert rel_err(w, tw.numpy()) <= TOL[dtype]
    assert rel_err(out, tout.numpy()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_for_any_thread_count(dtype):
    rng = np.random.default_rng(9)
    # 6 batch entries: with 1, 2 and 3 threads each task takes a whole entry (keys projected in
    # the task), with 5 all keys are projected first; the bits must not change.
    q, k, val, wq, wk, v = make(rng, dtype, batch=(2, 3), lq=131, lk=70, dq=40, dk=24, units=37, dv=9)
    saved = attnext.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            attnext.set_num_threads(n)
            results.append(attnext.additive_attention(q, k, val, wq, wk, v, key_lengths=[[70, 33, 0], [1, 69, 70]],
                                                      return_weights=True))
            results.append((attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v),))
    finally:
        attnext.set_num_threads(saved)
    for r in results[2:]:
        base = results[0] if len(r) == 2 else results[1]
        for a, b in zip(r, base):
            assert np.array_equal(a, b)


def test_errors():
    rng = np.random.default_rng(10)
    q, k, val, wq, wk, v = make(rng, np.float32, lq=3, lk=5)
    with pytest.raises(ValueError, match=r"key has 5 positions but value has shape \(2, 6, 5\)"):
        attnext.additive_attention(q, k, val[:, :1].repeat(6, 1), wq, wk, v)
    with pytest.raises(ValueError, match=r"w_query has shape \(13, 19\) but w_key has \(9, 18\)"):
        attnext.additive_attention(q, k, val, wq, wk[:, :18], v)
    with pytest.raises(ValueError, match=r"key has shape \(2, 5, 9\) but w_key has \(8, 19\)"):
        attnext.additive_attention(q, k, val, wq, wk[:8], v)
    with pytest.raises(ValueError, match=r"query has shape \(2, 3, 12\) but w_query has \(13, 19\)"):
        attnext.additive_attention(q[..., :12], k, val, wq, wk, v)
    with pytest.raises(ValueError, match=r"v has shape \(18,\) but the number of units is 19"):
        attnext.additive_attention(q, k, val, wq, wk, v[:18])
    with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
        attnext.additive_attention(q, k, val, wq, wk, v, bias=v[:3])
    with pytest.raises(ValueError, match="key_lengths must lie in"):
        attnext.additive_attention(q, k, val, wq, wk, v, key_lengths=[6, 1])
    with pytest.raises(TypeError, match="key_lengths must be integers"):
        attnext.additive_attention(q, k, val, wq, wk, v, key_lengths=[1.5, 1])
    with pytest.raises(ValueError, match="mask has shape"):
        attnext.additive_attention(q, k, val, wq, wk, v, mask=np.ones((4, 5), bool))
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        attnext.additive_attention(q.astype(int), k, val, wq, wk, v)
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        attnext.additive_attention(q, np.concatenate([k, k, k]), np.concatenate([val, val, val]), wq, wk, v)
    with pytest.raises(ValueError, match="pass w_key=None"):
        attnext.additive_attention(q, attnext.project_keys(k, wk), val, wq, wk, v)
    with pytest.raises(ValueError, match="w_key is required"):
        attnext.additive_attention(q, k, val, wq, None, v)


def test_core_refuses_bad_arguments():
    rng = np.random.default_rng(11)
    q, k, val, wq, wk, v = make(rng, np.float32, lq=3, lk=5)
    raw, expo, ok = _core.additive_keys(k, wk)
    good = dict(query=q, w_query=wq, bias=None, keys_raw=raw, keys_exp=expo, keys_ok=ok, value=val, v=v, mask=None,
                key_lengths=None)
    _core.additive_attention(**good)
    bad = [
        (ValueError, dict(keys_raw=raw[:, :, :5])),
        (ValueError, dict(keys_exp=expo[:, ::2])),
        (ValueError, dict(keys_exp=np.asfortranarray(expo))),
        (TypeError, dict(keys_ok=ok.astype(np.int8))),
        (ValueError, dict(keys_ok=ok[:1])),
        (ValueError, dict(value=val[:, :4])),
        (ValueError, dict(value=val[:1])),
        (TypeError, dict(value=val.astype(np.float64))),
        (ValueError, dict(w_query=wq[:, :3])),
        (ValueError, dict(v=v[:2])),
        (ValueError, dict(key_lengths=np.array([9, 1]))),
        (ValueError, dict(key_lengths=np.array([-1, 1]))),
        (TypeError, dict(key_lengths=np.array([1, 1], np.int32))),
        (ValueError, dict(key_lengths=np.array([1]))),
        (ValueError, dict(mask=np.ones((2, 3, 4), bool))),
        (TypeError, dict(mask=np.ones((2, 3, 5), np.int32))),
        (ValueError, dict(query=q[0, 0])),
        (TypeError, dict(query=q.astype(np.int64))),
    ]
    for exc, change in bad:
        with pytest.raises(exc):
            _core.additive_attention(**{**good, **change})
    with pytest.raises(ValueError):
        _core.additive_keys(k, wk[:4])
    with pytest.raises(ValueError):
        _core.additive_keys(k[0, 0], wk)
    with pytest.raises(TypeError):
        _core.additive_keys(k, wk.astype(np.float64))


def test_core_raw_keys_path_matches_prepared_keys_and_refuses_bad_arguments():
    rng = np.random.default_rng(13)
    q, k, val, wq, wk, v = make(rng, np.float32, lq=40, lk=5)
    raw, expo, ok = _core.additive_keys(k, wk)
    good = dict(query=q, w_query=wq, bias=None, key=k, w_key=wk, value=val, v=v, mask=None, key_lengths=None,
                return_weights=True)
    out, w = _core.additive_attention_keys(**good)
    prepared = _core.additive_attention(q, wq, None, raw, expo, ok, val, v, None, None, True)
    assert np.array_equal(out, prepared[0]) and np.array_equal(w, prepared[1])
    bad = [
        (ValueError, dict(key=k[:1])),                      # batch shape differs from the query's
        (ValueError, dict(key=k[:, :4])),                   # 4 keys, 5 values
        (ValueError, dict(w_key=wk[:4])),                   # key has 9 features
        (ValueError, dict(w_key=wk[:, :3])),                # 3 units, w_query has 19
        (ValueError, dict(w_key=wk[None])),
        (TypeError, dict(key=k.astype(np.float64))),
        (TypeError, dict(w_key=wk.astype(np.float64))),
        (ValueError, dict(key=k[0, 0])),
        (ValueError, dict(key_lengths=np.array([6, 1]))),
    ]
    for exc, change in bad:
        with pytest.raises(exc):
            _core.additive_attention_keys(**{**good, **change})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [3, 40])
def test_no_keys_gives_zero_context(dtype, lq):
    # Lk = 0: empty score rows (an empty scratch buffer, never touched), zero context; both the
    # raw-key and the prepared-key paths, with and without the weights.
    rng = np.random.default_rng(15)
    q, k, val, wq, wk, v = make(rng, dtype, lq=lq, lk=0)
    for keys, w_key in ((k, wk), (attnext.project_keys(k, wk), None)):
        out = attnext.additive_attention(q, keys, val, wq, w_key, v)
        assert out.shape == (2, lq, 5) and np.all(out == 0)
        out, w = attnext.additive_attention(q, keys, val, wq, w_key, v, return_weights=True)
        assert np.all(out == 0) and w.shape == (2, lq, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_scale", [1e-30, 1.0, 1e4, 1e30])
def test_factored_form_at_the_edges_of_its_range(dtype, v_scale):
    # Projections up to just inside the factored form's limit (20 in float32: e^{+-40} factors;
    # 170 in float64), units taken in pairs sharing a reciprocal, v of any magnitude (scaled by
    # an exact power of two inside): the same scores as the plain formula.
    rng = np.random.default_rng(16)
    limit = 19.9 if dtype == np.float32 else 169.0
    lq, lk, units = 6, 9, 41  # float32: two pairs of packets, one single packet, a tail
    q = rng.uniform(-1, 1, (2, lq, units)).astype(dtype)
    k = rng.uniform(-1, 1, (2, lk, units)).astype(dtype)
    eye = np.eye(units, dtype=dtype)
    wq, wk = eye * limit, eye * limit  # q' = limit q, k' = limit k: the whole range, both signs
    v = (rng.standard_normal(units) * v_scale).astype(dtype)
    s = attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v)
    r = ref.score(q, k, "additive", w_query=wq, w_key=wk, v=v)
    assert rel_err(s, r) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_v_leaves_the_factored_form(dtype):
    # The factored form weighs each term by -2 v_u e^{-2 q'_u}; when that overflows (|v| near the
    # dtype's maximum) the row goes through the plain tanh, with the same result.
    rng = np.random.default_rng(14)
    q, k, val, wq, wk, v = make(rng, dtype, lq=40, lk=21, units=20)
    big = v * (np.finfo(dtype).max / 8 / np.abs(v).max())
    s = attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=big)
    r = ref.score(q, k, "additive", w_query=wq, w_key=wk, v=big)
    assert np.all(np.isfinite(s)) and rel_err(s, r) <= TOL[dtype]
    scaled = attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v)
    assert rel_err(s / (big[0] / v[0]), scaled) <= 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [1, 4])
def test_repeatable_bits_for_small_shapes(dtype, lq):
    # Tiny products must not depend on where scratch buffers happen to be allocated.
    rng = np.random.default_rng(12)
    q, k, val, wq, wk, v = make(rng, dtype, batch=(3, 2), lq=lq, lk=10)
    first = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    for _ in range(5):
        again = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.array_equal(first[0], attnext.additive_attention(q, k, val, wq, wk, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])  # the factored form, and the plain tanh (|q'| > 20)
def test_a_keys_score_does_not_depend_on_its_position(dtype, scale):
    # Keys are scored four at a time with a shared lane reduction and the rest one by one; a
    # key's bits must be the same wherever it sits. (37 keys: two batch entries make 74 rows,
    # enough for the packed GEMM, whose rows do not depend on their neighbours either.)
    rng = np.random.default_rng(13)
    q, k, _, wq, wk, v = make(rng, dtype, lq=3, lk=37, units=40, scale=scale)
    base = attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v)
    for perm in (np.arange(37)[::-1], rng.permutation(37), np.roll(np.arange(37), 3)):
        moved = attnext.score(q, k[:, perm], "additive", w_query=wq, w_key=wk, v=v)
        assert np.array_equal(moved, base[..., perm])


@pytest.mark.skipif(bool(os.environ.get("ATTNEXT_SANITIZED")),
                    reason="ASan's redzones and quarantine inflate the resident memory")
def test_long_sequences_memory_is_bounded():
    """B = 8, Lq = Lk = 1024, U = 256 (the textbook (B, Lq, Lk, U) tensor would be 8 GiB): peak RSS
    grows by < 64 MB beyond the inputs, counting the 8 MB output and the kernel's scratch memory."""
    grown, biggest = peak_rss_growth("""
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((8, 1024, 256), dtype=np.float32) for _ in range(3))
        wq, wk = (rng.standard_normal((256, 256), dtype=np.float32) / 16 for _ in range(2))
        u = rng.standard_normal(256, dtype=np.float32)
    """, "attnext.additive_attention(q, k, v, wq, wk, u)")
    assert grown < 64 * 2**20
    assert biggest > 0
