"""Gradients of the functional API: ``vjp`` and the backward functions behind it.

``out, pullback = attnext.vjp(fn, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` and returns
its result together with a :class:`Pullback`: ``pullback(cotangent)`` returns the
:class:`Gradients` of every argument (a vector-Jacobian product: for a scalar loss L with
dL/d(out) = cotangent, the gradients are dL/d(argument)).

The backward functions (``scaled_dot_product_attention_backward`` and the others) are public too,
for users who keep their own tape: they take the forward's arguments plus what the forward
returned (``out``, ``lse``) and return each input's gradient with that input's shape and dtype
(broadcast axes summed back by :func:`attnext._broadcast.reduce_to_shape`, the one inverse of
broadcasting). :mod:`attnext.reference` holds their NumPy twins, with the same names and
signatures, written from the formulas.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

from . import _core, functional, reference
from ._broadcast import broadcast_batch, reduce_to_shape
from ._validation import (aligned, as_axis, as_float_array, as_scalar, check_dropout, promote,
                          refuse_bfloat16_backward, require_ndim, shape_str, to_array)
from .functional import ProjectedKeys

__all__ = [
    "vjp",
    "Gradients",
    "Pullback",
    "softmax_backward",
    "weighted_sum_backward",
    "score_backward",
    "scaled_dot_product_attention_backward",
    "additive_attention_backward",
    "linear_backward",
]

ArrayLike = npt.ArrayLike


# ---- The result types ------------------------------------------------------------------------


class Gradients(tuple):
    """The gradients a pullback returns: a tuple with one entry per positional argument of the
    ``vjp`` call (``dq, dk, dv = pullback(g)``), each of its argument's shape and dtype, or None
    for an argument that is not a float array (ints, bools, None, int/bool arrays, strings).

    Every argument is also reachable by its parameter name, positional or keyword:
    ``grads["weight"]``, ``grads["attn_mask"]``, ``grads["query"]``. :meth:`names` lists them.
    """

    _named: dict[str, Optional[np.ndarray]]

    def __new__(cls, positional: tuple, named: Mapping[str, Optional[np.ndarray]]) -> "Gradients":
        obj = super().__new__(cls, positional)
        obj._named = dict(named)
        return obj

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._named[key]
            except KeyError:
                raise KeyError(f"no gradient named {key!r}: the call passed {', '.join(self._named) or 'nothing'}"
                               ) from None
        return super().__getitem__(key)

    def names(self) -> tuple[str, ...]:
        """The names of every argument the call passed, positional ones first."""
        return tuple(self._named)

    def get(self, name: str, default: Any = None) -> Any:
        """The gradient of the argument called ``name``, or ``default`` if the call did not pass it."""
        return self._named.get(name, default)

    def __reduce__(self):
        return (Gradients, (tuple(self), self._named))

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={_describe(g)}" for name, g in self._named.items())
        return f"Gradients({parts})"


def _describe(g) -> str:
    if g is None:
        return "None"
    return f"<{g.dtype.name} {tuple(g.shape)}>"


class Pullback:
    """The second result of :func:`vjp`: ``pullback(cotangent) -> Gradients``.

    cotangent: an array of the output's shape, or, when the function returned several arrays
    (``return_weights``/``return_lse``), a tuple of the same structure with None for the
    outputs not differentiated. The pullback keeps its own copies of the arguments and of what
    the forward saved, so it can be called any number of times and never reads the caller's
    arrays again. ``seed`` is the dropout seed the forward used (drawn by ``vjp`` when the call
    asked for dropout without one), or None.
    """

    __slots__ = ("_backward", "_outputs", "_positional", "_passed", "_seed")

    def __init__(self, backward, outputs, positional, passed, seed) -> None:
        self._backward = backward
        self._outputs = outputs  # (shape, dtype) of each returned array
        self._positional = positional  # names of the positional arguments, in order
        self._passed = passed  # every passed name -> (shape, dtype) of a float array, or None
        self._seed = seed

    @property
    def seed(self) -> Optional[int]:
        """The dropout seed the forward used (drawn by vjp when the call had dropout and no seed), or None."""
        return self._seed

    def __call__(self, cotangent: Any) -> Gradients:
        cts = self._cotangents(cotangent)
        raw = self._backward(cts)
        named = {}
        for name, like in self._passed.items():
            g = raw.get(name) if like is not None else None
            named[name] = None if g is None else _shaped_like(g, *like, name)
        return Gradients(tuple(named[name] for name in self._positional), named)

    def _cotangents(self, cotangent) -> tuple:
        n = len(self._outputs)
        if n == 1:
            if isinstance(cotangent, (tuple, list)) and len(cotangent) == 1 and not np.isscalar(cotangent[0]):
                cotangent = cotangent[0]
            items = (cotangent,)
        else:
            if not isinstance(cotangent, (tuple, list)) or len(cotangent) != n:
                raise TypeError(f"the function returned {n} arrays, so the cotangent must be a tuple of {n} "
                                "(None for an output you do not differentiate)")
            items = tuple(cotangent)
        return tuple(_cotangent(ct, shape, dtype, i, n) for i, (ct, (shape, dtype)) in
                     enumerate(zip(items, self._outputs)))

    def __repr__(self) -> str:
        return f"Pullback(outputs={len(self._outputs)}, seed={self.seed})"


def _cotangent(ct, shape, dtype, index, count):
    """One output's cotangent as an array of the output's shape and dtype (None stays None)."""
    if ct is None:
        return None
    what = "the cotangent" if count == 1 else f"cotangent {index}"
    a = np.asarray(ct)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{what} must be a real array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(a.shape)} but the output has shape {tuple(shape)}")
    return a.astype(dtype, copy=False)


def _shaped_like(g, shape, dtype, name):
    """A raw gradient summed back to its argument's shape, in its dtype."""
    return reduce_to_shape(np.asarray(g), shape).astype(dtype, copy=False)


