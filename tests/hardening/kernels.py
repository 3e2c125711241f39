"""The registry every hardening suite runs over: one entry per public function (and per
``attnext._core`` function), each with a generator of valid arguments and the NumPy
reference that must agree with it.

Adding a kernel to the validation, fuzz, crash-fuzz, concurrency, determinism and leak suites
is one ``Kernel(...)`` entry in ``KERNELS`` below:

- ``make(case)`` returns the keyword arguments of one valid call, built from a :class:`Case`
  (seeded rng, dtype, sizes, layout, mask kind, causal flag, and named ``options`` such as
  ``key_lengths`` or ``gqa``); it uses what it needs. ``options`` lists the option names the
  entry reads (their choices are ``OPTION_CHOICES``; hypothesis draws them, see strategies.py).
- ``call(kw)`` runs the kernel, ``reference(kw)`` the NumPy twin; both return a tuple of arrays.
- ``core`` is True for direct ``attnext._core`` entries (their arguments are never promoted,
  broadcast or converted, so the crash fuzzer aims at them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

import attnext
from attnext import _core
from attnext import reference as ref

from .harness import LAYOUTS, layout as with_layout, low_precision_tolerance, relative_error, tolerance  # noqa: F401

MASKS = ("none", "bool", "float", "float_ninf", "bool_broadcast")
CAUSAL = (False, True, "bottom_right")

# Named options of the generators: every choice a generator can make beyond sizes, dtypes,
# layouts and masks. The first choice is the default (what a Case without that option gets).
OPTION_CHOICES = {
    "softmax_axis": (-1, -2, 0, 1, -3, 2),  # an axis that the array lacks falls back to -1
    "key_lengths": (False, True),  # pass key_lengths (random lengths in [0, Lk])
    "window": (None, (0, 0), (1, None), (0, 2), (2, 1)),  # SDPA's (left, right) window
    "core_window": ((-1, -1), (0, 0), (1, -1), (-1, 2), (2, 1), (0, 2)),  # _core.sdpa's; -1 = unbounded
    "scale": (None, 0.3),  # SDPA's scale (None: 1/sqrt(E))
    "bias": (False, True),  # an additive bias / linear bias / MHA in_proj and out_proj biases
    "heads": (1, 2, 3),  # MHA query heads
    "gqa": (False, True),  # MHA with one key/value head (multi-query attention)
    "packed": (True, False),  # MHA: kdim == vdim == embed_dim, one packed in_proj_weight
    "self_attention": (False, True),  # MHA (packed only): query alone, key = value = query
    "mask_2d": (False, True),  # MHA: an (L, S) mask instead of (B, H, L, S)
    "key_extra": (1, 2),  # Bahdanau: key_dim = query_dim + key_extra
    "normalize": (False, True),  # Bahdanau: weight-normalised g v / ||v|| and a bias inside the tanh
    "single_step": (False, True),  # RNN layers: one decoder step (B, D) instead of (B, T, D)
    "separate_values": (True, False),  # RNN layers: values given (else the keys are the values)
    "learn_scale": (False, True),  # Luong: a learnable scalar g on the scores
    "exclude_self": (False, True),  # SelfAttention: no position attends to itself
    "dropout": (False, True),  # backward entries: dropout_p 0.3 with a fixed seed
    "grad_weights": (False, True),  # backward entries: a cotangent for the returned weights too
}
# Every feature on (one choice per option) for the suites that run one fixed case per entry.
FULL_OPTIONS = dict(softmax_axis=-2, key_lengths=True, window=(1, 2), core_window=(1, 2), scale=0.3, bias=True, heads=2,
                    gqa=True, packed=True, self_attention=False, mask_2d=False, key_extra=2, normalize=True,
                    single_step=False, separate_values=True, learn_scale=True, exclude_self=True, dropout=True,
                    grad_weights=True)


@dataclass
class Case:
    """Everything a generator may draw on. Sizes may be 0 (empty sequences are legal)."""

    seed: int = 0
    dtype: object = np.float64
    dtype2: object = None  # a second dtype for mixed-dtype public calls (None = same)
    batch: tuple = (2,)
    lq: int = 5
    lk: int = 7
    d: int = 4
    dv: int = 3
    units: int = 6
    layout: str = "C"
    mask: str = "none"
    causal: object = False
    options: dict = field(default_factory=dict)  # named choices (OPTION_CHOICES); missing = default
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def opt(self, name: str):
        """The value of option `name` (its first choice unless this case sets it)."""
        return self.options[name] if name in self.options else OPTION_CHOICES[name][0]

    def fresh(self) -> "Case":
        return replace(self)

    def array(self, shape, dtype=None, scale=1.0) -> np.ndarray:
        """Random normal values of `shape` in this case's layout."""
        dtype = np.dtype(dtype or self.dtype)
        shape = tuple(shape)
        base = (self.rng.standard_normal(shape) * scale).astype(dtype)
        return with_layout(base, self.layout)

    def mask_for(self, shape, dtype=None):
        """A mask for scores of `shape` (bool True = may attend, or float added), or None."""
        dtype = np.dtype(dtype or self.dtype)
        if self.mask == "none":
            return None
        if self.mask in ("bool", "bool_broadcast"):
            mshape = shape if self.mask == "bool" else (1,) * (len(shape) - 1) + shape[-1:]
            m = self.rng.random(mshape) < 0.7
            if m.size and m.ndim >= 2 and self.mask == "bool":
                m.reshape(-1, mshape[-1])[0] = False  # one row with nothing to attend
            return m
        m = self.rng.standard_normal(shape).astype(dtype)
        if self.mask == "float_ninf" and m.size:
            m[self.rng.random(shape) < 0.3] = -np.inf
        return m


