"""Plain NumPy twins of attnext's public functions, written to read like the formulas.

Every function here has the same name, signature and meaning as its compiled counterpart in
:mod:`attnext`; the tests hold the two against each other. Nothing here is tuned for speed:
scores are built densely, masks are materialised, and the additive score builds the full
(..., Lq, Lk, U) tensor, exactly as the textbook formula reads.

Notation: a query q_i (row i of Q, shape (..., Lq, Dq)), a key k_j (row j of K, (..., Lk, Dk)),
a value v_j (row j of V, (..., Lk, Dv)).

Precision: float32 and float64 inputs compute as themselves. float16 and ml_dtypes.bfloat16
inputs are read exactly (as float64), computed in float64, and rounded to a 16-bit type only
at the documented rounding points (docs/precision.md), each marked ``ROUNDING POINT`` below:
the kernels' rounding, applied to an exact computation, so the tests can measure how far a
kernel's float32 arithmetic strays from it. bfloat16 needs ml_dtypes for those roundings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._broadcast import reduce_to_shape
from ._validation import BFLOAT16, FLOAT32, is_bfloat16, is_low_precision, output_dtype

__all__ = [
    "score",
    "softmax",
    "weighted_sum",
    "attention",
    "scaled_dot_product_attention",
    "dense_mask",
    "multi_head_attention",
]

_METHODS = ("dot", "scaled_dot", "general", "additive")


def _float_dtype(*arrays):
    """The backward functions' compute dtype: NumPy's promotion over the inputs, float16 as
    float32 (bfloat16 has no backward)."""
    dtype = np.result_type(*arrays)
    return np.float32 if dtype == np.float16 else dtype


class _Precision:
    """How one forward call computes: the inputs' dtype (NumPy's promotion over the data
    arguments; masks excluded, as in attnext) and the dtype of the arithmetic, float64 for
    16-bit inputs (read exactly: every float16 and bfloat16 value is a float64 value), else
    the inputs' dtype."""

    def __init__(self, *arrays) -> None:
        self.dtype = np.result_type(*(np.asarray(a) for a in arrays if a is not None))
        self.low = is_low_precision(self.dtype)
        self.bfloat16 = is_bfloat16(self.dtype)
        if self.bfloat16 and BFLOAT16 is None:
            raise TypeError("the reference needs ml_dtypes to round to bfloat16 (pip install ml_dtypes)")
        self.compute = np.dtype(np.float64) if self.low else self.dtype

    def read(self, x):
        """An input in the compute dtype (16-bit inputs exactly, no rounding); None stays None."""
        return None if x is None else np.asarray(x).astype(self.compute, copy=False)

    def store(self, x, out_dtype=None) -> np.ndarray:
        """ROUNDING POINT (every function): the main output, rounded once to the inputs' dtype
        (or to float32 when out_dtype asks for it)."""
        return np.asarray(x).astype(output_dtype(out_dtype, self.dtype))

    def statistic(self, x) -> np.ndarray:
        """Weights and lse: float32 for 16-bit inputs (the kernels' accumulators), else the
        inputs' dtype."""
        return np.asarray(x).astype(FLOAT32 if self.low else self.dtype)

    def bf16(self, x) -> np.ndarray:
        """A bfloat16 rounding point (RNE, as ml_dtypes and attnext's from_float), returned in
        the compute dtype; the identity for every other input type."""
        if not self.bfloat16:
            return x
        return np.asarray(x).astype(BFLOAT16).astype(self.compute)


def score(query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *, weight: ArrayLike | None = None,
          w_query: ArrayLike | None = None, w_key: ArrayLike | None = None, v: ArrayLike | None = None,
          scale: float | None = None, out_dtype: DTypeLike | None = None) -> np.ndarray:
    """Scores of every query against every key, shape (..., Lq, Lk).

    - dot:        s_ij = q_i . k_j
    - scaled_dot: s_ij = q_i . k_j / sqrt(d_k)
    - general:    s_ij = q_i^T W k_j              (Luong), W (Dq, Dk)
    - additive:   s_ij = v^T tanh(W_q^T q_i + W_k^T k_j)   (Bahdanau), W_q (Dq, U), W_k (Dk, U), v (U,)

    ``scale`` multiplies the scores (default 1/sqrt(d_k) for scaled_dot, 1 otherwise).
    16-bit inputs: computed exactly, rounded once at the store (or float32 with out_dtype).
    """
    prec = _Precision(query, key, weight, w_query, w_key, v)
    q, k = prec.read(query), prec.read(key)
    if method in ("dot", "scaled_dot"):
        s = q @ np.swapaxes(k, -1, -2)
    elif method == "general":
        s = q @ prec.read(weight) @ np.swapaxes(k, -1, -2)
    elif method == "additive":
        q_proj = q @ prec.read(w_query)  # (..., Lq, U)
        k_proj = k @ prec.read(w_key)  # (..., Lk, U)
        s = np.tanh(q_proj[..., :, None, :] + k_proj[..., None, :, :]) @ prec.read(v)
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] else 1.0
    return prec.store(s * np.asarray(scale, dtype=s.dtype), out_dtype)


def _masked(x, mask):
    """x with a mask applied: bool False -> -inf (True = may attend), float -> added, except
    that a -inf entry hides the key whatever x is (even NaN or +inf)."""
    if mask is None:
        return x
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, x, -np.inf).astype(x.dtype)
    return np.where(mask == -np.inf, -np.inf, x + mask.astype(x.dtype)).astype(x.dtype)


def softmax(x: ArrayLike, *, mask: ArrayLike | None = None, axis: int = -1,
            out_dtype: DTypeLike | None = None) -> np.ndarray:
    """softmax(x)_j = exp(x_j - m) / sum_k exp(x_k - m), m = max_k x_k, over ``axis``.

    A row with nothing to attend (all -inf after masking) gives zeros. 16-bit x: computed
    exactly, rounded once at the store (or float32 with out_dtype).
    """
    prec = _Precision(x)
    return prec.store(_softmax(_masked(prec.read(x), mask), axis), out_dtype)


