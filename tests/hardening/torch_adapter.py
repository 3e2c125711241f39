"""Registry entries for the PyTorch adapter (attnext.torch): scaled_dot_product_attention,
additive_attention and BahdanauAttention, each run forward + backward through torch's autograd.

The NumPy-fed registry (kernels.KERNELS) varies arrays; the adapter takes tensors, and what can
go wrong there is different: tensors of the wrong dtype, device or layout, mixed dtypes, views
with odd strides (transposed, sliced, expanded), threads calling at once. So the adapter has its
own entries (``TORCH_KERNELS``), made from a :class:`kernels.Case` like every other entry, and
its own suite (test_torch_adapter.py) runs those axes over them. Every entry returns
(output, gradient of each float argument) as NumPy arrays; its reference is attnext.reference's
forward and backward twin (``vjp``) on the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import attnext
from attnext import reference as ref

from .kernels import Case

torch = None
try:
    import torch  # noqa: F811
    import attnext.torch as at
except ImportError:  # the suite is skipped without torch
    at = None


@dataclass
class TorchKernel:
    name: str
    make: Callable[[Case], dict]  # NumPy arrays and options, the Case's layout
    call: Callable[[dict, Callable], tuple]  # (kw, to_tensor) -> NumPy outputs and gradients
    reference: Callable[[dict], tuple]
    tensors: tuple  # the names of kw's tensor arguments (the ones a bad tensor replaces)


def as_tensor(a):
    """A NumPy argument as the tensor a user would pass: the same memory and strides where torch
    can share them (torch.from_numpy), a broadcast array as an expanded tensor (stride 0 kept),
    else a copy (negative strides, read-only arrays)."""
    if not isinstance(a, np.ndarray):
        return a
    if a.size and 0 in a.strides:
        compact = a[tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)]
        return as_tensor(np.array(compact)).expand(a.shape)
    if a.flags.writeable and all(s >= 0 for s in a.strides) and a.dtype.isnative:
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a))


def _leaves(kw: dict, names, to_tensor) -> dict:
    """kw's float arrays among ``names`` as tensors that require a gradient (views kept: the
    gradient lands on the view's base, read back through the view)."""
    out = {}
    for n in names:
        t = to_tensor(kw[n])
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            t.requires_grad_()
        out[n] = t
    return out


def _grads(outputs, cotangents, leaves: dict) -> tuple:
    """(outputs..., d leaf for every leaf that requires a gradient) as NumPy arrays."""
    wanted = [t for t in leaves.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, cotangents) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    result = [o.detach().numpy() for o in outputs]
    return tuple(result + [np.zeros(t.shape, t.detach().numpy().dtype) if g is None else g.numpy()
                           for t, g in zip(wanted, grads)])


