"""Plain NumPy twins of attnext's public functions, written to read like the formulas.

Every function here has the same name, signature and meaning as its compiled counterpart in
:mod:`attnext`; the tests hold the two against each other. Nothing here is tuned for speed:
scores are built densely, masks are materialised, and the additive score builds the full
(..., Lq, Lk, U) tensor, exactly as the textbook formula reads.

Notation: a query q_i (row i of Q, shape (..., Lq, Dq)), a key k_j (row j of K, (..., Lk, Dk)),
a value v_j (row j of V, (..., Lk, Dv)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

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
    """NumPy's promotion over the inputs, with float16 computed as float32."""
    dtype = np.result_type(*arrays)
    return np.float32 if dtype == np.float16 else dtype


def score(query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *, weight: ArrayLike | None = None,
          w_query: ArrayLike | None = None, w_key: ArrayLike | None = None, v: ArrayLike | None = None,
          scale: float | None = None) -> np.ndarray:
    """Scores of every query against every key, shape (..., Lq, Lk).

    - dot:        s_ij = q_i . k_j
    - scaled_dot: s_ij = q_i . k_j / sqrt(d_k)
    - general:    s_ij = q_i^T W k_j              (Luong), W (Dq, Dk)
    - additive:   s_ij = v^T tanh(W_q^T q_i + W_k^T k_j)   (Bahdanau), W_q (Dq, U), W_k (Dk, U), v (U,)

    ``scale`` multiplies the scores (default 1/sqrt(d_k) for scaled_dot, 1 otherwise).
    """
    q, k = np.asarray(query), np.asarray(key)
    if method in ("dot", "scaled_dot"):
        s = q @ np.swapaxes(k, -1, -2)
    elif method == "general":
        s = q @ np.asarray(weight) @ np.swapaxes(k, -1, -2)
    elif method == "additive":
        q_proj = q @ np.asarray(w_query)  # (..., Lq, U)
        k_proj = k @ np.asarray(w_key)  # (..., Lk, U)
        s = np.tanh(q_proj[..., :, None, :] + k_proj[..., None, :, :]) @ np.asarray(v)
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] else 1.0
    return s * np.asarray(scale, dtype=s.dtype)


def _masked(x, mask):
    """x with a mask applied: bool False -> -inf (True = may attend), float -> added, except
    that a -inf entry hides the key whatever x is (even NaN or +inf)."""
    if mask is None:
        return x
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, x, -np.inf).astype(x.dtype)
    return np.where(mask == -np.inf, -np.inf, x + mask.astype(x.dtype)).astype(x.dtype)


def softmax(x: ArrayLike, *, mask: ArrayLike | None = None, axis: int = -1) -> np.ndarray:
    """softmax(x)_j = exp(x_j - m) / sum_k exp(x_k - m), m = max_k x_k, over ``axis``.

    A row with nothing to attend (all -inf after masking) gives zeros.
    """
    x = _masked(np.asarray(x), mask)
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


def weighted_sum(weights: ArrayLike, value: ArrayLike) -> np.ndarray:
    """c_i = sum_j a_ij v_j: (..., Lq, Lk) x (..., Lk, Dv) -> (..., Lq, Dv)."""
    return np.asarray(weights) @ np.asarray(value)


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
              mask: ArrayLike | None = None, **score_args: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """context = softmax(score(Q, K) + attn_mask) V, the three steps in a row. Causal, window
    and key_lengths (over the batch axes (...,)) hide keys as in :func:`dense_mask`. ``mask`` is
    attn_mask's older name; ``warn`` is accepted for signature parity (the twin checks nothing)."""
    mask = _mask_alias(attn_mask, mask)
    s = score(query, key, method, **score_args)
    hidden = _hidden_by(mask)
    if is_causal or window is not None or key_lengths is not None:
        # dense_mask reads key_lengths over SDPA's batch axes and adds a head axis; dropped below.
        structural = dense_mask(s.shape[-2], s.shape[-1], is_causal=is_causal, window=window,
                                key_lengths=key_lengths) == -np.inf
        hidden = hidden | (structural[..., 0, :, :] if key_lengths is not None else structural)
    out, a = _attend(_masked(s, mask), value, hidden)
    return (out, a) if return_weights else out


