"""Registry entries for issue 15's backward functions and vjp pullbacks (appended to
``kernels.KERNELS``, so validation, non-finite values, concurrency, determinism, leaks, racing
arguments and fuzzing cover them like every forward entry).

Entries whose backward needs what the forward saved (``out``, ``lse``) run the forward inside
the call ("forward + backward"): the suites change arguments (layouts, dtypes, non-finite
values, finfo.min masks) and the saved values then always belong to the arguments. The
reference runs attnext.reference's forward and its backward twin the same way. Gradients come
in the dtype of their argument, so these entries draw float32/float64 only (``Kernel.grad``).
"""

from __future__ import annotations

import dataclasses
import functools
import traceback

import numpy as np

import attnext
from attnext import _core
from attnext import reference as ref

from .kernels import Case, Kernel, _additive_attention_make, _core_additive_attention_make, _core_linear_make, \
    _core_sdpa_make, _sdpa_make, _score_make, compute_dtype

SEED = 0x5EED0FD20  # the dropout seed of every entry with dropout on (decisions depend on coordinates only)


def _present(grads) -> tuple:
    """The gradients that exist, in order (a backward returns None for non-differentiable args)."""
    if isinstance(grads, dict):
        return tuple(grads[k] for k in sorted(grads) if grads[k] is not None)
    return tuple(g for g in grads if g is not None)


def _like_args(grads, kw, names):
    """The reference's gradients cast to the dtype of their argument, byte order included (as
    attnext returns them: "same dtype as that argument")."""
    return tuple(np.asarray(g).astype(kw[n].dtype) for g, n in zip(grads, names) if g is not None)


def native(dtype) -> np.dtype:
    """dtype in native byte order (softmax_backward's dx: x is not its argument, the weights are
    softmax's native-order output)."""
    return np.dtype(np.dtype(dtype).type)


def _in(kw, dtype):
    """Every float array in kw cast to the computing dtype (the reference computes in it)."""
    return {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in kw.items()}


# --- SDPA: forward + scaled_dot_product_attention_backward ------------------------------------

def _sdpa_grad_make(c: Case) -> dict:
    kw = _sdpa_make(c)
    kw.pop("return_weights"), kw.pop("return_lse")
    q = kw["query"]
    if c.opt("gqa"):  # two query heads per key/value head
        kw["query"] = c.array(q.shape[:-3] + (2 * q.shape[-3],) + q.shape[-2:])
        kw["enable_gqa"] = True
        if kw["attn_mask"] is not None:
            kw["attn_mask"] = c.mask_for(kw["query"].shape[:-1] + (kw["key"].shape[-2],))
    if c.opt("dropout"):
        kw.update(dropout_p=0.3, seed=SEED)
    q, v = kw["query"], kw["value"]
    kw["grad_out"] = c.array(q.shape[:-1] + (v.shape[-1],))
    if c.opt("grad_weights"):
        kw["grad_weights"] = c.array(q.shape[:-1] + (kw["key"].shape[-2],))
    return kw


def _sdpa_grad(module, kw):
    kw = dict(kw)
    g, gw = kw.pop("grad_out"), kw.pop("grad_weights", None)
    q, k, v = kw.pop("query"), kw.pop("key"), kw.pop("value")
    out, lse = module.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    return module.scaled_dot_product_attention_backward(g, q, k, v, out, lse, grad_weights=gw, **kw)


SDPA_GRAD_NAMES = ("query", "key", "value", "attn_mask")


def _sdpa_grad_ref(kw):
    dtype = compute_dtype(kw["query"], kw["key"], kw["value"])
    return _like_args(_sdpa_grad(ref, _in(kw, dtype)), kw, SDPA_GRAD_NAMES)


def vjp_make(make):
    """make() with the cotangents named as a pullback's messages name them ("the cotangent",
    "cotangent 1" for the weights' when the call returns two arrays)."""
    def vjp_kw(c: Case) -> dict:
        kw = make(c)
        kw["cotangent"] = kw.pop("grad_out")
        if "grad_weights" in kw:
            kw["cotangent 1"] = kw.pop("grad_weights")
        return kw
    return vjp_kw


