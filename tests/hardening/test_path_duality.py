"""Path duality of scaled_dot_product_attention: the decode path (L <= 16 query rows, no
weights), the blocked path (L > 16, or return_weights=True) and every masking spelling give the
same rows, NaN-ness included, and the same lse; hidden keys contribute nothing (rule 2 of
docs/robustness.md), so every result also equals the reference on inputs whose hidden rows are
zeroed.

Each drawn case is computed
- as given (causal / window / key_lengths / mask), with and without return_weights;
- with every masking argument folded into one explicit attn_mask, row chunks of at most 16 rows
  per call (the decode path);
- with the rows embedded in a longer query block (L' > 16, extra rows before them; the blocked
  path), explicit mask.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import attnext
from attnext import reference as ref

from .harness import HIDES_EVERY_KEY
from .sdpa_cases import DECODE_ROWS, SdpaCase, clean_inputs, same_rows, sdpa_cases

sdpa = attnext.scaled_dot_product_attention


def _chunked(case: SdpaCase, mask):
    """Rows in chunks of 1, 16, 5, 1, 16, 5, ... rows per call, explicit mask, no weights."""
    lq = case.query.shape[-2]
    outs, lses, r, sizes = [], [], 0, (1, DECODE_ROWS, 5)
    i = 0
    while r < lq:
        n = min(sizes[i % 3], lq - r)
        o, lse = sdpa(case.query[..., r:r + n, :], case.key, case.value, mask[..., r:r + n, :], scale=case.scale,
                      enable_gqa=case.enable_gqa, return_lse=True)
        outs.append(o)
        lses.append(lse)
        r, i = r + n, i + 1
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


def _embedded(case: SdpaCase, mask):
    """The rows as the last L of a block of L' > 16 rows (blocked path), explicit mask."""
    lq = case.query.shape[-2]
    pad = DECODE_ROWS + 1 - lq if lq <= DECODE_ROWS else 3
    rng = np.random.default_rng(lq)
    extra_q = rng.standard_normal(case.query.shape[:-2] + (pad, case.query.shape[-1])).astype(case.query.dtype)
    q = np.concatenate([extra_q, case.query], axis=-2)
    extra_m = np.ones(mask.shape[:-2] + (pad, mask.shape[-1]), bool)
    if mask.dtype != np.bool_:
        extra_m = np.zeros(extra_m.shape, mask.dtype)
    m = np.concatenate([extra_m, mask], axis=-2)
    o, lse = sdpa(q, case.key, case.value, m, scale=case.scale, enable_gqa=case.enable_gqa, return_lse=True)
    return o[..., pad:, :], lse[..., pad:]


def check_duality(case: SdpaCase):
    dtype = case.query.dtype
    o_plain, lse_plain = sdpa(case.query, case.key, case.value, **case.kwargs(return_lse=True))
    o_w, w, lse_w = sdpa(case.query, case.key, case.value, **case.kwargs(return_lse=True, return_weights=True))
    mask = case.explicit_mask()
    o_chunk, lse_chunk = _chunked(case, mask)
    o_emb, lse_emb = _embedded(case, mask)
    results = {"as given": (o_plain, lse_plain), "return_weights": (o_w, lse_w), "decode chunks": (o_chunk, lse_chunk),
               "embedded in L>16": (o_emb, lse_emb)}
    problems = []
    for name, (o, lse) in results.items():
        if name == "as given":
            continue
        for what, a, b in (("output", o, o_plain), ("lse", lse, lse_plain)):
            diff = same_rows(a, b, dtype)
            if diff:
                problems.append(f"{what}: '{name}' vs 'as given' (L={case.query.shape[-2]}): {diff}")
    # Hidden is hidden: hidden weights are exactly 0; a row with no visible key is zeros, lse -inf.
    seen = mask if mask.dtype == np.bool_ else mask != -np.inf
    hidden_w = w[~seen]
    if np.any(hidden_w != 0):
        problems.append(f"{np.count_nonzero(hidden_w != 0)} hidden weights are not 0")
    empty = ~seen.any(axis=-1)
    if empty.any():
        for name, (o, lse) in results.items():
            if np.any(o[empty] != 0) or np.any(lse[empty] != -np.inf):
                problems.append(f"'{name}': a row with no visible key is not zeros / lse -inf")
        if np.any(w[empty] != 0):
            problems.append("return_weights: a row with no visible key has nonzero weights")
    # ... and equals the reference on the same inputs with hidden key/value rows zeroed.
    k0, v0 = clean_inputs(case)
    r_out, r_w, r_lse = ref.scaled_dot_product_attention(case.query, k0, v0, mask, scale=case.scale,
                                                         enable_gqa=case.enable_gqa, return_weights=True,
                                                         return_lse=True)
    for what, a, b in (("output", o_plain, r_out), ("weights", w, r_w), ("lse", lse_plain, r_lse)):
        diff = same_rows(a, b, dtype)
        if diff:
            problems.append(f"{what} vs reference with hidden rows zeroed: {diff}")
    assert not problems, "\n".join(problems) + f"\ncase: mask={None if case.attn_mask is None else (np.shape(case.attn_mask), np.asarray(case.attn_mask).dtype)}, causal={case.is_causal}, window={case.window}, key_lengths={case.key_lengths}, scale={case.scale}, q{case.query.shape} k{case.key.shape}"  # noqa: E501


