"""attnext: attention mechanisms as fast C++ CPU kernels behind a NumPy API.

The three steps of attention, each a function:

- :func:`score` compares queries with keys (dot, scaled_dot, general, additive),
- :func:`softmax` normalises the scores, with masks (bool True = may attend, float added),
- :func:`weighted_sum` turns weights and values into context vectors,

and their compositions :func:`attention` and :func:`scaled_dot_product_attention`.
:mod:`attnext.reference` holds the same functions in plain NumPy.
"""

from __future__ import annotations

from . import _core, reference
from .functional import attention, scaled_dot_product_attention, score, softmax, weighted_sum
from .functional import ProjectedKeys, additive_attention, project_keys
from .rnn import BahdanauAttention, BahdanauMemory, LuongAttention
from .transformer import KVCache, MultiHeadAttention, SelfAttention

__version__ = _core.build_info()["version"]

__all__ = [
    "score",
    "softmax",
    "weighted_sum",
    "attention",
    "scaled_dot_product_attention",
    "additive_attention",
    "project_keys",
    "ProjectedKeys",
    "BahdanauAttention",
    "BahdanauMemory",
    "LuongAttention",
    "SelfAttention",
    "MultiHeadAttention",
    "KVCache",
    "set_num_threads",
    "get_num_threads",
    "build_info",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Sets how many threads every attnext kernel uses (process-wide; results do not depend on it).

    n: an int or NumPy integer in [1, 256] (TypeError, ValueError otherwise). In a process made by
    fork() kernels run on one thread whatever n is."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads attnext kernels use (default: OpenMP's maximum, usually the core count)."""
    return _core.get_num_threads()


def build_info() -> dict[str, object]:
    """How this build was made: version, compiler, SIMD level compiled in, OpenMP, Eigen version,
    whether it was tuned for the build machine (-march=native), and the default thread count."""
    return dict(_core.build_info())