def _from_vjp(kw) -> dict:
    """A vjp entry's kw with the backward entry's names (for the shared reference)."""
    kw = dict(kw)
    kw["grad_out"] = kw.pop("cotangent")
    if "cotangent 1" in kw:
        kw["grad_weights"] = kw.pop("cotangent 1")
    return kw


def _sdpa_vjp_call(kw):
    kw = _from_vjp(kw)
    g, gw = kw.pop("grad_out"), kw.pop("grad_weights", None)
    args = (kw.pop("query"), kw.pop("key"), kw.pop("value"), kw.pop("attn_mask"))
    out, pullback = attnext.vjp(attnext.scaled_dot_product_attention, *args, return_weights=gw is not None, **kw)
    return _present(pullback((g, gw) if gw is not None else g))


# --- _core.sdpa + _core.sdpa_backward ---------------------------------------------------------

def _core_sdpa_grad_make(c: Case) -> dict:
    kw = _core_sdpa_make(c)
    kw.pop("return_weights"), kw.pop("return_lse")
    kw["dropout_p"], kw["seed"] = (0.3, SEED) if c.opt("dropout") else (0.0, 0)
    q, k, v = kw["query"], kw["key"], kw["value"]
    kw["grad_out"] = c.array(q.shape[:-1] + (v.shape[-1],))
    kw["grad_weights"] = c.array(q.shape[:-1] + (k.shape[-2],)) if c.opt("grad_weights") else None
    return kw


def _core_sdpa_grad_call(kw):
    kw = dict(kw)
    g, gw = kw.pop("grad_out"), kw.pop("grad_weights")
    p, seed = kw.pop("dropout_p"), kw.pop("seed")
    m = kw["attn_mask"]
    out, _, lse = _core.sdpa(**kw, return_weights=False, return_lse=True, dropout_p=p, seed=seed)
    grads = _core.sdpa_backward(**kw, out=out, lse=lse, grad_out=g, dropout_p=p, seed=seed, grad_weights=gw,
                                mask_grad=m is not None and m.dtype != np.bool_)
    return _present(grads)


def _core_sdpa_grad_ref(kw):
    """The public twin on the _core arguments: one head axis of 1 so key_lengths cover every
    batch axis; causal_offset and the window as a bool mask (hidden keys stay hidden)."""
    q, k, v, m = kw["query"], kw["key"], kw["value"], kw["attn_mask"]
    lq, lk = q.shape[-2], k.shape[-2]
    hidden = np.zeros((lq, lk), bool)
    if kw["causal"]:
        hidden |= np.arange(lk)[None, :] > np.arange(lq)[:, None] + kw["causal_offset"]
    left, right = kw["window_left"], kw["window_right"]
    d = np.arange(lk)[None, :] - np.arange(lq)[:, None]
    if left >= 0:
        hidden |= d < -left
    if right >= 0:
        hidden |= d > right
    mask_grad = m is not None and m.dtype != np.bool_
    if m is None or m.dtype == np.bool_:
        m = ~hidden if m is None else np.where(hidden, False, m)
    else:
        m = np.where(hidden, -np.inf, m).astype(m.dtype)
    unit = (...,) + (None,) + (slice(None),) * 2
    mm = m[unit]
    dq, dk, dv, dm = ref.scaled_dot_product_attention_backward(
        kw["grad_out"][unit], q[unit], k[unit], v[unit], *ref.scaled_dot_product_attention(
            q[unit], k[unit], v[unit], mm, kw["dropout_p"], scale=kw["scale"], key_lengths=kw["key_lengths"],
            seed=kw["seed"], return_lse=True),
        mm, kw["dropout_p"], scale=kw["scale"], key_lengths=kw["key_lengths"], seed=kw["seed"],
        grad_weights=None if kw["grad_weights"] is None else kw["grad_weights"][unit])
    grads = [dq[..., 0, :, :], dk[..., 0, :, :], dv[..., 0, :, :]]
    if mask_grad:
        grads.append(np.where(hidden, 0, np.broadcast_to(dm, mm.shape)[..., 0, :, :]).astype(q.dtype))
    return tuple(grads)


# --- additive attention -------------------------------------------------------------------------

