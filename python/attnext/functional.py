"""The functional API: the three attention steps and their compositions, on NumPy arrays.

Every function accepts float32, float64, float16 and ml_dtypes.bfloat16 arrays of any layout
(C, Fortran, strided views); mixed dtypes follow NumPy's promotion (bfloat16 with float32 or
float16 computes as float32). float16 and bfloat16 are read as they are, computed in float32
and returned in their own type unless ``out_dtype=np.float32`` asks for the float32 result
(docs/precision.md lists every rounding point). Integer, bool and complex inputs raise
TypeError. Leading (batch) dimensions broadcast (one rule, in
:func:`attnext._broadcast.broadcast_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _core
from ._broadcast import broadcast_batch
from ._masks import as_mask, check_mask, combine_masks, prepare_mask
from ._validation import (
    as_axis,
    as_scalar,
    accumulation_dtype,
    causal_offset,
    check_dropout,
    check_key_lengths,
    out_kwargs,
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

ArrayLike = npt.ArrayLike
Causal = Union[bool, Literal["top_left", "bottom_right"], None]
Window = Optional[tuple[Optional[int], Optional[int]]]

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
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    passed = {name for name, value in given.items() if value is not None}
    needed = _METHOD_ARGS[method]
    missing = needed - passed
    if missing:
        raise ValueError(f"method={method!r} needs {', '.join(sorted(missing))}")
    extra = passed - needed
    if extra:
        raise ValueError(f"{', '.join(sorted(extra))} is not used by method={method!r}")


def score(query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *, weight: ArrayLike | None = None,
          w_query: ArrayLike | None = None, w_key: ArrayLike | None = None, v: ArrayLike | None = None,
          scale: float | None = None, out_dtype: npt.DTypeLike | None = None) -> np.ndarray:
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
        out_dtype: None (the inputs' dtype) or np.float32 for float16/bfloat16 inputs.

    Returns:
        (..., Lq, Lk) scores.
    """
    _require(query=query, key=key)
    _check_method_args(method, {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v})
    dtype, a = promote(query=query, key=key, weight=weight, w_query=w_query, w_key=w_key, v=v)
    require_ndim(a["query"], "query", 2, "(..., Lq, Dq)")
    require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
    _, qk = broadcast_batch({"query": a["query"], "key": a["key"]})
    q, k = qk["query"], qk["key"]
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] > 0 else 1.0
    scale = as_scalar(scale, "scale")
    out = out_kwargs(out_dtype, dtype)
    if method == "additive":
        return _core.score_additive(q, k, a["w_query"], a["w_key"], a["v"], None, scale, **out)
    return _core.score_product(q, k, a.get("weight"), scale, **out)


