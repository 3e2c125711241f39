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

import attnext
from attnext import reference as ref

from .kernels import (LUONG_OPTIONS, SELF_OPTIONS, Case, Kernel, _additive_attention_make, _attention_make,
                      _bahdanau_call, _bahdanau_make, _bahdanau_twin, _luong_call, _luong_make, _luong_twin, _mha_call,
                      _mha_make, _mha_twin, _score_make, _sdpa_make, _self_call, _self_make, _self_twin, _softmax_make,
                      _tuple, _ws_make)

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


def _layer(call, twin):
    """(call, reference) of a layer entry: the layer built in bfloat16 from the entry's
    arguments, and its twin called with the same bfloat16 arguments."""
    return (lambda kw: call(kw, ml_dtypes.bfloat16), lambda kw: _tuple(twin(kw)))


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
    # The layers' intermediate rounding points (docs/precision.md) add to their counts, each
    # with one of margin as the measure is relative to the largest output.
    entries.append(Kernel("MultiHeadAttention[bfloat16]", _bf16(_mha_make), *_layer(_mha_call, _mha_twin),
                          uses_mask=True, uses_causal=True, options=("heads", "gqa", "packed", "self_attention", "bias",
                                                                     "mask_2d", "key_lengths"),
                          low_precision=True, roundings=9, weight_roundings=3))
    # Bahdanau: the context's store, g v / ||v|| and the bias sum (ahead of the softmax too), margin.
    entries.append(Kernel("BahdanauAttention[bfloat16]", _bf16(_bahdanau_make), *_layer(_bahdanau_call, _bahdanau_twin),
                          options=("key_extra", "normalize", "single_step", "separate_values", "key_lengths"),
                          low_precision=True, roundings=4, weight_roundings=2))
    # Luong: s W_a or v g, SDPA's store and P, the context W_c reads, h~'s store, margin; ahead
    # of the softmax s W_a or v g, and SDPA's Q * g.
    entries += [Kernel(f"LuongAttention[{method}][bfloat16]", _bf16(_luong_make(method)),
                       *_layer(_luong_call, _luong_twin), uses_mask=True, options=LUONG_OPTIONS, low_precision=True,
                       roundings=6, weight_roundings=2) for method in ("dot", "general", "concat")]
    # SelfAttention: Q, K, V, SDPA's store and P, a near-boundary projection, margin; ahead of
    # the softmax Q, K and Q * scale.
    entries.append(Kernel("SelfAttention[bfloat16]", _bf16(_self_make), *_layer(_self_call, _self_twin),
                          uses_mask=True, uses_causal=True, options=SELF_OPTIONS, low_precision=True, roundings=7,
                          weight_roundings=3))
    return entries


LOWP_KERNELS = _entries()