def _hidden_by(mask):
    """Where a mask hides a key: a bool mask's False, a float mask's -inf (False for None)."""
    if mask is None:
        return np.asarray(False)
    mask = np.asarray(mask)
    return ~mask if mask.dtype == np.bool_ else mask == -np.inf


def _attend(s, value, hidden):
    """Softmax of the scores s (float masks already added) with the hidden keys set to -inf,
    and the context it gives. Returns (context, weights).

    A key whose final score is -inf counts as hidden, whatever made it -inf: once a float mask
    is added, a kernel cannot tell a -inf mask entry from a -inf score either."""
    s = np.where(hidden, -np.inf, s).astype(s.dtype)
    a = softmax(s)
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


def scaled_dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                                 attn_mask: ArrayLike | None = None, dropout_p: float = 0.0, is_causal: Any = False,
                                 scale: float | None = None, enable_gqa: bool = False, *,
                                 key_lengths: ArrayLike | None = None, window: tuple | None = None,
                                 return_weights: bool = False, return_lse: bool = False, warn: bool = True
                                 ) -> np.ndarray | tuple[np.ndarray, ...]:
    """softmax(Q K^T * scale + mask) V with PyTorch's argument meanings (``warn`` is accepted for
    signature parity; the twin checks nothing).

    Shapes: Q (..., Hq, L, E), K (..., Hk, S, E), V (..., Hk, S, Ev). With enable_gqa, query
    head h uses key/value head h // (Hq / Hk), and attn_mask broadcasts against the Hq heads.
    lse is log sum_j exp(s_ij) (natural log) over visible keys (-inf for a row with none).

    Hidden is hidden: a key hidden by causal, window, key_lengths, a bool False or a -inf
    float-mask entry contributes nothing (its score, its float-mask entry, NaN included, and
    its value row); a row that sees no key gives zeros and lse -inf.
    """
    if np.any(np.asarray(dropout_p) != 0.0):
        raise ValueError("dropout is not supported yet: dropout_p must be 0.0")
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    dtype = _float_dtype(q, k, v)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if enable_gqa and q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            raise ValueError(f"enable_gqa needs query heads ({q.shape[-3]}) to be a multiple of key heads "
                             f"({k.shape[-3]})")
        group = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scale = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else scale
    s = (q @ np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=dtype)
    # Keys hidden by causal, window, key_lengths or a bool attn_mask get score -inf whatever the
    # score was; a float attn_mask is added, then the structural hiding is applied again, so a
    # NaN mask entry on a key already hidden stays hidden.
    float_mask = attn_mask is not None and np.asarray(attn_mask).dtype != np.bool_
    hidden = dense_mask(s.shape[-2], s.shape[-1], attn_mask=None if float_mask else attn_mask,
                        is_causal=is_causal, key_lengths=key_lengths, window=window, dtype=dtype) == -np.inf
    if float_mask:
        s = _masked(s, attn_mask)
        hidden = hidden | _hidden_by(attn_mask)
    s = np.where(hidden, -np.inf, s).astype(dtype)
    out, a = _attend(s, v, hidden)
    extras = []
    if return_weights:
        extras.append(a)
    if return_lse:
        m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
        m = np.where(m == -np.inf, 0, m)
        with np.errstate(divide="ignore"):
            lse = (np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True)) + m)[..., 0]
        extras.append(lse.astype(dtype))
    return (out.astype(dtype), *extras) if extras else out.astype(dtype)


# --- Encoder-decoder (RNN) attention: additive attention and the layers' math ----------------

__all__ += ["additive_attention", "bahdanau_attention", "luong_attention"]


def _length_mask(key_lengths, lk):
    """(..., 1, Lk) bool, True for keys at positions < length (key_lengths (...,))."""
    return np.arange(lk) < np.asarray(key_lengths)[..., None, None]


