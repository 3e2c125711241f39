"""The functional API: the three attention steps and their compositions, on NumPy arrays.

Every function accepts float32 or float64 arrays of any layout (C, Fortran, strided views);
mixed dtypes follow NumPy's promotion and float16 computes as float32. Integer, bool and
complex inputs raise TypeError. Leading (batch) dimensions broadcast.
"""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._validation import (
    as_scalar,
    broadcast_batch,
    causal_offset,
    prepare_mask,
    promote,
    require_ndim,
    shape_str,
)

__all__ = ["score", "softmax", "weighted_sum", "attention", "scaled_dot_product_attention"]

METHODS = ("dot", "scaled_dot", "general", "additive")
_METHOD_ARGS = {
    "dot": set(),
    "scaled_dot": set(),
    "general": {"weight"},
    "additive": {"w_query", "w_key", "v"},
}


def _require(**arrays) -> None:
    """Required array arguments may not be None (promote() skips Nones, meant for optional ones)."""
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name} must be an array, got None")


def _check_method_args(method, given: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    passed = {name for name, value in given.items() if value is not None}
    needed = _METHOD_ARGS[method]
    missing = needed - passed
    if missing:
        raise ValueError(f"method={method!r} needs {', '.join(sorted(missing))}")
    extra = passed - needed
    if extra:
        raise ValueError(f"{', '.join(sorted(extra))} is not used by method={method!r}")


def score(query, key, method="scaled_dot", *, weight=None, w_query=None, w_key=None, v=None, scale=None):
    """Scores of every query against every key.

    Args:
        query: (..., Lq, Dq).
        key: (..., Lk, Dk); leading dimensions broadcast against query's.
        method: ``"dot"`` (q.k), ``"scaled_dot"`` (q.k / sqrt(Dk)), ``"general"`` (q W k, Luong)
            or ``"additive"`` (v . tanh(q W_q + k W_k), Bahdanau; Luong's "concat").
        weight: (Dq, Dk), for ``general``.
        w_query: (Dq, U), w_key: (Dk, U), v: (U,), for ``additive``. The (..., Lq, Lk, U)
            tensor of the textbook formula is never built.
        scale: multiplies the scores; default 1/sqrt(Dk) for ``scaled_dot``, else 1.

    Returns:
        (..., Lq, Lk) scores.
    """
    _require(query=query, key=key)
    _check_method_args(method, {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v})
    dtype, a = promote(query=query, key=key, weight=weight, w_query=w_query, w_key=w_key, v=v)
    require_ndim(a["query"], "query", 2, "(..., Lq, Dq)")
    require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
    _, qk = broadcast_batch({"query": a["query"], "key": a["key"]}, {"query": 2, "key": 2})
    q, k = qk["query"], qk["key"]
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] > 0 else 1.0
    scale = as_scalar(scale, "scale")
    if method == "additive":
        return _core.score_additive(q, k, a["w_query"], a["w_key"], a["v"], None, scale)
    return _core.score_product(q, k, a.get("weight"), scale)


def softmax(x, *, mask=None, axis=-1):
    """Numerically stable softmax along ``axis``: exp(x - max) / sum.

    Args:
        x: any shape with at least one dimension.
        mask: broadcastable to x. bool: True = may attend (False entries get weight 0);
            float: added to x (-inf hides an entry).

    Returns:
        Array of x's shape and dtype. A row with nothing to attend (every entry masked or
        -inf) is all zeros, never NaN; a NaN in a row makes that row NaN.
    """
    _require(x=x)
    dtype, a = promote(x=x)
    x = a["x"]
    require_ndim(x, "x", 1, "")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {shape_str(x.shape)}")
    m = prepare_mask(mask, x.shape, dtype)
    if axis % x.ndim != x.ndim - 1:
        x = np.moveaxis(x, axis, -1)
        m = None if m is None else np.moveaxis(m, axis, -1)
        return np.moveaxis(_core.softmax(x, m), -1, axis)
    return _core.softmax(x, m)


def weighted_sum(weights, value):
    """context_i = sum_j weights_ij value_j.

    Args:
        weights: (..., Lq, Lk).
        value: (..., Lk, Dv); leading dimensions broadcast.

    Returns:
        (..., Lq, Dv).
    """
    _require(weights=weights, value=value)
    _, a = promote(weights=weights, value=value)
    require_ndim(a["weights"], "weights", 2, "(..., Lq, Lk)")
    require_ndim(a["value"], "value", 2, "(..., Lk, Dv)")
    _, b = broadcast_batch(a, {"weights": 2, "value": 2})
    return _core.weighted_sum(b["weights"], b["value"])


