"""Transformer attention layers holding NumPy weights: :class:`SelfAttention`,
:class:`MultiHeadAttention` (with grouped-query attention) and :class:`KVCache` for
step-by-step decoding.

Every layer does its projections as single GEMMs (one for Q, K and V together where the
inputs allow it), hands the heads to :func:`attnext.scaled_dot_product_attention` as strided
views of the projection output (no per-head copies), and asks for the attention weights only
when the caller wants them. Masks follow attnext's one convention: bool True = may attend,
float added to the scores.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

from . import _core
from ._layers import LAYER_DTYPES, LOW_PRECISION_DTYPES
from ._layers import checked_weight as _check_array_shape
from ._layers import (LayerPullback, dropout_rate, dropout_seed, glorot_uniform, input_grad, layer_dtype, layer_input,
                      linear_grads, make_rng, output_cotangents, owned, positive_int)
from ._masks import as_mask, check_mask, combine_masks, key_mask_as_lengths
from ._validation import (FLOAT32, check_key_lengths, check_state_keys, out_kwargs, refuse_bfloat16_backward,
                          shape_str, to_array)
from .functional import ArrayLike, Causal, Window, _attention_of_checked, _mask_alias, scaled_dot_product_attention
from .grad import scaled_dot_product_attention_backward

__all__ = ["SelfAttention", "MultiHeadAttention", "KVCache"]

Projection = Tuple[ArrayLike, Optional[ArrayLike]]  # (W, b) of a torch.nn.Linear, b may be None


# --------------------------------------------------------------------------------------------
# helpers


def _linear(x: np.ndarray, weight: np.ndarray, bias, out: dict | None = None) -> np.ndarray:
    """y = x weight^T + bias as one GEMM on attnext's threads.

    x (..., in) in any layout (a 3-d strided view is read in place); weight (out, in) with one
    unit-stride axis; bias (out,) of the layer's dtype or None (the kernel reads a 16-bit bias
    exactly into float32, its accumulation type). Returns (..., out), C-contiguous. out: the
    keyword of :func:`attnext._validation.out_kwargs`.
    """
    lead = x.shape[:-1]
    if x.ndim == 3:
        x4 = x[:, :, None, :]
    elif x.ndim == 2:
        x4 = x[None, :, None, :]
    else:
        x4 = x.reshape((1, -1, 1, x.shape[-1]))
    return _core.linear(x4, weight, bias, **(out or {})).reshape(lead + (weight.shape[0],))


def _line_aligned_empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting on a 64-byte boundary (a cache line). A decoding step
    reads its weights and cache rows in 64-byte loads; NumPy's large arrays start 16 bytes past
    one, so every such load would straddle two lines unless aligned here."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start: start + nbytes].view(dtype).reshape(shape)


def _line_aligned(a: np.ndarray | None) -> np.ndarray | None:
    """a itself when it starts on a cache line, else a copy that does (_line_aligned_empty)."""
    if a is None or a.ctypes.data % 64 == 0:
        return a
    out = _line_aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _want_weights(return_weights, need_weights) -> bool:
    """MultiHeadAttention's return_weights, or need_weights (its PyTorch name)."""
    if need_weights is not None and return_weights is not None and bool(need_weights) != bool(return_weights):
        raise TypeError("return_weights and need_weights (its PyTorch name) disagree; pass one of them")
    return bool(return_weights if return_weights is not None else need_weights)


def _merge_heads(d: np.ndarray, batch_first: bool) -> np.ndarray:
    """(B, H, L, head_dim) -> (B, L, H * head_dim) / (L, B, H * head_dim), C-contiguous: the
    inverse of MultiHeadAttention._split_heads, for gradients and the output projection."""
    heads_last = d.transpose(0, 2, 1, 3) if batch_first else d.transpose(2, 0, 1, 3)
    return np.ascontiguousarray(heads_last).reshape(heads_last.shape[:2] + (-1,))


def _input(x, name: str, dtype: np.dtype, features: int, what: str) -> np.ndarray:
    """x as an aligned array of the layer's dtype with ``features`` in its last axis."""
    a = layer_input(x, name, dtype)
    if a.ndim == 0 or a.shape[-1] != features:
        raise ValueError(f"{name} has shape {shape_str(a.shape)} but its last dimension must be {what} = {features}")
    return a


# --------------------------------------------------------------------------------------------
# SelfAttention