# ---- vjp -------------------------------------------------------------------------------------


class _Backend(NamedTuple):
    """The forward functions and their backward twins one family of rules pulls back through."""

    sdpa_backward: Callable
    additive_backward: Callable
    softmax_backward: Callable
    weighted_sum_backward: Callable
    score_backward: Callable
    attention_rule: Callable
    # Whether additive_backward takes the forward's weights (weights=) instead of recomputing
    # them: the kernels' backward does (skipping the score pass, about a quarter of its work);
    # the reference twin recomputes them from the formula.
    additive_takes_weights: bool = False


def _own(value):
    """The pullback's own copy of an argument: arrays and array-likes copied, the rest as is. A
    broadcast view (stride 0 on some axes) is copied at its compact size and broadcast again."""
    if isinstance(value, np.ndarray):
        if value.size and 0 in value.strides:
            compact = value[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in value.strides)]
            return np.broadcast_to(compact.copy(), value.shape)
        return value.copy()
    if isinstance(value, (list,)):
        return np.array(value)
    return value


def _float_like(value):
    """(shape, dtype) of a float argument, which gets a gradient; None for everything else."""
    if isinstance(value, ProjectedKeys):
        return value.projected.shape, value.projected.dtype
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.shape, value.dtype
    return None


def _as_outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _dropout_wanted(p) -> bool:
    try:
        return float(np.asarray(p)) != 0.0
    except (TypeError, ValueError):
        return False  # the forward reports the bad value


def _sdpa_rule(fn, backend, call, saved):
    """scaled_dot_product_attention: the forward runs with return_lse=True (the backward needs
    lse), which is dropped from what the caller sees unless asked for."""
    seed = _draw_seed_if_needed(call, saved)
    want_weights, want_lse = bool(call.get("return_weights", False)), bool(call.get("return_lse", False))
    results = _as_outputs(fn(**{**call, "return_lse": True}))
    out, lse = results[0].copy(), results[-1].copy()
    shown = results if want_lse else results[:-1]

    def backward(cts):
        g_out = cts[0] if cts[0] is not None else np.zeros_like(out)
        g_weights = cts[1] if want_weights else None
        g_lse = cts[-1] if want_lse else None
        dq, dk, dv, dmask = backend.sdpa_backward(
            g_out, saved["query"], saved["key"], saved["value"], out, lse, saved.get("attn_mask"),
            saved.get("dropout_p", 0.0), saved.get("is_causal", False), saved.get("scale"),
            saved.get("enable_gqa", False), key_lengths=saved.get("key_lengths"), window=saved.get("window"),
            seed=seed, grad_weights=g_weights, grad_lse=g_lse)
        return {"query": dq, "key": dk, "value": dv, "attn_mask": dmask}

    return shown, backward, seed


def _mask_name(call) -> str:
    """additive_attention and attention take the mask as attn_mask or by its older name mask."""
    return "mask" if call.get("mask") is not None else "attn_mask"


def _additive_rule(fn, backend, call, saved):
    """additive_attention: with a backend that takes them, the forward also returns its weights
    (dropped from what the caller sees unless asked for), which the backward reads instead of
    recomputing the scores."""
    want_weights = bool(call.get("return_weights", False))
    keep = backend.additive_takes_weights
    results = _as_outputs(fn(**{**call, "return_weights": True}) if keep else fn(**call))
    shown = results if want_weights or not keep else results[:1]
    out = results[0].copy()
    # The pullback's own weights: a copy only when the caller also holds them.
    weights = None if not keep else results[1].copy() if want_weights else results[1]
    mask_name = _mask_name(call)
    extra = {"weights": weights} if keep else {}

    def backward(cts):
        g_out = cts[0] if cts[0] is not None else np.zeros_like(out)
        grads = backend.additive_backward(
            g_out, saved["query"], saved["key"], saved["value"], saved["w_query"], saved.get("w_key"), saved["v"],
            out, None, bias=saved.get("bias"), attn_mask=saved.get(mask_name), key_lengths=saved.get("key_lengths"),
            is_causal=saved.get("is_causal", False), window=saved.get("window"),
            grad_weights=cts[1] if want_weights else None, **extra)
        grads[mask_name] = grads.pop("attn_mask")
        return grads

    return shown, backward, None


