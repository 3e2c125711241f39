"""Argument handling shared by the functional API and the layers: conversion to arrays,
dtype promotion, scalar/int/axis arguments and shape checks with messages that name the
argument and its shape. Batch broadcasting lives in :mod:`attnext._broadcast`, masks in
:mod:`attnext._masks`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

try:  # optional: ml_dtypes is NumPy's bfloat16; attnext imports and works without it
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - exercised by hiding the module in the tests
    _ml_dtypes = None

#: ml_dtypes.bfloat16 as a NumPy dtype, or None when ml_dtypes is not installed.
BFLOAT16 = None if _ml_dtypes is None else np.dtype(_ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)


def shape_str(shape) -> str:
    return str(tuple(int(d) for d in shape))


def to_array(x: Any, name: str) -> np.ndarray:
    """np.asarray(x) for every array argument, refusing what would silently change meaning.

    - ``np.ma`` masked arrays: their mask's True means "invalid", the opposite of attnext's
      bool masks (True = may attend), and np.asarray would drop it without a word.
    - PyTorch tensors that require grad: converting them would cut the autograd graph;
      :mod:`attnext.torch` is the differentiable entry point. Nothing is detached silently.
    """
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma masked array; attnext does not read np.ma masks (their True means "
            "'invalid', the opposite of attnext's bool masks, where True = may attend). Pass the data "
            "(x.filled(...)) and, as a mask, ~x.mask")
    if getattr(x, "requires_grad", False) is True and type(x).__module__.split(".")[0] == "torch":
        raise TypeError(
            f"{name} is a torch tensor that requires grad; attnext's NumPy functions do not track "
            "gradients. Use attnext.torch for autograd, or pass tensor.detach() if no gradient is wanted")
    return np.asarray(x)


def is_bfloat16(dtype) -> bool:
    """True for ml_dtypes.bfloat16. NumPy files it under kind "V" (a user-defined type), not
    "f", so every floating check asks this too."""
    return BFLOAT16 is not None and np.dtype(dtype) == BFLOAT16


def is_low_precision(dtype) -> bool:
    """float16 or bfloat16: read as they are, computed in float32, returned in their own type."""
    return np.dtype(dtype) == FLOAT16 or is_bfloat16(dtype)


def accumulation_dtype(dtype) -> np.dtype:
    """The type a kernel computes in for inputs of ``dtype``: float32 for float16/bfloat16, else
    the dtype itself. Float masks and additive's bias of a 16-bit call are of this type."""
    return FLOAT32 if is_low_precision(dtype) else np.dtype(dtype)


def as_float_array(x, name: str) -> np.ndarray:
    """x as an ndarray of a floating dtype (float16/32/64 or ml_dtypes.bfloat16); integers,
    bools, complex, objects and wider floats are refused."""
    a = to_array(x, name)
    if a.dtype.kind != "f" and not is_bfloat16(a.dtype):
        raise TypeError(f"{name} must be a floating-point array (float32, float64, float16 or bfloat16), "
                        f"got dtype {a.dtype}")
    if a.dtype.itemsize > 8:
        raise TypeError(f"{name} has dtype {a.dtype}; attnext computes in float32 or float64")
    return a


def promote(backward: bool = False, **arrays) -> tuple[np.dtype, dict]:
    """Converts every named array to one dtype by NumPy's promotion rules (with ml_dtypes,
    bfloat16 + float32 and bfloat16 + float16 give float32).

    The forward keeps float16 and bfloat16 as they are: the kernels read them and compute in
    float32. ``backward=True`` is the backward functions' rule: float16 computes as float32
    (its gradients are returned as float16 by the caller) and bfloat16 is refused
    (:func:`refuse_bfloat16_backward`).

    Returns (dtype, {name: array of that dtype}); arrays already of the dtype are not copied.
    """
    checked = {name: as_float_array(a, name) for name, a in arrays.items() if a is not None}
    dtype = np.result_type(*checked.values())
    if backward:
        refuse_bfloat16_backward(checked)
        dtype = accumulation_dtype(dtype)
    return dtype, {name: aligned(a.astype(dtype, copy=False)) for name, a in checked.items()}


def refuse_bfloat16_backward(arrays: dict) -> None:
    """The one rule for gradients of 16-bit brain floats: not supported (bfloat16 training needs
    float32 master weights and loss scaling, which attnext does not do). TypeError naming the
    first bfloat16 argument; ``arrays`` maps names to anything (non-arrays are skipped, a
    ProjectedKeys by the dtype of the keys it was projected from)."""
    for name, value in arrays.items():
        dtype = getattr(value, "dtype", None)
        if dtype is not None and is_bfloat16(dtype):
            raise TypeError(f"{name} is bfloat16: bfloat16 backward is not supported; cast to float32 "
                            "(x.astype(np.float32)) for gradients")