def _softmax(x, axis=-1):
    """softmax of masked scores x in x's dtype (see :func:`softmax`)."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # -inf for an empty axis
    m = np.where(m == -np.inf, 0, m)  # an empty row: exp(-inf - 0) = 0 everywhere
    e = np.exp(x - m)
    total = np.sum(e, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # total is 0 only for a row with nothing to attend; a NaN total (NaN or +inf in the
        # row) keeps the row NaN, as the plain formula does.
        w = np.where(total == 0, 0, e / np.where(total == 0, 1, total))
    # A hidden entry (-inf after masking) weighs exactly 0, even in a row a NaN made NaN.
    return np.where(x == -np.inf, 0, w).astype(x.dtype)


def weighted_sum(weights: ArrayLike, value: ArrayLike, *, out_dtype: DTypeLike | None = None) -> np.ndarray:
    """c_i = sum_j a_ij v_j: (..., Lq, Lk) x (..., Lk, Dv) -> (..., Lq, Dv). 16-bit inputs:
    computed exactly, rounded once at the store (or float32 with out_dtype)."""
    prec = _Precision(weights, value)
    return prec.store(prec.read(weights) @ prec.read(value), out_dtype)


def causal_mask(lq: int, lk: int, is_causal: Any) -> np.ndarray:
    """(Lq, Lk) bool, True where query i may see key j: j <= i (top-left, PyTorch's) or
    j <= i + Lk - Lq (``"bottom_right"``)."""
    offset = lk - lq if is_causal == "bottom_right" else 0
    return np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset


def dense_mask(lq: int, lk: int, *, attn_mask: ArrayLike | None = None, is_causal: Any = False,
               key_lengths: ArrayLike | None = None, window: tuple | None = None,
               dtype: DTypeLike = np.float64) -> np.ndarray:
    """Every masking argument folded into one additive (..., Lq, Lk) mask (0 or -inf, plus
    float masks), the way the fused kernels must behave. A key that causal, window or
    key_lengths hides is -inf whatever attn_mask holds there (NaN included)."""
    total = np.zeros((lq, lk), dtype=dtype)
    if attn_mask is not None:
        total = _masked(total, attn_mask)
    if is_causal:
        total = np.where(causal_mask(lq, lk, is_causal), total, -np.inf)
    if window is not None:
        left, right = window
        d = np.arange(lk)[None, :] - np.arange(lq)[:, None]  # key index - query index
        inside = np.ones((lq, lk), dtype=bool)
        if left is not None:
            inside &= d >= -left
        if right is not None:
            inside &= d <= right
        total = np.where(inside, total, -np.inf)
    if key_lengths is not None:
        lengths = np.asarray(key_lengths)
        keep = np.arange(lk) < lengths[..., None, None, None]  # (..., 1, 1, Lk)
        total = np.where(keep, total, -np.inf)
    return total.astype(dtype)


def _mask_alias(attn_mask, mask):
    if mask is not None and attn_mask is not None:
        raise TypeError("got both attn_mask and its older name mask; pass attn_mask only")
    return attn_mask if mask is None else mask


def attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, *, method: str = "scaled_dot",
              attn_mask: ArrayLike | None = None, is_causal: Any = False, key_lengths: ArrayLike | None = None,
              window: tuple | None = None, return_weights: bool = False, warn: bool = True,
              mask: ArrayLike | None = None, dropout_p: float = 0.0, seed: int | None = None,
              out_dtype: DTypeLike | None = None, **score_args: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """context = softmax(score(Q, K) + attn_mask) V, the three steps in a row. Causal, window
    and key_lengths (over the batch axes (...,)) hide keys as in :func:`dense_mask`. ``mask`` is
    attn_mask's older name; ``warn`` is accepted for signature parity (the twin checks nothing).
    Dropout as in :func:`scaled_dot_product_attention`, over the batch entries (...).

    16-bit inputs take the fused route attnext takes, with its rounding points
    (:func:`_attention_low_precision`)."""
    mask = _mask_alias(attn_mask, mask)
    prec = _Precision(query, key, value, *(score_args.get(n) for n in ("weight", "w_query", "w_key", "v")))
    if prec.low:
        return _attention_low_precision(prec, query, key, value, method, mask, is_causal, key_lengths, window,
                                        return_weights, dropout_p, seed, out_dtype, score_args)
    output_dtype(out_dtype, prec.dtype)  # only None or the inputs' dtype is valid here
    s = score(query, key, method, **score_args)
    hidden = _attention_hidden(mask, s.shape, is_causal, window, key_lengths)
    if float(dropout_p) != 0.0 and seed is None:
        from . import _philox

        seed = _philox.draw_seed()
    z = _dropout_scale(dropout_p, seed, np.broadcast_shapes(s.shape[:-2], np.shape(value)[:-2]), s.shape[-2],
                       s.shape[-1], s.dtype)
    out, a = _attend(_masked(s, mask), value, hidden, z)
    return (out, a) if return_weights else out


def _attention_low_precision(prec, query, key, value, method, mask, is_causal, key_lengths, window, return_weights,
                             dropout_p, seed, out_dtype, score_args):
    """attention() of 16-bit inputs as attnext runs it: additive through
    :func:`additive_attention` with v * scale, the other methods through
    :func:`scaled_dot_product_attention` of (q W for general) with a head axis of 1 (so every
    leading axis is a batch axis of key_lengths)."""
    scale = score_args.get("scale")
    if method == "additive":
        v = score_args["v"]
        if scale is not None and scale != 1.0:
            # ROUNDING POINT (attention, method additive, 16-bit): v * scale in the inputs' dtype.
            v = (prec.read(v) * scale).astype(prec.dtype)
        return additive_attention(query, key, value, score_args["w_query"], score_args["w_key"], v,
                                  attn_mask=mask, key_lengths=key_lengths, is_causal=is_causal, window=window,
                                  return_weights=return_weights, out_dtype=out_dtype)
    q = query
    if method == "general":
        # ROUNDING POINT (attention, method general, 16-bit): q W in the inputs' dtype.
        q = (prec.read(query) @ prec.read(score_args["weight"])).astype(prec.dtype)
    if scale is None and method != "scaled_dot":
        scale = 1.0
    heads = tuple(np.asarray(x)[..., None, :, :] for x in (q, key, value))
    m = None if mask is None else np.asarray(mask)
    m = m[..., None, :, :] if m is not None and m.ndim >= 3 else m
    result = scaled_dot_product_attention(*heads, m, dropout_p, is_causal, scale, key_lengths=key_lengths,
                                          window=window, return_weights=return_weights, seed=seed,
                                          out_dtype=out_dtype)
    if return_weights:
        return tuple(r[..., 0, :, :] for r in result)
    return result[..., 0, :, :]


def _attention_hidden(mask, score_shape, is_causal, window, key_lengths):
    """Where :func:`attention` hides a key: the mask, causal, window and key_lengths (...,)."""
    hidden = _hidden_by(mask)
    if is_causal or window is not None or key_lengths is not None:
        # dense_mask reads key_lengths over SDPA's batch axes and adds a head axis; dropped below.
        structural = dense_mask(score_shape[-2], score_shape[-1], is_causal=is_causal, window=window,
                                key_lengths=key_lengths) == -np.inf
        hidden = hidden | (structural[..., 0, :, :] if key_lengths is not None else structural)
    return hidden


def _hidden_by(mask):
    """Where a mask hides a key: a bool mask's False, a float mask's -inf (False for None)."""
    if mask is None:
        return np.asarray(False)
    mask = np.asarray(mask)
    return ~mask if mask.dtype == np.bool_ else mask == -np.inf


def _attend(s, value, hidden, dropout=None):
    """Softmax of the scores s (float masks already added) with the hidden keys set to -inf,
    and the context it gives. Returns (context, weights); with dropout (Z, see
    :func:`_dropout_scale`) the weights are A * Z, what multiplies the values.

    A key whose final score is -inf counts as hidden, whatever made it -inf: once a float mask
    is added, a kernel cannot tell a -inf mask entry from a -inf score either."""
    s = np.where(hidden, -np.inf, s).astype(s.dtype)
    a = _apply_dropout(softmax(s), dropout)
    return _context(a, value, s == -np.inf), a


def _context(weights, value, hidden):
    """c_i = sum of a_ij v_j over the keys j row i may see (hidden (..., Lq, Lk) marks the others:
    bool False, float -inf, causal, window, key_lengths, a -inf score).

    Hidden is hidden: a hidden key's value row never enters, not even as 0 * NaN, and a row
    with nothing to attend (no visible key, or only -inf scores) is zeros. When every hidden
    value row is finite that is plainly weights @ value (a hidden key's weight is exactly 0);
    otherwise the sum is taken over the visible keys only. A visible key follows the plain
    formula, even with weight 0 (0 * inf is NaN).
    """
    a, v = np.asarray(weights), np.asarray(value)
    dtype = np.result_type(a, v)
    non_finite_rows = ~np.all(np.isfinite(v), axis=-1)  # (..., Lk)
    with np.errstate(invalid="ignore"):
        if not np.any(hidden & non_finite_rows[..., None, :]):
            out = a @ v
        else:
            terms = a[..., :, :, None] * v[..., None, :, :]  # (..., Lq, Lk, Dv)
            out = np.where(hidden[..., None], 0, terms).sum(axis=-2)
    empty = ~np.any(a != 0, axis=-1, keepdims=True)
    return np.where(empty, 0, out).astype(dtype)


def _gqa_repeat(q, k, v, enable_gqa):
    """K and V with each key/value head repeated for the query heads that share it, and the group
    size G = Hq / Hk (1 without grouped-query attention)."""
    if not (enable_gqa and q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] != q.shape[-3]):
        return k, v, 1
    if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
        raise ValueError(f"enable_gqa needs query heads ({q.shape[-3]}) to be a multiple of key heads "
                         f"({k.shape[-3]})")
    group = q.shape[-3] // k.shape[-3]
    return np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3), group


def _sdpa_scores(q, k, attn_mask, is_causal, scale, key_lengths, window, dtype):
    """s_ij = q_i . k_j * scale + mask_ij, with every hidden key at -inf. Returns (s, hidden).

    Keys hidden by causal, window, key_lengths or a bool attn_mask get score -inf whatever the
    score was; a float attn_mask is added, then the structural hiding is applied again, so a NaN
    mask entry on a key already hidden stays hidden."""
    s = (q @ np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=dtype)
    float_mask = attn_mask is not None and np.asarray(attn_mask).dtype != np.bool_
    hidden = dense_mask(s.shape[-2], s.shape[-1], attn_mask=None if float_mask else attn_mask,
                        is_causal=is_causal, key_lengths=key_lengths, window=window, dtype=dtype) == -np.inf
    if float_mask:
        s = _masked(s, attn_mask)
        hidden = hidden | _hidden_by(attn_mask)
    return np.where(hidden, -np.inf, s).astype(dtype), hidden


def _log_sum_exp(s):
    """log sum_j exp(s_ij) over the last axis; -inf for a row whose every entry is -inf."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(m == -np.inf, 0, m)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True)) + m)[..., 0]


def _dropout_scale(dropout_p, seed, batch_shape, lq, lk, dtype):
    """Z (batch_shape + (Lq, Lk)): 1 / (1 - p) where the element is kept, 0 where dropped, by
    the documented counter-based rule (:mod:`attnext._philox`); None when p is 0."""
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {p}")
    if p == 0.0:
        return None
    from . import _philox  # the NumPy twin of the C++ generator

    keep = _philox.keep_mask(int(seed), p, tuple(batch_shape), lq, lk)
    kept_scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return np.where(keep, kept_scale, 0.0).astype(dtype)


def _apply_dropout(x, z):
    """x * Z where Z keeps an element (kept ones scaled by 1 / (1 - p)) and exactly 0 where it
    drops one (a dropped NaN is 0 too); x itself when there is no dropout (Z None)."""
    if z is None:
        return x
    with np.errstate(invalid="ignore"):
        return np.where(z != 0, x * z, 0).astype(x.dtype)


def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: ArrayLike | None = None, dropout_p: float = 0.0, is_causal: Any = False,
                                 scale: float | None = None, enable_gqa: bool = False, *,
                                 key_lengths: ArrayLike | None = None, window: tuple | None = None,
                                 return_weights: bool = False, return_lse: bool = False, warn: bool = True,
                                 seed: int | None = None, out_dtype: DTypeLike | None = None
                                 ) -> np.ndarray | tuple[np.ndarray, ...]:
    """softmax(Q K^T * scale + mask) V with PyTorch's argument meanings (``warn`` is accepted for
    signature parity; the twin checks nothing).

    Shapes: Q (..., Hq, L, E), K (..., Hk, S, E), V (..., Hk, S, Ev). With enable_gqa, query
    head h uses key/value head h // (Hq / Hk), and attn_mask broadcasts against the Hq heads.
    lse is log sum_j exp(s_ij) (natural log) over visible keys (-inf for a row with none).

    Dropout: W = P * Z with Z_ij = 1 / (1 - p) where the element is kept and 0 where dropped
    (:func:`attnext._philox.keep_mask` with this seed over the (..., Hq) batch entries; a fresh
    seed from os.urandom when None); out = W V and ``return_weights`` returns W, the weights
    after dropout. lse is that of the undropped P.

    Hidden is hidden: a key hidden by causal, window, key_lengths, a bool False or a -inf
    float-mask entry contributes nothing (its score, its float-mask entry, NaN included, and
    its value row); a row that sees no key gives zeros and lse -inf.

    16-bit inputs (float16, bfloat16): weights and lse are float32; bfloat16 has two more
    rounding points, Q * scale and P before P V (:func:`_sdpa_query`, :func:`_rounded_p`).
    """
    prec = _Precision(query, key, value)
    dtype = prec.compute
    q, k, v = prec.read(query), prec.read(key), prec.read(value)
    k, v, _ = _gqa_repeat(q, k, v, enable_gqa)
    scale = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else scale
    q, scale_after = _sdpa_query(prec, q, scale)
    s, _ = _sdpa_scores(q, k, attn_mask, is_causal, scale_after, key_lengths, window, dtype)
    if float(dropout_p) != 0.0 and seed is None:
        from . import _philox

        seed = _philox.draw_seed()
    z = _dropout_scale(dropout_p, seed, s.shape[:-2], s.shape[-2], s.shape[-1], dtype)
    a = softmax(s)
    out = _context(_apply_dropout(_rounded_p(prec, s, a), z), v, s == -np.inf)
    extras = []
    if return_weights:
        extras.append(prec.statistic(_apply_dropout(a, z)))
    if return_lse:
        extras.append(prec.statistic(_log_sum_exp(s)))
    out = prec.store(out, out_dtype)
    return (out, *extras) if extras else out


def _sdpa_query(prec: _Precision, q: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """(Q as the score's left operand, the scale still to apply to the scores).

    ROUNDING POINT (SDPA, bfloat16): Q * scale, computed in float32, is rounded to bfloat16
    once, when the kernels fold the scale into Q: |scale| <= 1 or every Q * scale finite (the
    overflow rule of sdpa/micro.hpp, judged here over all of Q rather than per block). Not
    folded, Q is read as it is and the scores are scaled afterwards, in float32. Other
    dtypes: Q as it is, the scores scaled afterwards (no rounding to model)."""
    if not prec.bfloat16:
        return q, scale
    with np.errstate(over="ignore", invalid="ignore"):
        folded = q.astype(np.float32) * np.float32(scale)
    if abs(scale) <= 1 or np.all(np.isfinite(folded)):
        return prec.bf16(folded), 1.0
    return q, scale


def _rounded_p(prec: _Precision, s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The weights that multiply V: a = softmax(s) itself, except for bfloat16 inputs.

    ROUNDING POINT (SDPA, bfloat16): P = exp(s - m) is rounded to bfloat16 before P V, while
    the row sum l adds the unrounded P; the context is (bf16(P) V) / l. m here is the row's
    maximum; the kernels' online softmax rounds exp(s - m') for the running maximum m' of the
    key tiles seen so far, a difference of one more rounding of the same size (the tolerance
    in docs/precision.md counts it)."""
    if not prec.bfloat16:
        return a
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(m == -np.inf, 0, m)
    p = np.exp(s - m)
    total = np.sum(p, axis=-1, keepdims=True)
    return np.where(total == 0, 0, prec.bf16(p) / np.where(total == 0, 1, total))


# --- Encoder-decoder (RNN) attention: additive attention and the layers' math ----------------

__all__ += ["additive_attention", "bahdanau_attention", "luong_attention"]


def _length_mask(key_lengths, lk):
    """(..., 1, Lk) bool, True for keys at positions < length (key_lengths (...,))."""
    return np.arange(lk) < np.asarray(key_lengths)[..., None, None]


def _additive_dtype(query, key, value, w_query, w_key, v):
    """The compute dtype of additive attention; key may be a ProjectedKeys (its ``projected``)."""
    key = getattr(key, "projected", key)
    return _float_dtype(*(np.asarray(x) for x in (query, key, value, w_query, w_key, v) if x is not None))


def _additive_tanh(query, key, w_query, w_key, bias, dtype):
    """T_iju = tanh(q_i W_q + b + k_j W_k)_u, the (..., Lq, Lk, U) tensor of the formula. key may
    be a ProjectedKeys: its ``projected`` is k W_k."""
    q_proj = np.asarray(query, dtype) @ np.asarray(w_query, dtype)  # (..., Lq, U)
    if bias is not None:
        q_proj = q_proj + np.asarray(bias, dtype)
    projected = getattr(key, "projected", None)
    k_proj = (np.asarray(key, dtype) @ np.asarray(w_key, dtype) if projected is None
              else np.asarray(projected, dtype))  # (..., Lk, U)
    return np.tanh(q_proj[..., :, None, :] + k_proj[..., None, :, :])


def _additive_hidden(mask, key_lengths, is_causal, window, lq, lk):
    """Where additive attention hides a key: the mask, key_lengths (...,), causal and window."""
    hidden = _hidden_by(mask)
    if key_lengths is not None:
        hidden = hidden | ~_length_mask(key_lengths, lk)
    if is_causal or window is not None:
        hidden = hidden | (dense_mask(lq, lk, is_causal=is_causal, window=window) == -np.inf)
    return hidden


def additive_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, w_query: ArrayLike,
                       w_key: ArrayLike | None, v: ArrayLike, *, bias: ArrayLike | None = None,
                       attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                       is_causal: Any = False, window: tuple | None = None, return_weights: bool = False,
                       warn: bool = True, mask: ArrayLike | None = None, out_dtype: DTypeLike | None = None
                       ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """c_i = sum_j a_ij value_j, a_i = softmax_j(e_ij + mask_ij), e_ij = v . tanh(q_i W_q + b + k_j W_k).

    Builds the (..., Lq, Lk, U) tensor, as the formula reads. key_lengths (...,) hides keys at
    positions >= length; is_causal and window hide keys as in :func:`dense_mask`. key may be an
    :class:`attnext.ProjectedKeys` (then w_key is None). ``mask`` is attn_mask's older name;
    ``warn`` is accepted for signature parity. 16-bit inputs: computed exactly, the context
    rounded once at the store (or float32 with out_dtype), the weights float32.
    """
    mask = _mask_alias(attn_mask, mask)
    prec = _Precision(query, getattr(key, "projected", key), value, w_query, w_key, v, bias)
    dtype = prec.compute
    t = _additive_tanh(query, key, w_query, w_key, bias, dtype)
    e = t @ np.asarray(v, dtype)  # (..., Lq, Lk)
    hidden = _additive_hidden(mask, key_lengths, is_causal, window, e.shape[-2], e.shape[-1])
    out, a = _attend(_masked(e, mask).astype(dtype), np.asarray(value, dtype), hidden)
    out = prec.store(out, out_dtype)
    return (out, prec.statistic(a)) if return_weights else out


# PyTorch state-dict names of the encoder-decoder layers -> (textbook name, how to turn the
# (out, in) array into the textbook (in, out) one).
_TORCH_NAMES = {"query_proj.weight": ("w_query", np.transpose), "key_proj.weight": ("w_key", np.transpose),
                "v.weight": ("v", lambda a: a[0]), "query_proj.bias": ("bias", np.asarray),
                "key_proj.bias": ("key_bias", np.asarray), "v.bias": ("v_bias", lambda a: a[0]),
                "out_proj.weight": ("w_c", np.transpose)}


def _textbook(state, owner, general=False):
    """Weights given by their PyTorch state-dict names, under their textbook names and layout."""
    out = {}
    for name, value in state.items():
        if general and name == "key_proj.weight":
            out["w_a"] = np.asarray(value)  # Luong general: nn.Linear(key_dim, query_dim) holds W_a itself
        elif name in _TORCH_NAMES:
            textbook, convert = _TORCH_NAMES[name]
            out[textbook] = convert(np.asarray(value))
        else:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
    return out


def bahdanau_attention(query: ArrayLike, keys: ArrayLike, values: ArrayLike, w_query: ArrayLike | None = None,
                       w_key: ArrayLike | None = None, v: ArrayLike | None = None, *, g: float | None = None,
                       bias: ArrayLike | None = None, key_bias: ArrayLike | None = None,
                       v_bias: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                       out_dtype: DTypeLike | None = None, **state: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """BahdanauAttention's math for one step (query (B, Dq)) or many (query (B, T, Dq)).

    e_tj = v' . tanh(s_t W_q + bias + h_j W_k + key_bias) + v_bias, v' = v, or g v / ||v||
    (normalize=True); a_t = softmax(e_t); c_t = sum_j a_tj value_j. Returns (context, weights).
    The weights go by the layer's textbook attribute names (w_query (Dq, U), ...) or by its
    state-dict names, so ``bahdanau_attention(q, k, v, **layer.state_dict())`` is the layer's
    formula (``query_proj.weight`` (U, Dq), ``key_proj.weight`` (U, Dk), ``v.weight`` (1, U),
    ``query_proj.bias``, ``key_proj.bias``, ``v.bias``).

    16-bit inputs: as :func:`additive_attention` (context rounded at the store, or float32
    with out_dtype; weights float32), after the layer's two rounding points below.
    """
    given = dict(w_query=w_query, w_key=w_key, v=v, bias=bias, key_bias=key_bias, v_bias=v_bias)
    for name, value in _textbook(state, "bahdanau_attention").items():
        given[name] = value
    w_query, w_key, v, bias, key_bias, v_bias = (given[n] for n in ("w_query", "w_key", "v", "bias", "key_bias",
                                                                     "v_bias"))
    if w_query is None or w_key is None or v is None:
        raise TypeError("bahdanau_attention needs w_query, w_key and v (or their state-dict names)")
    if g is not None:
        g = float(np.asarray(g))
    prec = _Precision(query, keys, values, w_query, w_key, v)
    if key_bias is not None:
        # ROUNDING POINT (BahdanauAttention, bias=True, 16-bit): the sum of the two biases, one
        # bias inside the tanh, in the inputs' dtype.
        bias = key_bias if bias is None else (prec.read(bias) + prec.read(key_bias)).astype(prec.dtype)
    # v_bias adds the same number to every score: softmax does not see it.
    s = np.asarray(query)
    single = s.ndim == np.ndim(keys) - 1
    if single:
        s = s[..., None, :]
    if g is not None:
        # ROUNDING POINT (BahdanauAttention, normalize=True, 16-bit): g v / ||v|| in the inputs' dtype.
        exact = prec.read(v)
        v = (g * exact / np.sqrt(np.sum(exact * exact))).astype(prec.dtype)
    c, a = additive_attention(s, keys, values, w_query, w_key, v, bias=bias, key_lengths=key_lengths,
                              return_weights=True, out_dtype=out_dtype)
    return (c[..., 0, :], a[..., 0, :]) if single else (c, a)


def luong_attention(query: ArrayLike, keys: ArrayLike, values: ArrayLike | None = None,
                    w_c: ArrayLike | None = None, *, method: str = "dot", w_a: ArrayLike | None = None,
                    w_query: ArrayLike | None = None, w_key: ArrayLike | None = None, v: ArrayLike | None = None,
                    g: float | None = None, attn_mask: ArrayLike | None = None,
                    key_lengths: ArrayLike | None = None, mask: ArrayLike | None = None,
                    out_dtype: DTypeLike | None = None, **state: ArrayLike
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LuongAttention's math for one step (query (B, Dq)) or many (query (B, T, Dq)).

    Takes the layer's call arguments (query, keys, values, attn_mask, key_lengths) and its
    weights by their textbook attribute names (w_a, w_query, w_key, v, g, w_c) or by their
    state-dict names (``key_proj.weight``, ``query_proj.weight``, ``v.weight``, ``g``,
    ``out_proj.weight``), so ``luong_attention(q, k, method=m, **layer.state_dict())`` is the
    layer's formula. e_tj = s_t . h_j (dot), s_t W_a h_j (general) or
    v . tanh(s_t W_q + h_j W_k) (concat), times g when given; a_t = softmax(e_t + attn_mask);
    c_t = sum_j a_tj value_j; h~_t = tanh([c_t; s_t] W_c). Returns (h~, context, weights). For
    one step the mask broadcasts against (B, Lk). ``mask`` is attn_mask's older name.

    The scores and the context are :func:`attention` with method dot, general or additive
    (concat) and scale g, so 16-bit inputs take its route and rounding points; then h~ is
    computed exactly from the context rounded to the inputs' dtype and rounded at its store
    (float32 with out_dtype, which also returns the context unrounded); weights float32.
    """
    mask = _mask_alias(attn_mask, mask)
    given = dict(w_c=w_c, w_a=w_a, w_query=w_query, w_key=w_key, v=v)
    for name, value in _textbook(state, "luong_attention", general=method == "general").items():
        if name not in given:
            raise TypeError(f"luong_attention got an unexpected weight {name!r}")
        given[name] = value
    w_c, w_a, w_query, w_key, v = (given[n] for n in ("w_c", "w_a", "w_query", "w_key", "v"))
    if g is not None:
        g = float(np.asarray(g))
    if w_c is None:
        raise TypeError("luong_attention needs w_c (or out_proj.weight)")
    by_method: dict[str, Any] = {"dot": {}, "general": dict(weight=w_a),
                                 "concat": dict(w_query=w_query, w_key=w_key, v=v)}
    score_args = by_method.get(method)
    if score_args is None:
        raise ValueError(f"method must be 'dot', 'general' or 'concat', got {method!r}")
    s = np.asarray(query)
    h = np.asarray(keys)
    val = h if values is None else np.asarray(values)
    prec = _Precision(s, h, val, w_c, *score_args.values())
    single = s.ndim == h.ndim - 1
    if single:
        s = s[..., None, :]
        if mask is not None and np.ndim(mask) >= 2:
            mask = np.asarray(mask)[..., None, :]
    c, a = attention(s, h, val, method="additive" if method == "concat" else method, attn_mask=mask,
                     key_lengths=key_lengths, return_weights=True, scale=g, out_dtype=FLOAT32 if prec.low else None,
                     **score_args)
    # ROUNDING POINT (LuongAttention, 16-bit): W_c reads the context in the inputs' dtype (as
    # the kernel stored it); out_dtype=np.float32 returns it unrounded.
    read = c.astype(prec.dtype)
    joined = np.concatenate([prec.read(read), prec.read(np.broadcast_to(s, c.shape[:-1] + s.shape[-1:]))], axis=-1)
    hidden = prec.store(np.tanh(joined @ prec.read(w_c)), out_dtype)
    if prec.low and hidden.dtype != FLOAT32:
        c = read
    if single:
        return hidden[..., 0, :], c[..., 0, :], a[..., 0, :]
    return hidden, c, a


# ---- Multi-head attention (the formula behind attnext.MultiHeadAttention) -------------------


def multi_head_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, num_heads: int, q_weight: ArrayLike,
                         k_weight: ArrayLike, v_weight: ArrayLike, out_weight: ArrayLike, *,
                         q_bias: ArrayLike | None = None, k_bias: ArrayLike | None = None,
                         v_bias: ArrayLike | None = None, out_bias: ArrayLike | None = None,
                         num_kv_heads: int | None = None, attn_mask: ArrayLike | None = None,
                         is_causal: Any = False, key_mask: ArrayLike | None = None,
                         key_lengths: ArrayLike | None = None, window: tuple | None = None,
                         out_dtype: DTypeLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batch-first multi-head attention, one head at a time, with grouped-query attention by
    repeating key/value heads.

    query (B, L, E), key (B, S, kdim), value (B, S, vdim); weights in (out_features,
    in_features) layout: q_weight (E, E), k_weight and v_weight (Hk * d, kdim / vdim),
    out_weight (E, E) with d = E / num_heads. attn_mask broadcastable to (B, H, L, S), bool
    True = may attend or float added; key_mask (B, S) likewise per key; key_lengths (B,) and
    window as in :func:`dense_mask` (the layer's call arguments). Returns (output (B, L, E),
    weights (B, H, L, S)).

        Q = query W_q^T + b_q, K = key W_k^T + b_k, V = value W_v^T + b_v
        head_h = softmax(Q_h K_g^T / sqrt(d) + mask) V_g,  g = h // (H / Hk)
        output = [head_1, ..., head_H] W_out^T + b_out

    16-bit weights and inputs: :func:`_multi_head_low_precision` (float32 weights returned).
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    prec = _Precision(query, key, value, q_weight, k_weight, v_weight, out_weight)
    if prec.low:
        return _multi_head_low_precision(prec, query, key, value, num_heads, num_kv_heads, q_weight, k_weight,
                                         v_weight, out_weight, (q_bias, k_bias, v_bias, out_bias), attn_mask,
                                         is_causal, key_mask, key_lengths, window, out_dtype)
    output_dtype(out_dtype, prec.dtype)  # only None or the inputs' dtype is valid here

    def project(x, w, b):
        y = np.asarray(x) @ np.asarray(w).T
        return y if b is None else y + np.asarray(b)

    q = project(query, q_weight, q_bias)
    k = project(key, k_weight, k_bias)
    v = project(value, v_weight, v_bias)
    bsz, lq, e = q.shape
    s = k.shape[1]
    d = e // num_heads
    group = num_heads // num_kv_heads
    mask = _mha_mask(attn_mask, key_mask, (bsz, num_heads, lq, s), q.dtype)
    structural = (dense_mask(lq, s, is_causal=is_causal, window=window, key_lengths=key_lengths) == -np.inf
                  if (is_causal or window is not None or key_lengths is not None) else np.asarray(False))
    heads, weights = [], []
    for h in range(num_heads):
        g = h // group  # the key/value head that query head h shares
        qh, kh, vh = q[:, :, h * d:(h + 1) * d], k[:, :, g * d:(g + 1) * d], v[:, :, g * d:(g + 1) * d]
        mask_h = None if mask is None else mask[:, h]
        hidden = _hidden_by(mask_h) | (structural[:, 0] if structural.ndim == 4 else structural)
        c, a = _attend(_masked(qh @ np.swapaxes(kh, -1, -2) / math.sqrt(d), mask_h), vh, hidden)
        heads.append(c)
        weights.append(a)
    out = project(np.concatenate(heads, axis=-1), out_weight, out_bias)
    return out.astype(q.dtype), np.stack(weights, axis=1).astype(q.dtype)


def _mha_mask(attn_mask, key_mask, shape, dtype):
    """attn_mask (broadcastable to (B, H, L, S)) and key_mask (B, S) as one mask of ``shape``:
    bool & bool stays bool, otherwise both as additive masks, where a key either one hides
    stays hidden."""
    mask = None if attn_mask is None else np.broadcast_to(np.asarray(attn_mask), shape)
    if key_mask is None:
        return mask
    km = np.broadcast_to(np.asarray(key_mask)[:, None, None, :], shape)
    if mask is None:
        return km
    if mask.dtype == np.bool_ and km.dtype == np.bool_:
        return mask & km
    fm, fk = _masked(np.zeros(shape, dtype), mask), _masked(np.zeros(shape, dtype), km)
    with np.errstate(invalid="ignore"):
        return np.where((fm == -np.inf) | (fk == -np.inf), -np.inf, fm + fk)


def _multi_head_low_precision(prec, query, key, value, num_heads, num_kv_heads, q_weight, k_weight, v_weight,
                              out_weight, biases, attn_mask, is_causal, key_mask, key_lengths, window, out_dtype):
    """multi_head_attention of 16-bit weights and inputs, as MultiHeadAttention(dtype=...) runs:
    the projections and the attention output are 16-bit arrays between the steps, the heads go
    through :func:`scaled_dot_product_attention` (with its own rounding points)."""
    q_bias, k_bias, v_bias, out_bias = biases

    def project(x, w, b):
        # ROUNDING POINT (MultiHeadAttention, 16-bit): each projection Q, K, V is rounded to
        # the inputs' dtype (computed exactly, bias included).
        y = prec.read(x) @ prec.read(w).T
        return (y if b is None else y + prec.read(b)).astype(prec.dtype)

    q, k, v = project(query, q_weight, q_bias), project(key, k_weight, k_bias), project(value, v_weight, v_bias)
    bsz, lq, e = q.shape
    s, d = k.shape[1], e // num_heads

    def heads(y, h):  # (B, L, h * d) -> (B, h, L, d)
        return y.reshape(y.shape[:2] + (h, d)).transpose(0, 2, 1, 3)

    mask = _mha_mask(attn_mask, key_mask, (bsz, num_heads, lq, s), prec.compute)
    # ROUNDING POINT (MultiHeadAttention, 16-bit): the attention output fed to the output
    # projection is rounded to the inputs' dtype (SDPA's store).
    o, w = scaled_dot_product_attention(heads(q, num_heads), heads(k, num_kv_heads), heads(v, num_kv_heads), mask,
                                        is_causal=is_causal, enable_gqa=num_kv_heads != num_heads,
                                        key_lengths=key_lengths, window=window, return_weights=True)
    merged = o.transpose(0, 2, 1, 3).reshape(bsz, lq, e)
    out = prec.read(merged) @ prec.read(out_weight).T
    out = out if out_bias is None else out + prec.read(out_bias)
    return prec.store(out, out_dtype), w


# ---- Self-attention (the formula behind attnext.SelfAttention) -------------------------------

__all__ += ["self_attention"]


def self_attention(x: ArrayLike, w_query: ArrayLike, w_key: ArrayLike, w_value: ArrayLike, *,
                   b_query: ArrayLike | None = None, b_key: ArrayLike | None = None,
                   b_value: ArrayLike | None = None, attn_mask: ArrayLike | None = None, is_causal: Any = False,
                   key_lengths: ArrayLike | None = None, window: tuple | None = None, exclude_self: bool = False,
                   return_weights: bool = False, out_dtype: DTypeLike | None = None
                   ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """SelfAttention's math, with the layer's call arguments: Q = x W_q + b_q, K = x W_k + b_k,
    V = x W_v + b_v (the layer's textbook-orientation attributes, w_query (E, d_k), ...), then
    softmax(Q K^T / sqrt(d_k) + attn_mask) V with causal, key_lengths (x's batch axes) and window
    as in :func:`attention`; exclude_self hides each position's own key. 16-bit inputs: Q, K, V
    rounded to their dtype, then :func:`attention`'s route and rounding points (weights float32)."""
    prec = _Precision(x, w_query, w_key, w_value)

    def project(w, b):
        # ROUNDING POINT (SelfAttention, 16-bit): each projection Q, K, V is rounded to the
        # inputs' dtype (computed exactly, bias included).
        y = prec.read(x) @ prec.read(w)
        return (y if b is None else y + prec.read(b)).astype(prec.dtype)

    q, k, v = project(w_query, b_query), project(w_key, b_key), project(w_value, b_value)
    if exclude_self:
        off_diagonal = ~np.eye(np.shape(x)[-2], dtype=bool)
        if attn_mask is None:
            attn_mask = off_diagonal
        elif np.asarray(attn_mask).dtype == np.bool_:
            attn_mask = np.asarray(attn_mask) & off_diagonal
        else:
            attn_mask = np.where(off_diagonal, np.asarray(attn_mask), -np.inf)
    return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, key_lengths=key_lengths, window=window,
                     return_weights=return_weights, out_dtype=out_dtype)


# ---- Gradients: the backward of every differentiable function, from the formulas ------------
#
# Each takes the cotangent of the forward's output and returns the cotangents of its inputs,
# each with its input's shape (axes that broadcasting added or stretched summed back by
# attnext._broadcast.reduce_to_shape, the one inverse of broadcasting) and dtype.

__all__ += ["softmax_backward", "weighted_sum_backward", "score_backward", "scaled_dot_product_attention_backward",
            "additive_attention_backward", "linear_backward"]


def _like(grad, x):
    """grad summed back to x's shape (the inverse of broadcasting), in x's dtype."""
    x = getattr(x, "projected", x)  # a ProjectedKeys' gradient is its projected array's
    x = np.asarray(x)
    return reduce_to_shape(np.asarray(grad), x.shape).astype(x.dtype)


def _float_mask_grad(grad, mask):
    """The gradient of a float mask added to the scores (None for None or a bool mask)."""
    if mask is None or np.asarray(mask).dtype == np.bool_:
        return None
    return _like(grad, mask)


def _probabilities(s, lse):
    """P = softmax(s): the probabilities the forward produced, recomputed by the forward's own
    softmax (the row max subtracted); 0 where s is -inf and in rows with nothing to attend.

    The saved lse is not used: exp(s - lse) differs from the forward's weights where lse's
    rounding (lse = m + log(l)) is large against the score differences, e.g. a row whose every
    key has a mask of finfo.min (float32: every s_ij rounds to finfo.min, lse too, and exp(s - lse)
    gives 1 per key where the forward gave 1 / n); the backward differentiates the weights the
    forward actually produced."""
    return softmax(s)


def _softmax_input_grad(dp, p):
    """dS = P * (dP - sum_j P_ij dP_ij): the softmax's Jacobian (diag(p) - p p^T) applied to dP."""
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))