def _ref_grads(fn, args: dict, kwargs: dict, cotangents, names) -> tuple:
    """attnext.reference's (outputs..., gradient of each float argument among ``names``, in order)."""
    out, pullback = attnext.vjp(fn, *args.values(), **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = pullback(tuple(cotangents) if len(outs) > 1 else cotangents[0])
    given = dict(args, **kwargs)
    floats = [grads[n] for n in names if isinstance(given.get(n), np.ndarray) and given[n].dtype.kind == "f"]
    return tuple(np.asarray(o) for o in outs) + tuple(floats)


# --- scaled_dot_product_attention -------------------------------------------------------------

SDPA_TENSORS = ("query", "key", "value", "attn_mask")


def _sdpa_make(c: Case) -> dict:
    b, h = c.batch, 2
    q = c.array(b + (h, c.lq, c.d))
    kw = dict(query=q, key=c.array(b + (h, c.lk, c.d)), value=c.array(b + (h, c.lk, c.dv)),
              attn_mask=c.mask_for(b + (h, c.lq, c.lk)), is_causal=c.causal, scale=c.opt("scale"))
    kw["grad_out"] = c.array(b + (h, c.lq, c.dv))
    return kw


def _sdpa_call(kw: dict, to_tensor=as_tensor) -> tuple:
    leaves = _leaves(kw, SDPA_TENSORS, to_tensor)
    out = at.scaled_dot_product_attention(**leaves, is_causal=kw["is_causal"], scale=kw["scale"])
    return _grads((out,), (to_tensor(kw["grad_out"]),), leaves)


def _sdpa_ref(kw: dict) -> tuple:
    args = {n: kw[n] for n in SDPA_TENSORS}
    return _ref_grads(ref.scaled_dot_product_attention, args, dict(is_causal=kw["is_causal"], scale=kw["scale"]),
                      (kw["grad_out"],), SDPA_TENSORS)


# --- additive_attention ---------------------------------------------------------------------

ADDITIVE_TENSORS = ("query", "key", "value", "w_query", "w_key", "v", "bias", "attn_mask")


def _additive_make(c: Case) -> dict:
    kw = dict(query=c.array(c.batch + (c.lq, c.d)), key=c.array(c.batch + (c.lk, c.d + 1)),
              value=c.array(c.batch + (c.lk, c.dv)), w_query=c.array((c.d, c.units)),
              w_key=c.array((c.d + 1, c.units)), v=c.array((c.units,)),
              bias=c.array((c.units,)) if c.opt("bias") else None, attn_mask=c.mask_for(c.batch + (c.lq, c.lk)))
    kw["grad_out"] = c.array(c.batch + (c.lq, c.dv))
    kw["grad_weights"] = c.array(c.batch + (c.lq, c.lk)) if c.opt("grad_weights") else None
    return kw


def _additive_call(kw: dict, to_tensor=as_tensor) -> tuple:
    leaves = _leaves(kw, ADDITIVE_TENSORS, to_tensor)
    args = [leaves.pop(n) for n in ADDITIVE_TENSORS[:6]]
    out, weights = at.additive_attention(*args, **leaves, return_weights=True)
    leaves = dict(zip(ADDITIVE_TENSORS[:6], args), **leaves)
    return _grads((out, weights), (to_tensor(kw["grad_out"]), to_tensor(kw["grad_weights"])), leaves)


def _additive_ref(kw: dict) -> tuple:
    args = {n: kw[n] for n in ADDITIVE_TENSORS[:6]}
    kwargs = dict(bias=kw["bias"], attn_mask=kw["attn_mask"], return_weights=True)
    return _ref_grads(ref.additive_attention, args, kwargs, (kw["grad_out"], kw["grad_weights"]), ADDITIVE_TENSORS)


# --- BahdanauAttention (nn.Module) ----------------------------------------------------------

BAHDANAU_TENSORS = ("query", "keys")


def _bahdanau_make(c: Case) -> dict:
    kw = dict(query=c.array(c.batch + (c.lq, c.d)), keys=c.array(c.batch + (c.lk, c.d + 1)),
              w_query=c.array((c.d, c.units)), w_key=c.array((c.d + 1, c.units)), v=c.array((c.units,)))
    kw["grad_out"] = c.array(c.batch + (c.lq, c.d + 1))
    return kw


def _bahdanau_module(kw: dict, dtype):
    layer = at.BahdanauAttention(kw["w_query"].shape[0], kw["w_key"].shape[0], kw["v"].shape[0], dtype=dtype)
    with torch.no_grad():
        layer.query_proj.weight.copy_(torch.from_numpy(np.array(kw["w_query"].T)))
        layer.key_proj.weight.copy_(torch.from_numpy(np.array(kw["w_key"].T)))
        layer.v.weight.copy_(torch.from_numpy(np.array(kw["v"]))[None])
    return layer


def _bahdanau_call(kw: dict, to_tensor=as_tensor) -> tuple:
    leaves = _leaves(kw, BAHDANAU_TENSORS, to_tensor)
    layer = _bahdanau_module(kw, torch.float64 if kw["w_query"].dtype == np.float64 else torch.float32)
    out = layer(leaves["query"], leaves["keys"], return_weights=False)
    params = dict(w_query=layer.query_proj.weight, w_key=layer.key_proj.weight, v=layer.v.weight)
    result = _grads((out,), (to_tensor(kw["grad_out"]),), dict(leaves, **params))
    # The module's weights are (out, in): their gradients transposed to the functional layout.
    return result[:3] + (result[3].T, result[4].T, result[5][0])


def _bahdanau_ref(kw: dict) -> tuple:
    args = dict(query=kw["query"], key=kw["keys"], value=kw["keys"], w_query=kw["w_query"], w_key=kw["w_key"],
                v=kw["v"])
    out, dq, dk, dvalue, dwq, dwk, dv = _ref_grads(ref.additive_attention, args, {}, (kw["grad_out"],), tuple(args))
    return out, dq, dk + dvalue, dwq, dwk, dv  # the keys are the values too


TORCH_KERNELS: list[TorchKernel] = [] if at is None else [
    TorchKernel("attnext.torch.scaled_dot_product_attention", _sdpa_make, _sdpa_call, _sdpa_ref, SDPA_TENSORS),
    TorchKernel("attnext.torch.additive_attention", _additive_make, _additive_call, _additive_ref, ADDITIVE_TENSORS),
    TorchKernel("attnext.torch.BahdanauAttention", _bahdanau_make, _bahdanau_call, _bahdanau_ref, BAHDANAU_TENSORS),
]