def softmax(x: ArrayLike, *, mask: ArrayLike | None = None, axis: int = -1,
            out_dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """Numerically stable softmax along ``axis``: exp(x - max) / sum.

    Args:
        x: any shape with at least one dimension.
        mask: broadcastable to x. bool: True = may attend (False entries get weight 0);
            float: added to x (-inf hides an entry).
        axis: one int (not a tuple, None or a bool).
        out_dtype: None (x's dtype) or np.float32 for a float16/bfloat16 x.

    Returns:
        Array of x's shape and dtype (or out_dtype). A row with nothing to attend (every
        entry masked or -inf) is all zeros, never NaN; a NaN in a row makes that row NaN.
    """
    _require(x=x)
    dtype, a = promote(x=x)
    x = a["x"]
    require_ndim(x, "x", 1, "")
    axis = as_axis(axis, x.shape)
    m = prepare_mask(mask, x.shape, dtype)
    out = out_kwargs(out_dtype, dtype)
    if axis != x.ndim - 1:
        x = np.moveaxis(x, axis, -1)
        m = None if m is None else np.moveaxis(m, axis, -1)
        return np.moveaxis(_core.softmax(x, m, **out), -1, axis)
    return _core.softmax(x, m, **out)


def weighted_sum(weights: ArrayLike, value: ArrayLike, *, out_dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """context_i = sum_j weights_ij value_j.

    Args:
        weights: (..., Lq, Lk).
        value: (..., Lk, Dv); leading dimensions broadcast.
        out_dtype: None (the inputs' dtype) or np.float32 for float16/bfloat16 inputs.

    Returns:
        (..., Lq, Dv).
    """
    _require(weights=weights, value=value)
    dtype, a = promote(weights=weights, value=value)
    require_ndim(a["weights"], "weights", 2, "(..., Lq, Lk)")
    require_ndim(a["value"], "value", 2, "(..., Lk, Dv)")
    _, b = broadcast_batch(a)
    return _core.weighted_sum(b["weights"], b["value"], **out_kwargs(out_dtype, dtype))


def _mask_alias(attn_mask, mask, owner: str):
    """``mask=`` is the documented older name of ``attn_mask=`` (kept working, no warning)."""
    if mask is None:
        return attn_mask
    if attn_mask is not None:
        raise TypeError(f"{owner} got both attn_mask and its older name mask; pass attn_mask only")
    return mask


def _structural_keep(lq: int, lk: int, is_causal: Causal, window: Window) -> np.ndarray | None:
    """(Lq, Lk) bool, True where causality and the window let query i see key j (None if both
    are off), for the paths whose kernel takes a mask instead (additive attention). The same
    rule as the fused kernels' visible-key range: causal j <= i + offset, window
    i - left <= j <= i + right."""
    causal, offset = causal_offset(is_causal, lq, lk)
    left, right = _window_bounds(window, lq, lk)
    if not causal and left < 0 and right < 0:
        return None
    d = np.arange(lk)[None, :] - np.arange(lq)[:, None]  # key index - query index
    keep = np.ones((lq, lk), dtype=bool)
    if causal:
        keep &= d <= offset
    if left >= 0:
        keep &= d >= -left
    if right >= 0:
        keep &= d <= right
    return keep


def attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, *, method: str = "scaled_dot",
              attn_mask: ArrayLike | None = None, is_causal: Causal = False, key_lengths: ArrayLike | None = None,
              window: Window = None, return_weights: bool = False, warn: bool = True,
              mask: ArrayLike | None = None, dropout_p: float = 0.0, seed: int | None = None,
              out_dtype: npt.DTypeLike | None = None, **score_args: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The three steps composed: softmax(score(query, key) + attn_mask) value.

    Args:
        query: (..., Lq, Dq); key: (..., Lk, Dk); value: (..., Lk, Dv).
        method, score_args: as for :func:`score` (weight, w_query, w_key, v, scale).
        attn_mask: broadcastable to (..., Lq, Lk); bool True = may attend, float added.
            ``mask`` is its older name, still accepted.
        is_causal: False, True (top-left aligned, as PyTorch) or ``"bottom_right"``.
        key_lengths: ints broadcastable to the batch shape (...,), each in [0, Lk]; keys at
            positions >= length are padding (hidden, never warned about).
        window: (left, right): query i sees keys [i - left, i + right]; None = unbounded side.
        return_weights: also return the (..., Lq, Lk) attention weights (after dropout, with dropout).
        warn: check attn_mask for the usual mistakes (:class:`attnext.MaskWarning`: a bool mask
            hiding every key of a batch entry, a float mask of only 0 and 1); False skips the
            check (it costs at most two passes over the mask as given).
        dropout_p, seed: attention dropout as in :func:`scaled_dot_product_attention` (the
            (...) batch entries are its batch entries); not for method ``additive``.
        out_dtype: None (the inputs' dtype) or np.float32 for float16/bfloat16 inputs; the
            weights of 16-bit inputs are float32 either way. With 16-bit inputs, method
            ``general``'s q W and ``additive``'s v * scale are rounded to the inputs' type
            (docs/precision.md).

    Returns:
        context (..., Lq, Dv), or (context, weights). Every method runs as a fused kernel
        (``general`` as scaled-dot attention of q W; ``additive`` as
        :func:`additive_attention`), so keys hidden by the mask or causality never reach
        the context, not even their values' NaNs.
    """
    route = _route_attention(query, key, value, method=method, attn_mask=attn_mask, is_causal=is_causal,
                             key_lengths=key_lengths, window=window, return_weights=return_weights, warn=warn,
                             mask=mask, dropout_p=dropout_p, seed=seed, out_dtype=out_dtype, **score_args)
    return route.finish(route.fn(*route.args, **route.kwargs))


@dataclass(frozen=True)
class AttentionRoute:
    """How :func:`attention` runs, for the forward and its vjp alike: ``fn(*args, **kwargs)``
    (:func:`scaled_dot_product_attention` or :func:`additive_attention`) on transformed arguments.

    weight: method ``general`` ran scaled-dot attention of query @ weight (the query passed
    on is that product). head_axis: a head axis of 1 was added before the last two axes of
    query, key, value and a mask of 3 or more dimensions (SDPA's key_lengths run over the axes
    before its heads). v_scale: method ``additive`` passed v * scale as v."""

    fn: Callable
    args: tuple
    kwargs: dict
    weight: np.ndarray | None = None
    head_axis: bool = False
    v_scale: float | None = None

    def finish(self, result):
        """The routed call's result as attention returns it."""
        if not self.head_axis:
            return result
        if isinstance(result, tuple):
            return tuple(r[..., 0, :, :] for r in result)
        return result[..., 0, :, :]


def _route_attention(query, key, value, *, method="scaled_dot", attn_mask=None, is_causal=False, key_lengths=None,
                     window=None, return_weights=False, warn=True, mask=None, dropout_p=0.0, seed=None,
                     out_dtype=None, **score_args) -> AttentionRoute:
    """Checks attention's arguments and decides its route (see :class:`AttentionRoute`)."""
    mask = _mask_alias(attn_mask, mask, "attention()")
    unknown = set(score_args) - {"weight", "w_query", "w_key", "v", "scale"}
    if unknown:
        raise TypeError(f"attention() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    _require(query=query, key=key, value=value)
    given = {name: score_args.get(name) for name in ("weight", "w_query", "w_key", "v")}
    _check_method_args(method, given)
    dropout_p = check_dropout(dropout_p)
    dtype, a = promote(query=query, key=key, value=value, **given)
    out_kwargs(out_dtype, dtype)  # checked before any work
    q, k, val = a["query"], a["key"], a["value"]
    require_ndim(q, "query", 2, "(..., Lq, Dq)")
    require_ndim(k, "key", 2, "(..., Lk, Dk)")
    require_ndim(val, "value", 2, "(..., Lk, Dv)")
    if val.shape[-2] != k.shape[-2]:
        raise ValueError(f"key has {k.shape[-2]} positions but value has shape {shape_str(val.shape)}: "
                         "value's second-to-last dimension must equal key's")
    if mask is not None:
        mask = as_mask(mask, dtype, "attn_mask")
        if warn:
            check_mask(mask, "attn_mask", 2)
    scale = score_args.get("scale")
    if method == "additive":
        if dropout_p != 0.0:
            raise ValueError(f"dropout is not supported by method='additive' (dropout_p={dropout_p}); "
                             "use a product method or dropout_p=0")
        scale = 1.0 if scale is None else as_scalar(scale, "scale")
        batch, _ = broadcast_batch({"query": q, "key": k, "value": val})
        lq, lk = q.shape[-2], k.shape[-2]
        # additive_attention has no causal argument: causality and the window become one more bool mask.
        keep = _structural_keep(lq, lk, is_causal, window)
        m = combine_masks(prepare_mask(mask, batch + (lq, lk), dtype, "attn_mask"), keep, dtype)
        # scale * (v . tanh(...)) == (scale v) . tanh(...): the scale joins v.
        # With 16-bit inputs v * scale is rounded to their type (a documented rounding point).
        v_scaled = a["v"] if scale == 1.0 else (a["v"] * a["v"].dtype.type(scale)).astype(dtype)
        return AttentionRoute(additive_attention, (q, k, val, a["w_query"], a["w_key"], v_scaled),
                              {"attn_mask": m, "key_lengths": key_lengths, "return_weights": return_weights,
                               "warn": False, "out_dtype": out_dtype}, v_scale=scale)
    weight = None
    if method == "general":
        weight = a["weight"]
        if weight.ndim != 2 or weight.shape != (q.shape[-1], k.shape[-1]):
            raise ValueError(f"weight has shape {shape_str(weight.shape)} but query has {shape_str(q.shape)} and "
                             f"key {shape_str(k.shape)}: weight must be (Dq, Dk)")
        # q_i W k_j = (q_i W) . k_j: scaled-dot attention of q W, rounded to the inputs' dtype
        # (NumPy's bfloat16 matmul returns float32; the route stays in the inputs' type).
        q = (q @ weight).astype(dtype, copy=False)
    elif q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query has shape {shape_str(q.shape)} but key has {shape_str(k.shape)}: "
                         "the last (embedding) dimensions must match")
    if scale is None and method != "scaled_dot":
        scale = 1.0
    batch, b = broadcast_batch({"query": q, "key": k, "value": val})
    q, k, val = b["query"], b["key"], b["value"]
    options = {"window": window, "return_weights": return_weights, "warn": False, "out_dtype": out_dtype}
    if dropout_p != 0.0:
        options.update(seed=seed)
    if key_lengths is None:
        return AttentionRoute(scaled_dot_product_attention, (q, k, val, mask, dropout_p, is_causal, scale), options,
                              weight=weight)
    # SDPA's key_lengths run over the axes before its head axis: give it a head axis of 1, so
    # every leading axis here is a batch axis.
    lengths = check_key_lengths(key_lengths, batch, k.shape[-2])
    if mask is not None and mask.ndim >= 3:
        mask = mask[..., None, :, :]
    return AttentionRoute(scaled_dot_product_attention,
                          (q[..., None, :, :], k[..., None, :, :], val[..., None, :, :], mask, dropout_p, is_causal,
                           scale), {**options, "key_lengths": lengths}, weight=weight, head_axis=True)


def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: ArrayLike | None = None, dropout_p: float = 0.0,
                                 is_causal: Causal = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 key_lengths: ArrayLike | None = None, window: Window = None,
                                 return_weights: bool = False, return_lse: bool = False, warn: bool = True,
                                 seed: int | None = None, out_dtype: npt.DTypeLike | None = None
                                 ) -> np.ndarray | tuple[np.ndarray, ...]:
    """softmax(query key^T * scale + mask) value, with PyTorch's argument meanings.

    Runs as one fused, tiled kernel (online softmax over key tiles): the (L, S) scores are
    never stored unless ``return_weights`` asks for them, masks are read in place (broadcast
    axes are not expanded), tiles hidden by ``is_causal``, ``window`` or ``key_lengths`` are
    skipped, and results do not depend on the thread count.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S) (the query heads, also with enable_gqa);
            bool True = may attend, float added.
        dropout_p: the probability of dropping each attention weight (PyTorch's meaning): kept
            weights are scaled by 1 / (1 - p). Which (batch, head, query, key) elements drop is
            decided by a counter-based generator keyed by ``seed`` and the element's
            (batch entry, query head, query, key) coordinates (under GQA the query head's;
            documented in docs/backward.md; the NumPy reference reproduces it bit for bit), so
            the result does not depend on tiling, path or thread count and the backward
            regenerates it. lse is that of the weights before dropout.
        is_causal: False, True (top-left, PyTorch) or ``"bottom_right"`` (KV-cache decoding).
        scale: default 1/sqrt(E).
        enable_gqa: Hq a multiple of Hk; query head h uses key/value head h // (Hq // Hk). The
            axes before the heads broadcast as batch axes.
        key_lengths: ints broadcastable to the batch shape (the dimensions before Hq, L), each in
            [0, S]; keys at positions >= length are padding.
        window: (left, right): query i sees keys [i - left, i + right]; None = unbounded side.
        return_weights: also return the (..., Hq, L, S) weights; with dropout, the weights after
            dropout (what multiplied value: zeros where dropped, kept ones scaled by 1 / (1 - p)).
        return_lse: also return the (..., Hq, L) log-sum-exp of each row (-inf if empty).
        warn: check attn_mask for the usual mistakes (:class:`attnext.MaskWarning`: a bool mask
            hiding every key of a batch entry, the mark of PyTorch's inverted key_padding_mask;
            a float mask of only 0 and 1, the mark of a bool mask cast to float). The check
            reads the mask as given (not its broadcast view), at most twice; False skips it.
        seed: the dropout seed, an int in [0, 2**64); None draws a fresh one from the operating
            system's entropy (os.urandom, never a global generator). Ignored when dropout_p is 0.
            :func:`attnext.vjp` records the seed it used as ``pullback.seed``.
        out_dtype: None (the inputs' dtype) or np.float32 for float16/bfloat16 inputs (the
            output written from the float32 accumulators). Weights and lse of 16-bit inputs are
            float32 either way; a float attn_mask of a 16-bit call is read as float32.

    Precision: bfloat16 inputs have Q * scale and the probabilities P rounded to bfloat16
    before their products, everything else in float32 (docs/precision.md).

    Layout: a 3-D input is (H, L, E), with no batch axis; for (B, L, E) data add a head axis
    with ``x[:, None]``. (B, L, H, E) data must be transposed to (B, H, L, E) first
    (``x.transpose(0, 2, 1, 3)``); where the shapes reveal that mistake the error says so.

    Returns:
        output (..., Hq, L, Ev), followed by weights and lse when asked for. A row that may
        attend to nothing gives output 0, weights 0, lse -inf.
    """
    dropout_p = check_dropout(dropout_p)
    seed = _dropout_seed(seed, dropout_p)
    call = _prepare_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, key_lengths, window, warn)
    out, w, lse = _core.sdpa(*call.kernel_args(), bool(return_weights), bool(return_lse), dropout_p, seed,
                             **out_kwargs(out_dtype, call.dtype))
    results = [call.public(r) for r in [out] + ([w] if return_weights else []) + ([lse] if return_lse else [])]
    return tuple(results) if len(results) > 1 else results[0]


@dataclass(frozen=True)
class SdpaCall:
    """SDPA's arguments as the kernels take them, prepared once by :func:`_prepare_sdpa` for the
    forward and the backward alike: promoted, batch-broadcast views; under GQA the queries as
    (..., Hk, G, L, E) against stride-0 (..., Hk, G, S, E) key/value views (no copies)."""

    query: np.ndarray  # (N..., L, E)
    key: np.ndarray  # (N..., S, E)
    value: np.ndarray  # (N..., S, Ev)
    mask: np.ndarray | None  # (N..., L, S)
    causal: bool
    offset: int
    left: int
    right: int
    lengths: np.ndarray | None  # (N...)
    scale: float
    dtype: np.dtype
    batch: tuple[int, ...]  # the broadcast batch axes (before the heads under GQA)
    query_heads: int | None  # Hq under GQA, else None

    def kernel_args(self) -> tuple:
        """The positional arguments _core.sdpa and _core.sdpa_backward start with."""
        return (self.query, self.key, self.value, self.mask, self.causal, self.offset, self.left, self.right,
                self.lengths, self.scale)

    def public(self, result: np.ndarray) -> np.ndarray:
        """A kernel result (N..., L[, X]) in the caller's layout: (..., Hk, G, ...) -> (..., Hq, ...)."""
        if self.query_heads is None:
            return result
        return result.reshape(self.batch + (self.query_heads,) + result.shape[len(self.batch) + 2:])

    def row_shape(self) -> tuple[int, ...]:
        """The caller's shape of the query rows: (..., Hq, L)."""
        heads = self.query.shape[:-2] if self.query_heads is None else self.batch + (self.query_heads,)
        return heads + self.query.shape[-2:-1]

    def kernel(self, a: np.ndarray) -> np.ndarray:
        """A per-query-row array of the caller's layout ((..., Hq, L, ...)) in the kernel's."""
        return a.reshape(self.query.shape[:-1] + a.shape[len(self.row_shape()):])


def _prepare_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, key_lengths, window,
                  warn: bool, backward: bool = False) -> SdpaCall:
    """Checks SDPA's arguments and prepares them for the kernels (see :class:`SdpaCall`);
    backward: the backward's dtype rule (:func:`attnext._validation.promote`)."""
    _require(query=query, key=key, value=value)
    dtype, a = promote(backward, query=query, key=key, value=value)
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
    gqa = bool(enable_gqa) and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]
    if gqa:
        hq, hk = q.shape[-3], k.shape[-3]
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa needs query heads to be a multiple of key heads: query has shape "
                             f"{shape_str(q.shape)}, key has {shape_str(k.shape)}" + _heads_hint(q, k))
        # The axes before the heads are the batch; the heads pair up by group, not by broadcasting.
        batch, qkv = _broadcast_qkv(q, k, v, 3)
        heads = (hq,)
    else:
        batch, qkv = _broadcast_qkv(q, k, v, 2)
        heads = ()
    q, k, v = qkv["query"], qkv["key"], qkv["value"]
    lq, lk = q.shape[-2], k.shape[-2]
    score_shape = batch + heads + (lq, lk)
    scale = _default_scale(q.shape[-1]) if scale is None else as_scalar(scale, "scale")
    mask = prepare_mask(attn_mask, score_shape, dtype, "attn_mask", check_core=3 if warn else 0)
    lengths = None
    if key_lengths is not None:
        per_row = score_shape[:-3]  # one length per batch row, shared by its heads
        try:
            lengths = check_key_lengths(key_lengths, per_row, lk)
        except ValueError as e:
            if per_row or "broadcast" not in str(e):
                raise
            raise ValueError(f"{e}. SDPA expects (..., H, L, E) and reads a {q.ndim}-D query as (H, L, E), with no "
                             "batch axis; for (B, L, E) inputs add a head axis with x[:, None]") from None
        lengths = lengths[(...,) + (None,) * (len(score_shape) - 2 - len(per_row))]
    left, right = _window_bounds(window, lq, lk)
    causal, offset = causal_offset(is_causal, lq, lk)
    if gqa:
        q, k, v = _group_query_heads(q, k, v, batch)
        mask = None if mask is None else mask.reshape(q.shape[:-2] + (lq, lk))
        if lengths is not None:
            lengths = lengths[..., None]
    if lengths is not None:
        lengths = np.broadcast_to(lengths, q.shape[:-2])
    return SdpaCall(q, k, v, mask, causal, offset, left, right, lengths, scale, dtype, batch, hq if gqa else None)