@dataclass
class Kernel:
    name: str
    make: Callable[[Case], dict]
    call: Callable[[dict], tuple]
    reference: Callable[[dict], tuple]
    core: bool = False
    # Whether the generator supports masks / causal (fuzzers only vary what it uses).
    uses_mask: bool = False
    uses_causal: bool = False
    options: tuple = ()  # the OPTION_CHOICES names make() reads
    # A backward entry (grad_kernels.py): its gradients come in their arguments' dtypes, so it
    # draws float32/float64 only (no float16 upcast, no mixed dtypes).
    grad: bool = False
    # A bfloat16 entry (lowp_kernels.py): it draws its arrays in bfloat16 whatever the case's
    # dtype, and its 16-bit outputs may lie `roundings` ulps from the reference (one per
    # rounding point where the two can land apart, docs/precision.md).
    low_precision: bool = False
    roundings: int = 2
    # A bfloat16 entry's rounding points ahead of its softmax that the kernel and the reference
    # may resolve one ulp apart (a layer's projections; SDPA's Q * scale, whose fold the kernel
    # decides per block and the reference over all of Q): its float32 outputs (the attention
    # weights) are held to that many bfloat16 ulps instead of float32's tolerance.
    weight_roundings: int = 0


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def compute_dtype(*arrays) -> np.dtype:
    """The dtype attnext computes in: NumPy's promotion, float16 as float32, native byte order."""
    dt = np.result_type(*arrays)
    return np.dtype(np.float32) if dt == np.float16 else np.dtype(dt.type)