def _additive_grad_make(c: Case) -> dict:
    kw = _additive_attention_make(c)
    kw.pop("return_weights")
    kw["attn_mask"] = kw.pop("mask")
    kw["grad_out"] = c.array(kw["query"].shape[:-1] + (kw["value"].shape[-1],))
    if c.opt("grad_weights"):
        kw["grad_weights"] = c.array(kw["query"].shape[:-1] + (kw["key"].shape[-2],))
    return kw


ADDITIVE_ARGS = ("query", "key", "value", "w_query", "w_key", "v")


def additive_lse(q, k, w_query, w_key, v, bias=None, attn_mask=None, key_lengths=None):
    """The additive forward's log-sum-exp per query row from the formula (-inf for empty rows)."""
    qp = q @ w_query + (0 if bias is None else bias)
    e = np.tanh(qp[..., :, None, :] + (k @ w_key)[..., None, :, :]) @ v
    hidden = np.zeros(e.shape, bool)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        hidden = hidden | (~m if m.dtype == np.bool_ else m == -np.inf)
        if m.dtype != np.bool_:
            e = e + m
    if key_lengths is not None:
        hidden = hidden | (np.arange(e.shape[-1]) >= np.asarray(key_lengths)[..., None, None])
    e = np.where(hidden, -np.inf, e)
    top = np.max(e, axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(e - top), axis=-1)) + top[..., 0]).astype(e.dtype)


def _additive_grad(module, kw):
    kw = dict(kw)
    g, gw = kw.pop("grad_out"), kw.pop("grad_weights", None)
    args = [kw.pop(n) for n in ADDITIVE_ARGS]
    out = module.additive_attention(*args, **kw)
    dtype = compute_dtype(*[a for a in args if a is not None])
    lse = additive_lse(*(np.asarray(a, dtype) for a in (args[0], args[1], args[3], args[4], args[5])),
                       bias=None if kw.get("bias") is None else kw["bias"].astype(dtype),
                       attn_mask=kw.get("attn_mask"), key_lengths=kw.get("key_lengths"))
    grads = module.additive_attention_backward(g, *args, out, lse, grad_weights=gw, **kw)
    return [grads[n] for n in ADDITIVE_ARGS + ("bias", "attn_mask")]


def _additive_grad_call(kw):
    return _present(_additive_grad(attnext, kw))


def _additive_grad_ref(kw):
    dtype = compute_dtype(*[kw[n] for n in ADDITIVE_ARGS])
    return _like_args(_additive_grad(ref, _in(kw, dtype)), kw, ADDITIVE_ARGS + ("bias", "attn_mask"))


def _additive_vjp_call(kw):
    kw = _from_vjp(kw)
    g, gw = kw.pop("grad_out"), kw.pop("grad_weights", None)
    args = [kw.pop(n) for n in ADDITIVE_ARGS]
    out, pullback = attnext.vjp(attnext.additive_attention, *args, return_weights=gw is not None, **kw)
    grads = pullback((g, gw) if gw is not None else g)
    return _present(list(grads) + [grads[n] for n in ("bias", "attn_mask") if isinstance(kw.get(n), np.ndarray)])


# --- _core additive backward (raw keys, and keys prepared by additive_keys) ----------------------

def _core_additive_grad_make(c: Case) -> dict:
    kw = _core_additive_attention_make(c)
    kw.pop("return_weights")
    kw["grad_out"] = c.array(kw["query"].shape[:-1] + (kw["value"].shape[-1],))
    kw["grad_weights"] = c.array(kw["query"].shape[:-1] + (kw["key"].shape[-2],)) if c.opt("grad_weights") else None
    return kw


CORE_ADDITIVE_GRADS = ("query", "w_query", "bias", "v", "value", "keys_raw", "key", "w_key", "mask")


def _core_additive_grad_call(prepared: bool):
    def call(kw):
        kw = dict(kw)
        m = kw["mask"]
        mask_grad = isinstance(m, np.ndarray) and m.dtype != np.bool_
        if prepared:
            raw, expo, ok = _core.additive_keys(kw.pop("key"), kw.pop("w_key"))
            grads = _core.additive_attention_backward(**kw, keys_raw=raw, keys_exp=expo, keys_ok=ok,
                                                      mask_grad=mask_grad)
        else:
            grads = _core.additive_attention_keys_backward(**kw, mask_grad=mask_grad)
        return tuple(grads[n] for n in CORE_ADDITIVE_GRADS if grads.get(n) is not None)
    return call


