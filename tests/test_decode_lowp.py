"""SDPA's decode path (L <= 16 query rows, no weights) with bfloat16 inputs, on both bfloat16
product paths (fixture bf16_path): the pair kernels (16-key q . k tiles reduced together, P V on
interleaved pairs of value rows) against the reference of test_l2_sdpa_lowp (same rounding
points, same derived tolerances), at the shapes where a pairing or a lane permutation would go
wrong: odd key counts (the last key pairs with zero), key counts around the chunks (512 keys for
bfloat16) and the 16-key tiles, E and Ev not multiples of 32 (masked tails) or above 128 (several column
passes), hidden keys whose value rows hold inf/NaN, strided K and V, 1 to 16 query rows.
"""

import numpy as np
import pytest

from test_l2_sdpa_lowp import BF16, FLIP, TIGHT, check, mask_args, randn, reference, sdpa

from attnext import _core
from conftest import on_every_bf16_path


def rng(seed):
    return np.random.default_rng(seed)


def qkv(g, B, L, S, E, Ev):
    return randn(g, (B, L, E), BF16), randn(g, (B, S, E), BF16), randn(g, (B, S, Ev), BF16)


# (B, L, S, E, Ev): S around the 16-key tiles and the 512-key chunks, odd and even; E and Ev
# below, at and above 32-element multiples, and past 128 columns (two P V passes).
SHAPES = [
    (3, 1, 1, 64, 64),
    (2, 1, 2, 64, 64),
    (2, 1, 15, 64, 64),
    (2, 1, 17, 64, 64),
    (2, 1, 255, 64, 64),
    (2, 1, 256, 64, 64),
    (2, 1, 257, 64, 64),
    (2, 1, 511, 64, 64),
    (2, 1, 512, 64, 64),
    (2, 1, 513, 64, 64),
    (1, 1, 1025, 64, 64),
    (2, 3, 255, 40, 40),
    (2, 16, 257, 72, 72),
    (2, 5, 513, 33, 17),
    (1, 7, 300, 128, 160),
    (1, 2, 99, 96, 129),
    (2, 1, 31, 8, 1),
    (1, 3, 40, 129, 64),  # E past 128: the scores take a first pass of 128 and then a tail
    (2, 2, 21, 160, 33),
    (1, 1, 70, 256, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_float32", [False, True])
def test_shapes(bf16_path, shape, out_float32):
    B, L, S, E, Ev = shape
    q, k, v = qkv(rng(1), B, L, S, E, Ev)
    out, _, lse = sdpa(q, k, v, out_float32=out_float32)
    check(q, k, v, out, out_float32, lse=lse, exact=S <= 256)


def test_zero_width_queries_and_keys_weigh_every_key_alike(bf16_path):
    # E = 0: every score is the empty sum, 0, so each row's output is the mean of the values
    q, k, v = qkv(rng(4), 2, 3, 33, 0, 8)
    out, _, lse = sdpa(q, k, v, scale=1.0, out_float32=True)
    mean = np.broadcast_to(v.astype(np.float64).mean(axis=1, keepdims=True), out.shape)
    np.testing.assert_allclose(out, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, np.log(33), rtol=1e-6)


@pytest.mark.parametrize("L", list(range(1, 17)))
def test_query_rows(bf16_path, L):
    q, k, v = qkv(rng(2), 2, L, 131, 64, 64)
    out, _, lse = sdpa(q, k, v, out_float32=True)
    check(q, k, v, out, True, lse=lse)


@pytest.mark.parametrize("S", [255, 257, 513, 767])
def test_no_read_past_the_last_key(bf16_path, S):
    """K and V are views ending one row before NaN rows: a kernel that read past the last key
    (an odd count's zero partner, a 16-key tile's spare lanes) would put NaN in the output."""
    g = rng(3)
    q, k, v = qkv(g, 2, 3, S + 1, 64, 72)
    k[:, S], v[:, S] = np.nan, np.nan
    k, v = k[:, :S], v[:, :S]
    out, _, lse = sdpa(q, k, v, out_float32=True)
    check(q, k, v, out, True, lse=lse, exact=False)


@pytest.mark.parametrize("kind", ["bool", "float", "causal_top_left", "causal_bottom_right", "window", "key_lengths"])
@pytest.mark.parametrize("L", [1, 4, 16])
def test_masks(bf16_path, kind, L):
    g = rng(4)
    B, S = 2, 1025
    q, k, v = qkv(g, B, L, S, 64, 64)
    kw = mask_args(kind, g, B, L, S)
    out, _, lse = sdpa(q, k, v, **kw)
    check(q, k, v, out, False, lse=lse, exact=False, **kw)


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("S", [255, 513, 1025])
def test_hidden_nonfinite_values(bf16_path, L, S):
    """inf/NaN in the value rows (and keys) of hidden keys never reach the output: keys past a
    key length (odd, inside a chunk), keys a bool mask hides (one in each chunk), and a row that
    sees no key at all (zeros, lse -inf)."""
    g = rng(5)
    B, E = 3, 64
    q, k, v = qkv(g, B, L, S, E, 40)
    lengths = np.array([S, 201, 0], np.int64)
    v[1, 201:, 3] = np.nan
    k[1, 201:] = np.inf
    mask = np.ones((B, L, S), bool)
    for j in range(7, S, 256):
        mask[0, :, j] = False
        v[0, j, :] = np.inf if j % 2 else np.nan
    out, _, lse = sdpa(q, k, v, mask=mask, lengths=lengths)
    assert np.all(np.asarray(out, np.float64)[2] == 0) and np.all(np.isneginf(lse[2]))
    check(q, k, v, out, False, lse=lse, exact=False, mask=mask, lengths=lengths)


@pytest.mark.parametrize("layout", ["key_rows_strided", "transposed", "gqa_broadcast"])
def test_strided_keys_and_values(bf16_path, layout):
    """Rows at a stride other than E (read in place), elements at a stride (packed first), and
    stride-0 heads (GQA views)."""
    g = rng(6)
    B, L, S, E, Ev = 2, 3, 300, 64, 40
    q = randn(g, (B, L, E), BF16)
    if layout == "key_rows_strided":
        k = randn(g, (B, 2 * S, E + 8), BF16)[:, ::2, 3 : E + 3]
        v = randn(g, (B, S, 2 * Ev), BF16)[:, :, Ev:]
    elif layout == "transposed":
        k = np.swapaxes(randn(g, (B, E, S), BF16), -1, -2)
        v = randn(g, (B, S, 2 * Ev), BF16)[:, :, ::2]
    else:
        q = randn(g, (B, 4, L, E), BF16)
        k = np.broadcast_to(randn(g, (B, 1, S, E), BF16), (B, 4, S, E))
        v = np.broadcast_to(randn(g, (B, 1, S, Ev), BF16), (B, 4, S, Ev))
    out, _, lse = sdpa(q, k, v, causal=True, offset=S - L)
    check(q, k, v, out, False, lse=lse, exact=False, causal=True, offset=S - L)


def test_unfolded_scale(bf16_path):
    """|scale| > 1 with queries that overflow once scaled (q[:, :, 0] = 1.5e38): the kernel
    multiplies unscaled bfloat16 queries and scales the scores after, so the reference is the
    one of q . (3 k) with scale 1 (exact in float64; k[:, :, 0] small normal numbers keep the
    scores finite)."""
    g = rng(7)
    q, k, v = qkv(g, 2, 2, 270, 64, 64)
    q[:, :, 0] = 1.5e38
    k[:, :, 0] = (g.uniform(1.5, 8.0, k.shape[:2]) * np.where(g.random(k.shape[:2]) < 0.5, -1, 1) * 1e-38).astype(BF16)
    out, _, lse = sdpa(q, k, v, scale=3.0, out_float32=True)
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    check(q, k.astype(np.float64) * 3.0, v, out, True, lse=lse, exact=False, scale=1.0)


def test_paths_agree_closely():
    """Decode's pair kernels and the fallback multiply the same bfloat16 operands: they differ
    only by float32 summation order (and the rare P rounding flip that order causes)."""
    q, k, v = qkv(rng(8), 4, 3, 700, 64, 64)
    outs = on_every_bf16_path(lambda: sdpa(q, k, v, out_float32=True)[0].astype(np.float64))
    _, size, _, _ = reference(q, k, v)
    for other in outs[:-1]:  # each faster path against the fallback
        err = np.abs(other - outs[-1])
        assert np.all(err <= (TIGHT + FLIP) * size)
        assert np.mean(np.all(err <= TIGHT * size, axis=-1)) >= 0.5