class SelfAttention:
    """Single-head self-attention, the textbook layer: Q = x W_q, K = x W_k, V = x W_v,
    output = softmax(Q K^T / sqrt(d_k) + mask) V.

    Args:
        embed_dim: features of the input x.
        qk_dim: d_k, the width of queries and keys (default embed_dim).
        v_dim: the width of values and of the output (default embed_dim).
        bias: add a bias after each of the three maps.
        exclude_self: a position may not attend to itself (the diagonal is masked out), the
            usual remedy for self-attention over-weighting its own position. A row left with
            nothing to attend (position 0 under ``is_causal=True``) outputs zeros.
        dtype: float32 or float64, the dtype of the weights and of the computation; or float16 /
            ``ml_dtypes.bfloat16`` for inference: the weights (and state_dict) in that type,
            products read from it, accumulation in float32, output in it unless
            ``out_dtype=np.float32`` (:meth:`vjp` refuses bfloat16).
        rng: seed or ``np.random.Generator`` for the (Xavier-uniform) initial weights.
        dropout: probability of zeroing each attention weight (the kept ones scaled by
            1 / (1 - dropout)), PyTorch's meaning; applied in :meth:`vjp` (training) only, never
            in plain calls (inference).

    Precision (16-bit layers, docs/precision.md): inputs converted to the layer's type; Q, K
    and V (one GEMM, accumulated in float32, biases added in float32) rounded to it at their
    store; then :func:`attnext.scaled_dot_product_attention` with its own rounding points and
    the output rounded at its store unless ``out_dtype=np.float32``. The weights returned are
    float32.

    Weights (textbook orientation, ``Q = x @ w_query + b_query``): ``w_query`` (embed_dim, qk_dim),
    ``w_key`` (embed_dim, qk_dim), ``w_value`` (embed_dim, v_dim), biases ``b_query``, ``b_key``
    (qk_dim,), ``b_value`` (v_dim,) or None. They are views of one packed matrix (so the three
    maps are one GEMM); assign with :meth:`set_weights` or in place (``layer.w_query[...] = W``).

    :meth:`state_dict` / :meth:`load_state_dict` use PyTorch's ``nn.Linear`` layout and BERT's
    names instead: ``query.weight`` (qk_dim, embed_dim) = w_query.T, ``key.weight``,
    ``value.weight`` (v_dim, embed_dim), and ``query.bias``, ``key.bias``, ``value.bias`` when
    bias=True (a ``BertSelfAttention``'s state dict, converted to NumPy, loads as it is).
    :meth:`set_weights` is the textbook-orientation alias, kept for existing code.
    """

    def __init__(self, embed_dim: int, *, qk_dim: int | None = None, v_dim: int | None = None, bias: bool = False,
                 exclude_self: bool = False, dtype: npt.DTypeLike = np.float32,
                 rng: int | np.random.Generator | None = None, dropout: float = 0.0) -> None:
        self.embed_dim = positive_int(embed_dim, "embed_dim")
        self.qk_dim = self.embed_dim if qk_dim is None else positive_int(qk_dim, "qk_dim")
        self.v_dim = self.embed_dim if v_dim is None else positive_int(v_dim, "v_dim")
        self.exclude_self = bool(exclude_self)
        self.dropout = dropout_rate(dropout)
        self.dtype = layer_dtype(dtype)
        rng = make_rng(rng)
        e, dk, dv = self.embed_dim, self.qk_dim, self.v_dim
        # (2 dk + dv, embed_dim): rows [W_q^T; W_k^T; W_v^T], the (out, in) layout the linear
        # kernel reads in place (a transposed view would put it on a path whose float64 result
        # can depend on where its output is allocated); the attributes are transposed views.
        self._rows = np.concatenate([glorot_uniform(rng, (d, e), self.dtype) for d in (dk, dk, dv)])
        self._b = np.zeros(2 * dk + dv, dtype=self.dtype) if bias else None

    @property
    def w_query(self) -> np.ndarray:
        return self._rows[: self.qk_dim].T

    @property
    def w_key(self) -> np.ndarray:
        return self._rows[self.qk_dim: 2 * self.qk_dim].T

    @property
    def w_value(self) -> np.ndarray:
        return self._rows[2 * self.qk_dim:].T

    @property
    def b_query(self) -> np.ndarray | None:
        return None if self._b is None else self._b[: self.qk_dim]

    @property
    def b_key(self) -> np.ndarray | None:
        return None if self._b is None else self._b[self.qk_dim: 2 * self.qk_dim]

    @property
    def b_value(self) -> np.ndarray | None:
        return None if self._b is None else self._b[2 * self.qk_dim:]

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        e, dk, dv = self.embed_dim, self.qk_dim, self.v_dim
        shapes = {"query.weight": (dk, e), "key.weight": (dk, e), "value.weight": (dv, e)}
        if self._b is not None:
            shapes.update({"query.bias": (dk,), "key.bias": (dk,), "value.bias": (dv,)})
        return shapes

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the weights in PyTorch's (out_features, in_features) layout, under BERT's
        names: ``query.weight`` (qk_dim, embed_dim), ``key.weight``, ``value.weight``
        (v_dim, embed_dim), plus ``query.bias``, ``key.bias``, ``value.bias`` with bias=True."""
        state = {"query.weight": self.w_query.T.copy(), "key.weight": self.w_key.T.copy(),
                 "value.weight": self.w_value.T.copy()}
        if self._b is not None:
            state.update({"query.bias": self.b_query.copy(), "key.bias": self.b_key.copy(),
                          "value.bias": self.b_value.copy()})
        return state

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Copies in weights named and shaped as :meth:`state_dict` returns them (PyTorch's
        (out, in) layout). Every key must be present with its shape; nothing changes if a
        check fails."""
        d = dict(state_dict)
        shapes = self._state_shapes()
        check_state_keys(d, shapes, "this layer")
        checked = {name: _check_array_shape(d[name], name, shape, self.dtype) for name, shape in shapes.items()}
        self.w_query[...] = checked["query.weight"].T
        self.w_key[...] = checked["key.weight"].T
        self.w_value[...] = checked["value.weight"].T
        if self._b is not None:
            self.b_query[...] = checked["query.bias"]
            self.b_key[...] = checked["key.bias"]
            self.b_value[...] = checked["value.bias"]

    def set_weights(self, *, w_query: ArrayLike | None = None, w_key: ArrayLike | None = None,
                    w_value: ArrayLike | None = None, b_query: ArrayLike | None = None, b_key: ArrayLike | None = None,
                    b_value: ArrayLike | None = None) -> None:
        """Copies the given weights in, in the textbook (in, out) orientation of the attributes of
        the same names; the rest stay. The (out, in) equivalent is :meth:`load_state_dict`."""
        e, dk, dv = self.embed_dim, self.qk_dim, self.v_dim
        for name, value, shape in (("w_query", w_query, (e, dk)), ("w_key", w_key, (e, dk)),
                                   ("w_value", w_value, (e, dv))):
            if value is not None:
                getattr(self, name)[...] = _check_array_shape(value, name, shape, self.dtype)
        for name, value, shape in (("b_query", b_query, (dk,)), ("b_key", b_key, (dk,)), ("b_value", b_value, (dv,))):
            if value is not None:
                if self._b is None:
                    raise ValueError(f"{name} given but this layer was built with bias=False")
                getattr(self, name)[...] = _check_array_shape(value, name, shape, self.dtype)

    def __call__(self, x: ArrayLike, *, attn_mask: ArrayLike | None = None, is_causal: Causal = False,
                 key_lengths: ArrayLike | None = None, window: Window = None, return_weights: bool = False,
                 warn: bool = True, mask: ArrayLike | None = None, out_dtype: npt.DTypeLike | None = None
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Self-attention of x with itself.

        Args:
            x: (..., L, embed_dim).
            attn_mask: broadcastable to (..., L, L); bool True = may attend, float added.
                ``mask`` is its older name, still accepted.
            is_causal: False, True (position i sees j <= i) or ``"bottom_right"`` (same here).
            key_lengths: ints broadcastable to x's batch shape (...,); positions >= length are
                padding, hidden as keys.
            window: (left, right): position i sees [i - left, i + right]; None = unbounded side.
            return_weights: also return the (..., L, L) attention weights (float32 for a 16-bit
                layer).
            warn: check attn_mask for the usual mistakes (:class:`attnext.MaskWarning`).
            out_dtype: None (the layer's dtype) or np.float32 for a float16/bfloat16 layer (the
                attention kernel writes its float32 result).

        Returns:
            output (..., L, v_dim), or (output, weights).
        """
        result, _ = self._forward(x, attn_mask, is_causal, key_lengths, window, return_weights, warn, mask,
                                  out_dtype=out_dtype)
        return result

    def _forward(self, x, attn_mask, is_causal, key_lengths, window, return_weights, warn, mask=None,
                 dropout_p: float = 0.0, seed: int | None = None, keep: bool = False, out_dtype=None):
        """The forward pass of __call__ and vjp: (result, saved), saved (only with keep) holding
        what the backward needs."""
        out_dtype = FLOAT32 if out_kwargs(out_dtype, self.dtype) else None  # checked before any work
        given_mask = mask = _mask_alias(attn_mask, mask, "SelfAttention()")
        given = x
        x = _input(x, "x", self.dtype, self.embed_dim, "embed_dim")
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions (..., L, embed_dim), got shape {shape_str(x.shape)}")
        qkv = _linear(x, self._rows, self._b)  # one GEMM: (..., L, 2 dk + dv)
        dk = self.qk_dim
        q, k, v = qkv[..., :dk], qkv[..., dk: 2 * dk], qkv[..., 2 * dk:]
        if mask is not None:
            mask = as_mask(mask, self.dtype, "attn_mask")
            if warn:
                check_mask(mask, "attn_mask", 2)
        if self.exclude_self:
            mask = _exclude_diagonal(mask, x.shape[-2], self.dtype)
        lengths = None
        if key_lengths is not None:
            # A head axis of 1, so every axis before (L, d) is a batch axis for key_lengths.
            lengths = np.array(check_key_lengths(key_lengths, x.shape[:-2], x.shape[-2]))
            if mask is not None and mask.ndim >= 3:
                mask = mask[..., None, :, :]
            q, k, v = q[..., None, :, :], k[..., None, :, :], v[..., None, :, :]
        # dropout only in training (vjp): a plain call passes no dropout arguments at all
        training = {"dropout_p": dropout_p, "seed": seed} if dropout_p else {}
        result = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, key_lengths=lengths, window=window,
                                              return_weights=return_weights, return_lse=keep, warn=False,
                                              out_dtype=out_dtype, **training)
        parts = list(result) if isinstance(result, tuple) else [result]
        saved = None
        if keep:
            saved = dict(x=owned(x, given), q=q, k=k, v=v, o=parts[0], lse=parts[-1],
                         mask=None if mask is None else owned(mask, given_mask), lengths=lengths,
                         is_causal=is_causal, window=window, dropout_p=dropout_p, seed=seed,
                         weights=self.state_dict())
            parts = parts[:-1]
        if lengths is not None:
            parts = [r[..., 0, :, :] for r in parts]
        return (tuple(parts) if return_weights else parts[0]), saved

    def vjp(self, x: ArrayLike, *, attn_mask: ArrayLike | None = None, is_causal: Causal = False,
            key_lengths: ArrayLike | None = None, window: Window = None, return_weights: bool = False,
            warn: bool = True, mask: ArrayLike | None = None, seed: int | None = None):
        """A training step's forward pass and its pullback: ``result, pullback``.

        Takes what :meth:`__call__` takes (and returns what it returns), plus ``seed`` for the
        attention dropout (the layer's ``dropout``, applied here and never in plain calls):
        None draws a fresh seed from the operating system, recorded as ``pullback.seed``.

        ``pullback(grad_output)`` (or ``pullback((grad_output, grad_weights))`` with
        return_weights, None for an output not differentiated) returns ``((dx,), param_grads)``,
        param_grads keyed like :meth:`state_dict` and summed over the batch. Masks and key
        lengths get no gradient.
        """
        refuse_bfloat16_backward({"SelfAttention.dtype": self._rows})
        seed = dropout_seed(self.dropout, seed)
        result, saved = self._forward(x, attn_mask, is_causal, key_lengths, window, return_weights, warn, mask,
                                      self.dropout, seed, keep=True)

        def backward(cotangent):
            grads = output_cotangents(cotangent, result, self.dtype)
            dx, params = self._backward(saved, grads[0], grads[1] if return_weights else None)
            return (input_grad(dx, x),), params

        return result, LayerPullback(backward, seed)

    def _backward(self, s: dict, grad_out, grad_weights):
        """(dx, param_grads) from what _forward saved."""
        o, head_axis = s["o"], s["lengths"] is not None
        if grad_out is None:
            grad_out = np.zeros(o.shape, dtype=self.dtype)
        elif head_axis:
            grad_out = grad_out[..., None, :, :]
        if grad_weights is not None and head_axis:
            grad_weights = grad_weights[..., None, :, :]
        dq, dk, dv, _ = scaled_dot_product_attention_backward(
            grad_out, s["q"], s["k"], s["v"], o, s["lse"], s["mask"], s["dropout_p"], s["is_causal"],
            key_lengths=s["lengths"], window=s["window"], seed=s["seed"], grad_weights=grad_weights)
        d_qkv = np.concatenate([dq, dk, dv], axis=-1)
        if head_axis:
            d_qkv = d_qkv[..., 0, :, :]
        w = s["weights"]
        weight = np.concatenate([w["query.weight"], w["key.weight"], w["value.weight"]])
        bias = None if self._b is None else np.concatenate([w["query.bias"], w["key.bias"], w["value.bias"]])
        dx, dweight, dbias = linear_grads(d_qkv, s["x"], weight, bias)
        e, dk = self.embed_dim, self.qk_dim
        params = {"query.weight": dweight[:dk], "key.weight": dweight[dk: 2 * dk], "value.weight": dweight[2 * dk:]}
        if bias is not None:
            params.update({"query.bias": dbias[:dk], "key.bias": dbias[dk: 2 * dk], "value.bias": dbias[2 * dk:]})
        return dx, {name: np.array(g, dtype=self.dtype, order="C") for name, g in params.items()}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("dropout", 0.0)  # pickled before layers had dropout
        if "_w" in state:  # pickled when the packed weight was kept as (embed_dim, 2 dk + dv)
            state["_rows"] = np.ascontiguousarray(state.pop("_w").T)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"SelfAttention(embed_dim={self.embed_dim}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"bias={self._b is not None}, exclude_self={self.exclude_self}, dropout={self.dropout!r}, "
                f"dtype={self.dtype.name})")


def _exclude_diagonal(mask, length: int, dtype: np.dtype):
    """mask with every position's own key hidden (bool False or float -inf on the diagonal)."""
    off_diagonal = ~np.eye(length, dtype=bool)
    return combine_masks(None if mask is None else as_mask(mask, dtype, "mask"), off_diagonal, dtype)


# --------------------------------------------------------------------------------------------
# KVCache


def _native(a: np.ndarray) -> np.ndarray:
    """a in the machine's byte order (a big-endian array is converted, as everywhere in attnext)."""
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in "=|" else a


class KVCache:
    """The keys and values of the tokens decoded so far, for :meth:`MultiHeadAttention.step`.

    Stored per key/value head as (batch, num_kv_heads, capacity, head_dim) buffers of which
    the first ``len(cache)`` positions are filled. When an append does not fit, the capacity
    at least doubles, so decoding n tokens copies O(n) elements in all (amortised constant
    per token), never the whole cache per token.

    Args:
        capacity: positions to allocate on the first append (grows as needed).
        dtype: the type the cache stores: None (that of the first keys appended), float32,
            float64, float16 or ml_dtypes.bfloat16. Appended keys and values are converted to it
            (for 16-bit types a rounding point); a bfloat16 cache halves the bytes each decoding
            step reads.
    """

    def __init__(self, capacity: int = 0, *, dtype: npt.DTypeLike | None = None) -> None:
        if isinstance(capacity, (bool, np.bool_)) or not isinstance(capacity, numbers.Integral) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self._initial = int(capacity)
        self._dtype = None if dtype is None else layer_dtype(dtype)
        self._k = None  # (B, Hk, capacity, D)
        self._v = None  # (B, Hk, capacity, Dv)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def dtype(self) -> np.dtype | None:
        """The stored type: the one given, else that of the buffers (None before the first append)."""
        return self._dtype if self._dtype is not None or self._k is None else self._k.dtype

    @property
    def keys(self) -> np.ndarray | None:
        """(B, Hk, len, D) view of the cached keys (None before the first append)."""
        return None if self._k is None else self._k[:, :, : self._length]

    @property
    def values(self) -> np.ndarray | None:
        """(B, Hk, len, Dv) view of the cached values (None before the first append)."""
        return None if self._v is None else self._v[:, :, : self._length]

    def reset(self) -> None:
        """Forgets every cached position (the buffers are kept for the next sequence)."""
        self._length = 0

    def append(self, key: ArrayLike, value: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Appends T positions: key (B, Hk, T, D), value (B, Hk, T, Dv) (any layout).

        Returns the (keys, values) views of everything cached, T new positions included.
        """
        key, value = _native(to_array(key, "key")), _native(to_array(value, "value"))
        if key.ndim != 4 or value.ndim != 4 or key.shape[:3] != value.shape[:3]:
            raise ValueError(f"key has shape {shape_str(key.shape)} and value {shape_str(value.shape)}: both must "
                             "be (batch, num_kv_heads, T, dim) with equal first three dimensions")
        if key.dtype != value.dtype or key.dtype not in LAYER_DTYPES + LOW_PRECISION_DTYPES:
            raise TypeError(f"key and value must share a dtype float32, float64, float16 or bfloat16, got {key.dtype} "
                            f"and {value.dtype}")
        return self._extend(key, value)

    def _extend(self, key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """append() for arrays already checked as append() checks them: (B, Hk, T, D) and
        (B, Hk, T, Dv) ndarrays of one dtype it accepts, in native byte order (what
        MultiHeadAttention.step makes). Converts them to the cache's type and checks that they
        continue what it holds."""
        if self._dtype is not None and key.dtype != self._dtype:
            key, value = key.astype(self._dtype), value.astype(self._dtype)
        b, h, t = key.shape[:3]
        k = self._k
        same_kind = (k is not None and k.dtype == key.dtype and k.shape[:2] == key.shape[:2]
                     and k.shape[3] == key.shape[3] and self._v.shape[3] == value.shape[3])
        if self._length > 0 and not same_kind:
            raise ValueError(
                f"key has shape {shape_str(key.shape)} ({key.dtype}) but the cache holds keys of shape "
                f"{shape_str(self.keys.shape)} and values of {shape_str(self.values.shape)} ({k.dtype}): "
                "batch, heads, dims and dtype must match (call reset() to start a new sequence)")
        start, needed = self._length, self._length + t
        if not same_kind or needed > k.shape[2]:
            old = k.shape[2] if same_kind else 0
            capacity = max(needed, 2 * old, self._initial, 16)
            new_k = _line_aligned_empty((b, h, capacity, key.shape[3]), key.dtype)
            new_v = _line_aligned_empty((b, h, capacity, value.shape[3]), value.dtype)
            if start:
                new_k[:, :, :start] = k[:, :, :start]
                new_v[:, :, :start] = self._v[:, :, :start]
            self._k, self._v = new_k, new_v
        self._k[:, :, start:needed] = key
        self._v[:, :, start:needed] = value
        self._length = needed
        return self._k[:, :, :needed], self._v[:, :, :needed]

    def __repr__(self) -> str:
        shape = None if self._k is None else shape_str(self.keys.shape)
        return f"KVCache(len={self._length}, capacity={self.capacity}, keys={shape})"


# --------------------------------------------------------------------------------------------
# MultiHeadAttention


class MultiHeadAttention:
    """Multi-head attention, weight-compatible with ``torch.nn.MultiheadAttention``, with
    grouped-query attention.

    output = concat_h(softmax(Q_h K_g(h)^T / sqrt(head_dim) + mask) V_g(h)) W_out^T + b_out,
    where Q = query W_q^T + b_q, K = key W_k^T + b_k, V = value W_v^T + b_v, split into heads
    of head_dim = embed_dim / num_heads, and query head h uses key/value head
    g(h) = h // (num_heads / num_kv_heads).

    Args:
        embed_dim: features of the query and of the output.
        num_heads: query heads; must divide embed_dim.
        num_kv_heads: key/value heads (default num_heads); must divide num_heads. Fewer than
            num_heads is grouped-query attention, 1 is multi-query attention.
        kdim, vdim: features of key and value inputs (default embed_dim).
        bias: biases on the input and output projections.
        batch_first: inputs and outputs are (B, L, E) if True, (L, B, E) if False; an unbatched
            (L, E) input is accepted either way.
        dtype: float32 or float64, the dtype of the weights and the computation (inputs are
            converted to it); or float16 / ``ml_dtypes.bfloat16`` for inference: the weights
            (and state_dict) in that type, products read from it, accumulation in float32,
            output in it unless ``out_dtype=np.float32`` (training, :meth:`vjp`, refuses
            bfloat16).
        rng: seed or ``np.random.Generator`` for the initial weights (PyTorch's scheme:
            Xavier-uniform input projections, zero biases).
        dropout: probability of zeroing each attention weight (the kept ones scaled by
            1 / (1 - dropout)), PyTorch's ``dropout``; applied in :meth:`vjp` (training) only,
            never in plain calls (inference).

    Weights use PyTorch's names and (out_features, in_features) layout: ``in_proj_weight``
    (embed_dim + 2 num_kv_heads head_dim, embed_dim), only when kdim == vdim == embed_dim;
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (views into it, or separate when
    kdim/vdim differ); ``in_proj_bias``; ``out_proj_weight`` (embed_dim, embed_dim);
    ``out_proj_bias``. Load them with :meth:`load_state_dict`, :meth:`from_torch` or
    :meth:`load_projections`. :meth:`vjp` gives the gradients of the inputs and of these
    weights (keyed like :meth:`state_dict`).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, batch_first: bool = True,
                 dtype: npt.DTypeLike = np.float32, rng: int | np.random.Generator | None = None,
                 dropout: float = 0.0) -> None:
        self.embed_dim = positive_int(embed_dim, "embed_dim")
        self.num_heads = positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else positive_int(num_kv_heads, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.kdim = self.embed_dim if kdim is None else positive_int(kdim, "kdim")
        self.vdim = self.embed_dim if vdim is None else positive_int(vdim, "vdim")
        self.head_dim = self.embed_dim // self.num_heads
        self.batch_first = bool(batch_first)
        self.dtype = layer_dtype(dtype)
        self.bias = bool(bias)
        self.dropout = dropout_rate(dropout)
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        self._kv_width = kv
        self._packed = self.kdim == e and self.vdim == e
        rng = make_rng(rng)
        if self._packed:
            self._in_w = glorot_uniform(rng, (e + 2 * kv, e), self.dtype)
            self._split_in_proj()
        else:
            self._in_w = None
            self._q_w = glorot_uniform(rng, (e, e), self.dtype)
            self._k_w = glorot_uniform(rng, (kv, self.kdim), self.dtype)
            self._v_w = glorot_uniform(rng, (kv, self.vdim), self.dtype)
        bound = 1.0 / math.sqrt(e)
        self._out_w = rng.uniform(-bound, bound, size=(e, e)).astype(self.dtype)
        self._in_b = np.zeros(e + 2 * kv, dtype=self.dtype) if self.bias else None
        self._out_b = np.zeros(e, dtype=self.dtype) if self.bias else None
        self._align_weights()

    def _align_weights(self) -> None:
        """The weight matrices on cache-line boundaries (_line_aligned), for the decoding step's
        projections; they are loaded in place from then on, so they stay there."""
        self._in_w, self._out_w = _line_aligned(self._in_w), _line_aligned(self._out_w)
        if self._packed:
            self._split_in_proj()
        else:
            self._q_w, self._k_w, self._v_w = (_line_aligned(w) for w in (self._q_w, self._k_w, self._v_w))

    def _split_in_proj(self) -> None:
        """q/k/v_proj_weight as views of the rows of in_proj_weight (one GEMM for all three)."""
        e, kv = self.embed_dim, self._kv_width
        self._q_w, self._k_w, self._v_w = self._in_w[:e], self._in_w[e: e + kv], self._in_w[e + kv:]

    # ---- pickling: a copy keeps q/k/v_proj_weight as views of in_proj_weight ----------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._packed:  # the views are rebuilt from in_proj_weight; pickled, they would be copies
            for name in ("_q_w", "_k_w", "_v_w"):
                state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("dropout", 0.0)  # pickled before layers had dropout
        self.__dict__.update(state)
        self._align_weights()

    # ---- weights --------------------------------------------------------------------------

    @property
    def in_proj_weight(self) -> np.ndarray | None:
        """(embed_dim + 2 kv, embed_dim), rows [W_q; W_k; W_v]; None when kdim/vdim differ."""
        return self._in_w

    @property
    def q_proj_weight(self) -> np.ndarray:
        return self._q_w

    @property
    def k_proj_weight(self) -> np.ndarray:
        return self._k_w

    @property
    def v_proj_weight(self) -> np.ndarray:
        return self._v_w

    @property
    def in_proj_bias(self) -> np.ndarray | None:
        return self._in_b

    @property
    def out_proj_weight(self) -> np.ndarray:
        return self._out_w

    @property
    def out_proj_bias(self) -> np.ndarray | None:
        return self._out_b

    def _bias_part(self, which: str):
        if self._in_b is None:
            return None
        e, kv = self.embed_dim, self._kv_width
        return {"q": self._in_b[:e], "k": self._in_b[e: e + kv], "v": self._in_b[e + kv:]}[which]

    def _weight_shapes(self) -> dict:
        e, kv = self.embed_dim, self._kv_width
        shapes = {}
        if self._packed:
            shapes["in_proj_weight"] = (e + 2 * kv, e)
        else:
            shapes.update(q_proj_weight=(e, e), k_proj_weight=(kv, self.kdim), v_proj_weight=(kv, self.vdim))
        if self.bias:
            shapes["in_proj_bias"] = (e + 2 * kv,)
        shapes["out_proj.weight"] = (e, e)
        if self.bias:
            shapes["out_proj.bias"] = (e,)
        return shapes

    def _storage(self, name: str) -> np.ndarray:
        return {"in_proj_weight": self._in_w, "q_proj_weight": self._q_w, "k_proj_weight": self._k_w,
                "v_proj_weight": self._v_w, "in_proj_bias": self._in_b, "out_proj.weight": self._out_w,
                "out_proj.bias": self._out_b}[name]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights under ``torch.nn.MultiheadAttention``'s state-dict names, as NumPy copies."""
        return {name: self._storage(name).copy() for name in self._weight_shapes()}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Copies in the weights of a ``torch.nn.MultiheadAttention`` state dict converted to
        NumPy (``{k: v.numpy() for k, v in module.state_dict().items()}``).

        Keys: ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
        when kdim/vdim differ from embed_dim), ``in_proj_bias``, ``out_proj.weight``,
        ``out_proj.bias`` (biases only with bias=True). Every key must be present with the
        shape this layer needs; nothing is changed if any check fails.
        """
        d = dict(state_dict)
        unsupported = {"bias_k", "bias_v"} & set(d)
        if unsupported:
            raise ValueError(f"state dict has {', '.join(sorted(unsupported))} (add_bias_kv=True), which "
                             "MultiHeadAttention does not support")
        shapes = self._weight_shapes()
        check_state_keys(d, shapes, "this layer")
        checked = {name: _check_array_shape(d[name], name, shape, self.dtype) for name, shape in shapes.items()}
        for name, value in checked.items():
            self._storage(name)[...] = value

    @classmethod
    def from_torch(cls, module: Any, *, batch_first: bool | None = True) -> "MultiHeadAttention":
        """A layer with the configuration and (copied) weights of a ``torch.nn.MultiheadAttention``.

        batch_first: the layer's layout. True (the default, attnext's layout): inputs are
            (B, L, E) whatever the module's ``batch_first``; the weights do not depend on the
            layout, so nothing needs converting back. False: PyTorch's (L, B, E). None: the
            module's own setting.

        float16/bfloat16 modules give float32 layers; the module's ``dropout`` is the layer's
        (applied in :meth:`vjp` only).
        """
        try:
            import torch
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("from_torch needs PyTorch installed") from None
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("modules with add_bias_kv=True are not supported")
        if module.add_zero_attn:
            raise ValueError("modules with add_zero_attn=True are not supported")
        dtype = np.float64 if module.out_proj.weight.dtype == torch.float64 else np.float32
        layer = cls(module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim,
                    bias=module.in_proj_bias is not None,
                    batch_first=module.batch_first if batch_first is None else bool(batch_first), dtype=dtype,
                    dropout=module.dropout)
        torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
        layer.load_state_dict({k: v.detach().to("cpu", torch_dtype).numpy() for k, v in module.state_dict().items()})
        return layer

    def load_projections(self, *, q: Projection | None = None, k: Projection | None = None,
                         v: Projection | None = None, out: Projection | None = None) -> None:
        """Copies in separate projection layers' weights, each a pair (W, b) in the
        (out_features, in_features) layout of ``torch.nn.Linear`` (BERT's query/key/value/
        output.dense, LLaMA's q_proj/k_proj/v_proj/o_proj with num_kv_heads).

        Shapes: q W (embed_dim, embed_dim); k W (num_kv_heads * head_dim, kdim);
        v W (num_kv_heads * head_dim, vdim); out W (embed_dim, embed_dim); b (out_features,).
        b may be None (zero bias when the layer has bias=True); a bias given to a layer built
        with bias=False is an error. Projections not given keep their weights.
        """
        e, kv = self.embed_dim, self._kv_width
        plan = []
        for name, pair, w_store, b_store, w_shape in (
            ("q", q, self._q_w, self._bias_part("q"), (e, e)),
            ("k", k, self._k_w, self._bias_part("k"), (kv, self.kdim)),
            ("v", v, self._v_w, self._bias_part("v"), (kv, self.vdim)),
            ("out", out, self._out_w, self._out_b, (e, e)),
        ):
            if pair is None:
                continue
            try:
                weight, bias = pair
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a pair (W, b), got {type(pair).__name__}") from None
            weight = _check_array_shape(weight, f"{name} weight", w_shape, self.dtype)
            if bias is not None:
                if b_store is None:
                    raise ValueError(f"{name} bias given but this layer was built with bias=False")
                bias = _check_array_shape(bias, f"{name} bias", (w_shape[0],), self.dtype)
            plan.append((w_store, weight, b_store, bias))
        for w_store, weight, b_store, bias in plan:
            w_store[...] = weight
            if b_store is not None:
                b_store[...] = 0 if bias is None else bias

    # ---- forward ---------------------------------------------------------------------------

    def _split_heads(self, y: np.ndarray, start: int, heads: int, batch_first: bool) -> np.ndarray:
        """Columns [start, start + heads * head_dim) of a (B, L, F) / (L, B, F) projection as a
        (B, heads, L, head_dim) strided view (no copy)."""
        part = y[..., start: start + heads * self.head_dim]
        part = part.reshape(part.shape[:-1] + (heads, self.head_dim))
        return part.transpose(0, 2, 1, 3) if batch_first else part.transpose(1, 2, 0, 3)

    def _project_out(self, o: np.ndarray, batch_first: bool, out: dict | None = None) -> np.ndarray:
        """(B, H, L, head_dim) attention output -> (B, L, E) / (L, B, E) through W_out, reading the
        heads through a (B, L, H, head_dim) view (the kernel gathers rows, no separate copy).
        out: the output keyword of :func:`attnext._validation.out_kwargs`."""
        heads_last = o.transpose(0, 2, 1, 3) if batch_first else o.transpose(2, 0, 1, 3)
        return _core.linear(heads_last, self._out_w, self._out_b, **(out or {}))

    def _layout_hint(self) -> str:
        other = "(L, B, E)" if self.batch_first else "(B, L, E)"
        return (f"; did you mean batch_first={not self.batch_first}? This layer reads inputs as "
                f"{'(B, L, E)' if self.batch_first else '(L, B, E)'}, and these shapes fit {other}")

    def _prepare_masks(self, key_mask, key_lengths, attn_mask, b: int, lq: int, s: int, unbatched: bool,
                       warn: bool = True):
        """(attn_mask for the kernel (B, H, L, S)-broadcastable or None, key_lengths (B,) or None).

        A bool key_mask that is a padding mask (each row True then False) is passed on as key
        lengths (:func:`attnext._masks.key_mask_as_lengths`, same results, padding tiles skipped);
        any other key_mask is combined with attn_mask into one mask."""
        h = self.num_heads
        mask = None
        if attn_mask is not None:
            m = as_mask(attn_mask, self.dtype, "attn_mask")
            if m.shape == (lq, s):
                pass
            elif m.shape == (b * h, lq, s):
                m = m.reshape(b, h, lq, s)
            elif m.shape == (b, h, lq, s) and not unbatched:
                pass
            else:
                allowed = f"(L, S) = {shape_str((lq, s))}, (B*num_heads, L, S) = {shape_str((b * h, lq, s))}"
                if not unbatched:
                    allowed += f" or (B, num_heads, L, S) = {shape_str((b, h, lq, s))}"
                raise ValueError(f"attn_mask has shape {shape_str(m.shape)} but must be {allowed}")
            if warn:
                check_mask(m, "attn_mask", 3 if m.ndim == 4 else 2)
            mask = m
        lengths = None
        if key_lengths is not None:
            kl = to_array(key_lengths, "key_lengths")
            want = () if unbatched else (b,)
            if kl.shape != want:
                hint = self._layout_hint() if not unbatched and kl.shape == (lq,) and lq == s else ""
                raise ValueError(f"key_lengths has shape {shape_str(kl.shape)} but must be {shape_str(want)} "
                                 f"(one length per sequence){hint}")
            lengths = np.array(check_key_lengths(kl, want, s)).reshape(b)
        if key_mask is not None:
            km = as_mask(key_mask, self.dtype, "key_mask")
            want = (s,) if unbatched else (b, s)
            if km.shape != want:
                hint = self._layout_hint() if not unbatched and km.shape == (s, b) and lq == s else ""
                raise ValueError(f"key_mask has shape {shape_str(km.shape)} but must be (B, S) = {shape_str(want)}{hint}"
                                 if not unbatched else
                                 f"key_mask has shape {shape_str(km.shape)} but must be (S,) = {shape_str(want)}")
            if warn:
                check_mask(km, "key_mask", 1)
            km = km.reshape(b, s)
            as_lengths = key_mask_as_lengths(km) if lengths is None else None
            if as_lengths is not None:
                return mask, as_lengths
            mask = combine_masks(mask, km[:, None, None, :], self.dtype)  # (B, 1, 1, S)
        return mask, lengths

    def __call__(self, query: ArrayLike, key: ArrayLike | None = None, value: ArrayLike | None = None, *,
                 key_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                 attn_mask: ArrayLike | None = None, is_causal: Causal = False, window: Window = None,
                 return_weights: bool | None = None, average_attn_weights: bool = True, warn: bool = True,
                 need_weights: bool | None = None, out_dtype: npt.DTypeLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Attention of query over key/value (self-attention when both are omitted).

        Args:
            query: (B, L, embed_dim) if batch_first else (L, B, embed_dim); or unbatched (L, embed_dim).
            key: (B, S, kdim) / (S, B, kdim) / (S, kdim); default query.
            value: (B, S, vdim) / (S, B, vdim) / (S, vdim); default key.
            key_mask: (B, S) (unbatched: (S,)); bool True = may attend (PyTorch's
                ``key_padding_mask`` is its negation), or float added to the scores.
                A bool padding mask (each row True for its first n keys, False after) is
                passed to the kernel as key lengths n (``attnext._masks.key_mask_as_lengths``):
                the same results, with the padding's tiles skipped instead of masked.
            key_lengths: (B,) ints (unbatched: a scalar); keys at positions >= length are padding.
            attn_mask: (L, S), (B * num_heads, L, S) or (B, num_heads, L, S); bool True = may
                attend (PyTorch's MultiheadAttention bool mask is its negation), or float added.
            is_causal: False, True (query i sees keys j <= i, top-left as PyTorch) or
                ``"bottom_right"`` (the last query aligned with the last key).
            window: (left, right): query i sees keys [i - left, i + right]; None = unbounded side.
            return_weights: also compute and return the attention weights (default False).
                ``need_weights`` is PyTorch's name for it, accepted too.
            average_attn_weights: weights averaged over heads (B, L, S) if True, else per head
                (B, num_heads, L, S).
            warn: check attn_mask and key_mask for the usual mistakes
                (:class:`attnext.MaskWarning`: a bool mask hiding every key of a batch entry,
                the mark of an uninverted PyTorch key_padding_mask; a float mask of only 0 and
                1). The check reads the masks as given, at most twice; False skips it.
            out_dtype: None (the layer's dtype) or np.float32 for a float16/bfloat16 layer (the
                output projection writes float32 from its accumulators).

        Precision (16-bit layers): inputs are converted to the layer's dtype; Q, K, V and the
        attention output are 16-bit arrays between the kernels (rounded at each store); the
        weights returned are float32 (docs/precision.md).

        Layout: with batch_first=True (the default) inputs are (B, L, E); PyTorch's default
        (L, B, E) needs batch_first=False. Where the shapes of key, key_mask or key_lengths
        reveal the other layout, the error asks "did you mean batch_first=...?"; a plain
        self-attention call cannot tell the two apart.

        Returns:
            (output, weights): output like query with embed_dim features; weights as above, or
            None when return_weights is False (the pair is always returned, as PyTorch does). A query that may attend to nothing gets output
            b_out (zero attention) and zero weights, where PyTorch gives NaN.
        """
        want_weights = _want_weights(return_weights, need_weights)
        out, weights, _ = self._forward(query, key, value, key_mask, key_lengths, attn_mask, is_causal, window,
                                        want_weights, average_attn_weights, warn,
                                        out=out_kwargs(out_dtype, self.dtype))
        return out, weights

    def _forward(self, query, key, value, key_mask, key_lengths, attn_mask, is_causal, window, want_weights: bool,
                 average_attn_weights: bool, warn: bool, dropout_p: float = 0.0, seed: int | None = None,
                 keep: bool = False, out: dict | None = None):
        """The forward pass of __call__ and vjp: (output, weights, saved), where saved (only with
        keep) holds what the backward needs; out: the output projection's keyword (out_dtype)."""
        q_in = _input(query, "query", self.dtype, self.embed_dim, "embed_dim")
        # query is key is value (or both omitted): one GEMM for Q, K and V together
        self_attention = (key is None or key is query) and (value is None or value is query)
        if key is None and value is not None:
            raise ValueError("value given without key: pass key too (or neither, for self-attention)")
        k_in = q_in if key is None else _input(key, "key", self.dtype, self.kdim, "kdim")
        v_in = k_in if value is None else _input(value, "value", self.dtype, self.vdim, "vdim")
        if value is None and key is not None and self.kdim != self.vdim:
            raise ValueError(f"value defaults to key, but kdim ({self.kdim}) != vdim ({self.vdim}): pass value")
        if q_in.ndim not in (2, 3):
            raise ValueError(f"query must be 3-d (batched) or 2-d (unbatched), got shape {shape_str(q_in.shape)}")
        unbatched = q_in.ndim == 2
        for name, a in (("key", k_in), ("value", v_in)):
            if a.ndim != q_in.ndim:
                raise ValueError(f"query has shape {shape_str(q_in.shape)} but {name} has {shape_str(a.shape)}: "
                                 "both must be batched (3-d) or both unbatched (2-d)")
        if k_in.shape[:-1] != v_in.shape[:-1]:
            raise ValueError(f"key has shape {shape_str(k_in.shape)} but value has {shape_str(v_in.shape)}: "
                             "all but the last dimension must match")
        batch_first = self.batch_first or unbatched
        if unbatched:
            q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
        b_axis = 0 if batch_first else 1
        if k_in.shape[b_axis] != q_in.shape[b_axis]:
            hint = self._layout_hint() if k_in.shape[1 - b_axis] == q_in.shape[1 - b_axis] else ""
            raise ValueError(f"query has shape {shape_str(np.shape(query))} but key has {shape_str(np.shape(key))}: "
                             f"their batch dimensions (axis {b_axis}) differ{hint}")
        b, lq, s = q_in.shape[b_axis], q_in.shape[1 - b_axis], k_in.shape[1 - b_axis]
        e, kv, hk = self.embed_dim, self._kv_width, self.num_kv_heads
        mask, lengths = self._prepare_masks(key_mask, key_lengths, attn_mask, b, lq, s, unbatched, warn)

        # Projections: one GEMM for Q, K, V together in self-attention, else one for Q and one
        # for K and V together when key is value.
        if self._packed and self_attention:
            y = _linear(q_in, self._in_w, self._in_b)
            q, k, v = (self._split_heads(y, 0, self.num_heads, batch_first),
                       self._split_heads(y, e, hk, batch_first), self._split_heads(y, e + kv, hk, batch_first))
        else:
            yq = _linear(q_in, self._q_w, self._bias_part("q"))
            q = self._split_heads(yq, 0, self.num_heads, batch_first)
            if self._packed and (value is None or v_in is k_in):
                ykv = _linear(k_in, self._in_w[e:], None if self._in_b is None else self._in_b[e:])
                k, v = self._split_heads(ykv, 0, hk, batch_first), self._split_heads(ykv, kv, hk, batch_first)
            else:
                k = self._split_heads(_linear(k_in, self._k_w, self._bias_part("k")), 0, hk, batch_first)
                v = self._split_heads(_linear(v_in, self._v_w, self._bias_part("v")), 0, hk, batch_first)

        gqa = hk != self.num_heads
        # dropout only in training (vjp): a plain call passes no dropout arguments at all
        training = {"dropout_p": dropout_p, "seed": seed} if dropout_p else {}
        result = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa, key_lengths=lengths,
                                              window=window, return_weights=want_weights, return_lse=keep,
                                              warn=False, **training)
        result = result if isinstance(result, tuple) else (result,)
        o = result[0]
        weights = result[1] if want_weights else None
        out = self._project_out(o, batch_first, out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        saved = None
        if keep:
            n_inputs = 1 if key is None else (2 if value is None else 3)
            inputs = tuple(owned(a, g) for a, g in zip((q_in, k_in, v_in)[:n_inputs], (query, key, value)))
            mask = None if mask is None else owned(owned(mask, attn_mask), key_mask)
            saved = dict(inputs=inputs, q=q, k=k, v=v, o=o, lse=result[-1], mask=mask, lengths=lengths,
                         is_causal=is_causal, window=window, gqa=gqa, dropout_p=dropout_p, seed=seed,
                         batch_first=batch_first, unbatched=unbatched, average=bool(average_attn_weights),
                         weights=self.state_dict())
        return out, weights, saved

    # ---- training --------------------------------------------------------------------------

    def vjp(self, query: ArrayLike, key: ArrayLike | None = None, value: ArrayLike | None = None, *,
            key_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
            attn_mask: ArrayLike | None = None, is_causal: Causal = False, window: Window = None,
            return_weights: bool | None = None, average_attn_weights: bool = True, warn: bool = True,
            need_weights: bool | None = None, seed: int | None = None
            ) -> tuple[tuple[np.ndarray, np.ndarray | None], LayerPullback]:
        """A training step's forward pass and its pullback: ``(out, weights), pullback``.

        Takes what :meth:`__call__` takes, plus ``seed`` for the attention dropout (the layer's
        ``dropout``, applied here and never in plain calls): None draws a fresh seed from the
        operating system, recorded as ``pullback.seed``; the same seed gives the same dropout.

        ``pullback((grad_out, grad_weights))`` (``grad_weights`` None unless the weights were
        asked for and are differentiated; ``grad_out`` None when only the weights are) returns
        ``(input_grads, param_grads)``: input_grads has one gradient per input given, (dquery,)
        for self-attention with key and value omitted, (dquery, dkey) when value defaults to key,
        (dquery, dkey, dvalue) otherwise, even when they are the same array (each is then the
        gradient through that argument alone; their sum is the array's); param_grads is keyed
        like :meth:`state_dict` (``in_proj_weight`` in the (out, in) layout, ...), summed over
        the batch. Masks and key lengths get no gradient.
        """
        refuse_bfloat16_backward({"MultiHeadAttention.dtype": self._out_w})
        want_weights = _want_weights(return_weights, need_weights)
        seed = dropout_seed(self.dropout, seed)
        out, weights, saved = self._forward(query, key, value, key_mask, key_lengths, attn_mask, is_causal, window,
                                            want_weights, average_attn_weights, warn, self.dropout, seed, keep=True)
        given = (query,) if key is None else ((query, key) if value is None else (query, key, value))
        outputs = (out, weights)

        def backward(cotangent):
            grad_out, grad_weights = output_cotangents(cotangent, outputs, self.dtype)
            dx, params = self._backward(saved, len(given), grad_out, grad_weights)
            return tuple(input_grad(d, g) for d, g in zip(dx, given)), params

        return outputs, LayerPullback(backward, seed)

    def _backward(self, s: dict, n_inputs: int, grad_out, grad_weights):
        """(input gradients, param_grads) from what _forward saved."""
        w = s["weights"]
        batch_first, o = s["batch_first"], s["o"]
        if s["unbatched"]:
            grad_out = None if grad_out is None else grad_out[None]
            grad_weights = None if grad_weights is None else grad_weights[None]
        b, h = o.shape[:2]
        merged = _merge_heads(o, batch_first)
        if grad_out is None:
            grad_out = np.zeros(merged.shape, dtype=self.dtype)
        d_merged, d_out_w, d_out_b = linear_grads(grad_out, merged, w["out_proj.weight"], w.get("out_proj.bias"))
        d_o = self._split_heads(d_merged, 0, h, batch_first)
        if grad_weights is not None and s["average"]:  # the mean over heads spreads evenly back to each
            grad_weights = np.broadcast_to((grad_weights / self.dtype.type(h))[:, None],
                                           (b, h) + grad_weights.shape[1:])
        dq, dk, dv, _ = scaled_dot_product_attention_backward(
            d_o, s["q"], s["k"], s["v"], s["o"], s["lse"], s["mask"], s["dropout_p"], s["is_causal"], None, s["gqa"],
            key_lengths=s["lengths"], window=s["window"], seed=s["seed"], grad_weights=grad_weights)
        parts = {"q": _merge_heads(dq, batch_first), "k": _merge_heads(dk, batch_first),
                 "v": _merge_heads(dv, batch_first)}
        dx, params = self._projection_grads(parts, s["inputs"], n_inputs, w)
        params["out_proj.weight"] = d_out_w
        if self.bias:
            params["out_proj.bias"] = d_out_b
        if s["unbatched"]:
            dx = [d[0] for d in dx]
        return dx, {name: params[name].astype(self.dtype, copy=False) for name in self._weight_shapes()}

    def _projection_grads(self, parts: dict, inputs: tuple, n_inputs: int, w: dict):
        """Gradients of the inputs and the input projections' weights from the gradients of the
        projected Q, K, V (``parts``, each laid out as the inputs). Q, K and V come from inputs
        0, 0, 0 (self-attention), 0, 1, 1 (value defaulting to key) or 0, 1, 2; rows of the
        packed weight that come from the same input go through one linear backward."""
        e, kv = self.embed_dim, self._kv_width
        rows = {"q": (0, e), "k": (e, e + kv), "v": (e + kv, e + 2 * kv)}
        source = {"q": 0, "k": min(1, n_inputs - 1), "v": min(2, n_inputs - 1)}
        groups = []  # [(input index, [part names])]
        for name in ("q", "k", "v"):
            if self._packed and groups and groups[-1][0] == source[name]:
                groups[-1][1].append(name)
            else:
                groups.append((source[name], [name]))
        packed_w = w.get("in_proj_weight")
        in_b = w.get("in_proj_bias")
        d_in_b = None if in_b is None else np.empty_like(in_b)
        d_w = {}
        dx = [None] * n_inputs
        for index, names in groups:
            r0, r1 = rows[names[0]][0], rows[names[-1]][1]
            weight = packed_w[r0:r1] if packed_w is not None else w[f"{names[0]}_proj_weight"]
            grad = parts[names[0]] if len(names) == 1 else np.concatenate([parts[n] for n in names], axis=-1)
            d, dweight, dbias = linear_grads(grad, inputs[index], weight, None if in_b is None else in_b[r0:r1])
            dx[index] = d if dx[index] is None else dx[index] + d
            d_w[names[0] if len(names) == 1 else "".join(names)] = (r0, r1, dweight)
            if d_in_b is not None:
                d_in_b[r0:r1] = dbias
        params = {}
        if packed_w is not None:
            d_packed = np.empty_like(packed_w)
            for r0, r1, dweight in d_w.values():
                d_packed[r0:r1] = dweight
            params["in_proj_weight"] = d_packed
        else:
            params.update({f"{n}_proj_weight": d_w[n][2] for n in ("q", "k", "v")})
        if d_in_b is not None:
            params["in_proj_bias"] = d_in_b
        return dx, params

    # ---- incremental decoding --------------------------------------------------------------

    def step(self, x_t: ArrayLike, cache: KVCache, *, out_dtype: npt.DTypeLike | None = None) -> np.ndarray:
        """Decodes one or a few new tokens against the cache (causal self-attention).

        The new tokens' keys and values are appended to ``cache``; each new token attends to
        every cached position and to the new tokens up to itself (bottom-right causal), so
        feeding a sequence in pieces gives the same output as the full causal pass.

        Args:
            x_t: (B, T, embed_dim) if batch_first else (T, B, embed_dim); or (B, embed_dim)
                for a single token.
            cache: a :class:`KVCache`, empty for a new sequence. A cache of another dtype than
                the layer's (``KVCache(dtype=ml_dtypes.bfloat16)`` beside float32 weights)
                stores the keys and values in its type; the step's queries are rounded to it
                too, so attention reads the cache in place.
            out_dtype: None (the layer's dtype) or np.float32 for a float16/bfloat16 layer.

        Returns:
            The output for the new tokens, shaped like x_t.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if not self._packed:
            raise ValueError(f"step() is causal self-attention: it needs kdim == vdim == embed_dim, but this layer "
                             f"has kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}")
        out_kw = out_kwargs(out_dtype, self.dtype)
        x = _input(x_t, "x_t", self.dtype, self.embed_dim, "embed_dim")
        if x.ndim not in (2, 3):
            raise ValueError(f"x_t must be (B, T, embed_dim) or (B, embed_dim), got shape {shape_str(x.shape)}")
        single = x.ndim == 2
        batch_first = self.batch_first or single
        h, hk = self.num_heads, self.num_kv_heads
        # Everything below works on arrays made here from checked ones, so it calls the kernels
        # without the public functions' checks: this is the per-token path of decoding.
        y = _core.linear(x[:, None, None, :] if single else x[:, :, None, :], self._in_w, self._in_b)
        heads = self._split_heads(y, 0, h + 2 * hk, batch_first)  # (B, H + 2 Hk, T, head_dim)
        keys, values = cache._extend(heads[:, h:h + hk], heads[:, h + hk:])
        o = self._attend_cache(heads[:, :h], keys, values, heads.shape[2])
        out = self._project_out(o, batch_first, out_kw)
        return out[:, 0] if single else out

    def _attend_cache(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, t: int) -> np.ndarray:
        """step()'s attention of the t new queries (B, H, t, head_dim) over the cache (bottom-right
        causal), returned in the layer's dtype. A cache of another dtype sets the type of the
        attention: the queries are rounded to it (so the cache is read in place, never
        converted), and the output comes back in the layer's dtype, as float32 straight from
        the kernel when that is what the layer needs."""
        out_float32 = False
        if keys.dtype != self.dtype:
            q = q.astype(keys.dtype)
            out_float32 = self.dtype == FLOAT32 and keys.dtype in LOW_PRECISION_DTYPES
        o = _attention_of_checked(q, keys, values, "bottom_right" if t > 1 else False, out_float32)
        return o if o.dtype == self.dtype else o.astype(self.dtype)

    def __repr__(self) -> str:
        extra = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        dims = "" if self._packed else f", kdim={self.kdim}, vdim={self.vdim}"
        dropout = f", dropout={self.dropout!r}" if self.dropout else ""
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extra}{dims}, "
                f"bias={self.bias}, batch_first={self.batch_first}{dropout}, dtype={self.dtype.name})")


# --------------------------------------------------------------------------------------------
# Hugging Face BERT


def from_bert_attention(module: Any, *, batch_first: bool = True, dtype: npt.DTypeLike | None = None
                        ) -> MultiHeadAttention:
    """A :class:`MultiHeadAttention` holding (copies of) the weights of a Hugging Face BERT
    attention block, for running a pretrained BERT-style encoder's attention on attnext.

    Args:
        module: a ``BertAttention`` (``model.encoder.layer[i].attention``) or a ``BertLayer``
            (``model.encoder.layer[i]``), or any module shaped like them (RoBERTa's,
            ELECTRA's...): ``.self.query/.key/.value`` and ``.output.dense`` are
            ``torch.nn.Linear``; the head count is ``.self.num_attention_heads``.
        batch_first: the layer's layout, (B, L, E) by default (as Hugging Face's hidden states).
        dtype: the layer's dtype; default float64 for a float64 module, else float32.

    The layer computes ``output.dense(self_attention(x))``; BERT's block then adds the residual
    and its LayerNorm, which stay with the caller::

        attn = attnext.transformer.from_bert_attention(model.encoder.layer[0].attention)
        ln = model.encoder.layer[0].attention.output.LayerNorm
        y, _ = attn(x, key_mask=attention_mask.astype(bool))    # HF's 1 = token is True = may attend
        out = layer_norm(x + y, ln.weight, ln.bias, ln.eps)     # = BertAttention(x, mask)[0]

    Hugging Face's ``attention_mask`` (1 = token, 0 = padding) is passed as a bool ``key_mask``,
    never as a float (a 0/1 float mask would be added to the scores; attnext warns about it).
    Raises TypeError for a module without those parts, ValueError for relative position
    embeddings (``position_embedding_type`` other than ``"absolute"``), which change the scores.
    """
    attention = getattr(module, "attention", module)
    self_attn, output = getattr(attention, "self", None), getattr(attention, "output", None)
    parts = [getattr(self_attn, n, None) for n in ("query", "key", "value")] + [getattr(output, "dense", None)]
    if any(p is None or not hasattr(p, "weight") for p in parts):
        raise TypeError(f"module must be a Hugging Face BertAttention or BertLayer (with .self.query/key/value and "
                        f".output.dense), got {type(module).__name__}")
    kind = getattr(self_attn, "position_embedding_type", None) or getattr(
        getattr(self_attn, "config", None), "position_embedding_type", None) or "absolute"
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} adds relative-position terms to the scores, which "
                         "MultiHeadAttention does not compute; only 'absolute' is supported")
    heads = getattr(self_attn, "num_attention_heads", None)
    if heads is None:
        raise TypeError(f"{type(self_attn).__name__} has no num_attention_heads")

    def numpy(t):
        return None if t is None else t.detach().to("cpu").double().numpy()

    query, key, value, dense = parts
    embed_dim = int(query.weight.shape[1])
    if dtype is None:
        dtype = np.float64 if str(query.weight.dtype) == "torch.float64" else np.float32
    if tuple(query.weight.shape) != (embed_dim, embed_dim):
        raise ValueError(f"query projection has shape {tuple(query.weight.shape)}; MultiHeadAttention needs "
                         f"all heads together to span the hidden size ({embed_dim}, {embed_dim})")
    has_bias = query.bias is not None
    layer = MultiHeadAttention(embed_dim, int(heads), bias=has_bias, batch_first=batch_first, dtype=dtype)
    layer.load_projections(**{name: (numpy(p.weight), numpy(p.bias) if has_bias else None)
                              for name, p in zip(("q", "k", "v", "out"), parts)})
    return layer


__all__ += ["from_bert_attention"]