def out_kwargs(out_dtype, dtype: np.dtype) -> dict:
    """The kernels' keyword for a public ``out_dtype=``: {"out_float32": True} when a float16 or
    bfloat16 call asks for float32 output (written by the kernel from its float32 accumulators,
    never via a 16-bit round trip), else {} (the output is in the inputs' dtype).

    out_dtype: None or the inputs' own dtype (the default output), or float32 for 16-bit
    inputs; anything else is a ValueError (attnext computes float64 as float64 and float32 as
    float32, so no other output type would be exact)."""
    if out_dtype is None:
        return {}
    try:
        want = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype must be a NumPy dtype or None, got {out_dtype!r}") from None
    if want == dtype:
        return {}
    if want == FLOAT32 and is_low_precision(dtype):
        return {"out_float32": True}
    raise ValueError(f"out_dtype must be None, the inputs' dtype ({np.dtype(dtype).name})"
                     + (" or float32" if is_low_precision(dtype) else "") + f", got {want.name}")


def output_dtype(out_dtype, dtype: np.dtype) -> np.dtype:
    """The dtype of the main output of a call with inputs of ``dtype`` and this ``out_dtype``
    (for code that computes it without a kernel, such as the reference)."""
    return FLOAT32 if out_kwargs(out_dtype, dtype) else np.dtype(dtype)


def aligned(a: np.ndarray) -> np.ndarray:
    """a itself, or a contiguous copy when its data is not aligned to its item size (a view at
    an odd byte offset, a field of a packed structured array), which the kernels refuse."""
    return a if a.flags.aligned else a.copy()


def as_scalar(value, name: str) -> float:
    """A float argument (scale, dropout_p, ...): a real number (int, float, NumPy scalar or 0-d
    array), not a bool or a string. TypeError otherwise; ValueError if it does not fit a double
    (Python ints can be larger)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {value!r}") from None


def as_int(value, name: str) -> int:
    """An int argument: Python or NumPy integers; bools, floats and strings are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def as_axis(axis, shape: tuple, name: str = "axis", of: str = "x") -> int:
    """One axis index into ``shape`` (negative counts from the end): an int, not a bool, None
    or a tuple (TypeError); ValueError when out of range."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be one int (attnext normalises along a single axis), got {axis!r}")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} {axis} is out of range for {of} of shape {shape_str(shape)}")
    return int(axis) % ndim


def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1] (NaN refused): the probability that a weight is dropped."""
    p = as_scalar(dropout_p, "dropout_p")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {p}")
    return p


def require_ndim(a: np.ndarray, name: str, min_ndim: int, what: str) -> None:
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions {what}, got shape {shape_str(a.shape)}")


def causal_offset(is_causal, lq: int, lk: int) -> tuple[bool, int]:
    """(on, offset) for the kernels: key j is visible to query i iff j <= i + offset.

    is_causal: None, a bool (NumPy's too), ``"top_left"`` or ``"bottom_right"``."""
    if is_causal is None:
        return False, 0
    if isinstance(is_causal, (bool, np.bool_)):
        return bool(is_causal), 0
    if isinstance(is_causal, str) and is_causal in ("top_left", "bottom_right"):
        return True, (lk - lq if is_causal == "bottom_right" else 0)
    raise ValueError(f"is_causal must be False, True, 'top_left' or 'bottom_right', got {is_causal!r}")


def check_key_lengths(key_lengths, batch_shape: tuple, lk: int) -> np.ndarray:
    """key_lengths as int64, broadcast (as a view) to ``batch_shape``; every value in [0, lk].

    The values are copied first and the copy is both checked and returned: a caller's array
    that changes later (another thread, a reused buffer) cannot bypass the check."""
    lengths = to_array(key_lengths, "key_lengths")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
    if lengths.dtype.kind == "u" and lengths.size and lengths.max() > np.iinfo(np.int64).max:
        raise ValueError(f"key_lengths must lie in [0, {lk}] (the number of keys), got {lengths.max()}")
    lengths = np.array(lengths, dtype=np.int64)  # an owned copy
    try:
        if np.broadcast_shapes(lengths.shape, batch_shape) != tuple(batch_shape):
            raise ValueError
    except ValueError:
        raise ValueError(f"key_lengths has shape {shape_str(lengths.shape)}, which does not broadcast to the "
                         f"batch shape {shape_str(batch_shape)}") from None
    # The range check runs over the given values, not the broadcast view (which may be huge);
    # broadcasting to an empty batch uses none of them.
    if lengths.size and math.prod(batch_shape) and (lengths.min() < 0 or lengths.max() > lk):
        raise ValueError(f"key_lengths must lie in [0, {lk}] (the number of keys), got values from "
                         f"{lengths.min()} to {lengths.max()}")
    return np.broadcast_to(lengths, batch_shape)


def check_state_keys(state, expected, owner: str) -> None:
    """Refuses a state dict whose keys are not exactly ``expected``, naming what is missing and
    what is unexpected (a layer's load_state_dict changes nothing when this raises)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {missing}"] if missing else []) + (
            [f"unexpected keys {unexpected}"] if unexpected else [])
        raise ValueError(f"state dict does not fit {owner} ({'; '.join(parts)}); it needs {list(expected)}")