def _ref_inputs(kw, dtype):
    """kw with every float array cast to the computing dtype (the reference computes in the
    inputs' dtype; attnext upcasts float16 to float32)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            v = v.astype(dtype)
        out[k] = v
    return out


# --- public functions -------------------------------------------------------------------


def _score_make(method):
    def make(c: Case):
        kw = dict(query=c.array(c.batch + (c.lq, c.d)),
                  key=c.array(c.batch + (c.lk, c.d + (1 if method in ("general", "additive") else 0)),
                              c.dtype2),
                  method=method)
        dk = kw["key"].shape[-1]
        if method == "general":
            kw["weight"] = c.array((c.d, dk))
        if method == "additive":
            kw.update(w_query=c.array((c.d, c.units)), w_key=c.array((dk, c.units)), v=c.array((c.units,)))
        return kw
    return make


def _score_ref(kw):
    dtype = compute_dtype(*[v for v in kw.values() if isinstance(v, np.ndarray)])
    kw = _ref_inputs(kw, dtype)
    return (ref.score(**kw).astype(dtype),)


def _softmax_make(c: Case):
    x = c.array(c.batch + (c.lq, c.lk), scale=3.0)
    axis = c.opt("softmax_axis")
    return dict(x=x, mask=c.mask_for(x.shape), axis=axis if -x.ndim <= axis < x.ndim else -1)


def _softmax_ref(kw):
    dtype = compute_dtype(kw["x"])
    x = kw["x"].astype(dtype)
    m = kw["mask"]
    if m is not None and m.dtype != np.bool_:
        m = m.astype(dtype)
    return (ref.softmax(x, mask=m, axis=kw["axis"]),)


def _ws_make(c: Case):
    return dict(weights=c.array(c.batch + (c.lq, c.lk)), value=c.array(c.batch + (c.lk, c.dv), c.dtype2))


def _ws_ref(kw):
    dtype = compute_dtype(kw["weights"], kw["value"])
    return (ref.weighted_sum(kw["weights"].astype(dtype), kw["value"].astype(dtype)),)


def _attention_make(method):
    def make(c: Case):
        kw = _score_make(method)(c)
        kw["value"] = c.array(c.batch + (c.lk, c.dv))
        kw["mask"] = c.mask_for(c.batch + (c.lq, c.lk))
        kw["is_causal"] = c.causal
        kw["return_weights"] = True
        return kw
    return make


def _attention_ref(kw):
    arrays = [v for v in kw.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    dtype = compute_dtype(*arrays)
    kw = _ref_inputs(kw, dtype)
    if kw["mask"] is not None and kw["mask"].dtype != np.bool_:
        kw["mask"] = kw["mask"].astype(dtype)
    return tuple(r.astype(dtype) for r in ref.attention(**kw))


def _sdpa_make(c: Case):
    batch = c.batch if len(c.batch) >= 1 else (1,)
    q = c.array(batch + (c.lq, c.d))
    k = c.array(batch + (c.lk, c.d), c.dtype2)
    v = c.array(batch + (c.lk, c.dv))
    kw = dict(query=q, key=k, value=v, attn_mask=c.mask_for(batch + (c.lq, c.lk)), is_causal=c.causal,
              return_weights=True, return_lse=True)
    if c.opt("key_lengths") and c.lk:  # key_lengths over the dimensions before the heads
        kw["key_lengths"] = c.rng.integers(0, c.lk + 1, size=batch[:-1])
    if c.opt("window") is not None:
        kw["window"] = c.opt("window")
    if c.opt("scale") is not None:
        kw["scale"] = c.opt("scale")
    return kw


def _sdpa_ref(kw):
    dtype = compute_dtype(kw["query"], kw["key"], kw["value"])
    kw = _ref_inputs(kw, dtype)
    if kw.get("attn_mask") is not None and kw["attn_mask"].dtype != np.bool_:
        kw["attn_mask"] = kw["attn_mask"].astype(dtype)
    return tuple(r.astype(dtype) for r in ref.scaled_dot_product_attention(**kw))


# --- _core functions (no promotion, no broadcasting: equal batch shapes, one dtype) -----


def _core_product_make(general):
    def make(c: Case):
        kw = dict(query=c.array(c.batch + (c.lq, c.d)), key=c.array(c.batch + (c.lk, c.d + general)),
                  weight=c.array((c.d, c.d + general)) if general else None, scale=0.5)
        return kw
    return make


def _core_product_ref(kw):
    q, k, w = kw["query"], kw["key"], kw["weight"]
    s = ref.score(q, k, "dot") if w is None else ref.score(q, k, "general", weight=w)
    return ((s * q.dtype.type(kw["scale"])).astype(q.dtype),)


def _core_additive_make(c: Case):
    return dict(query=c.array(c.batch + (c.lq, c.d)), key=c.array(c.batch + (c.lk, c.d + 1)),
                w_query=c.array((c.d, c.units)), w_key=c.array((c.d + 1, c.units)), v=c.array((c.units,)),
                bias=c.array((c.units,)) if c.opt("bias") else None, scale=1.5)


def _core_additive_ref(kw):
    q, k = kw["query"], kw["key"]
    qp = q @ kw["w_query"]
    if kw["bias"] is not None:
        qp = qp + kw["bias"]
    kp = k @ kw["w_key"]
    s = np.tanh(qp[..., :, None, :] + kp[..., None, :, :]) @ kw["v"]
    return ((s * q.dtype.type(kw["scale"])).astype(q.dtype),)


def _core_softmax_make(c: Case):
    x = c.array(c.batch + (c.lq, c.lk), scale=3.0)
    mask = c.mask_for(x.shape)
    if mask is not None:
        mask = np.broadcast_to(mask, x.shape)
    causal = c.causal is not False
    offset = (c.lk - c.lq if c.causal == "bottom_right" else 0) if causal else 0
    return dict(x=x, mask=mask, causal=causal, causal_offset=offset)


def _core_softmax_ref(kw):
    x = kw["x"]
    s = x
    if kw["causal"]:
        lq, lk = x.shape[-2:]
        s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + kw["causal_offset"], x, -np.inf)
    return (ref.softmax(s.astype(x.dtype), mask=kw["mask"]),)


def _core_ws_make(c: Case):
    return dict(weights=c.array(c.batch + (c.lq, c.lk)), value=c.array(c.batch + (c.lk, c.dv)))


# --- fused additive attention, fused SDPA and the linear layer kernel ---------------------


def _additive_attention_make(c: Case):
    kw = dict(query=c.array(c.batch + (c.lq, c.d)), key=c.array(c.batch + (c.lk, c.d + 1), c.dtype2),
              value=c.array(c.batch + (c.lk, c.dv)), w_query=c.array((c.d, c.units)),
              w_key=c.array((c.d + 1, c.units)), v=c.array((c.units,)),
              bias=c.array((c.units,)) if c.opt("bias") else None, mask=c.mask_for(c.batch + (c.lq, c.lk)),
              return_weights=True)
    if c.opt("key_lengths"):  # key_lengths over the batch dimensions
        kw["key_lengths"] = c.rng.integers(0, c.lk + 1, size=c.batch)
    return kw


def _additive_attention_ref(kw):
    arrays = [v for v in kw.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    dtype = compute_dtype(*arrays)
    kw = _ref_inputs(kw, dtype)
    return tuple(r.astype(dtype) for r in ref.additive_attention(**kw))


def _core_additive_attention_make(c: Case):
    kw = _additive_attention_make(c)
    kw["key"] = c.array(c.batch + (c.lk, c.d + 1))  # one dtype, no promotion in _core
    if kw["mask"] is not None:
        kw["mask"] = np.broadcast_to(kw["mask"], c.batch + (c.lq, c.lk))
    if "key_lengths" not in kw:
        kw["key_lengths"] = None
    return kw


def _core_additive_attention_call(kw):
    # Keyword calls throughout, so a dropped or unknown argument is a TypeError, as for **kw.
    keys = {n: v for n, v in kw.items() if n in ("key", "w_key")}
    rest = {n: v for n, v in kw.items() if n not in ("key", "w_key")}
    raw, expo, ok = _core.additive_keys(**keys)
    return _tuple(_core.additive_attention(keys_raw=raw, keys_exp=expo, keys_ok=ok, **rest))


def _core_additive_attention_keys_call(kw):
    # Raw keys projected inside the call (the path attnext.additive_attention takes when the
    # keys have the query's batch shape).
    return _tuple(_core.additive_attention_keys(**kw))


def _core_sdpa_make(c: Case):
    q = c.array(c.batch + (c.lq, c.d))
    k = c.array(c.batch + (c.lk, c.d))
    v = c.array(c.batch + (c.lk, c.dv))
    mask = c.mask_for(c.batch + (c.lq, c.lk))
    causal = c.causal is not False
    offset = (c.lk - c.lq if c.causal == "bottom_right" else 0) if causal else 0
    kw = dict(query=q, key=k, value=v, attn_mask=None if mask is None else np.broadcast_to(mask, c.batch + (c.lq, c.lk)),
              causal=causal, causal_offset=offset, window_left=-1, window_right=-1, key_lengths=None,
              scale=c.opt("scale") or 1.0 / math.sqrt(max(c.d, 1)), return_weights=True, return_lse=True)
    if c.opt("key_lengths"):  # one length per batch entry (heads included: _core takes the whole batch shape)
        kw["key_lengths"] = c.rng.integers(0, c.lk + 1, size=c.batch).astype(np.int64)
    kw["window_left"], kw["window_right"] = c.opt("core_window")
    return kw


def _core_sdpa_ref(kw):
    # The public reference with an extra unit axis before (Lq, E): its key_lengths then cover
    # every batch dimension, as _core.sdpa's do.
    q, k, v = kw["query"], kw["key"], kw["value"]
    m = kw["attn_mask"]
    lq, lk = q.shape[-2], k.shape[-2]
    hidden = np.zeros((lq, lk), bool)
    if kw["causal"]:
        hidden |= np.arange(lk)[None, :] > np.arange(lq)[:, None] + kw["causal_offset"]
    if m is not None and m.dtype == np.bool_:
        m = np.where(hidden, False, m)
    elif m is not None:
        m = np.where(hidden, -np.inf, m).astype(m.dtype)
    else:
        m = ~hidden
    window = None
    if kw["window_left"] >= 0 or kw["window_right"] >= 0:
        window = tuple(None if w < 0 else w for w in (kw["window_left"], kw["window_right"]))
    out, w, lse = ref.scaled_dot_product_attention(
        q[..., None, :, :], k[..., None, :, :], v[..., None, :, :], attn_mask=m[..., None, :, :] if m.ndim > 2 else m,
        scale=kw["scale"], key_lengths=kw["key_lengths"], window=window, return_weights=True, return_lse=True)
    return tuple(r[..., 0, :, :] if r.ndim == q.ndim + 1 else r[..., 0, :] for r in (out, w, lse))


def _core_linear_make(c: Case):
    b = int(np.prod(c.batch)) if c.batch else 2
    x = c.array((b, c.lq, c.dv, c.d))
    return dict(x=x, weight=c.array((c.units, c.dv * c.d)), bias=c.array((c.units,)) if c.opt("bias") else None)


def _core_linear_ref(kw):
    x, w, b = kw["x"], kw["weight"], kw["bias"]
    y = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],)) @ w.T
    if b is not None:
        y = y + b
    return (y.astype(x.dtype),)


# --- layers: the weights travel in kw under the layer's state-dict names ---------------------

MHA_CONFIG = ("embed_dim", "num_heads", "num_kv_heads", "kdim", "vdim")
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
               "out_proj.weight", "out_proj.bias")


def _mha_make(c: Case):
    heads = c.opt("heads")
    kv_heads = 1 if c.opt("gqa") else heads  # grouped-query (multi-query) attention
    hd = max(c.d, 1)
    e, kvw = heads * hd, kv_heads * hd
    packed = c.opt("packed")  # kdim == vdim == embed_dim: one packed in_proj_weight
    kdim, vdim = (e, e) if packed else (c.units + 1, c.dv + 1)
    b = int(np.prod(c.batch)) if c.batch else 1
    kw = dict(query=c.array((b, c.lq, e)))
    self_attention = packed and c.opt("self_attention")  # query only: self-attention, one GEMM for Q, K, V
    if self_attention:
        lk = c.lq
    else:
        lk = c.lk
        kw["key"] = c.array((b, lk, kdim), c.dtype2)
        kw["value"] = c.array((b, lk, vdim))
    kw.update(embed_dim=e, num_heads=heads, num_kv_heads=kv_heads, kdim=kdim, vdim=vdim)
    if packed:
        kw["in_proj_weight"] = c.array((e + 2 * kvw, e), scale=0.5)
    else:
        kw.update(q_proj_weight=c.array((e, e), scale=0.5), k_proj_weight=c.array((kvw, kdim), scale=0.5),
                  v_proj_weight=c.array((kvw, vdim), scale=0.5))
    bias = c.opt("bias")
    if bias:
        kw["in_proj_bias"] = c.array((e + 2 * kvw,))
    kw["out_proj.weight"] = c.array((e, e), scale=0.5)
    if bias:
        kw["out_proj.bias"] = c.array((e,))
    m = c.mask_for((b, heads, c.lq, lk))
    if m is not None and (m.shape != (b, heads, c.lq, lk) or c.opt("mask_2d")):
        m = np.ascontiguousarray(np.broadcast_to(c.mask_for((c.lq, lk)), (c.lq, lk)))  # the (L, S) form
    kw.update(attn_mask=m, is_causal=c.causal)
    if c.opt("key_lengths") and lk:
        kw["key_lengths"] = c.rng.integers(0, lk + 1, size=b)
    kw.update(need_weights=True, average_attn_weights=False)
    return kw


def _float_arrays(kw):
    return [v for v in kw.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]


def _layer(cls, kw: dict, config_names, weight_names, dtype=None, **fixed):
    """(layer, the call's keyword arguments): ``cls`` built from the config ints in kw and
    loaded with the state dict in kw, in ``dtype`` (None: the computing dtype of kw's float
    arrays, float64 when there are none); ``fixed`` adds constructor arguments."""
    kw = dict(kw)
    config = {n: kw.pop(n) for n in config_names if n in kw}
    state = {n: kw.pop(n) for n in weight_names if n in kw}
    if dtype is None:
        floats = _float_arrays(kw) + _float_arrays(state)
        dtype = compute_dtype(*floats) if floats else np.dtype(np.float64)
    layer = cls(**config, dtype=dtype, **fixed)
    layer.load_state_dict(state)
    return layer, kw


def _mha_call(kw, dtype=None):
    bias = "in_proj_bias" in kw or "out_proj.bias" in kw
    layer, kw = _layer(attnext.MultiHeadAttention, kw, MHA_CONFIG, MHA_WEIGHTS, dtype, bias=bias)
    return _tuple(layer(**kw))


def _mha_twin(kw):
    """ref.multi_head_attention of an MHA entry's call: the packed in_proj_weight (and bias)
    split into the rows of Q, K and V, key and value defaulting as the layer's do."""
    e, heads, kv_heads = kw["embed_dim"], kw["num_heads"], kw["num_kv_heads"]
    kvw = kv_heads * (e // heads)
    if "in_proj_weight" in kw:
        w = kw["in_proj_weight"]
        wq, wk, wv = w[:e], w[e:e + kvw], w[e + kvw:]
    else:
        wq, wk, wv = kw["q_proj_weight"], kw["k_proj_weight"], kw["v_proj_weight"]
    biases = {"out_bias": kw.get("out_proj.bias")}
    if "in_proj_bias" in kw:
        b = kw["in_proj_bias"]
        biases.update(q_bias=b[:e], k_bias=b[e:e + kvw], v_bias=b[e + kvw:])
    query = kw["query"]
    key = kw.get("key", query)
    return ref.multi_head_attention(query, key, kw.get("value", key), heads, wq, wk, wv, kw["out_proj.weight"],
                                    num_kv_heads=kv_heads, attn_mask=kw["attn_mask"], is_causal=kw["is_causal"],
                                    key_lengths=kw.get("key_lengths"), **biases)


def _mha_ref(kw):
    dtype = compute_dtype(*_float_arrays(kw))
    out, w = _mha_twin(_ref_inputs(kw, dtype))
    return out.astype(dtype), w.astype(dtype)



# Encoder-decoder layers (python/attnext/rnn.py): config ints and the state dict travel in kw,
# the call builds the layer of the inputs' computing dtype, loads the weights and calls it.

BAHDANAU_CONFIG = ("query_dim", "key_dim", "units", "normalize")
BAHDANAU_WEIGHTS = ("w_query", "w_key", "v", "g", "bias")


def _bahdanau_make(c: Case):
    qd, units = max(c.d, 1), max(c.units, 1)
    kd = qd + c.opt("key_extra")
    normalize = c.opt("normalize")  # weight-normalised: g v / ||v|| and a bias inside the tanh
    single = c.opt("single_step")  # one decoder step (B, D) or many (B, T, D)
    kw = dict(query=c.array(c.batch + ((qd,) if single else (c.lq, qd))),
              keys=c.array(c.batch + (c.lk, kd), c.dtype2))
    if c.opt("separate_values"):  # else the keys are the values
        kw["values"] = c.array(c.batch + (c.lk, c.dv))
    if c.opt("key_lengths"):  # key_lengths over the batch dimensions
        kw["key_lengths"] = c.rng.integers(0, c.lk + 1, size=c.batch)
    kw.update(query_dim=qd, key_dim=kd, units=units, normalize=normalize)
    kw.update(w_query=c.array((qd, units), scale=1 / math.sqrt(qd)), w_key=c.array((kd, units), scale=1 / math.sqrt(kd)),
              v=c.array((units,)))
    if normalize:
        kw["g"] = np.asarray(0.5 + c.rng.random(), dtype=c.dtype)
        kw["bias"] = c.array((units,), scale=0.5)
    return kw


def _bahdanau_call(kw, dtype=None):
    # Keyword calls throughout, so a dropped or unknown argument is a TypeError.
    layer, kw = _layer(attnext.BahdanauAttention, kw, BAHDANAU_CONFIG, BAHDANAU_WEIGHTS, dtype)
    memory = layer.precompute(**{n: kw.pop(n) for n in ("keys", "values", "key_lengths") if n in kw})
    return _tuple(layer(memory=memory, **kw))


def _bahdanau_twin(kw):
    values = kw.get("values")
    return ref.bahdanau_attention(kw["query"], kw["keys"], kw["keys"] if values is None else values, kw["w_query"],
                                  kw["w_key"], kw["v"], g=kw.get("g"), bias=kw.get("bias"),
                                  key_lengths=kw.get("key_lengths"))


def _bahdanau_ref(kw):
    dtype = compute_dtype(*_float_arrays(kw))
    return tuple(np.asarray(r).astype(dtype) for r in _bahdanau_twin(_ref_inputs(kw, dtype)))


LUONG_CONFIG = ("query_dim", "key_dim", "method", "attentional_units", "units", "value_dim", "scale")
LUONG_WEIGHTS = ("w_a", "w_query", "w_key", "v", "g", "w_c")


def _luong_make(method):
    def make(c: Case):
        qd = max(c.d, 1)
        kd = qd if method == "dot" else qd + 1
        units, att = max(c.units, 1), max(c.units, 1) + 1
        scale = c.opt("learn_scale")  # a learnable scalar g on the scores
        single = c.opt("single_step")  # one decoder step (B, D) or many (B, T, D)
        kw = dict(query=c.array(c.batch + ((qd,) if single else (c.lq, qd))),
                  keys=c.array(c.batch + (c.lk, kd), c.dtype2))
        if c.opt("separate_values"):  # else the keys are the values
            kw["values"] = c.array(c.batch + (c.lk, max(c.dv, 1)))
        vd = kw["values"].shape[-1] if "values" in kw else kd
        kw["mask"] = c.mask_for(c.batch + ((c.lk,) if single else (c.lq, c.lk)))
        if c.opt("key_lengths"):  # key_lengths over the batch dimensions
            kw["key_lengths"] = c.rng.integers(0, c.lk + 1, size=c.batch)
        kw.update(query_dim=qd, key_dim=kd, method=method, attentional_units=att, value_dim=vd, scale=scale)
        if method == "general":
            kw["w_a"] = c.array((qd, kd), scale=1 / math.sqrt(qd))
        if method == "concat":
            kw.update(units=units, w_query=c.array((qd, units), scale=1 / math.sqrt(qd)),
                      w_key=c.array((kd, units), scale=1 / math.sqrt(kd)), v=c.array((units,)))
        if scale:
            kw["g"] = np.asarray(0.5 + c.rng.random(), dtype=c.dtype)
        kw["w_c"] = c.array((vd + qd, att), scale=1 / math.sqrt(vd + qd))
        return kw
    return make


def _luong_call(kw, dtype=None):
    layer, kw = _layer(attnext.LuongAttention, kw, LUONG_CONFIG, LUONG_WEIGHTS, dtype)
    return _tuple(layer(**kw))


def _luong_twin(kw):
    return ref.luong_attention(kw["query"], kw["keys"], kw.get("values"), kw["w_c"], method=kw["method"],
                               w_a=kw.get("w_a"), w_query=kw.get("w_query"), w_key=kw.get("w_key"), v=kw.get("v"),
                               g=kw.get("g"), mask=kw.get("mask"), key_lengths=kw.get("key_lengths"))


def _luong_ref(kw):
    dtype = compute_dtype(*_float_arrays(kw))
    return tuple(np.asarray(r).astype(dtype) for r in _luong_twin(_ref_inputs(kw, dtype)))

LUONG_OPTIONS = ("learn_scale", "single_step", "separate_values", "key_lengths")

SELF_CONFIG = ("embed_dim", "qk_dim", "v_dim", "exclude_self")
SELF_WEIGHTS = ("query.weight", "key.weight", "value.weight", "query.bias", "key.bias", "value.bias")
SELF_OPTIONS = ("exclude_self", "bias", "key_lengths", "window")


def _self_make(c: Case):
    e, dk, dv = max(c.d, 1), max(c.units, 1), max(c.dv, 1)
    kw = dict(x=c.array(c.batch + (c.lq, e)), attn_mask=c.mask_for(c.batch + (c.lq, c.lq)), is_causal=c.causal,
              window=c.opt("window"), return_weights=True)
    if c.opt("key_lengths"):  # key_lengths over the batch dimensions
        kw["key_lengths"] = c.rng.integers(0, c.lq + 1, size=c.batch)
    kw.update(embed_dim=e, qk_dim=dk, v_dim=dv, exclude_self=c.opt("exclude_self"))
    for name, rows in (("query", dk), ("key", dk), ("value", dv)):
        kw[f"{name}.weight"] = c.array((rows, e), scale=1 / math.sqrt(e))
        if c.opt("bias"):
            kw[f"{name}.bias"] = c.array((rows,), scale=0.5)
    return kw


def _self_call(kw, dtype=None):
    layer, kw = _layer(attnext.SelfAttention, kw, SELF_CONFIG, SELF_WEIGHTS, dtype, bias="query.bias" in kw)
    return _tuple(layer(**kw))


def _self_twin(kw):
    return ref.self_attention(kw["x"], kw["query.weight"].T, kw["key.weight"].T, kw["value.weight"].T,
                              b_query=kw.get("query.bias"), b_key=kw.get("key.bias"), b_value=kw.get("value.bias"),
                              attn_mask=kw["attn_mask"], is_causal=kw["is_causal"], key_lengths=kw.get("key_lengths"),
                              window=kw["window"], exclude_self=kw["exclude_self"], return_weights=True)


def _self_ref(kw):
    dtype = compute_dtype(*_float_arrays(kw))
    return tuple(np.asarray(r).astype(dtype) for r in _self_twin(_ref_inputs(kw, dtype)))

KERNELS: list[Kernel] = [
    Kernel("score[dot]", _score_make("dot"), lambda kw: (attnext.score(**kw),), _score_ref),
    Kernel("score[scaled_dot]", _score_make("scaled_dot"), lambda kw: (attnext.score(**kw),), _score_ref),
    Kernel("score[general]", _score_make("general"), lambda kw: (attnext.score(**kw),), _score_ref),
    Kernel("score[additive]", _score_make("additive"), lambda kw: (attnext.score(**kw),), _score_ref),
    Kernel("softmax", _softmax_make, lambda kw: (attnext.softmax(**kw),), _softmax_ref, uses_mask=True,
           options=("softmax_axis",)),
    Kernel("weighted_sum", _ws_make, lambda kw: (attnext.weighted_sum(**kw),), _ws_ref),
    Kernel("attention[scaled_dot]", _attention_make("scaled_dot"), lambda kw: _tuple(attnext.attention(**kw)),
           _attention_ref, uses_mask=True, uses_causal=True),
    Kernel("attention[additive]", _attention_make("additive"), lambda kw: _tuple(attnext.attention(**kw)),
           _attention_ref, uses_mask=True, uses_causal=True),
    Kernel("scaled_dot_product_attention", _sdpa_make,
           lambda kw: _tuple(attnext.scaled_dot_product_attention(**kw)), _sdpa_ref, uses_mask=True,
           uses_causal=True, options=("key_lengths", "window", "scale")),
    Kernel("_core.score_product", _core_product_make(0), lambda kw: (_core.score_product(**kw),),
           _core_product_ref, core=True),
    Kernel("_core.score_product[weight]", _core_product_make(1), lambda kw: (_core.score_product(**kw),),
           _core_product_ref, core=True),
    Kernel("_core.score_additive", _core_additive_make, lambda kw: (_core.score_additive(**kw),),
           _core_additive_ref, core=True, options=("bias",)),
    Kernel("_core.softmax", _core_softmax_make, lambda kw: (_core.softmax(**kw),), _core_softmax_ref, core=True,
           uses_mask=True, uses_causal=True),
    Kernel("_core.weighted_sum", _core_ws_make, lambda kw: (_core.weighted_sum(**kw),),
           lambda kw: (ref.weighted_sum(kw["weights"], kw["value"]),), core=True),
    Kernel("additive_attention", _additive_attention_make, lambda kw: _tuple(attnext.additive_attention(**kw)),
           _additive_attention_ref, uses_mask=True, options=("bias", "key_lengths")),
    Kernel("_core.sdpa", _core_sdpa_make, lambda kw: tuple(_core.sdpa(**kw)), _core_sdpa_ref, core=True,
           uses_mask=True, uses_causal=True,
           options=("key_lengths", "core_window", "scale")),
    Kernel("_core.additive_attention", _core_additive_attention_make, _core_additive_attention_call,
           _additive_attention_ref, core=True, uses_mask=True, options=("bias", "key_lengths")),
    Kernel("_core.additive_attention_keys", _core_additive_attention_make, _core_additive_attention_keys_call,
           _additive_attention_ref, core=True, uses_mask=True, options=("bias", "key_lengths")),
    Kernel("_core.linear", _core_linear_make, lambda kw: (_core.linear(**kw),), _core_linear_ref, core=True,
           options=("bias",)),
    Kernel("MultiHeadAttention", _mha_make, _mha_call, _mha_ref, uses_mask=True, uses_causal=True,
           options=("heads", "gqa", "packed", "self_attention", "bias", "mask_2d", "key_lengths")),
    Kernel("BahdanauAttention", _bahdanau_make, _bahdanau_call, _bahdanau_ref,
           options=("key_extra", "normalize", "single_step", "separate_values", "key_lengths")),
    Kernel("LuongAttention[dot]", _luong_make("dot"), _luong_call, _luong_ref, uses_mask=True,
           options=LUONG_OPTIONS),
    Kernel("LuongAttention[general]", _luong_make("general"), _luong_call, _luong_ref, uses_mask=True,
           options=LUONG_OPTIONS),
    Kernel("LuongAttention[concat]", _luong_make("concat"), _luong_call, _luong_ref, uses_mask=True,
           options=LUONG_OPTIONS),
    Kernel("SelfAttention", _self_make, _self_call, _self_ref, uses_mask=True, uses_causal=True, options=SELF_OPTIONS),
]

# Issue 15's backward functions and vjp pullbacks (they build on the entries above).
from .grad_kernels import GRAD_KERNELS  # noqa: E402

KERNELS += GRAD_KERNELS

# Issue 17's bfloat16 entry points (none without ml_dtypes).
from .lowp_kernels import LOWP_KERNELS  # noqa: E402

KERNELS += LOWP_KERNELS

BY_NAME = {k.name: k for k in KERNELS}

# The public functions and _core functions the crash fuzzer also calls with arbitrary
# positional garbage (beyond mutating the registry's valid calls).
PUBLIC_FUNCTIONS = {
    "score": attnext.score,
    "softmax": attnext.softmax,
    "weighted_sum": attnext.weighted_sum,
    "attention": attnext.attention,
    "scaled_dot_product_attention": attnext.scaled_dot_product_attention,
    "additive_attention": attnext.additive_attention,
    "project_keys": attnext.project_keys,
    "set_num_threads": attnext.set_num_threads,
}
CORE_FUNCTIONS = {name: getattr(_core, name) for name in dir(_core) if not name.startswith("_")
                  and callable(getattr(_core, name))}

# Exceptions a bad argument may raise (documented in docs/robustness.md). NumPy's
# _ArrayMemoryError is a MemoryError.
DOCUMENTED_ERRORS = (TypeError, ValueError, MemoryError)


max_rel_err = relative_error  # the registry suites' name for the harness's measure


def check_against_reference(kernel: Kernel, kw: dict, tol_dtype=None) -> None:
    got = kernel.call(kw)
    want = kernel.reference(kw)
    assert len(got) == len(want), f"{kernel.name}: {len(got)} outputs, reference {len(want)}"
    # A backward's gradients share the scale of one loss: each is measured against the largest
    # gradient of the call, so one that is zero in exact arithmetic (a single visible key's dq)
    # may carry the rounding noise of the others rather than being held to 1e-30.
    scale = max((float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0)) for w in want), default=0.0) \
        if kernel.grad else 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype == np.float16 and w.dtype == np.float32:
            w = w.astype(g.dtype)  # the float32 result rounded once at the store, as attnext returns it
        assert g.dtype == w.dtype, f"{kernel.name} output {i}: dtype {g.dtype}, reference {w.dtype}"
        err = max_rel_err(g, w)
        if kernel.grad and np.isfinite(err) and w.size:
            own = float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))
            err = err * max(own, 1e-30) / max(scale, own, 1e-30)
        tol = tolerance(tol_dtype or g.dtype)
        if kernel.low_precision and g.dtype.itemsize == 2:
            tol = low_precision_tolerance(g.dtype, kernel.roundings)
        elif kernel.weight_roundings:
            tol = max(tol, low_precision_tolerance("bfloat16", kernel.weight_roundings))
        assert err <= tol, f"{kernel.name} output {i}: max rel err {err:.3g} > {tol:g} for {shapes(kw)}"


def shapes(kw: dict) -> dict:
    return {k: (v.shape, str(v.dtype)) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
