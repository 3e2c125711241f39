"""What every layer (rnn.py, transformer.py) needs the same way: its dtype, its sizes, its
random initialisation, and its inputs converted to its dtype."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._validation import aligned, as_float_array, shape_str

__all__ = ["LAYER_DTYPES", "layer_dtype", "positive_int", "make_rng", "glorot_uniform", "layer_input", "checked_weight"]

LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def layer_dtype(dtype: Any) -> np.dtype:
    """A layer's dtype: float32 or float64 (TypeError otherwise)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in LAYER_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
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