def _default_scale(e: int) -> float:
    """SDPA's scale when none is given: 1/sqrt(E) (1 for E = 0)."""
    return 1.0 / math.sqrt(e) if e else 1.0


def _group_query_heads(q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: tuple) -> tuple:
    """GQA as the kernels take it: (*batch, Hq, L, E) queries as (*batch, Hk, G, L, E) against
    stride-0 (*batch, Hk, G, S, E) key/value views of the (*batch, Hk, S, E) heads (no copies);
    query head h = g * G + j reads key/value head g."""
    hk = k.shape[-3]
    group = q.shape[-3] // hk
    q = q.reshape(batch + (hk, group) + q.shape[-2:])
    k = np.broadcast_to(k[..., :, None, :, :], batch + (hk, group) + k.shape[-2:])
    v = np.broadcast_to(v[..., :, None, :, :], batch + (hk, group) + v.shape[-2:])
    return q, k, v


def _attention_of_checked(query: np.ndarray, key: np.ndarray, value: np.ndarray, is_causal: Causal,
                          out_float32: bool = False) -> np.ndarray:
    """scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=True) for
    arguments its caller made and checked itself (MultiHeadAttention.step, once per token):
    query (B, Hq, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), one dtype, aligned, Hk dividing
    Hq; no mask, dropout or window, the default scale. The same kernel call as the public
    function's, without its argument checks and conversions; out_float32: the kernels' keyword
    of a 16-bit call's ``out_dtype=np.float32``."""
    batch = query.shape[:-3]
    causal, offset = causal_offset(is_causal, query.shape[-2], key.shape[-2])
    q, k, v = (query, key, value) if key.shape[-3] == query.shape[-3] else _group_query_heads(query, key, value, batch)
    out, _, _ = _core.sdpa(q, k, v, causal=causal, causal_offset=offset, scale=_default_scale(query.shape[-1]),
                           out_float32=out_float32)
    return out.reshape(query.shape[:-1] + value.shape[-1:])


