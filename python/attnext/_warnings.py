"""attnext's warning categories and the cheap checks behind them.

- :class:`MaskWarning`: a mask that is valid but most likely not what the caller meant (a
  PyTorch ``key_padding_mask`` passed where attnext's True = may attend is expected, or a bool
  mask cast to float). Silence one call with ``warn=False``, or every call with
  ``warnings.filterwarnings("ignore", category=attnext.MaskWarning)``.
- :class:`ThreadWarning` (a RuntimeWarning): more threads asked for than this process may run on.

Warnings point at the caller's line, the first frame outside the attnext package.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

__all__ = ["MaskWarning", "ThreadWarning", "warn", "check_bool_mask", "check_float_mask", "usable_cores"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class MaskWarning(UserWarning):
    """A mask attnext accepts but that looks like a mistake: a bool mask or key_mask that leaves
    a whole batch entry with no key to attend (the mark of PyTorch's inverted
    ``key_padding_mask``, True = ignore), or a float mask holding only 0 and 1 (the mark of a
    bool mask cast to float, e.g. Hugging Face's ``attention_mask.float()``, which is added to
    the scores instead of hiding keys)."""


class ThreadWarning(RuntimeWarning):
    """set_num_threads (or attnext.threads) asked for more threads than this process may run
    on (``os.sched_getaffinity``): the extra threads only time-share cores and slow kernels down."""


def warn(message: str, category: type[Warning]) -> None:
    """warnings.warn pointing at the first frame outside attnext (the user's call)."""
    level = 2  # stacklevel 2 is the frame that called this function
    frame = sys._getframe(1)
    while frame is not None and _inside(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _inside(filename: str) -> bool:
    d = os.path.dirname(os.path.abspath(filename))
    return d == _PACKAGE_DIR or d.startswith(_PACKAGE_DIR + os.sep)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_bool_mask(mask: np.ndarray, name: str, entry_axes: int) -> None:
    """MaskWarning if a whole batch entry of a bool mask is False.

    mask: the mask as the caller gave it (not a broadcast view, so a (B, 1, 1, S) mask costs
    B*S reads, not B*H*L*S). Its leading ``entry_axes`` axes are the batch entries; everything
    after them is reduced. One vectorised ``any`` over the given mask, and only if it has a
    False at all (``all()`` first, which stops at nothing cheaper but is the common, all-visible
    case's only pass)."""
    if mask.size == 0 or mask.all():
        return
    if entry_axes <= 0 or mask.ndim <= entry_axes:
        blind = not mask.any()
        where = "every entry"
    else:
        seen = mask.any(axis=tuple(range(entry_axes, mask.ndim)))
        blind = not seen.all()
        where = f"{int(seen.size - np.count_nonzero(seen))} of {seen.size} batch entries"
    if blind:
        warn(f"{name} hides every key for {where}: in attnext a bool mask's True means 'may attend' "
             "(PyTorch's key_padding_mask means the opposite; pass ~mask). Rows with no key give zeros. "
             "Pass warn=False if this is intended, or use key_lengths=0 for empty sequences", MaskWarning)


def check_float_mask(mask: np.ndarray, name: str) -> None:
    """MaskWarning if a float mask holds only 0 and 1 (with at least one 1).

    Cost: the first row (last axis) of the given mask is looked at first; only when it holds
    nothing but 0 and 1 is the whole mask (as given, not broadcast) read, once."""
    if mask.size == 0:
        return
    first = mask[(0,) * (mask.ndim - 1)] if mask.ndim else mask
    if not np.all((first == 0) | (first == 1)):
        return
    if np.all((mask == 0) | (mask == 1)) and np.any(mask == 1):
        warn(f"{name} is a float mask holding only 0 and 1, which is added to the scores; it looks like a "
             "bool mask cast to float (e.g. attention_mask.float()). Pass it as bool (True = may attend: "
             "mask.astype(bool)), or as an additive mask (0 / -inf). Pass warn=False if this is intended",
             MaskWarning)
