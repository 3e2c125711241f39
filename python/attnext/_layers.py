"""What every layer (rnn.py, transformer.py) needs the same way: its dtype, its sizes, its
random initialisation, its inputs converted to its dtype, and the pieces of its ``vjp``
(the pullback object, the cotangent checks, the dropout seed, linear maps' gradients)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._validation import BFLOAT16, FLOAT16, aligned, as_float_array, check_dropout, shape_str
from .functional import _dropout_seed
from .grad import linear_backward

__all__ = ["LAYER_DTYPES", "LOW_PRECISION_DTYPES", "layer_dtype", "positive_int", "make_rng", "glorot_uniform",
           "layer_input", "checked_weight", "LayerPullback", "output_cotangents", "dropout_rate", "dropout_seed",
           "owned", "input_grad", "linear_grads"]

# A layer stores its weights in one of these and computes in it: float16 and bfloat16 read as
# they are and computed in float32 (docs/precision.md), for inference (bfloat16 has no vjp).
LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
LOW_PRECISION_DTYPES = (FLOAT16,) + (() if BFLOAT16 is None else (BFLOAT16,))


def layer_dtype(dtype: Any) -> np.dtype:
    """A layer's dtype: float32, float64, float16 or ml_dtypes.bfloat16 (TypeError otherwise)."""
    names = "float32, float64, float16 or bfloat16"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be {names}, got {dtype!r}") from None
    if dt not in LAYER_DTYPES + LOW_PRECISION_DTYPES:
        raise TypeError(f"dtype must be {names}, got {dt}")
    return dt


def positive_int(value: Any, name: str) -> int:
    """A layer size: an int (NumPy's too; TypeError otherwise) that is positive and fits 64 bits
    (ValueError otherwise: a larger one would overflow the initialisation's arithmetic; one that
    fits but cannot be allocated is NumPy's MemoryError or ValueError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    if value >= 2**63:
        raise ValueError(f"{name} is too large: {value}")
    return int(value)


def make_rng(rng: Any) -> np.random.Generator:
    """A seed, None or a Generator as a Generator (a Generator is used as it is, not copied)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Glorot (Xavier) uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out)). The bound depends on
    the sum of the two sizes only, so (in, out) and PyTorch's (out, in) layouts draw the same; a
    vector (n,) counts as (n, 1)."""
    fans = shape[0] + (shape[1] if len(shape) == 2 else 1)
    bound = math.sqrt(6.0 / fans) if fans else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def layer_input(x: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """x as an array of the layer's dtype, aligned to its item size (the kernels refuse
    unaligned data; the public API copies it, see docs/robustness.md)."""
    if type(x) is np.ndarray and x.dtype == dtype:
        return aligned(x)
    return aligned(as_float_array(x, name).astype(dtype, copy=False))


def checked_weight(value: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A weight given by the user, of exactly ``shape``, as ``dtype`` (not yet copied)."""
    a = as_float_array(value, name)  # integer weights are refused, as everywhere in attnext
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {shape_str(a.shape)} but this layer needs {shape_str(shape)}")
    return a.astype(dtype, copy=False)


# --- the backward pass (layer.vjp) ------------------------------------------------------------


class LayerPullback:
    """What a layer's ``vjp`` returns beside its output: ``pullback(cotangent)`` gives
    ``(input_grads, param_grads)``, the gradients of the inputs (a tuple, one per input the call
    was given) and of the parameters (a dict keyed exactly like ``layer.state_dict()``, same
    shapes and layout). ``seed`` is the dropout seed the forward pass used (None when no dropout
    was applied), so the same step can be run again. Calling it twice gives the same result:
    it holds its own copies of what it needs, not the caller's arrays or the layer's weights."""

    __slots__ = ("_backward", "seed")

    def __init__(self, backward, seed: int | None = None) -> None:
        self._backward, self.seed = backward, seed

    def __call__(self, cotangent):
        return self._backward(cotangent)

    def __repr__(self) -> str:
        return f"LayerPullback(seed={self.seed!r})"


def output_cotangents(cotangent: Any, outputs: Any, dtype: np.dtype) -> list:
    """The cotangent of a layer's outputs as a list of C-contiguous arrays of ``dtype``, one per
    output, each of its output's shape, or None for an output not differentiated.

    ``outputs`` is the layer's result: a tuple takes a tuple (or list) of the same length (an
    output that is None, such as weights not asked for, takes None), a single array takes a
    single array (or None)."""
    several = isinstance(outputs, tuple)
    entries = cotangent if several else (cotangent,)
    results = outputs if several else (outputs,)
    if several and (not isinstance(cotangent, (tuple, list)) or len(cotangent) != len(outputs)):
        got = f"a {type(cotangent).__name__} of {len(cotangent)}" if isinstance(cotangent, (tuple, list)) \
            else type(cotangent).__name__
        raise TypeError(f"cotangent must be a tuple of {len(outputs)} entries, one per output (None for an output "
                        f"not differentiated), got {got}")
    out = []
    for i, (ct, result) in enumerate(zip(entries, results)):
        name = f"cotangent[{i}]" if several else "cotangent"
        if ct is None:
            out.append(None)
            continue
        if result is None:
            raise ValueError(f"{name} is given but that output is None (not computed): pass None")
        a = as_float_array(ct, name)
        if a.shape != result.shape:
            raise ValueError(f"{name} has shape {shape_str(a.shape)} but the output has {shape_str(result.shape)}")
        out.append(np.ascontiguousarray(a, dtype=dtype))
    return out


def dropout_rate(value: Any) -> float:
    """A layer's ``dropout``: the probability of zeroing each attention weight in training
    (PyTorch's meaning), a real number in [0, 1]: the rule of SDPA's dropout_p, which it
    becomes."""
    return check_dropout(value)


def dropout_seed(p: float, seed: Any) -> int | None:
    """The seed of one training step's dropout: ``seed`` as given (checked), a fresh one from
    the operating system when None (as scaled_dot_product_attention draws it), and None when
    there is no dropout (p == 0), so the pullback records only a seed that was used."""
    return None if p == 0.0 else _dropout_seed(seed, p)


def owned(a: np.ndarray, given: Any) -> np.ndarray:
    """a, copied if it shares memory with the caller's ``given``: a pullback keeps what it
    needs and must not see later writes to the caller's arrays."""
    return a.copy() if isinstance(given, np.ndarray) and np.may_share_memory(a, given) else a


def input_grad(grad: np.ndarray, given: Any) -> np.ndarray:
    """The gradient of an input in that input's floating dtype (a float64 input of a float32
    layer gets a float64 gradient); lists and other array-likes get the layer's dtype."""
    dtype = getattr(given, "dtype", None)
    if isinstance(given, np.ndarray) and dtype.kind == "f" and dtype != grad.dtype:
        return grad.astype(dtype)
    return grad


def linear_grads(grad: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    """(dx, dweight, dbias) of y = x weight^T + bias, x (..., in), weight (out, in) (PyTorch's
    ``nn.Linear`` layout), grad (..., out); dweight and dbias summed over every leading axis,
    dbias None without a bias. Through :func:`attnext.grad.linear_backward`."""
    lead = x.shape[:-1]
    # the sizes written out: reshape(-1, n) cannot infer the -1 when n is 0 (an empty feature axis)
    flat_grad = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1])
    dx, dw, db = linear_backward(flat_grad, x.reshape(math.prod(lead), x.shape[-1]), weight, bias)
    return dx.reshape(lead + (x.shape[-1],)), dw, db