def _dropout_seed(seed, dropout_p: float) -> int:
    """The dropout seed as the kernel takes it: an int in [0, 2**64); None draws one from
    os.urandom when dropout is on (0 when it is off: no element is dropped, the seed unused)."""
    if seed is None:
        if dropout_p == 0.0:
            return 0
        from ._philox import draw_seed

        return draw_seed()
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64) or None, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return int(seed)


def _heads_hint(q: np.ndarray, k: np.ndarray) -> str:
    """A hint for shapes that look like (B, L, H, E) given where SDPA reads (B, H, L, E): equal
    sizes on the axis read as positions (really the heads) and different ones on the axis read
    as heads (really query and key lengths)."""
    if q.ndim >= 4 and k.ndim >= 4 and q.shape[-2] == k.shape[-2] and q.shape[-3] != k.shape[-3]:
        return (". SDPA expects (..., H, L, E); if these are (B, L, H, E) arrays, pass "
                "x.transpose(0, 2, 1, 3)")
    return ""


def _broadcast_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, core: int):
    """broadcast_batch for SDPA's query, key and value, with the layout hint on failure."""
    try:
        return broadcast_batch({"query": q, "key": k, "value": v}, core)
    except ValueError as e:
        hint = _heads_hint(q, k)
        if not hint:
            raise
        raise ValueError(f"{e}{hint}") from None


