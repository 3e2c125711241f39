"""The public functions of :mod:`attnext.torch`: PyTorch's argument checks, then the custom operators."""

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._ops import additive_keys_op, additive_op, sdpa_op

_FLOATS = (torch.float32, torch.float64)


def check_tensors(fn: str, **tensors: Optional[Tensor]) -> torch.dtype:
    """The common dtype of the tensor arguments (None entries skipped), after checking that each
    is a strided CPU float32/float64 tensor and that they agree (TypeError/ValueError naming the
    argument otherwise). attnext computes in the inputs' dtype; it does not promote."""
    dtype = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested or t.layout != torch.strided:
            raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}"
                             f"{' (nested)' if t.is_nested else ''}")
        if t.device.type != "cpu":
            raise ValueError(f"{fn}: {name} is on {t.device}; attnext runs on the CPU only")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; attnext takes float32 or float64 tensors")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            first = next(n for n, x in tensors.items() if x is not None)
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {first} has {dtype}; pass one dtype")
    return dtype


def check_mask(fn: str, attn_mask: Optional[Tensor], dtype: torch.dtype) -> None:
    """A mask is a CPU tensor, bool (True = may attend) or of the inputs' float dtype (added)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{fn}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device.type != "cpu" or attn_mask.is_nested or attn_mask.layout != torch.strided:
        raise ValueError(f"{fn}: attn_mask must be a dense CPU tensor, got one on {attn_mask.device} with "
                         f"layout {attn_mask.layout}{' (nested)' if attn_mask.is_nested else ''}")
    if attn_mask.dtype not in (torch.bool, dtype):
        raise TypeError(f"{fn}: attn_mask has dtype {attn_mask.dtype}; it must be bool (True = may attend) or "
                        f"{dtype} like the query (added to the scores)")


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so torch.manual_seed reproduces it),
    in [0, 2**63): the operator's int argument is a signed 64-bit integer."""
    return int(torch.empty((), dtype=torch.int64).random_())


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: Union[bool, str] = False,
                                 scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on attnext's CPU kernels, with autograd.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hk, S, Ev): CPU float32 or
            float64 tensors of one dtype, any strides (read in place, not copied). The axes
            before (L, E) broadcast (before the heads under ``enable_gqa``).
        attn_mask: broadcastable to (..., Hq, L, S); bool True = may attend, or a float tensor of
            the query's dtype added to the scores (it gets a gradient when it requires one).
        dropout_p: PyTorch's meaning (kept weights scaled by 1 / (1 - p)), applied whenever > 0
            (as PyTorch's function, whatever the module's training flag). The seed comes from
            torch's default generator: ``torch.manual_seed`` reproduces the mask. Which elements
            drop follows attnext's Philox rule, so the mask differs from PyTorch's own.
        is_causal: True = top-left aligned (PyTorch); ``"bottom_right"`` aligns the last query
            with the last key (an attnext extension). With attn_mask too, a key must pass both
            (PyTorch 2.13's behaviour).
        scale: default 1 / sqrt(E). enable_gqa: Hq a multiple of Hk.

    Returns:
        (..., Hq, L, Ev), the inputs' dtype. A query row that may attend to no key gives zeros
        (and zero gradients), as PyTorch 2.13's CPU kernel does.

    Gradients flow to query, key, value and a float mask through attnext's backward kernel;
    a second-order gradient (``create_graph=True``) raises RuntimeError.
    """
    fn = "scaled_dot_product_attention"
    dtype = check_tensors(fn, query=query, key=key, value=value)
    check_mask(fn, attn_mask, dtype)
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: dropout_p must lie in [0, 1], got {dropout_p}")
    seed = draw_seed() if p > 0.0 else 0
    causal = is_causal if isinstance(is_causal, str) else bool(is_causal)
    if isinstance(causal, str):  # the operator's schema takes a bool; bottom-right goes through the mask
        structure = _bottom_right_mask(query, key, causal)
        attn_mask = structure if attn_mask is None else _hide(attn_mask, structure)
        causal = False
    out, _ = sdpa_op(query, key, value, attn_mask, p, causal, None if scale is None else float(scale),
                     bool(enable_gqa), seed)
    return out


def _bottom_right_mask(query: Tensor, key: Tensor, causal: str) -> Tensor:
    if causal != "bottom_right":
        raise ValueError(f"scaled_dot_product_attention: is_causal must be a bool or 'bottom_right', got {causal!r}")
    length, keys = query.shape[-2], key.shape[-2]
    return torch.ones(length, keys, dtype=torch.bool).tril(keys - length)


def _hide(attn_mask: Tensor, keep: Tensor) -> Tensor:
    """attn_mask restricted to the keys ``keep`` allows (bool: and; float: -inf elsewhere)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


class AdditiveMemory(NamedTuple):
    """Keys projected once for additive attention, made by :func:`project_keys` (and
    :meth:`BahdanauAttention.precompute`): pass it as ``key`` with ``w_key=None`` so a decoder
    pays for ``key @ w_key`` (and its backward) once per sentence instead of once per step.

    ``projected`` (..., Lk, U) = key @ w_key carries the gradient (autograd adds every step's
    share, then runs the projection's backward once); ``expo`` and ``ok`` are the kernels'
    factored form of it (not differentiable)."""

    projected: Tensor
    expo: Tensor
    ok: Tensor


def project_keys(key: Tensor, w_key: Tensor) -> AdditiveMemory:
    """``key @ w_key`` (..., Lk, U), prepared for :func:`additive_attention`, with autograd.

    Args:
        key: (..., Lk, Dk); w_key: (Dk, U): CPU float32/float64 tensors of one dtype.
    """
    check_tensors("project_keys", key=key, w_key=w_key)
    return AdditiveMemory(*additive_keys_op(key, w_key))


def _memory(fn: str, key: Union[Tensor, AdditiveMemory], w_key: Optional[Tensor], w_query: Tensor) -> AdditiveMemory:
    """additive_attention's keys as an AdditiveMemory: as given, or raw keys projected now."""
    if isinstance(key, AdditiveMemory):
        if w_key is not None:
            raise ValueError(f"{fn}: key is already projected (an AdditiveMemory); pass w_key=None")
        return key
    if w_key is None:
        raise ValueError(f"{fn}: w_key is required unless key is an AdditiveMemory from project_keys")
    if w_key.dim() == 2 and w_query.dim() == 2 and w_key.shape[1] != w_query.shape[1]:
        raise ValueError(f"{fn}: w_query has shape {tuple(w_query.shape)} but w_key has {tuple(w_key.shape)}: "
                         "the number of units (second dimensions) must match")
    return AdditiveMemory(*additive_keys_op(key, w_key))


def additive_attention(query: Tensor, key: Union[Tensor, AdditiveMemory], value: Tensor, w_query: Tensor,
                       w_key: Optional[Tensor], v: Tensor, *, bias: Optional[Tensor] = None,
                       attn_mask: Optional[Tensor] = None,
                       return_weights: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Bahdanau's attention, fused, with autograd: softmax_j(v . tanh(q_i W_q + bias + k_j W_k)
    + mask_ij) value_j, never forming the (..., Lq, Lk, U) tensor (forward or backward).

    Args:
        query: (..., Lq, Dq); key: (..., Lk, Dk), or an :class:`AdditiveMemory` from
            :func:`project_keys` (then ``w_key`` is None); value: (..., Lk, Dv) (batch axes
            broadcast).
        w_query: (Dq, U); w_key: (Dk, U); v: (U,); bias: (U,) or None (added inside the tanh).
        attn_mask: broadcastable to (..., Lq, Lk): bool True = may attend (key padding:
            ``(torch.arange(Lk) < lengths[:, None])[:, None, :]``), or float added to the scores.
        return_weights: also return the (..., Lq, Lk) weights (differentiable too).

    Returns:
        context (..., Lq, Dv), or (context, weights). A row that may attend to no key gives zeros.
    """
    fn = "additive_attention"
    projected = key.projected if isinstance(key, AdditiveMemory) else key
    dtype = check_tensors(fn, query=query, key=projected, value=value, w_query=w_query, w_key=w_key, v=v, bias=bias)
    check_mask(fn, attn_mask, dtype)
    memory = _memory(fn, key, w_key, w_query)
    context, weights = additive_op(query, *memory, value, w_query, v, bias, attn_mask)
    return (context, weights) if return_weights else context
