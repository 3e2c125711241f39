"""Attention dropout: the Philox4x32-10 generator (dropout.hpp) against the published answers and
its NumPy twin (_philox.py) bit for bit, and the SDPA forward with dropout (_core.sdpa) against a
NumPy computation from the same keep rule. The heavy statistics are tests/test_grad_* (g5)."""

import math

import numpy as np
import pytest

import attnext
from attnext import _core, _philox
from attnext import reference as ref
from hardening.harness import DTYPES, assert_close

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, want):
    assert _core._philox4x32_10(*counter, *key) == want
    got = _philox.philox4x32_10(np.array(counter, dtype=np.uint32), *key)
    assert got.dtype == np.uint32
    assert tuple(int(w) for w in got) == want


def test_philox_numpy_vectorised_matches_cpp():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(3, 5, 4), dtype=np.uint64)
    key0, key1 = (int(x) for x in rng.integers(0, 2**32, size=2))
    got = _philox.philox4x32_10(counters, key0, key1)
    assert got.shape == (3, 5, 4)
    for idx in np.ndindex(3, 5):
        assert tuple(int(w) for w in got[idx]) == _core._philox4x32_10(*(int(c) for c in counters[idx]), key0, key1)


def test_threshold_and_scale_rule():
    assert _philox.threshold(0.0) == 0
    assert _philox.threshold(1.0) == 2**32
    assert _philox.threshold(0.5) == 2**31
    assert _philox.threshold(0.1) == math.floor(0.1 * 2**32)
    assert _philox.keep_scale(0.25) == 1 / 0.75
    assert _philox.keep_scale(1.0) == 0.0


def tile_of(values, layout):
    """values (rows, cols) in a tile layout: "queries" stores it transposed (row stride 1, the
    blocked path's tiles), "keys" in C order (key stride 1, the decode path's rows), "strided"
    with no unit stride (the scalar rule)."""
    rows, cols = values.shape
    if layout == "queries":
        tile = np.empty((cols, rows), values.dtype).T
    elif layout == "keys":
        tile = np.empty((rows, cols), values.dtype)
    else:
        tile = np.empty((2 * rows, 3 * cols), values.dtype)[::2, ::3]
    tile[...] = values
    return tile


def cpp_tile(seed, p, n, i0, rows, j0, cols, dtype, layout):
    """C++'s apply_dropout_tile on a tile of ones: (rows, cols), element (r, c) = (n, i0 + r, j0 + c)."""
    tile = tile_of(np.ones((rows, cols), dtype), layout)
    _core._dropout_apply_tile(tile, p, seed, n, i0, j0)
    return np.array(tile)


TILE_CASES = [  # (n, i0, rows, j0, cols)
    (0, 0, 1, 0, 1),
    (3, 5, 7, 1, 13),
    (1, 0, 64, 0, 128),
    (7, 63, 65, 126, 131),
    (2**32 + 5, 2**31 + 3, 17, 2**33 + 2, 37),  # n past 32 bits; i and j past what one word holds
    (2**64 - 1, 2**32 - 2, 5, 2**34 - 3, 9),  # i and j >> 2 wrap to 32 bits in both
    (12345, 4, 33, 1049, 70),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TILE_CASES)