@pytest.mark.filterwarnings(HIDES_EVERY_KEY)
@settings(max_examples=60)
@given(case=sdpa_cases())
def test_paths_agree(case):
    with np.errstate(all="ignore"):
        check_duality(case)


# --- the instances of issue 13 (each a row the decode and blocked paths answered differently) --


def _rows(l, s=6, e=4, ev=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, l, e)).astype(dtype), rng.standard_normal((1, s, e)).astype(dtype),
            rng.standard_normal((1, s, ev)).astype(dtype))


@pytest.mark.parametrize("l", [4, 17, 40])
@pytest.mark.parametrize("how", ["bottom_right_L_gt_S", "window_0_0", "key_lengths_0", "bool_row"])
def test_row_without_visible_key_is_zero_even_with_nan_values(l, how):
    q, k, v = _rows(l)
    v[..., :, :] = np.nan  # every value row is NaN; rows that see no key must still be zeros
    kw = {}
    if how == "bottom_right_L_gt_S":
        kw = dict(is_causal="bottom_right")  # rows 0 .. L-S-1 see nothing
        empty = np.arange(l) < l - k.shape[-2]
    elif how == "window_0_0":
        kw = dict(window=(0, 0))  # row i sees key i only: rows >= S see nothing
        empty = np.arange(l) >= k.shape[-2]
    elif how == "key_lengths_0":
        kw = dict(key_lengths=0)
        empty = np.ones(l, bool)
    else:
        m = np.ones((l, k.shape[-2]), bool)
        m[::2] = False
        kw = dict(attn_mask=m)
        empty = np.arange(l) % 2 == 0
    for rw in (False, True):
        res = sdpa(q, k, v, **kw, return_weights=rw, return_lse=True)
        out, lse = res[0], res[-1]
        assert np.all(out[0, empty] == 0), f"return_weights={rw}: rows without a visible key are not zeros"
        assert np.all(lse[0, empty] == -np.inf)
        if rw:
            assert np.all(res[1][0, empty] == 0)


@pytest.mark.parametrize("l", [4, 16, 17, 40])
def test_nan_float_mask_on_hidden_key_is_hidden(l):
    q, k, v = _rows(l, s=l)
    m = np.zeros((l, l))
    m[np.triu_indices(l, 1)] = np.nan  # NaN on every key that causal hides
    for rw in (False, True):
        got = sdpa(q, k, v, m, is_causal=True, return_weights=rw)
        got = got[0] if rw else got
        want = sdpa(q, k, v, is_causal=True)
        assert not np.isnan(got).any(), f"L={l}, return_weights={rw}: a NaN on a hidden key reached the output"
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