def additive_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, w_query: ArrayLike, w_key: ArrayLike,
                       v: ArrayLike, *, bias: ArrayLike | None = None, attn_mask: ArrayLike | None = None,
                       key_lengths: ArrayLike | None = None, is_causal: Any = False, window: tuple | None = None,
                       return_weights: bool = False, warn: bool = True, mask: ArrayLike | None = None
                       ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """c_i = sum_j a_ij value_j, a_i = softmax_j(e_ij + mask_ij), e_ij = v . tanh(q_i W_q + b + k_j W_k).

    Builds the (..., Lq, Lk, U) tensor, as the formula reads. key_lengths (...,) hides keys at
    positions >= length; is_causal and window hide keys as in :func:`dense_mask`. ``mask`` is
    attn_mask's older name; ``warn`` is accepted for signature parity.
    """
    mask = _mask_alias(attn_mask, mask)
    q, k, val = np.asarray(query), np.asarray(key), np.asarray(value)
    dtype = _float_dtype(q, k, val, w_query, w_key, v)
    q_proj = q.astype(dtype) @ np.asarray(w_query, dtype)  # (..., Lq, U)
    if bias is not None:
        q_proj = q_proj + np.asarray(bias, dtype)
    k_proj = k.astype(dtype) @ np.asarray(w_key, dtype)  # (..., Lk, U)
    e = np.tanh(q_proj[..., :, None, :] + k_proj[..., None, :, :]) @ np.asarray(v, dtype)  # (..., Lq, Lk)
    hidden = _hidden_by(mask)
    if key_lengths is not None:
        hidden = hidden | ~_length_mask(key_lengths, e.shape[-1])
    if is_causal or window is not None:
        hidden = hidden | (dense_mask(e.shape[-2], e.shape[-1], is_causal=is_causal, window=window) == -np.inf)
    out, a = _attend(_masked(e, mask).astype(dtype), val.astype(dtype), hidden)
    return (out, a) if return_weights else out


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
                       **state: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """BahdanauAttention's math for one step (query (B, Dq)) or many (query (B, T, Dq)).

    e_tj = v' . tanh(s_t W_q + bias + h_j W_k + key_bias) + v_bias, v' = v, or g v / ||v||
    (normalize=True); a_t = softmax(e_t); c_t = sum_j a_tj value_j. Returns (context, weights).
    The weights go by the layer's textbook attribute names (w_query (Dq, U), ...) or by its
    state-dict names, so ``bahdanau_attention(q, k, v, **layer.state_dict())`` is the layer's
    formula (``query_proj.weight`` (U, Dq), ``key_proj.weight`` (U, Dk), ``v.weight`` (1, U),
    ``query_proj.bias``, ``key_proj.bias``, ``v.bias``).
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
    if key_bias is not None:
        bias = np.asarray(key_bias) if bias is None else np.asarray(bias) + np.asarray(key_bias)
    # v_bias adds the same number to every score: softmax does not see it.
    s = np.asarray(query)
    single = s.ndim == np.ndim(keys) - 1
    if single:
        s = s[..., None, :]
    v = np.asarray(v)
    if g is not None:
        v = g * v / np.sqrt(np.sum(v * v))
    c, a = additive_attention(s, keys, values, w_query, w_key, v, bias=bias, key_lengths=key_lengths,
                              return_weights=True)
    return (c[..., 0, :], a[..., 0, :]) if single else (c, a)


def luong_attention(query: ArrayLike, keys: ArrayLike, values: ArrayLike | None = None,
                    w_c: ArrayLike | None = None, *, method: str = "dot", w_a: ArrayLike | None = None,
                    w_query: ArrayLike | None = None, w_key: ArrayLike | None = None, v: ArrayLike | None = None,
                    g: float | None = None, attn_mask: ArrayLike | None = None,
                    key_lengths: ArrayLike | None = None, mask: ArrayLike | None = None, **state: ArrayLike
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
    s = np.asarray(query)
    h = np.asarray(keys)
    val = h if values is None else np.asarray(values)
    single = s.ndim == h.ndim - 1
    if single:
        s = s[..., None, :]
        if mask is not None and np.ndim(mask) >= 2:
            mask = np.asarray(mask)[..., None, :]
    if method == "dot":
        e = s @ np.swapaxes(h, -1, -2)
    elif method == "general":
        e = s @ np.asarray(w_a) @ np.swapaxes(h, -1, -2)
    elif method == "concat":
        e = np.tanh((s @ np.asarray(w_query))[..., :, None, :] + (h @ np.asarray(w_key))[..., None, :, :]) @ v
    else:
        raise ValueError(f"method must be 'dot', 'general' or 'concat', got {method!r}")
    if g is not None:
        e = e * g
    hidden = _hidden_by(mask)
    if key_lengths is not None:
        hidden = hidden | ~_length_mask(key_lengths, e.shape[-1])
    c, a = _attend(_masked(e, mask), val, hidden)
    hidden = np.tanh(np.concatenate([c, np.broadcast_to(s, c.shape[:-1] + s.shape[-1:])], axis=-1) @ np.asarray(w_c))
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
                         key_lengths: ArrayLike | None = None, window: tuple | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
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
    """
    def project(x, w, b):
        y = np.asarray(x) @ np.asarray(w).T
        return y if b is None else y + np.asarray(b)

    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    q = project(query, q_weight, q_bias)
    k = project(key, k_weight, k_bias)
    v = project(value, v_weight, v_bias)
    bsz, lq, e = q.shape
    s = k.shape[1]
    d = e // num_heads
    group = num_heads // num_kv_heads
    mask = None if attn_mask is None else np.broadcast_to(np.asarray(attn_mask), (bsz, num_heads, lq, s))
    if key_mask is not None:
        km = np.broadcast_to(np.asarray(key_mask)[:, None, None, :], (bsz, num_heads, lq, s))
        if mask is None:
            mask = km
        elif mask.dtype == np.bool_ and km.dtype == np.bool_:
            mask = mask & km
        else:  # both as additive masks; a key either one hides stays hidden
            fm, fk = _masked(np.zeros(mask.shape, q.dtype), mask), _masked(np.zeros(km.shape, q.dtype), km)
            with np.errstate(invalid="ignore"):
                mask = np.where((fm == -np.inf) | (fk == -np.inf), -np.inf, fm + fk)
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