def _core_additive_grad_ref(prepared: bool):
    def reference(kw):
        m = kw["mask"]

        def twin(key, w_key):
            return ref.additive_attention_backward(kw["grad_out"], kw["query"], key, kw["value"], kw["w_query"], w_key,
                                                   kw["v"], None, None, bias=kw["bias"], attn_mask=m,
                                                   key_lengths=kw["key_lengths"], grad_weights=kw["grad_weights"])

        r = twin(attnext.project_keys(kw["key"], kw["w_key"]), None)  # "key" is then d(key w_key)
        grads = dict(query=r["query"], w_query=r["w_query"], bias=r["bias"], v=r["v"], value=r["value"],
                     keys_raw=r["key"])
        if not prepared:
            raw = twin(kw["key"], kw["w_key"])
            grads.update(key=raw["key"], w_key=raw["w_key"])
        if m is not None and m.dtype != np.bool_:
            grads["mask"] = np.broadcast_to(r["attn_mask"], m.shape)
        dtype = kw["query"].dtype
        return tuple(np.asarray(grads[n]).astype(dtype) for n in CORE_ADDITIVE_GRADS if grads.get(n) is not None)
    return reference


def _core_linear_grad_make(c: Case) -> dict:
    kw = _core_linear_make(c)
    x, w = kw["x"], kw["weight"]
    kw["grad"] = c.array(x.shape[:2] + (w.shape[0],))
    kw["want_bias"] = kw.pop("bias") is not None
    return kw


def _core_linear_grad_ref(kw):
    x = kw["x"]
    flat = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],))
    dx, dw, db = ref.linear_backward(kw["grad"], flat, kw["weight"], np.zeros(kw["weight"].shape[0], x.dtype)
                                     if kw["want_bias"] else None)
    return tuple(np.asarray(g).astype(x.dtype) for g in (np.asarray(dx).reshape(x.shape), dw, db) if g is not None)


# --- softmax, weighted_sum, score, linear ---------------------------------------------------------

def _softmax_grad_make(c: Case) -> dict:
    x = c.array(c.batch + (c.lq, c.lk), scale=3.0)
    return dict(x=x, grad=c.array(x.shape), axis=-1 if x.ndim < 2 else -2 if c.opt("softmax_axis") == -2 else -1)


def _softmax_grad(module, kw):
    w = module.softmax(kw["x"], axis=kw["axis"])
    return (module.softmax_backward(kw["grad"], w, axis=kw["axis"]),)


def _softmax_grad_ref(kw):
    dtype = compute_dtype(kw["x"], kw["grad"])
    return tuple(g.astype(native(kw["x"].dtype)) for g in _softmax_grad(ref, _in(kw, dtype)))


def _ws_grad_make(c: Case) -> dict:
    w = c.array(c.batch + (c.lq, c.lk))
    return dict(grad=c.array(c.batch + (c.lq, c.dv)), weights=w, value=c.array(c.batch + (c.lk, c.dv)))


def _ws_grad_ref(kw):
    dtype = compute_dtype(kw["grad"], kw["weights"], kw["value"])
    return _like_args(ref.weighted_sum_backward(**_in(kw, dtype)), kw, ("weights", "value"))


def _score_grad_make(method):
    def make(c: Case) -> dict:
        kw = _score_make(method)(c)
        kw["grad"] = c.array(kw["query"].shape[:-1] + (kw["key"].shape[-2],))
        return kw
    return make


def _score_grad_ref(kw):
    dtype = compute_dtype(*[v for v in kw.values() if isinstance(v, np.ndarray)])
    grads = ref.score_backward(**_in(kw, dtype))
    return tuple(np.asarray(grads[n]).astype(kw[n].dtype) for n in sorted(grads) if grads[n] is not None)


