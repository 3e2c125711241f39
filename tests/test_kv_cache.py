"""KVCache and MultiHeadAttention.step: incremental decoding equals the full causal pass."""

from __future__ import annotations

import numpy as np
import pytest

import attnext

from hardening.harness import TOLERANCE as TOL
from hardening.harness import relative_error as rel_err



def make_layer(dtype, num_kv_heads=None, batch_first=True, seed=0):
    layer = attnext.MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads, batch_first=batch_first, dtype=dtype,
                                       rng=seed)
    rng = np.random.default_rng(seed + 100)
    layer.in_proj_bias[...] = rng.standard_normal(layer.in_proj_bias.shape)
    layer.out_proj_bias[...] = rng.standard_normal(layer.out_proj_bias.shape)
    return layer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_token_by_token_equals_causal_pass(dtype, num_kv_heads):
    layer = make_layer(dtype, num_kv_heads)
    x = np.random.default_rng(1).standard_normal((2, 33, 32)).astype(dtype)
    full, _ = layer(x, is_causal=True)
    cache = attnext.KVCache()
    steps = [layer.step(x[:, t], cache) for t in range(x.shape[1])]
    assert steps[0].shape == (2, 32)
    assert len(cache) == 33
    assert rel_err(np.stack(steps, axis=1), full) <= TOL[dtype]


@pytest.mark.parametrize("chunks", [[1, 3, 5, 7, 17], [33], [16, 1, 16]])
@pytest.mark.parametrize("batch_first", [True, False])
def test_chunks_equal_causal_pass(chunks, batch_first):
    layer = make_layer(np.float64, 2, batch_first=batch_first)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 33, 32) if batch_first else (33, 3, 32))
    full, _ = layer(x, is_causal=True)
    cache = attnext.KVCache(capacity=4)
    outs, t = [], 0
    for n in chunks:
        piece = x[:, t:t + n] if batch_first else x[t:t + n]
        outs.append(layer.step(piece, cache))
        t += n
    got = np.concatenate(outs, axis=1 if batch_first else 0)
    assert rel_err(got, full) <= TOL[np.float64]


def test_cache_grows_geometrically_and_keeps_contents():
    cache = attnext.KVCache()
    rng = np.random.default_rng(3)
    keys, values, buffers = [], [], set()
    for t in range(300):
        k, v = rng.standard_normal((2, 3, 1, 4)), rng.standard_normal((2, 3, 1, 5))
        keys.append(k)
        values.append(v)
        ck, cv = cache.append(k, v)
        buffers.add(id(cache._k))
        assert ck.shape == (2, 3, t + 1, 4) and cv.shape == (2, 3, t + 1, 5)
    # 16, 32, ..., 512: a handful of reallocations, not one per token
    assert len(buffers) <= 6 and cache.capacity == 512
    np.testing.assert_array_equal(cache.keys, np.concatenate(keys, axis=2))
    np.testing.assert_array_equal(cache.values, np.concatenate(values, axis=2))


def test_reset_starts_a_new_sequence():
    layer = make_layer(np.float32)
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((1, 5, 32)).astype(np.float32), rng.standard_normal((2, 6, 32)).astype(np.float32)
    cache = attnext.KVCache()
    layer.step(a, cache)
    capacity = cache.capacity
    cache.reset()
    assert len(cache) == 0 and cache.keys.shape[2] == 0 and cache.capacity == capacity
    layer.step(a[:, :3], cache)
    cache.reset()
    out = layer.step(b, cache)  # a different batch size after reset
    assert rel_err(out, layer(b, is_causal=True)[0]) <= TOL[np.float32]


def test_cache_errors():
    cache = attnext.KVCache()
    cache.append(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"key has shape \(1, 3, 1, 4\) .*call reset\(\)"):
        cache.append(np.zeros((1, 3, 1, 4)), np.zeros((1, 3, 1, 4)))
    with pytest.raises(ValueError, match="equal first three dimensions"):
        cache.append(np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 2, 4)))
    with pytest.raises(TypeError, match="share a dtype"):
        cache.append(np.zeros((1, 2, 1, 4), np.float32), np.zeros((1, 2, 1, 4)))
    with pytest.raises(ValueError, match="capacity must be a non-negative int"):
        attnext.KVCache(-1)
    layer = attnext.MultiHeadAttention(8, 2, kdim=4)
    with pytest.raises(ValueError, match="step\\(\\) is causal self-attention"):
        layer.step(np.zeros((1, 8), np.float32), attnext.KVCache())
    layer = attnext.MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        layer.step(np.zeros((1, 8), np.float32), None)
    with pytest.raises(ValueError, match="embed_dim = 8"):
        layer.step(np.zeros((1, 7), np.float32), attnext.KVCache())
