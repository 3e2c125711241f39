"""attnext: attention mechanisms as fast C++ CPU kernels behind a NumPy API.

The three steps of attention, each a function:

- :func:`score` compares queries with keys (dot, scaled_dot, general, additive),
- :func:`softmax` normalises the scores, with masks (bool True = may attend, float added),
- :func:`weighted_sum` turns weights and values into context vectors,

and their compositions :func:`attention` and :func:`scaled_dot_product_attention`.
Gradients: ``out, pullback = vjp(fn, *args, **kwargs)`` for each of them (:mod:`attnext.grad`),
and the backward functions behind it (``scaled_dot_product_attention_backward``, ...).
:mod:`attnext.reference` holds the same functions in plain NumPy.

One vocabulary everywhere: ``return_weights`` (MultiHeadAttention also takes PyTorch's
``need_weights``), ``attn_mask`` for masks broadcastable to the (..., Lq, Lk) scores (``mask``
is its older name, still accepted), ``key_mask`` for per-key (B, S) masks, ``key_lengths`` and
``window`` wherever keys are attended; bool masks mean True = may attend.

Warnings: :class:`MaskWarning` flags masks that are valid but most likely mistaken (a bool mask
that hides every key of a batch entry, as a PyTorch ``key_padding_mask`` passed uninverted
does; a float mask of only 0 and 1, as a bool mask cast to float is). Silence it per call with
``warn=False`` or globally with ``warnings.filterwarnings("ignore", category=attnext.MaskWarning)``.
:class:`ThreadWarning` (a RuntimeWarning) flags more threads than usable cores.

Precision: float32 and float64 compute as themselves; float16 and ``ml_dtypes.bfloat16``
(optional dependency) are read as they are, computed in float32 and returned in their own
type unless ``out_dtype=np.float32`` (docs/precision.md). ``ATTNEXT_BF16=fallback`` in the
environment at import forces the float32 fallback for bfloat16 products (the path
``build_info()["bf16"]`` names), as on a CPU without AVX512_BF16.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import _core, reference
from ._warnings import MaskWarning, ThreadWarning
from ._warnings import usable_cores as _usable_cores
from ._warnings import warn as _warn
from .functional import attention, scaled_dot_product_attention, score, softmax, weighted_sum
from .functional import ProjectedKeys, additive_attention, project_keys
from .grad import (Gradients, Pullback, additive_attention_backward, linear_backward,
                   scaled_dot_product_attention_backward, score_backward, softmax_backward, vjp,
                   weighted_sum_backward)
from .rnn import BahdanauAttention, BahdanauMemory, BahdanauMemoryGrad, LuongAttention
from .transformer import KVCache, MultiHeadAttention, SelfAttention

__version__ = _core.build_info()["version"]


def _bf16_path_from_environment() -> None:
    """ATTNEXT_BF16 caps the bfloat16 product path (to test or compare the others on a CPU
    that has the best): "avx512_bf16" (vdpbf16ps, no AMX tiles) or "fallback" (float32 math);
    unset, empty or "auto" keeps the CPU's best path. Any other value is refused at import
    rather than ignored."""
    wanted = os.environ.get("ATTNEXT_BF16", "").strip().lower()
    if wanted in ("", "auto"):
        return
    if wanted not in ("avx512_bf16", "fallback"):
        raise ImportError(f"ATTNEXT_BF16 must be 'avx512_bf16', 'fallback', 'auto' or unset, got "
                          f"{os.environ['ATTNEXT_BF16']!r}")
    _core.set_bf16_path(wanted)


_bf16_path_from_environment()

__all__ = [
    "score",
    "softmax",
    "weighted_sum",
    "attention",
    "scaled_dot_product_attention",
    "additive_attention",
    "project_keys",
    "ProjectedKeys",
    "vjp",
    "Gradients",
    "Pullback",
    "scaled_dot_product_attention_backward",
    "additive_attention_backward",
    "score_backward",
    "softmax_backward",
    "weighted_sum_backward",
    "linear_backward",
    "BahdanauAttention",
    "BahdanauMemory",
    "BahdanauMemoryGrad",
    "LuongAttention",
    "SelfAttention",
    "MultiHeadAttention",
    "KVCache",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "MaskWarning",
    "ThreadWarning",
    "build_info",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Sets how many threads every attnext kernel uses (process-wide; results do not depend on it).

    n: an int or NumPy integer in [1, 256] (TypeError, ValueError otherwise). In a process made by
    fork() kernels run on one thread whatever n is. More threads than the cores this process may
    run on (``os.sched_getaffinity``) is accepted but warns (:class:`ThreadWarning`, a
    RuntimeWarning): the extra threads only time-share cores. The default comes from OpenMP
    (``OMP_NUM_THREADS`` when set before import, else the core count). For a scoped setting use
    ``with attnext.threads(n):``."""
    _core.set_num_threads(n)
    cores = _usable_cores()
    if int(n) > cores:
        _warn(f"set_num_threads({int(n)}) asks for more threads than the {cores} cores this process may run on; "
             "kernels will time-share cores and run slower", ThreadWarning)


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """``with attnext.threads(n):`` runs the block with n kernel threads, then restores the
    previous count, also when the block raises. n as for :func:`set_num_threads` (checked before
    anything changes). The count is process-wide, so threads of your own that call attnext
    inside the block see it too. Yields n."""
    before = get_num_threads()
    set_num_threads(n)
    try:
        yield int(n)
    finally:
        _core.set_num_threads(before)


def get_num_threads() -> int:
    """The number of threads attnext kernels use (default: OpenMP's maximum, usually the core count)."""
    return _core.get_num_threads()


def build_info() -> dict[str, object]:
    """How this build was made: version, compiler, SIMD level compiled in, OpenMP, Eigen version,
    whether it was tuned for the build machine (-march=native), and the default thread count."""
    return dict(_core.build_info())