def attention(query, key, value, *, method="scaled_dot", mask=None, is_causal=False, return_weights=False,
              **score_args):
    """The three steps composed: softmax(score(query, key) + mask) value.

    Args:
        query: (..., Lq, Dq); key: (..., Lk, Dk); value: (..., Lk, Dv).
        method, score_args: as for :func:`score` (weight, w_query, w_key, v, scale).
        mask: broadcastable to (..., Lq, Lk); bool True = may attend, float added.
        is_causal: False, True (top-left aligned, as PyTorch) or ``"bottom_right"``.
        return_weights: also return the (..., Lq, Lk) attention weights.

    Returns:
        context (..., Lq, Dv), or (context, weights).
    """
    unknown = set(score_args) - {"weight", "w_query", "w_key", "v", "scale"}
    if unknown:
        raise TypeError(f"attention() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    _require(query=query, key=key, value=value)
    dtype, a = promote(value=value)
    s = score(query, key, method, **score_args)
    dtype = np.result_type(s.dtype, a["value"].dtype)
    s = s.astype(dtype, copy=False)
    val = a["value"].astype(dtype, copy=False)
    require_ndim(val, "value", 2, "(..., Lk, Dv)")
    if val.shape[-2] != s.shape[-1]:
        raise ValueError(
            f"key has {s.shape[-1]} positions but value has shape {shape_str(val.shape)}: "
            "value's second-to-last dimension must equal key's"
        )
    causal, offset = causal_offset(is_causal, s.shape[-2], s.shape[-1])
    w = _core.softmax(s, prepare_mask(mask, s.shape, dtype), causal, offset)
    _, b = broadcast_batch({"weights": w, "value": val}, {"weights": 2, "value": 2})
    out = _core.weighted_sum(b["weights"], b["value"])
    return (out, b["weights"]) if return_weights else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, key_lengths=None, window=None, return_weights=False,
                                 return_lse=False):
    """softmax(query key^T * scale + mask) value, with PyTorch's argument meanings.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool True = may attend, float added.
        dropout_p: must be 0.0 (dropout is not supported yet).
        is_causal: False, True (top-left, PyTorch) or ``"bottom_right"`` (KV-cache decoding).
        scale: default 1/sqrt(E).
        enable_gqa: Hq a multiple of Hk; query head h uses key/value head h // (Hq // Hk).
        key_lengths: ints broadcastable to the batch shape (the dimensions before Hq, L), each in
            [0, S]; keys at positions >= length are padding.
        window: (left, right): query i sees keys [i - left, i + right]; None = unbounded side.
        return_weights: also return the (..., Hq, L, S) weights.
        return_lse: also return the (..., Hq, L) log-sum-exp of each row (-inf if empty).

    Returns:
        output (..., Hq, L, Ev), followed by weights and lse when asked for. A row that may
        attend to nothing gives output 0, weights 0, lse -inf.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout is not supported yet: dropout_p must be 0.0, got {dropout_p}")
    _require(query=query, key=key, value=value)
    dtype, a = promote(query=query, key=key, value=value)
    q, k, v = a["query"], a["key"], a["value"]
    require_ndim(q, "query", 2, "(..., L, E)")
    require_ndim(k, "key", 2, "(..., S, E)")
    require_ndim(v, "value", 2, "(..., S, Ev)")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key has shape {shape_str(k.shape)} but value has {shape_str(v.shape)}: "
                         "all but the last dimension must match")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query has shape {shape_str(q.shape)} but key has {shape_str(k.shape)}: "
                         "the last (embedding) dimensions must match")
    if enable_gqa and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa needs query heads to be a multiple of key heads: query has shape "
                             f"{shape_str(q.shape)}, key has {shape_str(k.shape)}")
        # Group the query heads (..., Hk, G, L, E) against stride-0 key/value heads: no copies.
        group = hq // hk
        q = q.reshape(q.shape[:-3] + (hk, group) + q.shape[-2:])
        k, v = k[..., :, None, :, :], v[..., :, None, :, :]
        results = scaled_dot_product_attention(q, k, v, _regroup_mask(attn_mask, hk, group), 0.0, is_causal,
                                               scale, False, key_lengths=_add_axis(key_lengths), window=window,
                                               return_weights=return_weights, return_lse=return_lse)
        def ungroup(r):  # (..., Hk, G, L[, X]) -> (..., Hq, L[, X])
            lead = r.ndim - 4 if r.ndim == q.ndim else r.ndim - 3
            return r.reshape(r.shape[:lead] + (hq,) + r.shape[lead + 2:])

        return tuple(map(ungroup, results)) if isinstance(results, tuple) else ungroup(results)
    _, qkv = broadcast_batch({"query": q, "key": k, "value": v}, {"query": 2, "key": 2, "value": 2})
    q, k, v = qkv["query"], qkv["key"], qkv["value"]
    lq, lk = q.shape[-2], k.shape[-2]
    score_shape = q.shape[:-1] + (lk,)
    scale = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else as_scalar(scale, "scale")
    mask = _fold_masks(attn_mask, key_lengths, window, score_shape, dtype)
    s = _core.score_product(q, k, None, scale)
    causal, offset = causal_offset(is_causal, lq, lk)
    w = _core.softmax(s, mask, causal, offset)
    out = _core.weighted_sum(w, v)
    extras = []
    if return_weights:
        extras.append(w)
    if return_lse:
        extras.append(_log_sum_exp(s, w, mask, causal, offset))
    return (out, *extras) if extras else out


def _regroup_mask(attn_mask, hk: int, group: int):
    """An attn_mask for (..., Hq, L, S) scores, reshaped for (..., Hk, G, L, S) ones."""
    if attn_mask is None:
        return None
    m = np.asarray(attn_mask)
    if m.ndim < 3:
        return m
    if m.shape[-3] == hk * group:
        return m.reshape(m.shape[:-3] + (hk, group) + m.shape[-2:])
    return m[..., None, :, :]


def _add_axis(key_lengths):
    return None if key_lengths is None else np.asarray(key_lengths)[..., None]


def _check_key_lengths(key_lengths, batch_shape: tuple, lk: int) -> np.ndarray:
    lengths = np.asarray(key_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
    try:
        lengths = np.broadcast_to(lengths, batch_shape)
    except ValueError:
        raise ValueError(f"key_lengths has shape {shape_str(lengths.shape)}, which does not broadcast to the "
                         f"batch shape {shape_str(batch_shape)}") from None
    if lengths.size and (lengths.min() < 0 or lengths.max() > lk):
        raise ValueError(f"key_lengths must lie in [0, {lk}] (the number of keys), got values from "
                         f"{lengths.min()} to {lengths.max()}")
    return lengths


def _check_window(window):
    if window is None:
        return None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (left, right), got {window!r}") from None
    for side, value in (("left", left), ("right", right)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"window {side} must be a non-negative int or None, got {value!r}")
    return left, right


def _fold_masks(attn_mask, key_lengths, window, score_shape: tuple, dtype):
    """attn_mask, key_lengths and window as one mask broadcast to score_shape (or None)."""
    lq, lk = score_shape[-2], score_shape[-1]
    mask = prepare_mask(attn_mask, score_shape, dtype, "attn_mask")
    keep = None
    if key_lengths is not None:
        batch_shape = score_shape[:-3] if len(score_shape) >= 3 else ()
        lengths = _check_key_lengths(key_lengths, batch_shape, lk)  # broadcast to batch_shape
        keep = np.arange(lk) < lengths.reshape(batch_shape + (1,) * (len(score_shape) - len(batch_shape)))
    window = _check_window(window)
    if window is not None:
        d = np.arange(lk)[None, :] - np.arange(lq)[:, None]
        inside = np.ones((lq, lk), dtype=bool)
        if window[0] is not None:
            inside &= d >= -window[0]
        if window[1] is not None:
            inside &= d <= window[1]
        keep = inside if keep is None else keep & inside
    if keep is None:
        return mask
    if mask is None:
        return np.broadcast_to(keep, score_shape)
    if mask.dtype == np.bool_:
        return np.broadcast_to(mask & keep, score_shape)
    return np.broadcast_to(np.where(keep, mask, dtype.type(-np.inf)), score_shape)


def _log_sum_exp(s, w, mask, causal: bool, offset: int):
    """log sum_j exp(masked score_ij) per row; -inf for a row with nothing visible."""
    masked = s
    if mask is not None:
        masked = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else np.where(mask == -np.inf, -np.inf, s + mask)
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        masked = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset, masked, -np.inf)
    m = np.max(masked, axis=-1, keepdims=True) if masked.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf)
    # Shift by the row max (0 for an empty row); a +inf or NaN score makes the row's lse NaN,
    # like its weights.
    m_safe = np.where(m == -np.inf, 0, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.log(np.sum(np.exp(masked - m_safe), axis=-1, keepdims=True)) + m_safe)[..., 0].astype(s.dtype)