# ---- Self-attention (the formula behind attnext.SelfAttention) -------------------------------

__all__ += ["self_attention"]


def self_attention(x: ArrayLike, w_query: ArrayLike, w_key: ArrayLike, w_value: ArrayLike, *,
                   b_query: ArrayLike | None = None, b_key: ArrayLike | None = None,
                   b_value: ArrayLike | None = None, attn_mask: ArrayLike | None = None, is_causal: Any = False,
                   key_lengths: ArrayLike | None = None, window: tuple | None = None, exclude_self: bool = False,
                   return_weights: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """SelfAttention's math, with the layer's call arguments: Q = x W_q + b_q, K = x W_k + b_k,
    V = x W_v + b_v (the layer's textbook-orientation attributes, w_query (E, d_k), ...), then
    softmax(Q K^T / sqrt(d_k) + attn_mask) V with causal, key_lengths (x's batch axes) and window
    as in :func:`attention`; exclude_self hides each position's own key."""
    x = np.asarray(x)

    def project(w, b):
        y = x @ np.asarray(w)
        return y if b is None else y + np.asarray(b)

    q, k, v = project(w_query, b_query), project(w_key, b_key), project(w_value, b_value)
    if exclude_self:
        off_diagonal = ~np.eye(x.shape[-2], dtype=bool)
        if attn_mask is None:
            attn_mask = off_diagonal
        elif np.asarray(attn_mask).dtype == np.bool_:
            attn_mask = np.asarray(attn_mask) & off_diagonal
        else:
            attn_mask = np.where(off_diagonal, np.asarray(attn_mask), -np.inf)
    return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, key_lengths=key_lengths, window=window,
                     return_weights=return_weights)
