"""The fused scaled dot-product attention kernel against PyTorch's SDPA and the NumPy reference."""

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref
from hardening.harness import HIDES_EVERY_KEY
from hardening.harness import DTYPES, layout, peak_rss_growth, randn
from hardening.harness import TOLERANCE as TOL
from hardening.harness import absolute_error as max_err


def torch_sdpa(torch, q, k, v, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)]
    if "attn_mask" in kw and kw["attn_mask"] is not None:
        kw["attn_mask"] = torch.from_numpy(np.array(kw["attn_mask"]))
    return torch.nn.functional.scaled_dot_product_attention(*t, **kw).numpy()


# --- against PyTorch ------------------------------------------------------------------------

SHAPES = [  # (batch dims, Hq, Hk, L, S, E, Ev)
    ((2,), 3, 3, 7, 33, 8, 8),
    ((), 2, 2, 129, 130, 64, 64),
    ((1,), 1, 1, 1, 129, 16, 16),
    ((2,), 4, 2, 33, 7, 5, 9),
    ((2, 1), 2, 1, 16, 300, 32, 24),
    ((1,), 2, 2, 70, 1, 3, 3),
    ((1,), 8, 2, 1, 517, 64, 64),
    ((), 1, 1, 40, 2100, 32, 24),  # few query blocks: keys split into chunks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["C", "F", "strided"])
def test_matches_torch_plain(dtype, shape, kind):
    torch = pytest.importorskip("torch")
    batch, hq, hk, L, S, E, Ev = shape
    rng = np.random.default_rng(1)
    q = randn(rng, batch + (hq, L, E), dtype)
    k = randn(rng, batch + (hk, S, E), dtype)
    v = randn(rng, batch + (hk, S, Ev), dtype)
    gqa = hq != hk
    got = attnext.scaled_dot_product_attention(layout(q, kind), layout(k, kind), layout(v, kind), enable_gqa=gqa)
    want = torch_sdpa(torch, q, k, v, enable_gqa=gqa)
    assert got.dtype == dtype
    assert max_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_broadcast", "float_heads"])
def test_matches_torch_masks(dtype, shape, mask_kind):
    torch = pytest.importorskip("torch")
    batch, hq, hk, L, S, E, Ev = shape
    rng = np.random.default_rng(2)
    q = randn(rng, batch + (hq, L, E), dtype)
    k = randn(rng, batch + (hk, S, E), dtype)
    v = randn(rng, batch + (hk, S, Ev), dtype)
    if mask_kind == "bool":
        mask = rng.random(batch + (hq, L, S)) < 0.7
        mask[..., 0] = True  # torch gives NaN for a row with nothing to attend
    elif mask_kind == "bool_broadcast":
        mask = rng.random((L, S)) < 0.7
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = randn(rng, batch + (1, L, S), dtype)
    else:
        mask = randn(rng, (hq, 1, S), dtype)
    gqa = hq != hk
    got = attnext.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    want = torch_sdpa(torch, q, k, v, attn_mask=np.broadcast_to(mask, batch + (hq, L, S)), enable_gqa=gqa)
    assert max_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_torch_causal(dtype, shape, scale):
    torch = pytest.importorskip("torch")
    batch, hq, hk, L, S, E, Ev = shape
    rng = np.random.default_rng(3)
    q = randn(rng, batch + (hq, L, E), dtype)
    k = randn(rng, batch + (hk, S, E), dtype)
    v = randn(rng, batch + (hk, S, Ev), dtype)
    gqa = hq != hk
    got = attnext.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    want = torch_sdpa(torch, q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    assert max_err(got, want) <= TOL[dtype]
    # bottom_right: torch takes it as an explicit mask (rows with no visible key are NaN there, 0 here).
    got = attnext.scaled_dot_product_attention(q, k, v, is_causal="bottom_right", scale=scale, enable_gqa=gqa)
    keep = np.arange(S)[None, :] <= np.arange(L)[:, None] + (S - L)
    want = torch_sdpa(torch, q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)
    empty = ~keep.any(axis=-1)
    assert np.all(got[..., empty, :] == 0)
    assert max_err(got[..., ~empty, :], want[..., ~empty, :]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_blocked_sizes(dtype):
    """Sizes around the query block and key tile boundaries, causal and masked together."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    for L, S in [(17, 17), (63, 129), (65, 255), (129, 257), (200, 100)]:
        q, k, v = (randn(rng, (2, L if i == 0 else S, 40), dtype) for i in range(3))
        mask = randn(rng, (L, S), dtype)
        got = attnext.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
        keep = np.arange(S)[None, :] <= np.arange(L)[:, None]
        want = torch_sdpa(torch, q, k, v, attn_mask=np.where(keep, mask, -np.inf).astype(dtype))
        assert max_err(got, want) <= TOL[dtype]


# --- against the reference ------------------------------------------------------------------

def compare_ref(q, k, v, **kw):
    dtype = q.dtype.type
    got = attnext.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True, **kw)
    want = ref.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True, **kw)
    (o, w, lse), (ro, rw, rlse) = got, want
    assert o.shape == ro.shape and w.shape == rw.shape and lse.shape == rlse.shape
    assert max_err(o, ro) <= TOL[dtype]
    assert max_err(w, rw) <= TOL[dtype]
    finite = np.isfinite(rlse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(rlse))
    assert max_err(lse[finite], rlse[finite]) <= TOL[dtype] * max(1.0, float(np.max(np.abs(rlse[finite]), initial=0)))
    # Without weights (flash path, or decode path for few queries) the same output and lse.
    o2, lse2 = attnext.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    assert max_err(o2, ro) <= TOL[dtype]
    assert np.array_equal(np.isneginf(lse2), np.isneginf(rlse))
    assert max_err(lse2[finite], rlse[finite]) <= TOL[dtype] * max(1.0, float(np.max(np.abs(rlse[finite]), initial=0)))
    return got


SIZES = [(1, 1), (7, 33), (16, 300), (33, 7), (129, 129), (70, 300), (40, 2500)]  # last: key chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("window", [(0, 0), (3, None), (None, 2), (5, 1), (200, 0)])
def test_window_matches_reference(dtype, L, S, window):
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (2, L, 12), dtype), randn(rng, (2, S, 12), dtype), randn(rng, (2, S, 7), dtype)
    compare_ref(q, k, v, window=window)
    compare_ref(q, k, v, window=window, is_causal="bottom_right")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", SIZES)
def test_key_lengths_matches_reference(dtype, L, S):
    rng = np.random.default_rng(6)
    q, k, v = randn(rng, (3, 2, L, 8), dtype), randn(rng, (3, 2, S, 8), dtype), randn(rng, (3, 2, S, 8), dtype)
    lengths = np.array([0, S, rng.integers(0, S + 1)])
    compare_ref(q, k, v, key_lengths=lengths)
    compare_ref(q, k, v, key_lengths=lengths, is_causal=True, attn_mask=rng.random((L, S)) < 0.8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", SIZES)
def test_weights_and_lse_with_masks(dtype, L, S):
    rng = np.random.default_rng(7)
    q, k, v = randn(rng, (2, L, 20), dtype), randn(rng, (2, S, 20), dtype), randn(rng, (2, S, 3), dtype)
    compare_ref(q, k, v, attn_mask=rng.random((2, L, S)) < 0.5)
    compare_ref(q, k, v, attn_mask=randn(rng, (L, S), dtype), is_causal=True, scale=0.7)
    _, w, _ = compare_ref(q, k, v)
    assert np.allclose(w.sum(axis=-1), 1.0)


@pytest.mark.filterwarnings(HIDES_EVERY_KEY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 5, 100])
def test_fully_masked_rows(dtype, L):
    rng = np.random.default_rng(8)
    S = 40
    q, k, v = randn(rng, (2, L, 6), dtype), randn(rng, (2, S, 6), dtype), randn(rng, (2, S, 6), dtype)
    mask = rng.random((2, L, S)) < 0.5
    mask[:, ::2] = False  # every other row sees nothing
    o, w, lse = compare_ref(q, k, v, attn_mask=mask)
    assert np.all(o[:, ::2] == 0) and np.all(w[:, ::2] == 0) and np.all(lse[:, ::2] == -np.inf)
    fmask = np.where(mask, 0.0, -np.inf).astype(dtype)
    o, w, lse = compare_ref(q, k, v, attn_mask=fmask)
    assert np.all(o[:, ::2] == 0) and np.all(w[:, ::2] == 0) and np.all(lse[:, ::2] == -np.inf)
    # No keys at all.
    o, lse = attnext.scaled_dot_product_attention(q, k[:, :0], v[:, :0], return_lse=True)
    assert o.shape == (2, L, 6) and np.all(o == 0) and np.all(lse == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_with_everything(dtype):
    rng = np.random.default_rng(9)
    q, k, v = randn(rng, (2, 6, 50, 8), dtype), randn(rng, (2, 3, 70, 8), dtype), randn(rng, (2, 3, 70, 5), dtype)
    kw = dict(enable_gqa=True, key_lengths=np.array([60, 3]), window=(10, 4), attn_mask=rng.random((6, 50, 70)) < 0.9)
    got = attnext.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True, **kw)
    want = ref.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True, **kw)
    for g, r in zip(got, want):
        fin = np.isfinite(r)
        assert np.array_equal(fin, np.isfinite(g))
        assert max_err(g[fin], r[fin]) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["scaled_dot", "dot"])
def test_attention_routes_to_kernel(dtype, method):
    rng = np.random.default_rng(10)
    q, k, v = randn(rng, (3, 9, 4), dtype), randn(rng, (3, 11, 4), dtype), randn(rng, (11, 6), dtype)
    mask = rng.random((9, 11)) < 0.7
    for causal in (False, True, "bottom_right"):
        got, w = attnext.attention(q, k, v, method=method, mask=mask, is_causal=causal, return_weights=True)
        want, rw = ref.attention(q, k, v, method=method, mask=mask, is_causal=causal, return_weights=True)
        assert max_err(got, want) <= TOL[dtype] and max_err(w, rw) <= TOL[dtype]
    got = attnext.attention(q, k, v, method=method, scale=0.25)
    assert max_err(got, ref.attention(q, k, v, method=method, scale=0.25)) <= TOL[dtype]


# --- determinism ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(1, 3000), (9, 1000), (300, 500), (70, 3500)])
def test_bit_identical_for_any_thread_count(dtype, L, S):
    rng = np.random.default_rng(11)
    q, k, v = randn(rng, (2, 3, L, 32), dtype), randn(rng, (2, 3, S, 32), dtype), randn(rng, (2, 3, S, 32), dtype)
    mask = randn(rng, (L, S), dtype)
    saved = attnext.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            attnext.set_num_threads(n)
            results.append(attnext.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal="bottom_right",
                                                                return_lse=True))
            results[-1] += attnext.scaled_dot_product_attention(q, k, v, window=(50, 3), return_weights=True)
    finally:
        attnext.set_num_threads(saved)
    for r in results[1:]:
        assert all(np.array_equal(x, y) for x, y in zip(r, results[0]))


# --- errors ---------------------------------------------------------------------------------

def test_errors():
    rng = np.random.default_rng(12)
    q, k, v = randn(rng, (2, 4, 5, 8), np.float32), randn(rng, (2, 4, 6, 8), np.float32), randn(rng, (2, 4, 6, 8), np.float32)
    sdpa = attnext.scaled_dot_product_attention
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\]"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"key has shape \(2, 4, 6, 8\) but value has \(2, 4, 7, 8\)"):
        sdpa(q, k, v[:, :, :1].repeat(7, axis=2))
    with pytest.raises(ValueError, match=r"query has shape \(2, 4, 5, 8\) but key has \(2, 4, 6, 7\)"):
        sdpa(q, k[..., :7], v)
    with pytest.raises(ValueError, match="multiple of key heads"):
        sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask has shape"):
        sdpa(q, k, v, attn_mask=np.ones((5, 7), dtype=bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        sdpa(q, k, v, attn_mask=np.ones((5, 6), dtype=np.int32))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 6\]"):
        sdpa(q, k, v, key_lengths=np.array([1, 7]))
    with pytest.raises(TypeError, match="key_lengths must be integers"):
        sdpa(q, k, v, key_lengths=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="window left must be a non-negative int"):
        sdpa(q, k, v, window=(-1, 2))
    with pytest.raises(ValueError, match="window must be a pair"):
        sdpa(q, k, v, window=3)
    with pytest.raises(ValueError, match="is_causal must be"):
        sdpa(q, k, v, is_causal="middle")
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        sdpa(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="query must have at least 2 dimensions"):
        sdpa(q[0, 0, 0], k, v)


def test_core_rejects_bad_arguments():
    rng = np.random.default_rng(13)
    q, k, v = randn(rng, (2, 5, 8), np.float32), randn(rng, (2, 6, 8), np.float32), randn(rng, (2, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"key has shape \(2, 6, 8\) but value has \(2, 7, 3\)"):
        _core.sdpa(q, k, randn(rng, (2, 7, 3), np.float32))
    with pytest.raises(ValueError, match="leading"):
        _core.sdpa(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="embedding"):
        _core.sdpa(q, randn(rng, (2, 6, 9), np.float32), v)
    with pytest.raises(TypeError, match="dtype"):
        _core.sdpa(q, k.astype(np.float64), v)
    with pytest.raises(ValueError, match="attn_mask has shape"):
        _core.sdpa(q, k, v, np.ones((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="key_lengths has shape"):
        _core.sdpa(q, k, v, key_lengths=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="key_lengths must lie"):
        _core.sdpa(q, k, v, key_lengths=np.array([1, 9]))
    with pytest.raises(TypeError, match="int64"):
        _core.sdpa(q, k, v, key_lengths=np.array([1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="window"):
        _core.sdpa(q, k, v, window_left=-2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        _core.sdpa(q[0, 0], k, v)


# --- memory ---------------------------------------------------------------------------------

def test_long_sequence_memory_is_bounded():
    """L = S = 16384 (the score matrix alone would be 1 GiB): peak RSS grows by < 64 MB."""
    grown, biggest = peak_rss_growth("""
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 16384, 64), dtype=np.float32) for _ in range(3))
        out = np.empty((1, 16384, 64), dtype=np.float32); out[:] = 1  # the output's pages, counted before
    """, "attnext.scaled_dot_product_attention(q, k, v, is_causal=True)")
    assert grown < 64 * 2**20
    assert biggest > 0


@pytest.mark.parametrize("L", [3, 40])
def test_empty_feature_dims_and_extreme_core_arguments(L):
    rng = np.random.default_rng(14)
    q, k, v = randn(rng, (2, L, 0), np.float64), randn(rng, (2, 6, 0), np.float64), randn(rng, (2, 6, 4), np.float64)
    got = attnext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max_err(got, ref.scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True)) <= 1e-12
    assert attnext.scaled_dot_product_attention(q, k, v[..., :0]).shape == (2, L, 0)
    q, k = randn(rng, (2, L, 4), np.float64), randn(rng, (2, 6, 4), np.float64)
    everything = _core.sdpa(q, k, k, None, True, 2**62)[0]
    assert max_err(everything, _core.sdpa(q, k, k)[0]) == 0
    assert np.all(_core.sdpa(q, k, k, None, True, -2**62)[0] == 0)
    assert max_err(_core.sdpa(q, k, k, None, False, 0, 2**62, 2**62)[0], everything) == 0