def _score_rule(fn, backend, call, saved):
    out = fn(**call)

    def backward(cts):
        g = cts[0] if cts[0] is not None else np.zeros(out.shape, out.dtype)
        return backend.score_backward(g, saved["query"], saved["key"], saved.get("method", "scaled_dot"),
                                      weight=saved.get("weight"), w_query=saved.get("w_query"),
                                      w_key=saved.get("w_key"), v=saved.get("v"), scale=saved.get("scale"))

    return (out,), backward, None


def _softmax_rule(fn, backend, call, saved):
    out = fn(**call)
    weights = out.copy()

    def backward(cts):
        g = cts[0] if cts[0] is not None else np.zeros_like(weights)
        dx = backend.softmax_backward(g, weights, axis=saved.get("axis", -1))
        return {"x": dx, "mask": dx}  # a float mask is added to x: the same gradient, summed to its shape

    return (out,), backward, None


def _weighted_sum_rule(fn, backend, call, saved):
    out = fn(**call)

    def backward(cts):
        g = cts[0] if cts[0] is not None else np.zeros(out.shape, out.dtype)
        dw, dv = backend.weighted_sum_backward(g, saved["weights"], saved["value"])
        return {"weights": dw, "value": dv}

    return (out,), backward, None


def _draw_seed_if_needed(call, saved):
    """The dropout seed of a call: the one passed, or, with dropout_p > 0 and none passed, one
    drawn now from os.urandom and written into the call (forward and backward use it)."""
    seed = call.get("seed")
    if _dropout_wanted(call.get("dropout_p", 0.0)) and seed is None:
        from ._philox import draw_seed

        seed = call["seed"] = saved["seed"] = draw_seed()
    return seed


def _reference_attention_rule(fn, backend, call, saved):
    """reference.attention: the dense backward of softmax(score + mask) V."""
    seed = _draw_seed_if_needed(call, saved)
    results = _as_outputs(fn(**call))
    want_weights = len(results) > 1
    mask_name = _mask_name(call)
    score_args = {name: saved[name] for name in ("weight", "w_query", "w_key", "v", "scale") if name in saved}

    def backward(cts):
        g_out = cts[0] if cts[0] is not None else np.zeros(results[0].shape, results[0].dtype)
        grads = reference._attention_backward(
            g_out, saved["query"], saved["key"], saved["value"], method=saved.get("method", "scaled_dot"),
            attn_mask=saved.get(mask_name), is_causal=saved.get("is_causal", False),
            key_lengths=saved.get("key_lengths"), window=saved.get("window"),
            grad_weights=cts[1] if want_weights else None, dropout_p=saved.get("dropout_p", 0.0), seed=seed,
            **score_args)
        grads[mask_name] = grads.pop("attn_mask")
        return grads

    return results, backward, seed


def _attention_rule(fn, backend, call, saved):
    """attnext.attention: pulled back through the fused call it routes to (SDPA, or additive
    attention), then through the route's own steps (general's query @ weight, additive's
    scale folded into v, the head axis added for key_lengths)."""
    seed = _draw_seed_if_needed(call, saved)
    route = functional._route_attention(**call)
    inner_out, inner_pullback = vjp(route.fn, *route.args, **route.kwargs)
    results = _as_outputs(route.finish(inner_out))
    mask_name = _mask_name(call)
    weight = None if route.weight is None else saved["weight"]
    query = saved["query"]

    def backward(cts):
        if route.head_axis:
            cts = tuple(None if ct is None else ct[..., None, :, :] for ct in cts)
        inner = inner_pullback(cts if len(cts) > 1 else cts[0])
        if route.fn is functional.additive_attention:
            grads = {name: inner[name] for name in ("query", "key", "value", "w_query", "w_key")}
            grads["v"] = None if inner["v"] is None else inner["v"] * inner["v"].dtype.type(route.v_scale)
            grads[mask_name] = inner["attn_mask"]
            return grads
        dq, dk, dv, dmask = inner[:4]
        if route.head_axis:
            dq, dk, dv = dq[..., 0, :, :], dk[..., 0, :, :], dv[..., 0, :, :]
            if dmask is not None and dmask.ndim >= 4:
                dmask = dmask[..., 0, :, :]
        grads = {"key": dk, "value": dv, mask_name: dmask}
        if weight is not None:  # the routed query was query @ weight
            w = weight.astype(dq.dtype, copy=False)
            grads["weight"] = _sum_outer(np.asarray(query, dq.dtype), dq)
            dq = dq @ w.T
        grads["query"] = dq
        return grads

    return results, backward, seed