@pytest.mark.parametrize("layout", ["queries", "keys", "strided"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_cpp_tile_matches_numpy_twin(dtype, case, layout, p):
    n, i0, rows, j0, cols = case
    seed = 0x9E3779B97F4A7C15 ^ n
    got = cpp_tile(seed, p, n, i0, rows, j0, cols, dtype, layout)
    keep = _philox.kept(seed, p, n, np.arange(i0, i0 + rows, dtype=np.uint64)[:, None],
                        np.arange(j0, j0 + cols, dtype=np.uint64)[None, :])
    np.testing.assert_array_equal(got != 0, keep)
    np.testing.assert_array_equal(got[keep], dtype(1) * dtype(1 / (1 - p)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["queries", "keys", "strided"])
def test_two_tiles_share_decisions(dtype, layout):
    # apply_dropout_tiles (the backward's P and dP): both tiles get the one tile's decisions.
    rng = np.random.default_rng(11)
    n, i0, rows, j0, cols, p, seed = 6, 17, 21, 5, 70, 0.35, 424242
    want = cpp_tile(seed, p, n, i0, rows, j0, cols, dtype, layout)
    values = rng.standard_normal((rows, cols)).astype(dtype)
    a, b = tile_of(np.ones((rows, cols), dtype), layout), tile_of(values, layout)
    _core._dropout_apply_tile(a, p, seed, n, i0, j0, b)
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, np.where(want != 0, values * dtype(1 / (1 - p)), 0))


@pytest.mark.parametrize("layout", ["queries", "keys", "strided"])
def test_dropped_nan_is_zero(layout):
    # A dropped element is set to 0, not multiplied: a NaN probability that is dropped is 0.
    tile = tile_of(np.full((20, 40), np.nan), layout)
    _core._dropout_apply_tile(tile, 0.5, 7, 3, 0, 0)
    keep = _philox.keep_mask(7, 0.5, (4,), 20, 40)[3]
    np.testing.assert_array_equal(np.isnan(tile), keep)
    np.testing.assert_array_equal(tile[~keep], 0)


def test_keep_mask_is_the_rule_per_element():
    seed, p = 2**63 + 11, 0.3
    mask = _philox.keep_mask(seed, p, (2, 3), 5, 11)
    assert mask.shape == (2, 3, 5, 11) and mask.dtype == bool
    n = np.arange(6).reshape(2, 3)[:, :, None, None]
    want = _philox.kept(seed, p, n, np.arange(5)[:, None], np.arange(11)[None, :])
    np.testing.assert_array_equal(mask, want)
    # Element by element, the rule written out once more.
    for (a, h, i, j) in [(0, 0, 0, 0), (1, 2, 4, 10), (0, 1, 3, 7)]:
        nn = a * 3 + h
        words = _core._philox4x32_10(j >> 2, i, nn & 0xFFFFFFFF, nn >> 32, seed & 0xFFFFFFFF, seed >> 32)
        assert mask[a, h, i, j] == (words[j & 3] >= _philox.threshold(p))


def test_p_zero_and_one_masks():
    assert _philox.keep_mask(5, 0.0, (2,), 3, 4).all()
    assert not _philox.keep_mask(5, 1.0, (2,), 3, 4).any()
    np.testing.assert_array_equal(cpp_tile(5, 1.0, 0, 0, 3, 0, 9, np.float32, "keys"), 0)
    np.testing.assert_array_equal(cpp_tile(5, 0.0, 0, 0, 3, 0, 9, np.float32, "keys"), 1)


def test_keep_rate_sanity():
    # 400k decisions from each side: the rate lies within 5 sigma of 1 - p (g5 tests the rest).
    p = 0.2
    mask = _philox.keep_mask(2026, p, (4, 5), 100, 200)
    tile = cpp_tile(2026, p, 9, 0, 500, 0, 800, np.float32, "queries") != 0
    for m in (mask, tile):
        sigma = math.sqrt(p * (1 - p) / m.size)
        assert abs(m.mean() - (1 - p)) < 5 * sigma


def test_seeds_differ_and_draw_seed():
    a = _philox.keep_mask(1, 0.5, (), 16, 16)
    b = _philox.keep_mask(2, 0.5, (), 16, 16)
    assert (a != b).mean() > 0.3
    seeds = {_philox.draw_seed() for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**64 for s in seeds)


# --- the SDPA forward with dropout ------------------------------------------------------------


def core_sdpa(q, k, v, *, mask=None, causal=False, offset=0, key_lengths=None, scale=None, weights=False,
              lse=False, p=0.0, seed=0):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None:
        mask = np.broadcast_to(mask, q.shape[:-1] + (k.shape[-2],))
    if key_lengths is not None:
        key_lengths = np.broadcast_to(np.asarray(key_lengths, dtype=np.int64), q.shape[:-2])
    return _core.sdpa(q, k, v, mask, causal, offset, -1, -1, key_lengths, scale, weights, lse, p, seed)


def numpy_sdpa_dropout(q, k, v, *, mask=None, causal=False, key_lengths=None, p=0.0, seed=0):
    """(out, dropped weights, lse) in float64 from the reference's undropped weights and lse."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    m = None if mask is None else (mask if mask.dtype == bool else mask.astype(np.float64))
    if key_lengths is not None:  # per kernel batch entry (the public API's lengths skip the heads)
        m = np.arange(k.shape[-2]) < np.asarray(key_lengths)[..., None, None]
    _, w, lse = ref.scaled_dot_product_attention(q64, k64, v64, attn_mask=m, is_causal=causal,
                                                 return_weights=True, return_lse=True)
    wd = _philox.apply_dropout(w, seed, p)
    return wd @ v64, wd, lse


def random_problem(rng, batch, L, S, E, Ev, dtype):
    return (rng.standard_normal(batch + (L, E)).astype(dtype), rng.standard_normal(batch + (S, E)).astype(dtype),
            rng.standard_normal(batch + (S, Ev)).astype(dtype))


FORWARD_CASES = [  # (batch, L, S, E, Ev)
    ((2, 3), 7, 33, 8, 8),  # decode path without weights
    ((2,), 70, 131, 16, 9),  # blocked, odd tiles
    ((), 40, 2100, 8, 8),  # blocked with the keys split into chunks (chunk starts not at 4k)
    ((1, 2), 1, 300, 5, 7),  # decode across chunks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("masking", ["none", "bool", "float", "causal", "key_lengths"])
def test_forward_matches_numpy(dtype, case, masking):
    batch, L, S, E, Ev = case
    rng = np.random.default_rng(7)
    q, k, v = random_problem(rng, batch, L, S, E, Ev, dtype)
    kw = {}
    if masking == "bool":
        kw["mask"] = rng.random(batch + (L, S)) < 0.7
    elif masking == "float":
        kw["mask"] = rng.standard_normal(batch + (L, S)).astype(dtype)
    elif masking == "causal":
        kw["causal"] = True
    elif masking == "key_lengths":
        kw["key_lengths"] = rng.integers(1, S + 1, size=batch)
    p, seed = 0.3, 2**64 - 12345
    want_out, want_w, want_lse = numpy_sdpa_dropout(q, k, v, p=p, seed=seed, **kw)
    out, _, lse = core_sdpa(q, k, v, lse=True, p=p, seed=seed, **kw)
    assert_close(out, want_out, dtype, factor=4, what="out")
    assert_close(lse, want_lse, dtype, factor=4, what="lse (undropped)")
    out_w, w, lse_w = core_sdpa(q, k, v, weights=True, lse=True, p=p, seed=seed, **kw)
    keep = _philox.keep_mask(seed, p, batch, L, S)
    np.testing.assert_array_equal(w[~keep], 0)
    assert_close(w, want_w, dtype, factor=4, what="weights (dropped)")
    assert_close(out_w, want_out, dtype, factor=4, what="out with weights")
    assert_close(lse_w, want_lse, dtype, factor=4, what="lse with weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_what_multiplied_value(dtype):
    rng = np.random.default_rng(3)
    q, k, v = random_problem(rng, (2,), 20, 45, 8, 6, dtype)
    out, w, _ = core_sdpa(q, k, v, weights=True, p=0.4, seed=99)
    assert_close(out, w.astype(np.float64) @ v.astype(np.float64), dtype, factor=4)
    rows = w.sum(axis=-1)
    assert np.all(rows > 0) and not np.allclose(rows, 1)  # scaled by 1 / (1 - p), some dropped


def test_p_zero_is_the_undropped_kernel():
    rng = np.random.default_rng(4)
    for L in (3, 70):
        q, k, v = random_problem(rng, (2,), L, 50, 8, 8, np.float32)
        plain = _core.sdpa(q, k, v, None, False, 0, -1, -1, None, 0.3, L > 16, True)
        for got in (core_sdpa(q, k, v, scale=0.3, weights=L > 16, lse=True, p=0.0, seed=123),
                    core_sdpa(q, k, v, scale=0.3, weights=L > 16, lse=True)):
            for a, b in zip(got, plain):
                if b is not None:
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_p_one_gives_zeros(dtype):
    rng = np.random.default_rng(5)
    for L in (4, 70):
        q, k, v = random_problem(rng, (2,), L, 37, 8, 8, dtype)
        out, w, lse = core_sdpa(q, k, v, weights=L > 16, lse=True, p=1.0, seed=3)
        np.testing.assert_array_equal(out, 0)
        if w is not None:
            np.testing.assert_array_equal(w, 0)
        _, _, plain_lse = core_sdpa(q, k, v, lse=True)
        np.testing.assert_array_equal(lse, plain_lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((2, 3), 5, 600, 16, 8), ((3,), 130, 300, 16, 8), ((), 20, 2500, 8, 8)])
def test_bit_identical_for_any_thread_count(dtype, case):
    batch, L, S, E, Ev = case
    rng = np.random.default_rng(6)
    q, k, v = random_problem(rng, batch, L, S, E, Ev, dtype)
    before = attnext.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            attnext.set_num_threads(threads)
            results.append(core_sdpa(q, k, v, causal=True, offset=S - L, lse=True, p=0.25, seed=77))
    finally:
        attnext.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            if a is not None:
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_independent_of_path_and_of_L(dtype):
    # The decode path (L <= 16, no weights) and the blocked path (weights, or more queries) drop
    # the same elements: decode's rows equal the blocked path's, and the first rows of a longer
    # causal problem (top-left aligned, so row i sees the same keys) are those of a short one.
    rng = np.random.default_rng(8)
    q, k, v = random_problem(rng, (2, 2), 40, 530, 16, 8, dtype)
    p, seed = 0.5, 31337
    long_out, long_w, _ = core_sdpa(q, k, v, causal=True, weights=True, p=p, seed=seed)
    short = np.ascontiguousarray(q[..., :5, :])
    decode_out, _, _ = core_sdpa(short, k, v, causal=True, p=p, seed=seed)
    blocked_out, short_w, _ = core_sdpa(short, k, v, causal=True, weights=True, p=p, seed=seed)
    np.testing.assert_array_equal(short_w, long_w[..., :5, :])
    assert_close(decode_out, blocked_out, dtype, factor=4)
    assert_close(decode_out, long_out[..., :5, :], dtype, factor=4)


def test_broadcast_key_heads_use_query_heads_coordinates():
    # A stride-0 (GQA-like) key/value batch axis: n still counts the query's batch entries.
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 4, 20, 8))
    k1, v1 = rng.standard_normal((2, 1, 30, 8)), rng.standard_normal((2, 1, 30, 8))
    k, v = np.broadcast_to(k1, (2, 4, 30, 8)), np.broadcast_to(v1, (2, 4, 30, 8))
    _, w, _ = core_sdpa(q, k, v, weights=True, p=0.5, seed=1)
    keep = _philox.keep_mask(1, 0.5, (2, 4), 20, 30)
    np.testing.assert_array_equal(w != 0, keep)


@pytest.mark.parametrize("p, seed, error, match", [
    (1.5, 0, ValueError, r"dropout_p must lie in \[0, 1\]"),
    (-0.1, 0, ValueError, r"dropout_p must lie in \[0, 1\]"),
    (float("nan"), 0, ValueError, r"dropout_p must lie in \[0, 1\]"),
    (0.1, -1, ValueError, r"seed must lie in \[0, 2\*\*64 - 1\]"),
    (0.1, 2**64, ValueError, r"seed must lie in \[0, 2\*\*64 - 1\]"),
    (0.1, True, TypeError, "seed must be an int"),
    (0.1, 1.0, TypeError, "seed must be an int"),
])
def test_argument_errors(p, seed, error, match):
    q = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(error, match=match):
        core_sdpa(q, q, q, p=p, seed=seed)


def test_seed_accepts_numpy_integers_and_the_full_range():
    rng = np.random.default_rng(10)
    q, k, v = random_problem(rng, (1,), 3, 9, 4, 4, np.float64)
    a = core_sdpa(q, k, v, p=0.5, seed=np.uint64(2**64 - 1))[0]
    b = core_sdpa(q, k, v, p=0.5, seed=2**64 - 1)[0]
    np.testing.assert_array_equal(a, b)


def test_check_dropout_accepts_the_unit_interval():
    from attnext._validation import check_dropout
    assert check_dropout(0) == 0.0 and check_dropout(np.float32(0.5)) == 0.5 and check_dropout(1) == 1.0
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            check_dropout(bad)
