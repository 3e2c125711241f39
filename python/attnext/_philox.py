"""The dropout generator's NumPy twin: Philox4x32-10 and attention dropout's keep rule, bit for
bit as ``cpp/include/attnext/dropout.hpp`` computes them (the kernels never store a mask; the
reference and the tests rebuild it here from the same rule).

Philox4x32-10 (Salmon, Moraes, Dror and Shaw, SC'11). One round on the counter
c = (c0, c1, c2, c3) with key (k0, k1)::

    (hi0, lo0) = 0xD2511F53 * c0,  (hi1, lo1) = 0xCD9E8D57 * c2     (32 x 32 -> 64 bit)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);  k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2**32)

ten rounds; the output is c after round 10.

The keep rule for element (n, i, j) of the attention weights, n the flat C-order index of the
(batch..., query head) entry, i the query, j the key::

    counter = (uint32(j >> 2), uint32(i), uint32(n), uint32(n >> 32))
    key = (uint32(seed), uint32(seed >> 32));  word = output word (j & 3)
    dropped iff word < T,  T = floor(p * 2**32)   (so p = 1 drops everything)

Kept weights are multiplied by 1 / (1 - p) (0 for p = 1); dropped ones are set to 0 (not
multiplied, so a NaN weight that is dropped is 0).

The arithmetic is NumPy uint64 on values below 2**32: a 32 x 32 bit product fits in 64 bits
exactly, so no step wraps.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["philox4x32_10", "threshold", "keep_scale", "kept", "keep_mask", "apply_dropout", "draw_seed"]

_MUL0 = np.uint64(0xD2511F53)
_MUL1 = np.uint64(0xCD9E8D57)
_BUMP0 = 0x9E3779B9
_BUMP1 = 0xBB67AE85
_ROUNDS = 10
_LOW32 = np.uint64(0xFFFFFFFF)
_SEED_LIMIT = 2**64


def philox4x32_10(counter, key0: int, key1: int) -> np.ndarray:
    """Philox4x32-10 of every counter: counter (..., 4) integers in [0, 2**32), key0 and key1
    ints in [0, 2**32). Returns (..., 4) uint32."""
    c = np.asarray(counter)
    if c.dtype.kind not in "ui" or c.shape[-1:] != (4,):
        raise ValueError(f"counter must be an integer array of shape (..., 4), got {c.dtype} {c.shape}")
    if c.size and (c.min() < 0 or c.max() > 0xFFFFFFFF):
        raise ValueError("counter words must lie in [0, 2**32)")
    for name, k in (("key0", key0), ("key1", key1)):
        if not 0 <= int(k) <= 0xFFFFFFFF:
            raise ValueError(f"{name} must lie in [0, 2**32), got {k}")
    c = c.astype(np.uint64)
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    k0, k1 = int(key0), int(key1)
    for _ in range(_ROUNDS):
        p0 = _MUL0 * c0
        p1 = _MUL1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ np.uint64(k0), p1 & _LOW32, (p0 >> 32) ^ c3 ^ np.uint64(k1), p0 & _LOW32
        k0 = (k0 + _BUMP0) & 0xFFFFFFFF
        k1 = (k1 + _BUMP1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _check(seed: int, p: float) -> tuple[int, float]:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64 - 1], got {type(seed).__name__}")
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must lie in [0, 2**64 - 1], got {seed}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {p}")
    return int(seed), p


def threshold(p: float) -> int:
    """T = floor(p * 2**32): a word below T drops its element (p * 2**32 is exact in double)."""
    return math.floor(math.ldexp(float(p), 32))


def keep_scale(p: float) -> float:
    """The factor of a kept weight: 1 / (1 - p), 0 for p = 1."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _words(seed: int, n, i, c) -> np.ndarray:
    """The four Philox words of key group c (= j >> 2) of query i in batch entry n (uint64
    arrays broadcast together): shape broadcast + (4,)."""
    n, i, c = np.broadcast_arrays(n, i, c)
    counter = np.stack([c & _LOW32, i & _LOW32, n & _LOW32, n >> 32], axis=-1)
    return philox4x32_10(counter, seed & 0xFFFFFFFF, seed >> 32)


def kept(seed: int, p: float, n, i, j) -> np.ndarray:
    """Whether element (n, i, j) is kept, for integer arrays n (in [0, 2**64)), i and j
    (>= 0) broadcast together; returns a bool array of the broadcast shape."""
    seed, p = _check(seed, p)
    n = np.asarray(n, dtype=np.uint64)
    i = np.asarray(i, dtype=np.uint64)
    j = np.asarray(j, dtype=np.uint64)
    words = _words(seed, n, i, j >> 2)
    n, i, j = np.broadcast_arrays(n, i, j)
    word = np.take_along_axis(words, (j & 3).astype(np.intp)[..., None], axis=-1)[..., 0]
    return word.astype(np.uint64) >= np.uint64(threshold(p)) if p < 1.0 else np.zeros(word.shape, dtype=bool)


def keep_mask(seed: int, p: float, batch_shape: tuple, L: int, S: int) -> np.ndarray:
    """The keep decisions of a whole problem: bool (*batch_shape, L, S), True = kept, with n the
    flat C-order index over batch_shape (the kernel's (N...) batch; under GQA the query heads).

    One Philox call gives the words of four neighbouring keys, so the counters are built per
    key group and the words laid out along the keys."""
    seed, p = _check(seed, p)
    batch_shape = tuple(int(d) for d in batch_shape)
    N, L, S = math.prod(batch_shape), int(L), int(S)
    groups = (S + 3) // 4
    n = np.arange(N, dtype=np.uint64)[:, None, None]
    i = np.arange(L, dtype=np.uint64)[None, :, None]
    c = np.arange(groups, dtype=np.uint64)[None, None, :]
    words = _words(seed, n, i, c).reshape(N, L, 4 * groups)[:, :, :S]
    if p >= 1.0:
        return np.zeros(batch_shape + (L, S), dtype=bool)
    return (words >= np.uint32(threshold(p))).reshape(batch_shape + (L, S))


def apply_dropout(weights: np.ndarray, seed: int, p: float) -> np.ndarray:
    """weights (*batch, L, S) after dropout: kept entries times 1 / (1 - p) (in the weights'
    dtype), dropped ones 0. The batch axes are flat-indexed in C order as n."""
    w = np.asarray(weights)
    keep = keep_mask(seed, p, w.shape[:-2], w.shape[-2], w.shape[-1])
    return np.where(keep, w * w.dtype.type(keep_scale(p)), w.dtype.type(0))


def draw_seed() -> int:
    """A fresh seed in [0, 2**64) from the operating system's entropy: never from a global
    generator, whose state forked workers would share."""
    return int.from_bytes(os.urandom(8), "little")