def _sum_outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over the batch axes of a^T b, for a (..., N, I) and b (..., N, J) (batch axes
    broadcast): the gradient of a weight W in a W."""
    prod = np.swapaxes(a, -1, -2) @ b
    return _flat(prod, 2).sum(axis=0)


def _flat(a: np.ndarray, keep: int = 1) -> np.ndarray:
    """a with its leading axes flattened into one, its last ``keep`` kept: the sizes written out,
    since reshape(-1, ...) cannot infer the -1 when a kept size is 0 (an empty feature axis)."""
    return a.reshape((math.prod(a.shape[:a.ndim - keep]),) + a.shape[a.ndim - keep:])


_RULES: dict[Callable, Callable] = {}
_BACKENDS: dict[Callable, _Backend] = {}


def _register(module, backend: _Backend) -> None:
    rules = {"scaled_dot_product_attention": _sdpa_rule, "additive_attention": _additive_rule,
             "score": _score_rule, "softmax": _softmax_rule, "weighted_sum": _weighted_sum_rule,
             "attention": backend.attention_rule}
    for name, rule in rules.items():
        fn = getattr(module, name)
        _RULES[fn], _BACKENDS[fn] = rule, backend


def vjp(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, Pullback]:
    """Runs ``fn(*args, **kwargs)`` and returns ``(out, pullback)``.

    fn: :func:`attnext.scaled_dot_product_attention`, :func:`attnext.additive_attention`,
    :func:`attnext.attention`, :func:`attnext.score`, :func:`attnext.softmax` or
    :func:`attnext.weighted_sum` (or their :mod:`attnext.reference` twins, which pull back
    through the reference backward).

    ``out`` is exactly what ``fn(*args, **kwargs)`` returns. ``pullback(cotangent)`` returns
    :class:`Gradients`: one entry per positional argument (``dq, dk, dv = pullback(g)``), each
    of its argument's shape and dtype with broadcast batch axes (and GQA's shared key/value
    heads) summed back, None for an argument that is not a float array; every argument,
    keyword ones included, is also reachable by name (``grads["weight"]``). A float attn_mask
    gets its gradient. With ``return_weights``/``return_lse`` the cotangent is a tuple of the
    same structure (None for outputs not differentiated; a weights cotangent is differentiated,
    as is an lse cotangent).

    Dropout: with ``dropout_p > 0`` and ``seed=None`` a seed is drawn from os.urandom, used for
    the forward and the backward, and recorded as ``pullback.seed``.

    The pullback keeps its own copies of the arguments and of the forward's saved results; it
    never reads the caller's arrays again and gives the same gradients every time it is called.
    """
    rule = _RULES.get(fn)
    if rule is None:
        raise TypeError(f"vjp supports attnext's scaled_dot_product_attention, additive_attention, attention, "
                        f"score, softmax and weighted_sum (and their attnext.reference twins), got {fn!r}")
    parameters = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **kwargs)
    call: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    positional = tuple(list(parameters)[:len(args)])
    saved = {name: _own(value) for name, value in call.items()}
    refuse_bfloat16_backward(saved)  # before the forward runs: its pullback could not be taken
    passed = {name: _float_like(value) for name, value in saved.items()}
    outputs, backward, seed = rule(fn, _BACKENDS[fn], call, saved)
    pullback = Pullback(backward, tuple((o.shape, o.dtype) for o in outputs), positional, passed, seed)
    return (outputs if len(outputs) > 1 else outputs[0]), pullback


# ---- The public backward functions -----------------------------------------------------------


def softmax_backward(grad: ArrayLike, weights: ArrayLike, *, axis: int = -1) -> np.ndarray:
    """The backward of :func:`attnext.softmax`: dx = w * (g - sum(g * w, axis)).

    Args:
        grad: the cotangent of softmax's output, weights' shape.
        weights: what softmax returned.
        axis: the axis softmax normalised.

    Returns:
        dx, weights' shape and dtype (also the gradient of a float mask added to x, summed to the
        mask's shape). A masked entry (weight 0) gets 0.
    """
    result_dtype = to_array(weights, "weights").dtype
    _, a = promote(backward=True, grad=grad, weights=weights)
    g, w = a["grad"], a["weights"]
    if g.shape != w.shape:
        raise ValueError(f"grad has shape {shape_str(g.shape)} but weights has {shape_str(w.shape)}: they must match")
    axis = as_axis(axis, w.shape, of="weights")
    return (w * (g - np.sum(g * w, axis=axis, keepdims=True))).astype(result_dtype, copy=False)


def weighted_sum_backward(grad: ArrayLike, weights: ArrayLike, value: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The backward of :func:`attnext.weighted_sum` (c = A V): dA = g V^T, dV = A^T g.

    Args:
        grad: (..., Lq, Dv), the context's cotangent.
        weights: (..., Lq, Lk); value: (..., Lk, Dv), as passed to the forward.

    Returns:
        (dweights, dvalue), each of its input's shape and dtype.
    """
    inputs = {"weights": to_array(weights, "weights"), "value": to_array(value, "value")}
    _, a = promote(backward=True, **inputs)
    w, val = a["weights"], a["value"]
    require_ndim(w, "weights", 2, "(..., Lq, Lk)")
    require_ndim(val, "value", 2, "(..., Lk, Dv)")
    if w.shape[-1] != val.shape[-2]:
        raise ValueError(f"weights has shape {shape_str(w.shape)} but value has {shape_str(val.shape)}: weights' "
                         "last dimension must equal value's second-to-last")
    batch, _ = broadcast_batch(a)
    _check_cotangent(grad, "grad", batch + (w.shape[-2], val.shape[-1]))
    dweights = functional.score(grad, inputs["value"], "dot")  # g V^T, as the scores q k^T
    dvalue = functional.weighted_sum(np.swapaxes(inputs["weights"], -1, -2), grad)  # A^T g
    return (_shaped_like(dweights, inputs["weights"].shape, inputs["weights"].dtype, "weights"),
            _shaped_like(dvalue, inputs["value"].shape, inputs["value"].dtype, "value"))


