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
    check_key_lengths,
    prepare_mask,
    promote,
    require_ndim,
    shape_str,
)

__all__ = [
    "score",
    "softmax",
    "weighted_sum",
    "attention",
    "scaled_dot_product_attention",
    "additive_attention",
    "project_keys",
    "ProjectedKeys",
]

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
    if method in ("dot", "scaled_dot") and set(score_args) <= {"scale"}:
        # The fused kernel computes exactly these three steps (and can return the weights).
        _check_method_args(method, {})
        _, a = promote(query=query, key=key, value=value)
        require_ndim(a["query"], "query", 2, "(..., Lq, Dq)")
        require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
        require_ndim(a["value"], "value", 2, "(..., Lk, Dv)")
        if a["value"].shape[-2] != a["key"].shape[-2]:
            raise ValueError(
                f"key has {a['key'].shape[-2]} positions but value has shape {shape_str(a['value'].shape)}: "
                "value's second-to-last dimension must equal key's"
            )
        scale = score_args.get("scale")
        if scale is None and method == "dot":
            scale = 1.0
        _, b = broadcast_batch(a, {"query": 2, "key": 2, "value": 2})
        return scaled_dot_product_attention(b["query"], b["key"], b["value"], mask, 0.0, is_causal, scale,
                                            return_weights=return_weights)
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
    # A row that attends to nothing is zeros, even if a value it never looks at is NaN
    # (the plain product would give 0 * NaN there).
    empty = ~b["weights"].any(axis=-1)
    if empty.any():
        out[empty] = 0
    return (out, b["weights"]) if return_weights else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, key_lengths=None, window=None, return_weights=False,
                                 return_lse=False):
    """softmax(query key^T * scale + mask) value, with PyTorch's argument meanings.

    Runs as one fused, tiled kernel (online softmax over key tiles): the (L, S) scores are
    never stored unless ``return_weights`` asks for them, masks are read in place (broadcast
    axes are not expanded), tiles hidden by ``is_causal``, ``window`` or ``key_lengths`` are
    skipped, and results do not depend on the thread count.

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
    mask = prepare_mask(attn_mask, score_shape, dtype, "attn_mask")
    lengths = None
    if key_lengths is not None:
        batch_shape = score_shape[:-3] if len(score_shape) >= 3 else ()
        lengths = check_key_lengths(key_lengths, batch_shape, lk)
        if len(score_shape) >= 3:  # one length per batch row, shared by its heads
            lengths = lengths[..., None]
        lengths = np.broadcast_to(lengths, score_shape[:-2])
    window = _check_window(window)
    # The kernel takes -1 for an unbounded side; a side wider than both sequences hides nothing.
    left, right = (-1, -1) if window is None else (
        -1 if w is None else min(int(w), lq + lk) for w in window)
    causal, offset = causal_offset(is_causal, lq, lk)
    out, w, lse = _core.sdpa(q, k, v, mask, causal, offset, left, right, lengths, scale, bool(return_weights),
                             bool(return_lse))
    extras = []
    if return_weights:
        extras.append(w)
    if return_lse:
        extras.append(lse)
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


# --- Fused additive (Bahdanau) attention ---------------------------------------------------


class ProjectedKeys:
    """Keys projected once for additive attention: ``key @ w_key`` and its exponential form.

    Made by :func:`project_keys` (and by ``BahdanauAttention.precompute``); pass it as ``key``
    to :func:`additive_attention` with ``w_key=None`` so a decoder pays for ``key @ w_key``
    once per sentence instead of once per step. Attributes: ``projected`` (..., Lk, U) =
    key @ w_key; ``units``; ``dtype``; ``batch_shape``; ``num_keys``.
    """

    __slots__ = ("projected", "_expo", "_ok")

    def __init__(self, projected, expo, ok):
        self.projected, self._expo, self._ok = projected, expo, ok

    @property
    def dtype(self):
        return self.projected.dtype

    @property
    def units(self) -> int:
        return self.projected.shape[-1]

    @property
    def num_keys(self) -> int:
        return self.projected.shape[-2]

    @property
    def batch_shape(self) -> tuple:
        return self.projected.shape[:-2]

    def astype(self, dtype) -> "ProjectedKeys":
        if self.projected.dtype == dtype:
            return self
        raw = self.projected.astype(dtype)
        limit = 20.0 if raw.dtype == np.float32 else 170.0  # the kernel's range for the factored form
        with np.errstate(over="ignore", invalid="ignore"):
            expo = np.exp(2 * raw)
            ok = np.all(np.abs(raw) <= limit, axis=(-2, -1))
        return ProjectedKeys(raw, expo, np.asarray(ok))

    def broadcast_to(self, batch_shape: tuple) -> "ProjectedKeys":
        if self.batch_shape == tuple(batch_shape):
            return self
        tail = self.projected.shape[-2:]
        return ProjectedKeys(np.broadcast_to(self.projected, batch_shape + tail),
                             np.broadcast_to(self._expo, batch_shape + tail), np.broadcast_to(self._ok, batch_shape))


def project_keys(key, w_key) -> ProjectedKeys:
    """``key @ w_key`` (..., Lk, U), prepared for :func:`additive_attention`.

    Args:
        key: (..., Lk, Dk).
        w_key: (Dk, U).
    """
    _require(key=key, w_key=w_key)
    _, a = promote(key=key, w_key=w_key)
    require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
    if a["w_key"].ndim != 2:
        raise ValueError(f"w_key must have shape (Dk, U), got {shape_str(a['w_key'].shape)}")
    return ProjectedKeys(*_core.additive_keys(a["key"], a["w_key"]))


def additive_attention(query, key, value, w_query, w_key, v, *, bias=None, mask=None, key_lengths=None,
                       return_weights=False):
    """Bahdanau's attention, fused: softmax_j(v . tanh(q_i W_q + bias + k_j W_k) + mask_ij) value_j.

    Both projections are computed once as matrix products and the scores are formed a block
    of query rows at a time, so the (..., Lq, Lk, U) tensor of the textbook formula (what
    Keras' AdditiveAttention and the usual PyTorch code build) is never materialised.

    Args:
        query: (..., Lq, Dq).
        key: (..., Lk, Dk), or a :class:`ProjectedKeys` from :func:`project_keys` (then
            ``w_key`` must be None).
        value: (..., Lk, Dv). Leading (batch) dimensions of query, key and value broadcast.
        w_query: (Dq, U); w_key: (Dk, U); v: (U,).
        bias: (U,), added inside the tanh (TF Addons' ``normalize=True`` bias), or None.
        mask: broadcastable to (..., Lq, Lk); bool True = may attend, float added to the scores.
        key_lengths: ints broadcastable to the batch shape (...,); keys at positions >= length
            are hidden.
        return_weights: also return the (..., Lq, Lk) attention weights.

    Returns:
        context (..., Lq, Dv), or (context, weights). A query row that may attend to no key
        gets zero weights and a zero context.
    """
    _require(query=query, key=key, value=value, w_query=w_query, v=v)
    projected = isinstance(key, ProjectedKeys)
    if projected:
        if w_key is not None:
            raise ValueError("key is already projected (a ProjectedKeys); pass w_key=None")
        dtype, a = promote(query=query, value=value, w_query=w_query, v=v, bias=bias)
        dtype = np.result_type(dtype, key.dtype)
        a = {name: arr.astype(dtype, copy=False) for name, arr in a.items()}
        keys = key.astype(dtype)
        key_batch = keys.batch_shape
    else:
        if w_key is None:
            raise ValueError("w_key is required unless key is a ProjectedKeys")
        dtype, a = promote(query=query, key=key, value=value, w_query=w_query, w_key=w_key, v=v, bias=bias)
        require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
        key_batch = a["key"].shape[:-2]
    q, val = a["query"], a["value"]
    require_ndim(q, "query", 2, "(..., Lq, Dq)")
    require_ndim(val, "value", 2, "(..., Lk, Dv)")
    wq, vv = a["w_query"], a["v"]
    if wq.ndim != 2:
        raise ValueError(f"w_query must have shape (Dq, U), got {shape_str(wq.shape)}")
    if wq.shape[0] != q.shape[-1]:
        raise ValueError(f"query has shape {shape_str(q.shape)} but w_query has {shape_str(wq.shape)}: "
                         "query's last dimension and w_query's first must match")
    if not projected:
        wk = a["w_key"]
        if wk.ndim != 2:
            raise ValueError(f"w_key must have shape (Dk, U), got {shape_str(wk.shape)}")
        if wk.shape[0] != a["key"].shape[-1]:
            raise ValueError(f"key has shape {shape_str(a['key'].shape)} but w_key has {shape_str(wk.shape)}: "
                             "key's last dimension and w_key's first must match")
        if wk.shape[1] != wq.shape[1]:
            raise ValueError(f"w_query has shape {shape_str(wq.shape)} but w_key has {shape_str(wk.shape)}: "
                             "the number of units (second dimensions) must match")
    lk = keys.num_keys if projected else a["key"].shape[-2]
    if val.shape[-2] != lk:
        raise ValueError(f"key has {lk} positions but value has shape {shape_str(val.shape)}: "
                         "value's second-to-last dimension must equal key's")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], key_batch, val.shape[:-2])
    except ValueError:
        raise ValueError(f"batch dimensions do not broadcast: query has shape {shape_str(q.shape)}, key has batch "
                         f"shape {shape_str(key_batch)}, value has shape {shape_str(val.shape)}") from None
    q = np.broadcast_to(q, batch + q.shape[-2:])
    val = np.broadcast_to(val, batch + val.shape[-2:])
    lengths = None
    if key_lengths is not None:
        lengths = check_key_lengths(key_lengths, batch, lk)
    m = prepare_mask(mask, batch + (q.shape[-2], lk), dtype)
    if not projected and key_batch == batch:
        # The kernel projects the keys itself, into scratch memory it reuses between calls.
        return _core.additive_attention_keys(q, wq, a.get("bias"), a["key"], a["w_key"], val, vv, m, lengths,
                                             bool(return_weights))
    if not projected:
        # Keys shared over batch axes: projected once at their own batch shape, then broadcast as views.
        keys = ProjectedKeys(*_core.additive_keys(a["key"], a["w_key"]))
    keys = keys.broadcast_to(batch)
    return _core.additive_attention(q, wq, a.get("bias"), keys.projected, keys._expo, keys._ok, val, vv, m, lengths,
                                    bool(return_weights))
