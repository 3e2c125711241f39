"""Routing PyTorch's SDPA calls to attnext: ``enabled()``, ``enable()``, ``disable()``.

Mechanism: while routing is on, the module attribute ``torch.nn.functional.scaled_dot_product_attention``
is replaced by :func:`_route`. Code that looks the name up at call time sees it: models calling
``F.scaled_dot_product_attention(...)`` / ``torch.nn.functional.scaled_dot_product_attention(...)``,
and ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and the
``nn.Transformer*`` layers run outside their inference fast path). What it cannot see: a name
bound before routing started (``from torch.nn.functional import scaled_dot_product_attention``),
calls of ``torch._C._nn.scaled_dot_product_attention`` / ``torch.ops.aten``, and the C++ fast
paths (``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode without grad
take ``torch._native_multi_head_attention`` / ``torch._transformer_encoder_layer_fwd``).

A call attnext can serve goes to :func:`attnext.torch.scaled_dot_product_attention`; any other
goes to PyTorch's function unchanged, and the reason is counted.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import threading
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from ._functions import scaled_dot_product_attention

_original = F.scaled_dot_product_attention
_signature = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                          ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
                          ("is_causal", False))
] + [inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default=None),
     inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False)])


class RoutingStats:
    """What routing did: ``routed`` calls ran on attnext, ``fell_through`` calls ran on PyTorch,
    ``reasons`` (a Counter) says why each fell through (e.g. ``"device cuda"``,
    ``"dtype torch.bfloat16"``, ``"nested tensor"``)."""

    def __init__(self) -> None:
        self.routed = 0
        self.fell_through = 0
        self.reasons: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"RoutingStats(routed={self.routed}, fell_through={self.fell_through}, reasons={dict(self.reasons)})"


_lock = threading.Lock()
_active: list[RoutingStats] = []  # every open enabled() block and the enable() object, if any
_process_stats: Optional[RoutingStats] = None


def _record(reason: Optional[str]) -> None:
    with _lock:
        for stats in _active:
            if reason is None:
                stats.routed += 1
            else:
                stats.fell_through += 1
                stats.reasons[reason] += 1


def _tracing() -> Optional[str]:
    if torch.jit.is_tracing():
        return "torch.jit tracing"
    if torch.jit.is_scripting():
        return "torchscript"
    return None


def _why_not(a: inspect.BoundArguments) -> Optional[str]:
    """None if attnext can serve this call exactly as PyTorch defines it, else the reason."""
    q, k, v, mask = (a.arguments.get(n) for n in ("query", "key", "value", "attn_mask"))
    tracing = _tracing()
    if tracing:
        return tracing
    if q is None or k is None or v is None:
        return "arguments"
    tensors = [t for t in (q, k, v, mask) if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return "not a plain tensor (subclass, fake or traced)"
    if any(t.is_nested for t in tensors):
        return "nested tensor"
    if any(t.layout != torch.strided for t in tensors):
        return "sparse tensor"
    for t in tensors:
        if t.device.type != "cpu":
            return f"device {t.device.type}"
    if q.dtype not in (torch.float32, torch.float64):
        return f"dtype {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "mixed dtypes"
    if mask is not None and mask.dtype not in (torch.bool, q.dtype):
        return f"attn_mask dtype {mask.dtype}"
    if _autocast_on():
        return "autocast"
    if torch._C._are_functorch_transforms_active():
        return "functorch transform (vmap/grad)"
    return _why_not_arguments(q, k, v, mask, a)


def _why_not_arguments(q, k, v, mask, a: inspect.BoundArguments) -> Optional[str]:
    """Argument values and shapes that PyTorch rejects (its own error should reach the user) or
    that attnext does not take."""
    p, causal = a.arguments.get("dropout_p", 0.0), a.arguments.get("is_causal", False)
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        return "dropout_p outside [0, 1)"
    if not isinstance(causal, bool):
        return "is_causal not a bool"
    if causal and mask is not None:  # PyTorch combines the two in some paths and refuses in others: its call
        return "attn_mask with is_causal"
    if not isinstance(a.arguments.get("enable_gqa", False), bool):
        return "enable_gqa not a bool"
    scale = a.arguments.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale not a number"
    if not (q.dim() == k.dim() == v.dim() and q.dim() >= 3):
        return "rank (attnext takes (..., H, L, E) with one rank for query, key and value)"
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return "shapes"
    if any(t.numel() == 0 for t in (q, k, v)):
        return "empty tensor"
    if not _batch_fits(q, k, v, mask, a.arguments.get("enable_gqa", False)):
        return "shapes"
    return None


def _batch_fits(q, k, v, mask, gqa: bool) -> bool:
    """Whether the batch axes broadcast as attnext broadcasts them, the mask included (it must
    not widen the output, as it would in PyTorch's math path)."""
    try:
        if gqa:
            if q.shape[-3] % k.shape[-3] or k.shape[-3] != v.shape[-3]:
                return False
            batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]) + (q.shape[-3],)
        else:
            batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        scores = tuple(batch) + (q.shape[-2], k.shape[-2])
        return mask is None or torch.broadcast_shapes(mask.shape, scores) == scores
    except RuntimeError:
        return False


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled()
    except TypeError:  # older signature: no device argument
        return torch.is_autocast_cpu_enabled() or torch.is_autocast_enabled()


def _route(*args: Any, **kwargs: Any):
    """Stands in for torch.nn.functional.scaled_dot_product_attention while routing is on."""
    if torch.compiler.is_compiling():  # dynamo/export trace PyTorch's own op (not counted)
        return _original(*args, **kwargs)
    try:
        bound = _signature.bind(*args, **kwargs)
    except TypeError:
        _record("arguments")
        return _original(*args, **kwargs)
    reason = _why_not(bound)
    _record(reason)
    if reason is not None:
        return _original(*args, **kwargs)
    a = bound.arguments
    return scaled_dot_product_attention(a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0),
                                        a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False))


def _install() -> None:
    """Puts the router in place when the first user activates, restores PyTorch's function when
    the last one leaves (called with _lock held)."""
    F.scaled_dot_product_attention = _route if _active else _original


@contextlib.contextmanager
def enabled() -> Iterator[RoutingStats]:
    """``with attnext.torch.enabled() as stats:`` routes PyTorch's CPU SDPA calls that attnext can
    serve to attnext for the block (process-wide: calls from other threads are routed too) and
    counts them in ``stats`` (a :class:`RoutingStats`); blocks nest, each counting its own calls."""
    stats = RoutingStats()
    with _lock:
        _active.append(stats)
        _install()
    try:
        yield stats
    finally:
        with _lock:
            _active.remove(stats)
            _install()


def enable() -> RoutingStats:
    """Routes for the whole process until :func:`disable`; returns the stats object that counts
    the calls (calling it again returns the same object)."""
    global _process_stats
    with _lock:
        if _process_stats is None:
            _process_stats = RoutingStats()
            _active.append(_process_stats)
            _install()
        return _process_stats


def disable() -> None:
    """Ends :func:`enable`'s routing (open ``enabled()`` blocks keep theirs). No-op if not enabled."""
    global _process_stats
    with _lock:
        if _process_stats is not None:
            _active.remove(_process_stats)
            _process_stats = None
            _install()


def is_enabled() -> bool:
    """Whether PyTorch's SDPA is routed now (by enable() or an open enabled() block)."""
    return F.scaled_dot_product_attention is _route
