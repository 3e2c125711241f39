"""attnext's kernels as PyTorch custom operators (``torch.library``), with autograd.

Five operators, all CPU-only and opaque to ``torch.compile`` (each has a fake implementation
that only computes shapes):

- ``attnext::sdpa`` (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
  seed) -> (out, lse), and ``attnext::sdpa_backward``, which runs ``_core.sdpa_backward``
  through :func:`attnext.grad.scaled_dot_product_attention_backward` (GQA group sums and
  broadcast sums included);
- ``attnext::additive_keys`` (key, w_key) -> (projected, expo, ok), the key projection (its
  backward is torch's two products), and ``attnext::additive_attention`` (query, projected
  keys, value, w_query, v, bias, attn_mask) -> (context, weights) with
  ``attnext::additive_attention_backward``.

Tensors reach the kernels as NumPy views of the same memory (``tensor.numpy()`` shares it, for
any strides), and results come back through ``torch.from_numpy`` (no copy either way). Dropout
is a pure function of the ``seed`` argument; the public wrappers in :mod:`attnext.torch` draw it
from torch's default generator, so ``torch.manual_seed`` reproduces a run and the operators
stay deterministic (what ``opcheck`` and ``gradcheck`` need).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _core, functional, grad

_DOUBLE_BACKWARD = ("attnext.torch: {op} has no double backward (create_graph=True, or a gradient of a "
                    "gradient, through it); call torch.nn.functional.scaled_dot_product_attention outside "
                    "attnext.torch.enabled() for higher-order gradients")

# The kernels' thread count is attnext's process-wide setting; a call through torch uses torch's
# intra-op count instead, so a torch model has one knob (torch.set_num_threads). Concurrent calls
# share one switch: the first sets the count, the last restores the user's (so a change of
# attnext's setting made by another thread while adapter calls run is undone when they end).
_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 0


@contextlib.contextmanager
def kernel_threads() -> Iterator[int]:
    """Runs the block with attnext's kernels on ``torch.get_num_threads()`` threads, then
    restores attnext's own count (once the last concurrent block leaves). Yields the count."""
    global _threads_depth, _threads_saved
    n = max(1, min(torch.get_num_threads(), 256))
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = _core.get_num_threads()
        _threads_depth += 1
        _core.set_num_threads(n)
    try:
        yield n
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0:
                _core.set_num_threads(_threads_saved)


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """The tensor's memory as a NumPy array (no copy: same data, same strides)."""
    return None if t is None else t.detach().numpy()


def _tensor(a: Optional[np.ndarray], like: Optional[Tensor] = None) -> Tensor:
    """A kernel result as a tensor sharing its memory; None (no gradient) becomes an empty
    tensor, since an operator's outputs are tensors."""
    if a is None:
        return torch.empty(0, dtype=like.dtype if like is not None else torch.float32)
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------
# scaled dot-product attention


def _sdpa_batch(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> tuple[int, ...]:
    """The output's shape before (L, X): the broadcast batch axes, then the query heads under GQA."""
    if enable_gqa:
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        return tuple(batch) + (query.shape[-3],)
    return tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))


@torch.library.custom_op("attnext::sdpa", mutates_args=(), device_types="cpu")
def sdpa_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
            is_causal: bool, scale: Optional[float], enable_gqa: bool, seed: int) -> tuple[Tensor, Tensor]:
    """(out (..., Hq, L, Ev), lse (..., Hq, L)) of attnext.scaled_dot_product_attention."""
    with kernel_threads():
        out, lse = functional.scaled_dot_product_attention(
            _np(query), _np(key), _np(value), _np(attn_mask), dropout_p, is_causal, scale, enable_gqa,
            return_lse=True, warn=False, seed=seed)
    return _tensor(out), _tensor(lse)


@sdpa_op.register_fake
def _sdpa_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    batch = _sdpa_batch(query, key, value, enable_gqa)
    length = query.shape[-2]
    return query.new_empty(batch + (length, value.shape[-1])), query.new_empty(batch + (length,))


