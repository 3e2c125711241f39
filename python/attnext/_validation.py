"""Argument handling shared by the functional API and the layers: dtype promotion, shape
checks with messages that name the argument and its shape, and mask preparation.

Everything here returns NumPy views where it can (np.broadcast_to gives stride-0 views), so
broadcast masks and batch dimensions reach the kernels without copies.
"""

from __future__ import annotations

import math

import numpy as np

_SUPPORTED = (np.float32, np.float64)


def shape_str(shape) -> str:
    return str(tuple(int(d) for d in shape))


def as_float_array(x, name: str) -> np.ndarray:
    """x as an ndarray of a floating dtype; integers, bools, complex and objects are refused."""
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array (float32 or float64), got dtype {a.dtype}")
    if a.dtype.itemsize > 8:
        raise TypeError(f"{name} has dtype {a.dtype}; attnext computes in float32 or float64")
    return a


def promote(**arrays) -> tuple[np.dtype, dict]:
    """Converts every named array with NumPy's promotion rules; float16 computes as float32.

    Returns (dtype, {name: array of that dtype}); arrays already of the dtype are not copied.
    """
    checked = {name: as_float_array(a, name) for name, a in arrays.items() if a is not None}
    dtype = np.result_type(*checked.values())
    if dtype == np.float16:
        dtype = np.dtype(np.float32)
    return dtype, {name: aligned(a.astype(dtype, copy=False)) for name, a in checked.items()}


def aligned(a: np.ndarray) -> np.ndarray:
    """a itself, or a contiguous copy when its data is not aligned to its item size (a view at
    an odd byte offset, a field of a packed structured array), which the kernels refuse."""
    return a if a.flags.aligned else a.copy()


def as_scalar(value, name: str) -> float:
    """A float argument (scale, ...): TypeError if it is not a number, ValueError if it does
    not fit a double (Python ints can be larger)."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {value!r}") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def require_ndim(a: np.ndarray, name: str, min_ndim: int, what: str) -> None:
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions {what}, got shape {shape_str(a.shape)}")


def broadcast_batch(arrays: dict, trailing: dict) -> tuple[tuple, dict]:
    """Broadcasts the leading (batch) axes of several arrays against each other.

    ``trailing[name]`` is how many trailing axes of that array are not batch axes. Returns the
    common batch shape and stride-0 views with it.
    """
    batch_shapes = {name: a.shape[: a.ndim - trailing[name]] for name, a in arrays.items()}
    try:
        batch = np.broadcast_shapes(*batch_shapes.values())
    except ValueError:
        described = ", ".join(f"{n} has shape {shape_str(a.shape)}" for n, a in arrays.items())
        raise ValueError(f"batch dimensions do not broadcast: {described}") from None
    views = {
        name: np.broadcast_to(a, batch + a.shape[a.ndim - trailing[name]:]) for name, a in arrays.items()
    }
    return batch, views


def prepare_mask(mask, score_shape: tuple, dtype: np.dtype, name: str = "mask"):
    """A mask as the kernels take it: bool (True = may attend) or ``dtype`` (added), broadcast
    (as a view) to exactly the scores' shape. None stays None."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        pass
    elif m.dtype.kind == "f":
        m = aligned(m.astype(dtype, copy=False))
    else:
        raise TypeError(
            f"{name} must be bool (True = may attend) or floating (added to the scores), got dtype {m.dtype}"
        )
    try:
        return np.broadcast_to(m, score_shape)
    except ValueError:
        raise ValueError(
            f"{name} has shape {shape_str(m.shape)}, which does not broadcast to the scores' shape "
            f"{shape_str(score_shape)}"
        ) from None


def causal_offset(is_causal, lq: int, lk: int) -> tuple[bool, int]:
    """(on, offset) for the kernels: key j is visible to query i iff j <= i + offset."""
    if is_causal is False or is_causal is None:
        return False, 0
    if is_causal is True or is_causal == "top_left":
        return True, 0
    if is_causal == "bottom_right":
        return True, lk - lq
    raise ValueError(f"is_causal must be False, True, 'top_left' or 'bottom_right', got {is_causal!r}")


def check_key_lengths(key_lengths, batch_shape: tuple, lk: int) -> np.ndarray:
    """key_lengths as int64, broadcast (as a view) to ``batch_shape``; every value in [0, lk]."""
    lengths = np.asarray(key_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
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
    return np.broadcast_to(lengths.astype(np.int64, copy=False), batch_shape)


def check_state_keys(state, expected, owner: str) -> None:
    """Refuses a state dict whose keys are not exactly ``expected``, naming what is missing and
    what is unexpected (a layer's load_state_dict changes nothing when this raises)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {missing}"] if missing else []) + (
            [f"unexpected keys {unexpected}"] if unexpected else [])
        raise ValueError(f"state dict does not fit {owner} ({'; '.join(parts)}); it needs {list(expected)}")