def _window_bounds(window: Window, lq: int, lk: int) -> tuple[int, int]:
    """(left, right) for the kernel: -1 for an unbounded side; a side wider than both
    sequences hides nothing, so it is capped there."""
    if window is None:
        return -1, -1
    try:
        sides = tuple(window)
    except TypeError:
        sides = ()
    if len(sides) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    bounds = []
    for side, value in zip(("left", "right"), sides):
        if value is None:
            bounds.append(-1)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"window {side} must be a non-negative int or None, got {value!r}")
        bounds.append(int(value))  # any size: the core's visible-key rule saturates it
    return bounds[0], bounds[1]


# --- Fused additive (Bahdanau) attention ---------------------------------------------------


# Where the additive kernel may use its factored tanh (|key projection| below this), read from
# the core, which owns the rule; the literal is only for a _core built before it exported it.
_EXP_FORM_LIMIT = getattr(_core, "additive_exp_form_limit", {"float32": 20.0, "float64": 170.0})


class ProjectedKeys:
    """Keys projected once for additive attention: ``key @ w_key`` and its exponential form.

    Made by :func:`project_keys` (and by ``BahdanauAttention.precompute``); pass it as ``key``
    to :func:`additive_attention` with ``w_key=None`` so a decoder pays for ``key @ w_key``
    once per sentence instead of once per step. Attributes: ``projected`` (..., Lk, U) =
    key @ w_key (float32 for 16-bit keys: the kernels' accumulation type); ``units``;
    ``dtype`` (that of the key and w_key it was projected from, the type it stands for in
    promotion); ``batch_shape``; ``num_keys``. It owns its arrays (the kernel's outputs,
    never the caller's).
    """

    __slots__ = ("projected", "_expo", "_ok", "_dtype")

    def __init__(self, projected: np.ndarray, expo: np.ndarray, ok: np.ndarray, dtype: npt.DTypeLike = None) -> None:
        self.projected, self._expo, self._ok = projected, expo, ok
        self._dtype = projected.dtype if dtype is None else np.dtype(dtype)

    @classmethod
    def _project(cls, key: np.ndarray, w_key: np.ndarray) -> "ProjectedKeys":
        return cls(*_core.additive_keys(key, w_key), dtype=key.dtype)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def units(self) -> int:
        return self.projected.shape[-1]

    @property
    def num_keys(self) -> int:
        return self.projected.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.projected.shape[:-2]

    def astype(self, dtype: npt.DTypeLike) -> "ProjectedKeys":
        """The same projected keys for inputs of another dtype (self if it already is); the
        arrays are of that dtype's accumulation type, as the kernel would have made them."""
        if self.dtype == dtype:
            return self
        raw = self.projected.astype(accumulation_dtype(dtype))
        limit = _EXP_FORM_LIMIT[raw.dtype.name]
        with np.errstate(over="ignore", invalid="ignore"):
            expo = np.exp(2 * raw)
            ok = np.all(np.abs(raw) <= limit, axis=(-2, -1))
        return ProjectedKeys(raw, expo, np.asarray(ok), dtype)

    def broadcast_to(self, batch_shape: tuple[int, ...]) -> "ProjectedKeys":
        """A view with a larger batch shape (stride 0 on the new axes)."""
        _, b = broadcast_batch({"projected": self.projected, "expo": self._expo, "ok": self._ok},
                               {"projected": 2, "expo": 2, "ok": 0}, to=tuple(batch_shape))
        return ProjectedKeys(b["projected"], b["expo"], b["ok"], self.dtype)

    def __repr__(self) -> str:
        return (f"ProjectedKeys(batch_shape={shape_str(self.batch_shape)}, num_keys={self.num_keys}, "
                f"units={self.units}, dtype={self.dtype.name})")