def _linear_grad_make(c: Case) -> dict:
    x = c.array(c.batch + (c.lq, c.d))
    return dict(grad=c.array(c.batch + (c.lq, c.units)), x=x, weight=c.array((c.units, c.d)),
                bias=c.array((c.units,)) if c.opt("bias") else None)


def _linear_grad_ref(kw):
    dtype = compute_dtype(kw["grad"], kw["x"], kw["weight"])
    return _like_args(ref.linear_backward(**_in(kw, dtype)), kw, ("x", "weight", "bias"))


SDPA_GRAD_OPTIONS = ("key_lengths", "window", "scale", "gqa", "dropout", "grad_weights")

GRAD_KERNELS: list[Kernel] = [
    Kernel("scaled_dot_product_attention_backward", _sdpa_grad_make, lambda kw: _present(_sdpa_grad(attnext, kw)),
           _sdpa_grad_ref, uses_mask=True, uses_causal=True, options=SDPA_GRAD_OPTIONS, grad=True),
    Kernel("vjp[scaled_dot_product_attention]", vjp_make(_sdpa_grad_make), _sdpa_vjp_call,
           lambda kw: _sdpa_grad_ref(_from_vjp(kw)), uses_mask=True,
           uses_causal=True, options=SDPA_GRAD_OPTIONS, grad=True),
    Kernel("_core.sdpa_backward", _core_sdpa_grad_make, _core_sdpa_grad_call, _core_sdpa_grad_ref, core=True,
           uses_mask=True, uses_causal=True, options=("key_lengths", "core_window", "scale", "dropout",
                                                      "grad_weights"), grad=True),
    Kernel("additive_attention_backward", _additive_grad_make, _additive_grad_call, _additive_grad_ref,
           uses_mask=True, options=("bias", "key_lengths", "grad_weights"), grad=True),
    Kernel("vjp[additive_attention]", vjp_make(_additive_grad_make), _additive_vjp_call,
           lambda kw: _additive_grad_ref(_from_vjp(kw)), uses_mask=True,
           options=("bias", "key_lengths", "grad_weights"), grad=True),
    Kernel("softmax_backward", _softmax_grad_make, lambda kw: _softmax_grad(attnext, kw), _softmax_grad_ref,
           options=("softmax_axis",), grad=True),
    Kernel("weighted_sum_backward", _ws_grad_make, lambda kw: _present(attnext.weighted_sum_backward(**kw)),
           _ws_grad_ref, grad=True),
    *[Kernel(f"score_backward[{m}]", _score_grad_make(m), lambda kw: _present(attnext.score_backward(**kw)),
             _score_grad_ref, grad=True) for m in ("dot", "scaled_dot", "general", "additive")],
    Kernel("_core.additive_attention_backward", _core_additive_grad_make, _core_additive_grad_call(True),
           _core_additive_grad_ref(True), core=True, uses_mask=True, options=("bias", "key_lengths", "grad_weights"),
           grad=True),
    Kernel("_core.additive_attention_keys_backward", _core_additive_grad_make, _core_additive_grad_call(False),
           _core_additive_grad_ref(False), core=True, uses_mask=True,
           options=("bias", "key_lengths", "grad_weights"), grad=True),
    Kernel("_core.linear_backward", _core_linear_grad_make,
           lambda kw: tuple(g for g in _core.linear_backward(**kw) if g is not None), _core_linear_grad_ref, core=True,
           options=("bias",), grad=True),
    Kernel("linear_backward", _linear_grad_make, lambda kw: _present(attnext.linear_backward(**kw)),
           _linear_grad_ref, options=("bias",), grad=True),
]


def _missing_as_type_error(call):
    """A call wrapper above reads its arguments by name; when the crash fuzzer drops one, the
    wrapper's own KeyError stands for the TypeError the function would raise for a missing
    argument. A KeyError raised inside attnext is not converted: that would be a real bug."""
    @functools.wraps(call)
    def wrapped(kw):
        try:
            return call(kw)
        except KeyError as e:
            if traceback.extract_tb(e.__traceback__)[-1].filename == __file__:
                raise TypeError(f"missing argument {e}") from None
            raise
    return wrapped


GRAD_KERNELS = [dataclasses.replace(k, call=_missing_as_type_error(k.call)) for k in GRAD_KERNELS]