def _check_cotangent(grad, name: str, shape: tuple[int, ...]) -> None:
    """A cotangent must have the shape of the forward's output it belongs to."""
    g = as_float_array(grad, name)
    if g.shape != tuple(shape):
        raise ValueError(f"{name} has shape {shape_str(g.shape)} but the forward's output has {shape_str(shape)}")


# Query rows per block of the additive score's backward, so the (rows, Lk, U) tanh block stays
# near 2**22 elements (32 MB in float64) whatever Lq is.
_ADDITIVE_BLOCK_ELEMENTS = 1 << 22


def score_backward(grad: ArrayLike, query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *,
                   weight: ArrayLike | None = None, w_query: ArrayLike | None = None, w_key: ArrayLike | None = None,
                   v: ArrayLike | None = None, scale: float | None = None) -> dict[str, np.ndarray | None]:
    """The backward of :func:`attnext.score`.

    dot/scaled_dot (s = c q k^T): dq = c g K, dk = c g^T Q; general (s = c (q W) k^T): dq = c g K W^T,
    dW = c sum Q^T g K, dk = c g^T Q W; additive (s = c v . tanh(q W_q + k W_k)): through the tanh,
    a block of query rows at a time (the (..., Lq, Lk, U) tensor is never whole).

    Args:
        grad: (..., Lq, Lk), the scores' cotangent; the rest as passed to the forward.

    Returns:
        {query, key, weight, w_query, w_key, v}: each gradient of its input's shape and dtype,
        None for the arguments the method does not use.
    """
    given = {"query": query, "key": key, "weight": weight, "w_query": w_query, "w_key": w_key, "v": v}
    functional._require(query=query, key=key)
    functional._check_method_args(method, {"weight": weight, "w_query": w_query, "w_key": w_key, "v": v})
    dtype, a = promote(backward=True, grad=grad, **given)
    q, k, g = a["query"], a["key"], a["grad"]
    require_ndim(q, "query", 2, "(..., Lq, Dq)")
    require_ndim(k, "key", 2, "(..., Lk, Dk)")
    _check_score_weights(method, q, k, a)
    batch, _ = broadcast_batch({"query": q, "key": k})
    _check_cotangent(grad, "grad", batch + (q.shape[-2], k.shape[-2]))
    if scale is None:
        scale = 1.0 / np.sqrt(k.shape[-1]) if method == "scaled_dot" and k.shape[-1] > 0 else 1.0
    c = dtype.type(as_scalar(scale, "scale"))
    grads: dict[str, Optional[np.ndarray]] = dict.fromkeys(given)
    gt = np.swapaxes(g, -1, -2)
    if method in ("dot", "scaled_dot"):
        grads["query"], grads["key"] = functional.weighted_sum(g, k) * c, functional.weighted_sum(gt, q) * c
    elif method == "general":
        w = a["weight"]
        dqw = functional.weighted_sum(g, k) * c  # the cotangent of q W
        grads["query"], grads["weight"] = dqw @ w.T, _sum_outer(q, dqw)
        grads["key"] = functional.weighted_sum(gt, q @ w) * c
    else:
        grads.update(_additive_score_backward(g * c, q, k, a["w_query"], a["w_key"], a["v"]))
    return {name: None if d is None else _shaped_like(d, np.shape(given[name]), to_array(given[name], name).dtype, name)
            for name, d in grads.items()}