def softmax_backward(grad: ArrayLike, weights: ArrayLike, *, axis: int = -1) -> np.ndarray:
    """dx = w * (g - sum(g * w, axis)) for w = softmax(x) along ``axis`` (weights: softmax's
    output; grad: its cotangent, the same shape). A masked entry (weight 0) gets 0; the same
    array is the gradient of a float mask added to x (summed to the mask's shape)."""
    w = np.asarray(weights)
    g = np.asarray(grad, dtype=w.dtype)
    return (w * (g - np.sum(g * w, axis=axis, keepdims=True))).astype(w.dtype)


def weighted_sum_backward(grad: ArrayLike, weights: ArrayLike, value: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """For c = A V ((..., Lq, Lk) x (..., Lk, Dv)): dA = g V^T, dV = A^T g. Returns (dweights, dvalue)."""
    a, v = np.asarray(weights), np.asarray(value)
    g = np.asarray(grad, dtype=_float_dtype(a, v))
    return _like(g @ np.swapaxes(v, -1, -2), a), _like(np.swapaxes(a, -1, -2) @ g, v)


def _flat(a, keep=1):
    """a with its leading axes flattened into one, its last ``keep`` kept: the sizes written out,
    since reshape(-1, ...) cannot infer the -1 when a kept size is 0 (an empty feature axis)."""
    return a.reshape((math.prod(a.shape[:a.ndim - keep]),) + a.shape[a.ndim - keep:])


def _sum_outer(a, b):
    """sum over the batch axes of a^T b, for a (..., N, I) and b (..., N, J): (I, J)."""
    prod = np.swapaxes(a, -1, -2) @ b
    return _flat(prod, 2).sum(axis=0)


def _additive_score_backward(ds, q, t, key, w_query, w_key, v, dtype):
    """Cotangents of e_ij = v . T_ij, T = tanh(q W_q + b + k W_k), given de = ds (..., Lq, Lk):
    dv = sum_ij de_ij T_ij; dZ = de v (1 - T^2); d(q W_q + b) = sum_j dZ; d(k W_k) = sum_i dZ."""
    v = np.asarray(v, dtype)
    dv = _flat(ds[..., None] * t).sum(axis=0)
    dz = ds[..., None] * v * (1 - t * t)  # (..., Lq, Lk, U)
    dq_proj, dk_proj = dz.sum(axis=-2), dz.sum(axis=-3)  # (..., Lq, U), (..., Lk, U)
    wq = np.asarray(w_query, dtype)
    grads = {"query": dq_proj @ wq.T, "w_query": _sum_outer(np.asarray(q, dtype), dq_proj), "v": dv,
             "bias": _flat(dq_proj).sum(axis=0)}
    if hasattr(key, "projected"):
        grads["key"], grads["w_key"] = dk_proj, None
    else:
        wk = np.asarray(w_key, dtype)
        grads["key"], grads["w_key"] = dk_proj @ wk.T, _sum_outer(np.asarray(key, dtype), dk_proj)
    return grads


def score_backward(grad: ArrayLike, query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *,
                   weight: ArrayLike | None = None, w_query: ArrayLike | None = None, w_key: ArrayLike | None = None,
                   v: ArrayLike | None = None, scale: float | None = None) -> dict[str, np.ndarray | None]:
    """Cotangents of :func:`score`'s inputs from the scores' cotangent grad (..., Lq, Lk).

    dot/scaled_dot (s = c q k^T): dq = c g K, dk = c g^T Q. general (s = c (q W) k^T): dq = c g K W^T,
    dW = c sum Q^T g K, dk = c g^T Q W. additive (s = c v . tanh(q W_q + k W_k)): through the
    (..., Lq, Lk, U) tensor. Returns {query, key, weight, w_query, w_key, v}, None for the
    arguments the method does not use.
    """
    q, k = np.asarray(query), np.asarray(key)
    dtype = _float_dtype(*(np.asarray(x) for x in (q, k, weight, w_query, w_key, v) if x is not None))
    q, k = q.astype(dtype), k.astype(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] else 1.0
    g = np.asarray(grad, dtype) * np.asarray(scale, dtype)
    out = dict.fromkeys(("query", "key", "weight", "w_query", "w_key", "v"))
    if method in ("dot", "scaled_dot"):
        out["query"], out["key"] = g @ k, np.swapaxes(g, -1, -2) @ q
    elif method == "general":
        w = np.asarray(weight, dtype)
        dqw = g @ k  # the cotangent of q W
        out["query"], out["weight"] = dqw @ w.T, _sum_outer(q, dqw)
        out["key"] = np.swapaxes(g, -1, -2) @ (q @ w)
    elif method == "additive":
        t = _additive_tanh(q, k, w_query, w_key, None, dtype)
        grads = _additive_score_backward(g, q, t, k, w_query, w_key, v, dtype)
        out.update({name: grads[name] for name in ("query", "key", "w_query", "w_key", "v")})
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    given = {"query": query, "key": key, "weight": weight, "w_query": w_query, "w_key": w_key, "v": v}
    return {name: None if g_ is None else _like(g_, given[name]) for name, g_ in out.items()}


def scaled_dot_product_attention_backward(
        grad_out: ArrayLike, query: ArrayLike, key: ArrayLike, value: ArrayLike, out: ArrayLike | None,
        lse: ArrayLike | None, attn_mask: ArrayLike | None = None, dropout_p: float = 0.0, is_causal: Any = False,
        scale: float | None = None, enable_gqa: bool = False, *, key_lengths: ArrayLike | None = None,
        window: tuple | None = None, seed: int | None = None, grad_weights: ArrayLike | None = None,
        grad_lse: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The backward of :func:`scaled_dot_product_attention` (same arguments; out and lse as it
    returned them; grad_out (..., Hq, L, Ev) the output's cotangent).

    With P = softmax(S) (the forward's weights, recomputed as the forward computes them; the
    saved lse is not used), Z the dropout scale (1 without dropout) and W = P * Z:
    dW = dO V^T + grad_weights (the cotangent of the returned weights, after dropout);
    dP = dW * Z; dS = P * (dP - rowsum(P * dP)) + grad_lse P (grad_lse (..., Hq, L): the
    cotangent of lse); dQ = scale dS K; dK = scale dS^T Q; dV = W^T dO. Under enable_gqa the
    query heads' dK and dV are summed over each key/value head's group. ``out`` is accepted for
    signature parity (this twin forms rowsum(P * dP) directly), ``lse`` too (P is recomputed).

    Returns (dquery, dkey, dvalue, dattn_mask), each of its input's shape and dtype;
    dattn_mask is dS summed to the mask's shape for a float mask, else None.
    """
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    dtype = _float_dtype(q, k, v)
    qc, kc, vc = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    kr, vr, group = _gqa_repeat(qc, kc, vc, enable_gqa)
    scale = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else scale
    s, _ = _sdpa_scores(qc, kr, attn_mask, is_causal, scale, key_lengths, window, dtype)
    lq, lk = s.shape[-2:]
    if float(dropout_p) != 0.0 and seed is None:
        raise ValueError("seed is required with dropout_p > 0: pass the seed the forward used")
    z = _dropout_scale(dropout_p, seed, s.shape[:-2], lq, lk, dtype)
    p = _probabilities(s, lse)
    w = _apply_dropout(p, z)
    g = np.asarray(grad_out, dtype)
    dw = g @ np.swapaxes(vr, -1, -2)
    if grad_weights is not None:
        dw = dw + np.asarray(grad_weights, dtype)
    ds = _softmax_input_grad(_apply_dropout(dw, z), p)
    if grad_lse is not None:
        ds = ds + np.asarray(grad_lse, dtype)[..., None] * p
    c = np.asarray(scale, dtype)
    dq = (ds @ kr) * c
    dk = (np.swapaxes(ds, -1, -2) @ qc) * c
    dv = np.swapaxes(w, -1, -2) @ g
    if group > 1:  # (..., Hq, S, X) -> (..., Hk, G, S, X), summed over G as k[..., :, None] was broadcast
        dk, dv = (d.reshape(d.shape[:-3] + (k.shape[-3], group) + d.shape[-2:]) for d in (dk, dv))
        dk = reduce_to_shape(dk, k.shape[:-2] + (1,) + k.shape[-2:]).reshape(k.shape)
        dv = reduce_to_shape(dv, v.shape[:-2] + (1,) + v.shape[-2:]).reshape(v.shape)
    return _like(dq, q), _like(dk, k), _like(dv, v), _float_mask_grad(ds, attn_mask)


def additive_attention_backward(grad_out: ArrayLike, query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                w_query: ArrayLike, w_key: ArrayLike | None, v: ArrayLike, out: ArrayLike | None,
                                lse: ArrayLike | None, *, bias: ArrayLike | None = None,
                                attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                                is_causal: Any = False, window: tuple | None = None,
                                grad_weights: ArrayLike | None = None) -> dict[str, np.ndarray | None]:
    """The backward of :func:`additive_attention` (same arguments; grad_out (..., Lq, Dv)).

    dA = dO V^T + grad_weights; dE = A * (dA - rowsum(A * dA)) (the scores' cotangent, also the
    float mask's); dvalue = A^T dO; then through e_ij = v . tanh(q_i W_q + b + k_j W_k):
    dv = sum dE_ij T_ij, dZ = dE v (1 - T^2), d(q W_q + b) = sum_j dZ, d(k W_k) = sum_i dZ.
    A ProjectedKeys key gets the gradient of its ``projected`` array (w_key None). ``out`` is
    and ``lse`` are accepted for signature parity: A is the forward's softmax, recomputed.

    Returns {query, key, value, w_query, w_key, v, bias, attn_mask}: each of its input's shape
    and dtype, None where the input is None or not a float array.
    """
    dtype = _additive_dtype(query, key, value, w_query, w_key, v)
    t = _additive_tanh(query, key, w_query, w_key, bias, dtype)
    e = t @ np.asarray(v, dtype)
    hidden = _additive_hidden(attn_mask, key_lengths, is_causal, window, e.shape[-2], e.shape[-1])
    s = np.where(hidden, -np.inf, _masked(e, attn_mask)).astype(dtype)
    p = _probabilities(s, lse)
    g, val = np.asarray(grad_out, dtype), np.asarray(value, dtype)
    dw = g @ np.swapaxes(val, -1, -2)
    if grad_weights is not None:
        dw = dw + np.asarray(grad_weights, dtype)
    ds = _softmax_input_grad(dw, p)
    grads = _additive_score_backward(ds, query, t, key, w_query, w_key, v, dtype)
    grads["value"] = np.swapaxes(p, -1, -2) @ g
    given = {"query": query, "key": key, "value": value, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias}
    result = {name: None if given[name] is None or grads[name] is None else _like(grads[name], given[name])
              for name in given}
    result["attn_mask"] = _float_mask_grad(ds, attn_mask)
    return result


def linear_backward(grad: ArrayLike, x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """For y = x W^T + b (x (..., In), W (Out, In), b (Out,)): dx = g W, dW = sum g^T x over
    the batch axes, db = sum g. Returns (dx, dweight, dbias), dbias None without a bias."""
    x_, w = np.asarray(x), np.asarray(weight)
    dtype = _float_dtype(*(np.asarray(a) for a in (x_, w, bias) if a is not None))
    g = np.asarray(grad, dtype)
    dx = g @ w.astype(dtype)
    dw = _sum_outer(_flat(g), _flat(x_.astype(dtype)))
    db = None if bias is None else _like(_flat(g).sum(axis=0), bias)
    return _like(dx, x_), _like(dw, w), db


def _attention_backward(grad_out, query, key, value, *, method="scaled_dot", attn_mask=None, is_causal=False,
                        key_lengths=None, window=None, grad_weights=None, dropout_p=0.0, seed=None, **score_args):
    """The backward of :func:`attention`, dense: S = score(Q, K) + mask, A = softmax(S),
    W = A * Z (Z the dropout scale), dW = dO V^T + grad_weights, dS = A * (dW Z - rowsum(A * dW Z)),
    dV = W^T dO, then :func:`score_backward` of dS. Returns score_backward's dict plus value and
    attn_mask."""
    s = score(query, key, method, **score_args)
    hidden = _attention_hidden(attn_mask, s.shape, is_causal, window, key_lengths)
    p = softmax(np.where(hidden, -np.inf, _masked(s, attn_mask)).astype(s.dtype))
    dtype = _float_dtype(s, np.asarray(value))
    z = _dropout_scale(dropout_p, seed, np.broadcast_shapes(s.shape[:-2], np.shape(value)[:-2]), s.shape[-2],
                       s.shape[-1], dtype)
    g, val = np.asarray(grad_out, dtype), np.asarray(value, dtype)
    dw = g @ np.swapaxes(val, -1, -2)
    if grad_weights is not None:
        dw = dw + np.asarray(grad_weights, dtype)
    ds = _softmax_input_grad(_apply_dropout(dw, z), p)
    grads = score_backward(ds, query, key, method, **score_args)
    grads["value"] = _like(np.swapaxes(_apply_dropout(p, z), -1, -2) @ g, value)
    grads["attn_mask"] = _float_mask_grad(ds, attn_mask)
    return grads
