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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

from . import functional, reference
from ._broadcast import reduce_to_shape
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

    __slots__ = ("_backward", "_outputs", "_positional", "_passed", "seed")

    def __init__(self, backward, outputs, positional, passed, seed) -> None:
        self._backward = backward
        self._outputs = outputs  # (shape, dtype) of each returned array
        self._positional = positional  # names of the positional arguments, in order
        self._passed = passed  # every passed name -> (shape, dtype) of a float array, or None
        self.seed = seed

    def __call__(self, cotangent) -> Gradients:
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


def _own(value):
    """The pullback's own copy of an argument: arrays and array-likes copied, the rest as is."""
    if isinstance(value, np.ndarray):
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
    seed = call.get("seed")
    if _dropout_wanted(call.get("dropout_p", 0.0)) and seed is None:
        from . import _philox

        seed = call["seed"] = saved["seed"] = _philox.draw_seed()
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
    results = _as_outputs(fn(**call))
    want_weights = len(results) > 1
    out = results[0].copy()
    mask_name = _mask_name(call)

    def backward(cts):
        g_out = cts[0] if cts[0] is not None else np.zeros_like(out)
        grads = backend.additive_backward(
            g_out, saved["query"], saved["key"], saved["value"], saved["w_query"], saved.get("w_key"), saved["v"],
            out, None, bias=saved.get("bias"), attn_mask=saved.get(mask_name), key_lengths=saved.get("key_lengths"),
            is_causal=saved.get("is_causal", False), window=saved.get("window"),
            grad_weights=cts[1] if want_weights else None)
        grads[mask_name] = grads.pop("attn_mask")
        return grads

    return results, backward, None


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


def _reference_attention_rule(fn, backend, call, saved):
    """reference.attention (and, until the fused backward routes it, attnext.attention): the
    dense backward of softmax(score + mask) V."""
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
            grad_weights=cts[1] if want_weights else None, **score_args)
        grads[mask_name] = grads.pop("attn_mask")
        return grads

    return results, backward, None


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
    return reference.softmax_backward(grad, weights, axis=axis)


def weighted_sum_backward(grad: ArrayLike, weights: ArrayLike, value: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The backward of :func:`attnext.weighted_sum` (c = A V): dA = g V^T, dV = A^T g.

    Args:
        grad: (..., Lq, Dv), the context's cotangent.
        weights: (..., Lq, Lk); value: (..., Lk, Dv), as passed to the forward.

    Returns:
        (dweights, dvalue), each of its input's shape and dtype.
    """
    return reference.weighted_sum_backward(grad, weights, value)


def score_backward(grad: ArrayLike, query: ArrayLike, key: ArrayLike, method: str = "scaled_dot", *,
                   weight: ArrayLike | None = None, w_query: ArrayLike | None = None, w_key: ArrayLike | None = None,
                   v: ArrayLike | None = None, scale: float | None = None) -> dict[str, np.ndarray | None]:
    """The backward of :func:`attnext.score`.

    Args:
        grad: (..., Lq, Lk), the scores' cotangent; the rest as passed to the forward.

    Returns:
        {query, key, weight, w_query, w_key, v}: each gradient of its input's shape and dtype,
        None for the arguments the method does not use.
    """
    return reference.score_backward(grad, query, key, method, weight=weight, w_query=w_query, w_key=w_key, v=v,
                                    scale=scale)


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
    return reference.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        key_lengths=key_lengths, window=window, seed=seed, grad_weights=grad_weights, grad_lse=grad_lse)


def additive_attention_backward(grad_out: ArrayLike, query: ArrayLike, key: ArrayLike | ProjectedKeys,
                                value: ArrayLike, w_query: ArrayLike, w_key: ArrayLike | None, v: ArrayLike,
                                out: ArrayLike | None, lse: ArrayLike | None, *, bias: ArrayLike | None = None,
                                attn_mask: ArrayLike | None = None, key_lengths: ArrayLike | None = None,
                                is_causal: functional.Causal = False, window: functional.Window = None,
                                grad_weights: ArrayLike | None = None) -> dict[str, np.ndarray | None]:
    """The backward of :func:`attnext.additive_attention`.

    Args:
        grad_out: (..., Lq, Dv), the context's cotangent; the other arguments as passed to the
            forward; out and lse: what it returned (either may be None: recomputed).
        grad_weights: (..., Lq, Lk), the cotangent of the returned weights, or None.

    Returns:
        {query, key, value, w_query, w_key, v, bias, attn_mask}: each of its input's shape and
        dtype, None where the input is None or not a float array. For a
        :class:`attnext.ProjectedKeys` key, "key" is the gradient of its ``projected`` array
        (..., Lk, U), the memory-shaped gradient that sums across decoder steps.
    """
    return reference.additive_attention_backward(
        grad_out, query, key, value, w_query, w_key, v, out, lse, bias=bias, attn_mask=attn_mask,
        key_lengths=key_lengths, is_causal=is_causal, window=window, grad_weights=grad_weights)


def linear_backward(grad: ArrayLike, x: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The backward of y = x W^T + b (x (..., In), weight (Out, In), bias (Out,)).

    Returns:
        (dx, dweight, dbias): dx = g W, dweight = sum over the batch of g^T x, dbias = sum of g
        (None without a bias); each of its input's shape and dtype.
    """
    return reference.linear_backward(grad, x, weight, bias)


_register(functional, _Backend(scaled_dot_product_attention_backward, additive_attention_backward, softmax_backward,
                               weighted_sum_backward, score_backward, _reference_attention_rule))
_register(reference, _Backend(reference.scaled_dot_product_attention_backward, reference.additive_attention_backward,
                              reference.softmax_backward, reference.weighted_sum_backward, reference.score_backward,
                              _reference_attention_rule))
