"""Registry entries for issue 17's bfloat16 entry points (appended to ``kernels.KERNELS``, so
validation, non-finite and extreme values, concurrency, determinism, leaks, racing arguments
and fuzzing cover them like every other entry).

Each entry takes a forward entry's generator and draws its arrays in ``ml_dtypes.bfloat16``
whatever dtype the suite asked for (float masks too: the public API reads them as float32).
The reference is the twin in :mod:`attnext.reference` called with the same bfloat16 arguments:
it applies the kernels' rounding points to an exact computation (docs/precision.md), so outputs
are held to ``low_precision_tolerance(bfloat16, roundings)`` with the entry's count of rounding
points. Empty when ml_dtypes is not installed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import attnext
from attnext import reference as ref

from .kernels import (MHA_CONFIG, MHA_WEIGHTS, Case, Kernel, _additive_attention_make, _attention_make, _mha_make,
                      _score_make, _sdpa_make, _softmax_make, _tuple, _ws_make)

try:
    import ml_dtypes
except ImportError:  # the bfloat16 entries need NumPy's bfloat16
    ml_dtypes = None


def _bf16(make):
    """make, drawing every array of the call in bfloat16 (one dtype: no mixed inputs)."""
    def wrapped(c: Case) -> dict:
        return make(dataclasses.replace(c, dtype=ml_dtypes.bfloat16, dtype2=None))
    return wrapped


def _public(name: str):
    """(call, reference) of a public function: attnext's and its twin's, the same arguments."""
    return (lambda kw: _tuple(getattr(attnext, name)(**kw)), lambda kw: _tuple(getattr(ref, name)(**kw)))


def _mha_call(kw):
    kw = dict(kw)
    config = {n: kw.pop(n) for n in MHA_CONFIG if n in kw}
    state = {n: kw.pop(n) for n in MHA_WEIGHTS if n in kw}
    bias = "in_proj_bias" in state
    layer = attnext.MultiHeadAttention(**config, bias=bias, dtype=ml_dtypes.bfloat16)
    layer.load_state_dict(state)
    return _tuple(layer(**kw))


def _mha_ref(kw):
    e, heads, kv_heads = kw["embed_dim"], kw["num_heads"], kw["num_kv_heads"]
    kvw = kv_heads * (e // heads)
    if "in_proj_weight" in kw:
        w = kw["in_proj_weight"]
        wq, wk, wv = w[:e], w[e:e + kvw], w[e + kvw:]
    else:
        wq, wk, wv = kw["q_proj_weight"], kw["k_proj_weight"], kw["v_proj_weight"]
    biases = {}
    if "in_proj_bias" in kw:
        b = kw["in_proj_bias"]
        biases = dict(q_bias=b[:e], k_bias=b[e:e + kvw], v_bias=b[e + kvw:], out_bias=kw["out_proj.bias"])
    query = kw["query"]
    key = kw.get("key", query)
    return ref.multi_head_attention(query, key, kw.get("value", key), heads, wq, wk, wv, kw["out_proj.weight"],
                                    num_kv_heads=kv_heads, attn_mask=kw["attn_mask"], is_causal=kw["is_causal"],
                                    key_lengths=kw.get("key_lengths"), **biases)


def _entries() -> list:
    if ml_dtypes is None:
        return []
    public = [
        ("score[scaled_dot]", _score_make("scaled_dot"), "score", {}),
        ("score[additive]", _score_make("additive"), "score", {}),
        ("softmax", _softmax_make, "softmax", dict(uses_mask=True, options=("softmax_axis",))),
        ("weighted_sum", _ws_make, "weighted_sum", {}),
        ("attention[scaled_dot]", _attention_make("scaled_dot"), "attention",
         dict(uses_mask=True, uses_causal=True, roundings=3)),
        ("attention[additive]", _attention_make("additive"), "attention", dict(uses_mask=True, uses_causal=True)),
        ("scaled_dot_product_attention", _sdpa_make, "scaled_dot_product_attention",
         dict(uses_mask=True, uses_causal=True, options=("key_lengths", "window", "scale"), roundings=3)),
        ("additive_attention", _additive_attention_make, "additive_attention",
         dict(uses_mask=True, options=("bias", "key_lengths"))),
    ]
    entries = [Kernel(f"{name}[bfloat16]", _bf16(make), *_public(fn), low_precision=True, **extra)
               for name, make, fn, extra in public]
    # MultiHeadAttention's intermediate stores (docs/precision.md) add their rounding points.
    entries.append(Kernel("MultiHeadAttention[bfloat16]", _bf16(_mha_make), _mha_call, _mha_ref, uses_mask=True,
                          uses_causal=True, options=("heads", "gqa", "packed", "self_attention", "bias", "mask_2d",
                                                     "key_lengths"), low_precision=True, roundings=9))
    return entries


LOWP_KERNELS = _entries()
