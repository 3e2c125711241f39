"""SDPA path duality under the rules of issues 12/13 (PLAN.md rules 1, 2, 4, 5).

The fused kernel has three ways to compute a row: the decode path (L <= 16, no weights), the
blocked online path (L > 16, no weights; split into key chunks when there are few query
blocks and many keys) and the blocked two-pass path (weights requested). Every case here is
computed on each path that applies and the rows must agree to rounding, with NaN and inf at
exactly the same places: lse and probabilities do not depend on the path. Hidden keys
(causal, window, key_lengths, bool False, float -inf) never reach the output, weights or lse,
even when their value rows, scores or mask entries are NaN/inf; a row with no visible key
gives zeros and lse -inf.
"""

import numpy as np
import pytest

from attnext import _core
from attnext import reference as ref

TOL = {np.float32: 2e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]
BIG = 1 << 62
DECODE_MAX = 16


def run(q, k, v, mask=None, causal=False, offset=0, left=-1, right=-1, lengths=None, scale=None, weights=False):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    out, w, lse = _core.sdpa(q, k, v, mask, causal, offset, left, right, lengths, scale, weights, True)
    return out, w, lse


def hidden_by_position(L, S, causal, offset, left, right, length):
    """(L, S) bool: True where causal/window/length hide key j from query i (the rule, in NumPy)."""
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    h = j >= length
    if causal:  # offsets near the int64 limits: everything visible (> 0) or hidden (< 0)
        h = h | ((j > i + offset) if abs(offset) < BIG // 2 else np.full(h.shape, offset < 0))
    if left >= 0:
        h = h | (j < i - min(left, BIG))
    if right >= 0:
        h = h | (j > i + min(right, BIG))
    return np.broadcast_to(h, (L, S))


def assert_same_rows(a, b, dtype, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN at different places"
    assert np.array_equal(np.isposinf(a), np.isposinf(b)), f"{what}: +inf at different places"
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), f"{what}: -inf at different places"
    fin = np.isfinite(a)
    np.testing.assert_allclose(a[fin], b[fin], rtol=TOL[dtype], atol=TOL[dtype], err_msg=what)


def all_paths(q, k, v, rows=DECODE_MAX, **kw):
    """Results of every path for the full problem and for its first `rows` queries; asserts that
    they agree and returns the full online result (out, weights, lse)."""
    dtype = q.dtype.type
    mask = kw.pop("mask", None)
    full = run(q, k, v, mask=mask, **kw)
    full_w = run(q, k, v, mask=mask, weights=True, **kw)
    assert_same_rows(full[0], full_w[0], dtype, "out: online vs weights pass")
    assert_same_rows(full[2], full_w[2], dtype, "lse: online vs weights pass")
    sub_mask = None if mask is None else np.ascontiguousarray(mask[..., :rows, :])
    sub = run(np.ascontiguousarray(q[..., :rows, :]), k, v, mask=sub_mask, **kw)
    sub_w = run(np.ascontiguousarray(q[..., :rows, :]), k, v, mask=sub_mask, weights=True, **kw)
    assert_same_rows(sub[0], full[0][..., :rows, :], dtype, "out: decode vs blocked")
    assert_same_rows(sub[2], full[2][..., :rows], dtype, "lse: decode vs blocked")
    assert_same_rows(sub_w[0], full[0][..., :rows, :], dtype, "out: blocked weights (L <= 16) vs blocked")
    assert_same_rows(sub_w[1], full_w[1][..., :rows, :], dtype, "weights: L <= 16 vs L > 16")
    return full[0], full_w[1], full[2]


def make(rng, dtype, batch, L, S, E, Ev):
    q = rng.standard_normal(batch + (L, E)).astype(dtype)
    k = rng.standard_normal(batch + (S, E)).astype(dtype)
    v = rng.standard_normal(batch + (S, Ev)).astype(dtype)
    return q, k, v


POSITION_CASES = [  # causal, offset, left, right
    (False, 0, -1, -1),
    (True, 0, -1, -1),
    (True, 5, -1, -1),
    (True, -3, -1, -1),
    (False, 0, 2, 1),
    (False, 0, 0, 0),
    (True, 0, 4, -1),
    (True, BIG, BIG, BIG),
    (True, -BIG, -1, -1),
    (True, 2**63 - 1, 2**63 - 1, 2**63 - 1),
    (True, -(2**63), -1, -1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", POSITION_CASES)
@pytest.mark.parametrize("S", [9, 300])
def test_paths_agree_with_nonfinite_hidden_values(dtype, pos, S):
    causal, offset, left, right = pos
    rng = np.random.default_rng(S + left + 7)
    L = 40
    q, k, v = make(rng, dtype, (2,), L, S, 8, 5)
    lengths = np.array([S - 2, 3], np.int64)
    hid = np.stack([hidden_by_position(L, S, causal, offset, left, right, n) for n in lengths])
    clean = all_paths(q, k, v, causal=causal, offset=offset, left=left, right=right, lengths=lengths)
    # Value rows that some query cannot see turn NaN / inf: rows that cannot see them are unchanged.
    bad = v.copy()
    seen_by_all = ~hid.any(axis=1)  # (2, S)
    cand = np.argwhere(~seen_by_all)
    for n, (b, j) in enumerate(cand[:: max(1, len(cand) // 6)]):
        bad[b, j, n % 5] = [np.nan, np.inf, -np.inf][n % 3]
    out, w, lse = all_paths(q, k, bad, causal=causal, offset=offset, left=left, right=right, lengths=lengths)
    touched = np.isnan(bad).any(-1) | np.isinf(bad).any(-1)  # (2, S)
    reaches = (~hid & touched[:, None, :]).any(-1)  # (2, L): rows that see a bad value row
    assert_same_rows(out[~reaches], clean[0][~reaches], dtype, "rows that see no bad value")
    assert_same_rows(lse, clean[2], dtype, "lse does not look at values")
    assert_same_rows(w, clean[1], dtype, "weights do not look at values")
    empty = hid.all(-1)
    assert np.all(out[empty] == 0) and np.all(w[empty] == 0) and np.all(np.isneginf(lse[empty]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("S", [9, 300, 2100])
def test_paths_agree_with_masks(dtype, kind, S):
    rng = np.random.default_rng(S)
    L = 40
    q, k, v = make(rng, dtype, (), L, S, 8, 6)
    keep = rng.random((L, S)) < 0.6
    keep[3] = False  # rows with nothing visible
    keep[20] = False
    if kind == "bool":
        mask = keep
    else:
        mask = np.where(keep, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    clean = all_paths(q, k, v, mask=mask)
    bad = v.copy()
    hidden_cols = np.flatnonzero(~keep[:DECODE_MAX].all(0))[:5]
    bad[hidden_cols, 0] = np.nan
    bad[hidden_cols[:2], 1] = np.inf
    out, w, lse = all_paths(q, k, bad, mask=mask)
    reaches = (keep[:, hidden_cols]).any(-1)
    assert_same_rows(out[~reaches], clean[0][~reaches], dtype, "rows that see no bad value")
    assert np.all(out[3] == 0) and np.all(out[20] == 0) and np.isneginf(lse[3]) and np.isneginf(lse[20])
    assert np.all(w[3] == 0) and np.all(w[~keep] == 0)
    if S <= 300:  # the reference (dense) for the clean case
        want_o, want_w, want_l = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True,
                                                                  return_lse=True)
        np.testing.assert_allclose(clean[0], want_o, rtol=20 * TOL[dtype], atol=20 * TOL[dtype])
        np.testing.assert_allclose(clean[2], want_l, rtol=20 * TOL[dtype], atol=20 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [9, 300])
def test_nan_mask_entry_on_hidden_key_is_ignored(dtype, S):
    """'Hidden is hidden': a NaN (or +inf) float-mask entry on a key already hidden by causal,
    window or key_lengths changes nothing, on every path."""
    rng = np.random.default_rng(3)
    L = 40
    q, k, v = make(rng, dtype, (2,), L, S, 8, 4)
    lengths = np.array([S, S - 3], np.int64)
    mask = rng.standard_normal((2, L, S)).astype(dtype)
    pos = dict(causal=True, offset=-2, left=5, right=-1, lengths=lengths)
    clean = all_paths(q, k, v, mask=mask.copy(), **pos)
    hid = np.stack([hidden_by_position(L, S, True, -2, 5, -1, n) for n in lengths])
    dirty = mask.copy()
    dirty[hid] = np.where(rng.random(hid.sum()) < 0.5, np.nan, np.inf)
    got = all_paths(q, k, v, mask=dirty, **pos)
    for g, c, what in zip(got, clean, ("out", "weights", "lse")):
        assert_same_rows(g, c, dtype, what)
    assert np.isfinite(got[0]).all() or np.isnan(clean[0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_nan_makes_row_nan_on_every_path(dtype):
    rng = np.random.default_rng(5)
    q, k, v = make(rng, dtype, (), 40, 50, 8, 4)
    mask = np.zeros((40, 50), dtype)
    mask[2, 7] = np.nan  # visible: row 2 is NaN, hidden weights stay 0
    mask[2, 9] = -np.inf
    out, w, lse = all_paths(q, k, v, mask=mask)
    assert np.isnan(out[2]).all() and np.isnan(lse[2]) and w[2, 9] == 0
    assert np.isfinite(np.delete(out, 2, axis=0)).all()


def test_positions_beyond_int64_are_saturated_not_overflowed():
    """The binding passes raw int64 offsets/windows; the rule saturates them."""
    rng = np.random.default_rng(1)
    q, k, v = make(rng, np.float64, (), 20, 30, 4, 3)
    for causal, offset, left, right in [(True, 2**63 - 1, 2**63 - 1, 2**63 - 1), (True, -(2**63), 0, 0),
                                        (False, 0, 2**63 - 1, 0), (True, 2**62, -1, 2**63 - 1)]:
        got = all_paths(q, k, v, causal=causal, offset=offset, left=left, right=right)
        hid = hidden_by_position(20, 30, causal, offset, left, right, 30)
        mask = np.ascontiguousarray(~hid)
        want = all_paths(q, k, v, mask=mask)
        for g, c in zip(got, want):
            assert_same_rows(g, c, np.float64, f"{causal, offset, left, right}")
