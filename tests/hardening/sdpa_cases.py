"""SDPA cases for the path-duality and GQA suites: a hypothesis strategy drawing every masking
argument (bool/float masks of several broadcast shapes, NaN and -inf entries, causal in both
alignments, windows, key_lengths, scale, GQA), and the explicit form of a case's visibility.

The rules these suites hold every path to (docs/robustness.md): one visible-key range per
query row from causal/window/key_lengths; a hidden key contributes nothing (its score, its
float-mask entry and its value row never reach the output, weights or lse); a row with no
visible key gives zeros and lse = -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from attnext import reference as ref

# The decode path serves L <= DECODE_ROWS query rows without weights; the blocked path the rest.
DECODE_ROWS = 16


@dataclass
class SdpaCase:
    query: np.ndarray  # (*batch, Hq, L, E)
    key: np.ndarray  # (*batch, Hk, S, E)
    value: np.ndarray  # (*batch, Hk, S, Ev)
    attn_mask: object = None
    is_causal: object = False
    window: object = None
    key_lengths: object = None
    scale: object = None
    enable_gqa: bool = False

    def kwargs(self, **extra) -> dict:
        kw = dict(attn_mask=self.attn_mask, is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa,
                  key_lengths=self.key_lengths, window=self.window)
        kw.update(extra)
        return kw

    @property
    def batch(self):
        return self.query.shape[:-3]

    @property
    def scores_shape(self):
        return self.batch + (self.query.shape[-3], self.query.shape[-2], self.key.shape[-2])

    def visible(self) -> np.ndarray:
        """(*batch, 1, L, S) bool: which keys causal, window and key_lengths leave visible."""
        lq, lk = self.query.shape[-2], self.key.shape[-2]
        vis = np.ones((lq, lk), bool)
        if self.is_causal:
            vis &= ref.causal_mask(lq, lk, self.is_causal)
        if self.window is not None:
            left, right = self.window
            d = np.arange(lk)[None, :] - np.arange(lq)[:, None]
            if left is not None:
                vis &= d >= -left
            if right is not None:
                vis &= d <= right
        vis = np.broadcast_to(vis, self.batch + (1, lq, lk))
        if self.key_lengths is not None:
            keep = np.arange(lk) < np.asarray(self.key_lengths)[..., None, None, None]
            vis = vis & keep
        return np.broadcast_to(vis, self.batch + (1, lq, lk))

    def explicit_mask(self) -> np.ndarray:
        """One attn_mask of the full score shape equivalent to every masking argument: causal,
        window and key_lengths folded in (hidden: False, or -inf in a float mask, even where the
        float mask held NaN)."""
        vis = np.broadcast_to(self.visible(), self.scores_shape)
        m = self.attn_mask
        if m is None:
            return np.array(vis)
        m = np.broadcast_to(m, self.scores_shape)
        if m.dtype == np.bool_:
            return m & vis
        return np.where(vis, m, -np.inf).astype(m.dtype)

    def hidden_everywhere(self) -> np.ndarray:
        """(*batch, Hq, S) bool: keys no query row of that batch entry and head can see."""
        m = self.explicit_mask()
        seen = m if m.dtype == np.bool_ else m != -np.inf
        return ~seen.any(axis=-2)


MASK_KINDS = ("none", "bool", "bool_row", "float", "float_ninf", "float_nan_hidden", "hf_min")


@st.composite
def sdpa_cases(draw, max_len=40, dtypes=(np.float32, np.float64), gqa=True, nan_hidden_values=True):
    """A drawn SdpaCase. L and S range over both sides of DECODE_ROWS (0 included for S)."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    hk = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2])) if gqa else 1
    hq = hk * group
    lq = draw(st.one_of(st.integers(1, DECODE_ROWS), st.integers(DECODE_ROWS + 1, max_len)))
    lk = draw(st.one_of(st.integers(0, 5), st.integers(1, max_len)))
    e, ev = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    q = rng.standard_normal(batch + (hq, lq, e)).astype(dtype)
    k = rng.standard_normal(batch + (hk, lk, e)).astype(dtype)
    v = rng.standard_normal(batch + (hk, lk, ev)).astype(dtype)
    full = batch + (hq, lq, lk)
    kind = draw(st.sampled_from(MASK_KINDS))
    mshape = draw(st.sampled_from([full, (lq, lk), (1, lk), batch + (1, lq, lk)]))
    mask = None
    if kind == "bool":
        mask = rng.random(mshape) < 0.7
    elif kind == "bool_row":  # some rows with nothing to attend
        mask = rng.random(mshape) < 0.7
        mask[..., ::3, :] = False
    elif kind != "none":
        mask = rng.standard_normal(mshape).astype(dtype)
        if kind in ("float_ninf", "float_nan_hidden"):
            mask[rng.random(mshape) < 0.3] = -np.inf
        if kind == "hf_min":  # HuggingFace's padding: finfo.min instead of -inf
            mask = np.where(rng.random(mshape) < 0.3, np.finfo(dtype).min, 0).astype(dtype)
    causal = draw(st.sampled_from([False, True, "bottom_right"]))
    window = draw(st.sampled_from([None, None, (0, 0), (1, None), (None, 2), (3, 1)]))
    lengths = None
    if draw(st.booleans()):
        lengths = rng.integers(0, lk + 1, size=batch) if batch else int(rng.integers(0, lk + 1))
    scale = draw(st.sampled_from([None, None, 0.3, 2.0]))
    case = SdpaCase(q, k, v, mask, causal, window, lengths, scale, enable_gqa=group > 1)
    if kind == "float_nan_hidden" and mask is not None:
        # NaN in float-mask entries of keys that causal/window/key_lengths already hide.
        hidden = ~np.broadcast_to(case.visible(), full)
        m = np.array(np.broadcast_to(mask, full))
        m[hidden & (rng.random(full) < 0.5)] = np.nan
        case.attn_mask = m
    if nan_hidden_values and draw(st.booleans()) and lk:
        # NaN/inf in value (and key) rows that no query of their batch entry and head can see.
        hid = case.hidden_everywhere()  # (*batch, Hq, S)
        hid_kv = hid.reshape(batch + (hk, group, lk)).all(axis=-2)
        bad = np.where(rng.random(hid_kv.shape) < 0.5, np.nan, np.inf)
        case.value = np.where(hid_kv[..., None], bad[..., None], v).astype(dtype)
        case.key = np.where(hid_kv[..., None], np.nan, k).astype(dtype)
    return case


def clean_inputs(case: SdpaCase):
    """(key, value) with the rows that no query can see replaced by zeros: what every result
    must equal under "hidden is hidden"."""
    hid = case.hidden_everywhere()
    hk, lk = case.key.shape[-3], case.key.shape[-2]
    group = case.query.shape[-3] // hk
    hid_kv = hid.reshape(case.batch + (hk, group, lk)).all(axis=-2)[..., None]
    return (np.where(hid_kv, 0, case.key).astype(case.key.dtype),
            np.where(hid_kv, 0, case.value).astype(case.value.dtype))


def same_rows(a, b, dtype, factor=10.0) -> str:
    """'' when a and b agree (NaN/inf in the same places, finite entries within factor x the
    dtype's relative tolerance); else a description of the difference."""
    from .harness import relative_error, tolerance

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    for what, f in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        if not np.array_equal(f(a), f(b)):
            return f"{what} in different places: {np.argwhere(f(a) != f(b))[:4].tolist()}"
    err = relative_error(a, b)
    if err > factor * tolerance(dtype):
        return f"relative error {err:.3g}"
    return ""