def project_keys(key: ArrayLike, w_key: ArrayLike) -> ProjectedKeys:
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
    return ProjectedKeys._project(a["key"], a["w_key"])


def additive_attention(query: ArrayLike, key: ArrayLike | ProjectedKeys, value: ArrayLike, w_query: ArrayLike,
                       w_key: ArrayLike | None, v: ArrayLike, *, bias: ArrayLike | None = None,
                       attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                       is_causal: Causal = False, window: Window = None, return_weights: bool = False,
                       warn: bool = True, mask: ArrayLike | None = None, out_dtype: npt.DTypeLike | None = None
                       ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
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
        attn_mask: broadcastable to (..., Lq, Lk); bool True = may attend, float added to the
            scores. ``mask`` is its older name, still accepted.
        key_lengths: ints broadcastable to the batch shape (...,); keys at positions >= length
            are hidden.
        is_causal: False, True (top-left) or ``"bottom_right"``; window: (left, right), query i
            sees keys [i - left, i + right], None = unbounded side. Both become a bool mask.
        return_weights: also return the (..., Lq, Lk) attention weights.
        warn: check attn_mask for the usual mistakes (:class:`attnext.MaskWarning`, as in
            :func:`scaled_dot_product_attention`); False skips the check.
        out_dtype: None (the inputs' dtype) or np.float32 for float16/bfloat16 inputs; their
            weights are float32 either way, their bias and float masks are read as float32.

    Returns:
        context (..., Lq, Dv), or (context, weights). A query row that may attend to no key
        gets zero weights and a zero context.
    """
    call = _prepare_additive(query, key, value, w_query, w_key, v, bias=bias,
                             attn_mask=_mask_alias(attn_mask, mask, "additive_attention()"), key_lengths=key_lengths,
                             is_causal=is_causal, window=window, warn=warn)
    return _additive_kernel(call.query, call.w_query, call.bias, call.keys, call.value, call.v, call.mask,
                            call.lengths, bool(return_weights), out_kwargs(out_dtype, call.dtype))


@dataclass(frozen=True)
class AdditiveCall:
    """additive_attention's arguments as the kernels take them, prepared once by
    :func:`_prepare_additive` for the forward and the backward alike: promoted, broadcast to the
    batch shape (views), causality and the window folded into the mask. ``keys`` is a
    :class:`ProjectedKeys` of the batch shape or (key, w_key) with the batch shape; ``key`` and
    ``w_key`` are the promoted raw key arguments (None for a ProjectedKeys key), which keys
    shared over batch axes were projected from."""

    query: np.ndarray  # (N..., Lq, Dq)
    w_query: np.ndarray  # (Dq, U)
    bias: np.ndarray | None  # (U,)
    keys: Any  # ProjectedKeys (N..., Lk, U) or (key (N..., Lk, Dk), w_key (Dk, U))
    value: np.ndarray  # (N..., Lk, Dv)
    v: np.ndarray  # (U,)
    mask: np.ndarray | None  # (N..., Lq, Lk)
    lengths: np.ndarray | None  # (N...)
    key: np.ndarray | None
    w_key: np.ndarray | None
    dtype: np.dtype


def _prepare_additive(query, key, value, w_query, w_key, v, *, bias=None, attn_mask=None, key_lengths=None,
                      is_causal=False, window=None, warn=True, backward=False) -> AdditiveCall:
    """Checks additive_attention's arguments and prepares them for the kernels (see
    :class:`AdditiveCall`); backward: the backward's dtype rule (:func:`attnext._validation.promote`)."""
    mask = attn_mask
    _require(query=query, key=key, value=value, w_query=w_query, v=v)
    projected = isinstance(key, ProjectedKeys)
    if projected:
        if w_key is not None:
            raise ValueError("key is already projected (a ProjectedKeys); pass w_key=None")
        # An empty array of the keys' type stands for them in the one promotion rule.
        dtype, a = promote(backward, query=query, value=value, w_query=w_query, v=v, bias=bias,
                           key=np.empty(0, key.dtype))
        del a["key"]
        keys = key.astype(dtype)
    else:
        if w_key is None:
            raise ValueError("w_key is required unless key is a ProjectedKeys")
        dtype, a = promote(backward, query=query, key=key, value=value, w_query=w_query, w_key=w_key, v=v, bias=bias)
        require_ndim(a["key"], "key", 2, "(..., Lk, Dk)")
        keys = a["key"]
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
        if wk.shape[0] != keys.shape[-1]:
            raise ValueError(f"key has shape {shape_str(keys.shape)} but w_key has {shape_str(wk.shape)}: "
                             "key's last dimension and w_key's first must match")
        if wk.shape[1] != wq.shape[1]:
            raise ValueError(f"w_query has shape {shape_str(wq.shape)} but w_key has {shape_str(wk.shape)}: "
                             "the number of units (second dimensions) must match")
    lk = keys.num_keys if projected else keys.shape[-2]
    if val.shape[-2] != lk:
        raise ValueError(f"key has {lk} positions but value has shape {shape_str(val.shape)}: "
                         "value's second-to-last dimension must equal key's")
    batch, b = broadcast_batch({"query": q, "key": keys, "value": val})
    lengths = None if key_lengths is None else check_key_lengths(key_lengths, batch, lk)
    m = prepare_mask(mask, batch + (q.shape[-2], lk), dtype, "attn_mask", check_core=2 if warn else 0)
    keep = _structural_keep(q.shape[-2], lk, is_causal, window)
    if keep is not None:
        m = np.broadcast_to(combine_masks(m, keep, dtype), batch + (q.shape[-2], lk))
    raw_key, raw_w_key = (None, None) if projected else (keys, a["w_key"])
    if projected:
        keys = b["key"]
    elif keys.shape[:-2] != batch:
        # Keys shared over batch axes: projected once at their own batch shape, then broadcast as views.
        keys = ProjectedKeys._project(keys, a["w_key"]).broadcast_to(batch)
    else:
        keys = (keys, a["w_key"])
    return AdditiveCall(b["query"], wq, a.get("bias"), keys, b["value"], vv, m, lengths, raw_key, raw_w_key, dtype)


def _additive_kernel(query: np.ndarray, w_query: np.ndarray, bias: np.ndarray | None,
                     keys: ProjectedKeys | tuple[np.ndarray, np.ndarray], value: np.ndarray, v: np.ndarray,
                     mask: np.ndarray | None, key_lengths: np.ndarray | None, return_weights: bool,
                     out: dict | None = None):
    """The one place that picks the additive kernel, for the functional API and the layers:
    keys already projected (a ProjectedKeys of the batch shape) use them; raw (key, w_key) of
    the batch shape are projected by the kernel itself, into scratch memory it reuses. out: the
    output keyword of :func:`attnext._validation.out_kwargs`."""
    out = out or {}
    if isinstance(keys, ProjectedKeys):
        return _core.additive_attention(query, w_query, bias, keys.projected, keys._expo, keys._ok, value, v, mask,
                                        key_lengths, return_weights, **out)
    key, w_key = keys
    return _core.additive_attention_keys(query, w_query, bias, key, w_key, value, v, mask, key_lengths,
                                         return_weights, **out)


def _additive_backward_kernel(call: AdditiveCall, grad_out: np.ndarray, grad_weights: np.ndarray | None,
                              mask_grad: bool, weights: np.ndarray | None = None) -> dict:
    """The additive backward kernel for a prepared call, picked as :func:`_additive_kernel` picks
    the forward's. Returns the kernel's dict (full batch shape): query, w_query, bias, v, value,
    keys_raw = dL/d(key w_key), mask = dL/d(score + mask) when mask_grad, and key, w_key for raw keys.
    weights: the forward's weights for this call (read instead of recomputed), or None."""
    if isinstance(call.keys, ProjectedKeys):
        k = call.keys
        return _core.additive_attention_backward(call.query, call.w_query, call.bias, k.projected, k._expo, k._ok,
                                                 call.value, call.v, call.mask, call.lengths, grad_out, grad_weights,
                                                 mask_grad, weights)
    key, w_key = call.keys
    return _core.additive_attention_keys_backward(call.query, call.w_query, call.bias, key, w_key, call.value, call.v,
                                                  call.mask, call.lengths, grad_out, grad_weights, mask_grad, weights)