def _check_score_weights(method: str, q: np.ndarray, k: np.ndarray, a: dict) -> None:
    """The shapes score()'s method needs: Dq = Dk for the products, weight (Dq, Dk) for general,
    w_query (Dq, U), w_key (Dk, U) and v (U,) for additive."""
    dq, dk = q.shape[-1], k.shape[-1]
    if method == "general":
        needed = {"weight": (dq, dk)}
    elif method == "additive":
        units = a["v"].shape[0] if a["v"].ndim == 1 else -1
        needed = {"w_query": (dq, units), "w_key": (dk, units), "v": (units,)}
    else:
        needed = {}
        if dq != dk:
            raise ValueError(f"query has shape {shape_str(q.shape)} but key has {shape_str(k.shape)}: "
                             "the last (embedding) dimensions must match")
    for name, shape in needed.items():
        if a[name].shape != shape:
            raise ValueError(f"{name} has shape {shape_str(a[name].shape)} but query has {shape_str(q.shape)} and key "
                             f"{shape_str(k.shape)}: method={method!r} needs {name} of shape {shape_str(shape)}")


def _additive_score_backward(g, q, k, w_query, w_key, v) -> dict[str, np.ndarray]:
    """Cotangents through e_ij = v . tanh(q_i W_q + k_j W_k) given de = g (..., Lq, Lk): with
    T the tanh, dv = sum de_ij T_ij, dZ = de v (1 - T^2), d(q W_q) = sum_j dZ, d(k W_k) = sum_i dZ."""
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], g.shape[:-2])
    qp = np.broadcast_to(q @ w_query, batch + (q.shape[-2], w_query.shape[1]))  # (..., Lq, U)
    kp = np.broadcast_to(k @ w_key, batch + (k.shape[-2], w_key.shape[1]))  # (..., Lk, U)
    g = np.broadcast_to(g, batch + g.shape[-2:])
    dqp, dkp, dv = np.zeros(qp.shape, qp.dtype), np.zeros(kp.shape, kp.dtype), np.zeros(v.shape, v.dtype)
    rows = max(1, _ADDITIVE_BLOCK_ELEMENTS // max(1, math.prod(batch) * kp.shape[-2] * kp.shape[-1]))
    for i in range(0, qp.shape[-2], rows):
        t = np.tanh(qp[..., i:i + rows, None, :] + kp[..., None, :, :])  # (..., rows, Lk, U)
        gi = g[..., i:i + rows, :, None]
        dv += _flat(gi * t).sum(axis=0)
        dz = gi * v * (1 - t * t)
        dqp[..., i:i + rows, :] = dz.sum(axis=-2)
        dkp += dz.sum(axis=-3)
    return {"query": dqp @ w_query.T, "w_query": _sum_outer(q, dqp), "key": dkp @ w_key.T,
            "w_key": _sum_outer(k, dkp), "v": dv}


def scaled_dot_product_attention_backward(
        grad_out: ArrayLike, query: ArrayLike, key: ArrayLike, value: ArrayLike, out: ArrayLike, lse: ArrayLike,
        attn_mask: ArrayLike | None = None, dropout_p: float = 0.0, is_causal: functional.Causal = False,
        scale: float | None = None, enable_gqa: bool = False, *, key_lengths: ArrayLike | None = None,
        window: functional.Window = None, seed: int | None = None, grad_weights: ArrayLike | None = None,
        grad_lse: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The backward of :func:`attnext.scaled_dot_product_attention`.

    Args:
        grad_out: (..., Hq, L, Ev), the output's cotangent.
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, key_lengths,
            window: as passed to the forward; seed: the forward's seed (required with dropout).
        out: (..., Hq, L, Ev); lse: (..., Hq, L): what the forward returned (``return_lse=True``).
        grad_weights: (..., Hq, L, S), the cotangent of the returned weights (after dropout), or None.
        grad_lse: (..., Hq, L), the cotangent of lse, or None.

    Returns:
        (dquery, dkey, dvalue, dattn_mask): each of its input's shape and dtype, broadcast batch
        axes summed back and, under enable_gqa, key/value gradients summed over each group;
        dattn_mask only for a float mask (else None). A row that attends to nothing gets zero
        gradients; hidden keys get exactly zero.
    """
    p = check_dropout(dropout_p)
    if p != 0.0 and seed is None:
        raise ValueError("seed is required with dropout_p > 0: pass the seed the forward used (vjp records it "
                         "as pullback.seed)")
    seed = functional._dropout_seed(seed, p)
    inputs = {"query": to_array(query, "query"), "key": to_array(key, "key"), "value": to_array(value, "value")}
    dtype, _ = promote(backward=True, **inputs)
    ev = inputs["value"].shape[-1] if inputs["value"].ndim else 0
    if grad_lse is not None:
        value, out, grad_out = _fold_lse_cotangent(inputs["value"], out, grad_out, grad_lse, dtype)
    call = functional._prepare_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, key_lengths,
                                    window, warn=False, backward=True)
    rows, (lk, ev_kernel) = call.row_shape(), call.value.shape[-2:]
    g = call.kernel(_rows_array(grad_out, "grad_out", rows + (ev_kernel,), dtype))
    o = call.kernel(_rows_array(out, "out", rows + (ev_kernel,), dtype))
    l_ = call.kernel(_rows_array(lse, "lse", rows, dtype))
    gw = None if grad_weights is None else call.kernel(_rows_array(grad_weights, "grad_weights", rows + (lk,), dtype))
    mask_grad = call.mask is not None and call.mask.dtype != np.bool_
    dq, dk, dv, dmask = _core.sdpa_backward(*call.kernel_args(), o, l_, g, p, seed, gw, mask_grad)
    dq, dk, dv = call.public(dq), call.public(dk), call.public(dv)[..., :ev]
    if call.query_heads is not None:  # (..., Hq, S, X) -> (..., Hk, G, S, X): each group sums into its head
        dk, dv = (_sum_groups(d, inputs[name].shape) for d, name in ((dk, "key"), (dv, "value")))
    grads = tuple(_shaped_like(d, inputs[name].shape, inputs[name].dtype, name)
                  for d, name in ((dq, "query"), (dk, "key"), (dv, "value")))
    mask_out = None
    if mask_grad:
        mask = to_array(attn_mask, "attn_mask")
        mask_out = _shaped_like(call.public(dmask), mask.shape, mask.dtype, "attn_mask")
    return (*grads, mask_out)


def _rows_array(a, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array the backward reads per query row (grad_out, out, lse, grad_weights), checked
    against the shape the forward gave it and converted to the compute dtype."""
    arr = as_float_array(a, name)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {shape_str(arr.shape)} but the forward's gives {shape_str(shape)}")
    return aligned(arr.astype(dtype, copy=False))


def _sum_groups(d: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A key/value-head gradient (..., Hq, S, X) summed back to the argument's ``shape``
    (..., Hk, S, X): the inverse of the forward's stride-0 (..., Hk, G, S, X) view of
    (..., Hk, 1, S, X), batch broadcasting included."""
    grouped = d.reshape(d.shape[:-3] + (shape[-3], d.shape[-3] // shape[-3]) + d.shape[-2:])
    return reduce_to_shape(grouped, shape[:-2] + (1,) + shape[-2:]).reshape(shape)


def _fold_lse_cotangent(value, out, grad_out, grad_lse, dtype):
    """The kernel's dS = P (dP - D) with D_i = rowsum(dO * O); an lse cotangent adds g_lse P to dS,
    i.e. it lowers D by g_lse. One more column does that without a second kernel: value gets a
    zero column (dP and the output unchanged), out gets -g_lse and grad_out gets 1 there, so
    D_i picks up -g_lse_i. The extra column of dvalue is dropped."""
    v = as_float_array(value, "value").astype(dtype, copy=False)
    o = as_float_array(out, "out").astype(dtype, copy=False)
    g = as_float_array(grad_out, "grad_out").astype(dtype, copy=False)
    gl = as_float_array(grad_lse, "grad_lse").astype(dtype, copy=False)
    if gl.shape != o.shape[:-1]:
        raise ValueError(f"grad_lse has shape {shape_str(gl.shape)} but lse has {shape_str(o.shape[:-1])}")
    zero_column = np.zeros(v.shape[:-1] + (1,), dtype)
    return (np.concatenate([v, zero_column], axis=-1), np.concatenate([o, -gl[..., None]], axis=-1),
            np.concatenate([g, np.ones(g.shape[:-1] + (1,), dtype)], axis=-1))


def additive_attention_backward(grad_out: ArrayLike, query: ArrayLike, key: ArrayLike | ProjectedKeys,
                                value: ArrayLike, w_query: ArrayLike, w_key: ArrayLike | None, v: ArrayLike,
                                out: ArrayLike | None, lse: ArrayLike | None, *, bias: ArrayLike | None = None,
                                attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                                is_causal: functional.Causal = False, window: functional.Window = None,
                                grad_weights: ArrayLike | None = None,
                                weights: ArrayLike | None = None) -> dict[str, np.ndarray | None]:
    """The backward of :func:`attnext.additive_attention`.

    Args:
        grad_out: (..., Lq, Dv), the context's cotangent; the other arguments as passed to the
            forward. out and lse are accepted for symmetry with the SDPA backward and may be None:
            the kernel recomputes the weights (the forward's bits) and needs neither.
        grad_weights: (..., Lq, Lk), the cotangent of the returned weights, or None.
        weights: (..., Lq, Lk), the weights the forward returned (``return_weights=True``) for
            these same arguments, or None. Given, the kernel reads them instead of recomputing
            the scores (about a quarter of its work); the gradients are the same.

    Returns:
        {query, key, value, w_query, w_key, v, bias, attn_mask}: each of its input's shape and
        dtype, None where the input is None or not a float array. For a
        :class:`attnext.ProjectedKeys` key, "key" is the gradient of its ``projected`` array
        (..., Lk, U), the memory-shaped gradient that sums across decoder steps.
    """
    call = functional._prepare_additive(query, key, value, w_query, w_key, v, bias=bias, attn_mask=attn_mask,
                                        key_lengths=key_lengths, is_causal=is_causal, window=window, warn=False,
                                        backward=True)
    rows, lk = call.query.shape[:-1], call.value.shape[-2]
    g = _rows_array(grad_out, "grad_out", rows + (call.value.shape[-1],), call.dtype)
    gw = None if grad_weights is None else _rows_array(grad_weights, "grad_weights", rows + (lk,), call.dtype)
    saved = None if weights is None else _rows_array(weights, "weights", rows + (lk,), call.dtype)
    mask_grad = attn_mask is not None and to_array(attn_mask, "attn_mask").dtype.kind == "f"
    raw = functional._additive_backward_kernel(call, g, gw, mask_grad, saved)
    if isinstance(key, ProjectedKeys):  # the memory-shaped gradient: d(key w_key)
        raw["key"], raw["w_key"] = raw["keys_raw"], None
    elif isinstance(call.keys, ProjectedKeys):  # keys shared over batch axes were projected once: chain through it
        dkp = reduce_to_shape(raw["keys_raw"], call.key.shape[:-1] + raw["keys_raw"].shape[-1:])
        raw["key"], raw["w_key"] = dkp @ call.w_key.T, _sum_outer(call.key, dkp)
    raw["attn_mask"] = raw.pop("mask")
    given = {"query": query, "key": key, "value": value, "w_query": w_query, "w_key": w_key, "v": v, "bias": bias,
             "attn_mask": attn_mask}
    result: dict[str, Optional[np.ndarray]] = {}
    for name, arg in given.items():
        like = getattr(arg, "projected", arg)
        d = raw.get(name)
        result[name] = None if arg is None or d is None else _shaped_like(d, np.shape(like), np.asarray(like).dtype,
                                                                           name)
    return result


def linear_backward(grad: ArrayLike, x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The backward of y = x W^T + b (x (..., In), weight (Out, In), bias (Out,)).

    Returns:
        (dx, dweight, dbias): dx = g W, dweight = sum over the batch of g^T x, dbias = sum of g
        (None without a bias); each of its input's shape and dtype.
    """
    inputs = {"x": to_array(x, "x"), "weight": to_array(weight, "weight")}
    if bias is not None:
        inputs["bias"] = to_array(bias, "bias")
    dtype, a = promote(backward=True, grad=grad, **inputs)
    g, xa, w = a["grad"], a["x"], a["weight"]
    require_ndim(xa, "x", 1, "(..., in)")
    if w.ndim != 2 or w.shape[1] != xa.shape[-1]:
        raise ValueError(f"x has shape {shape_str(xa.shape)} but weight has {shape_str(w.shape)}: weight must be "
                         "(out, in) with in = x's last dimension")
    if bias is not None and a["bias"].shape != (w.shape[0],):
        raise ValueError(f"bias has shape {shape_str(a['bias'].shape)} but weight has {shape_str(w.shape)}: "
                         "bias must be (out,)")
    _check_cotangent(g, "grad", xa.shape[:-1] + (w.shape[0],))
    # The kernel's layout is the forward's (transformer._linear): x (B, L, 1, in), grad (B, L, out).
    x4 = xa[:, :, None, :] if xa.ndim == 3 else xa.reshape((1, math.prod(xa.shape[:-1]), 1, xa.shape[-1]))
    g3 = g if g.ndim == 3 else g.reshape((1, math.prod(g.shape[:-1]), g.shape[-1]))
    dx, dw, db = _core.linear_backward(g3, x4, w, bias is not None)
    grads = (dx.reshape(xa.shape), dw, db)
    return tuple(None if d is None else _shaped_like(d, inputs[name].shape, inputs[name].dtype, name)
                 for d, name in zip(grads, ("x", "weight", "bias")))  # type: ignore[return-value]


_register(functional, _Backend(scaled_dot_product_attention_backward, additive_attention_backward, softmax_backward,
                               weighted_sum_backward, score_backward, _attention_rule, additive_takes_weights=True))
_register(reference, _Backend(reference.scaled_dot_product_attention_backward, reference.additive_attention_backward,
                              reference.softmax_backward, reference.weighted_sum_backward, reference.score_backward,
                              _reference_attention_rule))