@torch.library.custom_op("attnext::sdpa_backward", mutates_args=(), device_types="cpu")
def sdpa_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                     out: Tensor, lse: Tensor, dropout_p: float, is_causal: bool, scale: Optional[float],
                     enable_gqa: bool, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dquery, dkey, dvalue, dattn_mask) of attnext::sdpa, each of its input's shape; dattn_mask
    is empty unless attn_mask is a float tensor."""
    with kernel_threads():
        dq, dk, dv, dm = grad.scaled_dot_product_attention_backward(
            _np(grad_out), _np(query), _np(key), _np(value), _np(out), _np(lse), _np(attn_mask), dropout_p,
            is_causal, scale, enable_gqa, seed=seed)
    return _tensor(dq), _tensor(dk), _tensor(dv), _tensor(dm, query)


@sdpa_backward_op.register_fake
def _sdpa_backward_fake(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, enable_gqa,
                        seed):
    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    dm = torch.empty_like(attn_mask, memory_format=torch.contiguous_format) if float_mask else query.new_empty(0)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value)) + (dm,)


def _sdpa_setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)
    ctx.options = (dropout_p, is_causal, scale, enable_gqa, seed)


def _refuse_double_backward(op: str, *tensors: Optional[Tensor]) -> None:
    """Raises when this backward is being recorded for a higher-order gradient: the backward
    operators have no backward of their own, and silently missing terms would be wrong."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(_DOUBLE_BACKWARD.format(op=op))


def _sdpa_backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    _refuse_double_backward("scaled_dot_product_attention", grad_out, query, key, value, attn_mask)
    # grad_lse is unused: lse is never handed to the user (the public functions return out only).
    dq, dk, dv, dm = sdpa_backward_op(grad_out, query, key, value, attn_mask, out, lse, *ctx.options)
    wants_mask = attn_mask is not None and attn_mask.dtype != torch.bool and ctx.needs_input_grad[3]
    return dq, dk, dv, dm if wants_mask else None, None, None, None, None, None


sdpa_op.register_autograd(_sdpa_backward, setup_context=_sdpa_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD.format(op="scaled_dot_product_attention"))


def _no_context(ctx, inputs, output):
    pass


sdpa_backward_op.register_autograd(_no_double_backward, setup_context=_no_context)


# ---------------------------------------------------------------------------------------------
# additive (Bahdanau) attention: two operators, the key projection and the attention on
# projected keys. A call on raw keys chains them; a decoder projects its memory once per
# sentence and runs the attention once per step on it, and torch's autograd adds the steps'
# memory gradients before the projection's backward runs once. The attention saves its weights
# (the backward reads them instead of recomputing the scores) and the projection (the backward
# does not project the keys again).


