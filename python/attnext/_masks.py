"""Masks, the one convention: a bool mask's True means "may attend"; a float mask is added to
the scores, and a -inf entry hides its key.

"Hidden is hidden": once any mask hides a key (bool False, float -inf), nothing else said
about that key reaches the output, not even a NaN in another float mask. :func:`fold_mask`
is the one bool -> float conversion and :func:`combine_masks` the one way two masks become
one; both keep that rule.
"""

from __future__ import annotations

import numpy as np

from ._validation import accumulation_dtype, aligned, shape_str, to_array
from ._warnings import check_bool_mask, check_float_mask

__all__ = ["as_mask", "fold_mask", "combine_masks", "prepare_mask", "key_mask_as_lengths", "check_mask"]


def check_mask(mask: np.ndarray | None, name: str, core_ndim: int) -> None:
    """The mask sanity checks (:class:`attnext.MaskWarning`), on the mask as the caller gave it.

    core_ndim: how many trailing axes of the scores are not batch axes (2 for (..., Lq, Lk),
    3 for SDPA's (..., H, L, S), 1 for a per-key (B, S) key_mask); the mask's axes before them
    are its batch entries. Bool: warns when an entry hides every key. Float: warns when it
    holds only 0 and 1. Cost: at most two vectorised passes over the given mask (never over
    its broadcast view)."""
    if mask is None:
        return
    if mask.dtype == np.bool_:
        check_bool_mask(mask, name, mask.ndim - core_ndim)
    else:
        check_float_mask(mask, name)


def as_mask(mask, dtype: np.dtype, name: str = "mask") -> np.ndarray:
    """mask as an array the kernels read: bool as it is, floating converted to the type the
    call computes in (``dtype``; float32 for float16/bfloat16 inputs, where a mask added to the
    scores joins them in float32)."""
    m = to_array(mask, name)
    if m.dtype == np.bool_:
        return m
    if m.dtype.kind == "f":
        return aligned(m.astype(accumulation_dtype(dtype), copy=False))
    raise TypeError(f"{name} must be bool (True = may attend) or floating (added to the scores), got dtype {m.dtype}")


def fold_mask(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The bool -> float fold: True -> 0, False -> -inf; a float mask is returned as the type
    the call computes in (``dtype``, or float32 for 16-bit inputs)."""
    dtype = accumulation_dtype(dtype)
    if mask.dtype == np.bool_:
        return np.where(mask, dtype.type(0), dtype.type(-np.inf))
    return mask.astype(dtype, copy=False)


def combine_masks(a: np.ndarray | None, b: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """Two masks as one, broadcast together: bool & bool stays bool; otherwise both are folded
    and added, except that a key either one hides stays hidden (-inf), whatever the other
    holds there (NaN or +inf included)."""
    if a is None or b is None:
        return b if a is None else a
    if a.dtype == np.bool_ and b.dtype == np.bool_:
        return a & b
    fa, fb = fold_mask(a, dtype), fold_mask(b, dtype)
    neg_inf = accumulation_dtype(dtype).type(-np.inf)
    with np.errstate(invalid="ignore"):
        return np.where((fa == neg_inf) | (fb == neg_inf), neg_inf, fa + fb)


def prepare_mask(mask, score_shape: tuple, dtype: np.dtype, name: str = "mask", *,
                 check_core: int = 0) -> np.ndarray | None:
    """A mask as the kernels take it: bool (True = may attend) or ``dtype`` (added), broadcast
    (as a view, nothing copied) to exactly the scores' shape. None stays None.

    check_core > 0 runs :func:`check_mask` on the given mask with that many core axes first."""
    if mask is None:
        return None
    m = as_mask(mask, dtype, name)
    if check_core:
        check_mask(m, name, check_core)
    try:
        return np.broadcast_to(m, score_shape)
    except ValueError:
        raise ValueError(
            f"{name} has shape {shape_str(m.shape)}, which does not broadcast to the scores' shape "
            f"{shape_str(score_shape)}") from None


def key_mask_as_lengths(key_mask: np.ndarray) -> np.ndarray | None:
    """The key lengths a bool (B, S) key mask stands for, or None.

    A mask whose every row is True for its first n keys and False after them says exactly
    what ``key_lengths = n`` says; as lengths, the kernels skip the padding's tiles instead of
    reading a mask, and by the hidden-is-hidden rule the results are the same. Any other mask
    (a float one, a gap in a row) gives None and stays a mask.
    """
    if key_mask.dtype != np.bool_ or key_mask.ndim != 2:
        return None
    counts = key_mask.sum(axis=-1)
    if not np.array_equal(key_mask, np.arange(key_mask.shape[-1]) < counts[:, None]):
        return None
    return counts.astype(np.int64)