@torch.library.custom_op("attnext::additive_keys", mutates_args=(), device_types="cpu")
def additive_keys_op(key: Tensor, w_key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(projected (..., Lk, U) = key w_key, expo = exp(2 projected), ok (...,) bool) of
    attnext.project_keys: expo and ok are the kernels' factored form of the projection (not
    differentiable; their gradient is the projected keys')."""
    with kernel_threads():
        keys = functional.project_keys(_np(key), _np(w_key))
    return torch.from_numpy(keys.projected), torch.from_numpy(keys._expo), torch.from_numpy(keys._ok)


@additive_keys_op.register_fake
def _additive_keys_fake(key, w_key):
    shape = key.shape[:-1] + (w_key.shape[-1],)
    return key.new_empty(shape), key.new_empty(shape), key.new_empty(key.shape[:-2], dtype=torch.bool)


def _additive_keys_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.mark_non_differentiable(output[1], output[2])


def _additive_keys_backward(ctx, grad_projected, grad_expo, grad_ok):
    """Through projected = key w_key: dkey = g w_key^T, dw_key = sum over the batch of key^T g
    (torch's own products: this backward is differentiable again)."""
    key, w_key = ctx.saved_tensors
    dkey = grad_projected @ w_key.transpose(0, 1) if ctx.needs_input_grad[0] else None
    dw_key = None
    if ctx.needs_input_grad[1]:
        depth, units = key.shape[-1], grad_projected.shape[-1]
        dw_key = key.reshape(-1, depth).transpose(0, 1) @ grad_projected.reshape(-1, units)
    return dkey, dw_key


additive_keys_op.register_autograd(_additive_keys_backward, setup_context=_additive_keys_setup_context)


def _projected(keys_raw: Tensor, keys_exp: Tensor, keys_ok: Tensor) -> functional.ProjectedKeys:
    """The kernels' projected keys sharing the tensors' memory."""
    return functional.ProjectedKeys(keys_raw.detach().numpy(), keys_exp.numpy(), keys_ok.numpy())


@torch.library.custom_op("attnext::additive_attention", mutates_args=(), device_types="cpu")
def additive_op(query: Tensor, keys_raw: Tensor, keys_exp: Tensor, keys_ok: Tensor, value: Tensor, w_query: Tensor,
                v: Tensor, bias: Optional[Tensor], attn_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(context (..., Lq, Dv), weights (..., Lq, Lk)) of attnext.additive_attention on keys
    projected by attnext::additive_keys. The weights are always computed: the backward reads them."""
    with kernel_threads():
        context, weights = functional.additive_attention(
            _np(query), _projected(keys_raw, keys_exp, keys_ok), _np(value), _np(w_query), None, _np(v),
            bias=_np(bias), attn_mask=_np(attn_mask), return_weights=True, warn=False)
    return _tensor(context), _tensor(weights)


def _additive_batch(query: Tensor, keys_raw: Tensor, value: Tensor) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(query.shape[:-2], keys_raw.shape[:-2], value.shape[:-2]))


@additive_op.register_fake
def _additive_fake(query, keys_raw, keys_exp, keys_ok, value, w_query, v, bias, attn_mask):
    batch, lq, lk = _additive_batch(query, keys_raw, value), query.shape[-2], keys_raw.shape[-2]
    return query.new_empty(batch + (lq, value.shape[-1])), query.new_empty(batch + (lq, lk))


# The differentiable inputs of attnext::additive_attention, in order ("key": the projected keys).
_ADDITIVE_GRADS = ("query", "key", "value", "w_query", "v", "bias", "attn_mask")


@torch.library.custom_op("attnext::additive_attention_backward", mutates_args=(), device_types="cpu")
def additive_backward_op(grad_out: Tensor, grad_weights: Optional[Tensor], query: Tensor, keys_raw: Tensor,
                         keys_exp: Tensor, keys_ok: Tensor, value: Tensor, w_query: Tensor, v: Tensor,
                         bias: Optional[Tensor], attn_mask: Optional[Tensor], weights: Tensor) -> list[Tensor]:
    """The gradients of attnext::additive_attention for (query, keys_raw, value, w_query, v, bias,
    attn_mask), each of its input's shape; empty where there is none (no bias, a bool mask).
    weights: the forward's."""
    with kernel_threads():
        grads = grad.additive_attention_backward(
            _np(grad_out), _np(query), _projected(keys_raw, keys_exp, keys_ok), _np(value), _np(w_query), None,
            _np(v), None, None, bias=_np(bias), attn_mask=_np(attn_mask), grad_weights=_np(grad_weights),
            weights=_np(weights))
    return [_tensor(grads[name], query) for name in _ADDITIVE_GRADS]


@additive_backward_op.register_fake
def _additive_backward_fake(grad_out, grad_weights, query, keys_raw, keys_exp, keys_ok, value, w_query, v, bias,
                            attn_mask, weights):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    return [like(t) for t in (query, keys_raw, value, w_query, v)] + [
        like(bias) if bias is not None else query.new_empty(0),
        like(attn_mask) if float_mask else query.new_empty(0)]


def _additive_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    # An unused output's gradient stays None (no zero tensor made and read).
    ctx.set_materialize_grads(False)


# Where each differentiable input of attnext::additive_attention sits in its argument list.
_ADDITIVE_INPUT_AT = (0, 1, 4, 5, 6, 7, 8)


def _additive_backward(ctx, grad_context, grad_weights):
    query, keys_raw, keys_exp, keys_ok, value, w_query, v, bias, attn_mask, weights = ctx.saved_tensors
    _refuse_double_backward("additive_attention", grad_context, grad_weights, query, keys_raw, value, w_query, v,
                            bias, attn_mask)
    if grad_context is None:
        grad_context = query.new_zeros(weights.shape[:-1] + value.shape[-1:])
    grads = additive_backward_op(grad_context, grad_weights, query, keys_raw, keys_exp, keys_ok, value, w_query, v,
                                 bias, attn_mask, weights)
    grads[5] = grads[5] if bias is not None else None
    grads[6] = grads[6] if attn_mask is not None and attn_mask.dtype != torch.bool else None
    result = [None] * 9
    for g, at in zip(grads, _ADDITIVE_INPUT_AT):
        result[at] = g if ctx.needs_input_grad[at] else None
    return tuple(result)


additive_op.register_autograd(_additive_backward, setup_context=_additive_setup_context)


def _no_additive_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD.format(op="additive_attention"))


additive_backward_op.register_autograd(_no_additive_double_backward, setup_context=_no_context)
