"""Layers after pickle and deepcopy, objects that own their data, and the layers' shared
helpers and masks (issue 13 findings 9 and 10; issue 12's layer and mask rules)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import attnext
from attnext._layers import glorot_uniform, layer_dtype, positive_int
from attnext._masks import combine_masks, fold_mask, key_mask_as_lengths


def params(layer) -> dict:
    if hasattr(type(layer), "state_dict"):
        return layer.state_dict()
    names = ("w_query", "w_key", "w_value", "b_query", "b_key", "b_value")  # SelfAttention (no state_dict yet)
    return {n: getattr(layer, n) for n in names if getattr(layer, n) is not None}


def pickle_copy(obj):
    return pickle.loads(pickle.dumps(obj))


COPIES = {"pickle": pickle_copy, "deepcopy": copy.deepcopy}


def _exercise_bahdanau(layer, rng):
    keys = rng.standard_normal((2, 5, layer.key_dim)).astype(layer.dtype)
    memory = layer.precompute(keys, key_lengths=np.array([5, 3]))
    q = rng.standard_normal((2, layer.query_dim)).astype(layer.dtype)
    out = [*layer(q, memory), *layer(q[:, None], memory), layer(q, memory, return_weights=False)]
    layer.load_state_dict(layer.state_dict())
    out.append(layer.effective_v)
    repr(layer)
    return out


def _exercise_luong(layer, rng):
    keys = rng.standard_normal((2, 5, layer.key_dim)).astype(layer.dtype)
    vals = rng.standard_normal((2, 5, layer.value_dim)).astype(layer.dtype)
    q = rng.standard_normal((2, 3, layer.query_dim)).astype(layer.dtype)
    out = [*layer(q, keys, vals, key_lengths=np.array([4, 2])), *layer(q[:, 0], keys, vals, mask=np.ones((2, 5), bool))]
    layer.load_state_dict(layer.state_dict())
    repr(layer)
    return out


def _exercise_self(layer, rng):
    x = rng.standard_normal((2, 4, layer.embed_dim)).astype(layer.dtype)
    out = [*layer(x, is_causal=True, return_weights=True), layer(x, mask=np.tril(np.ones((4, 4), bool)))]
    layer.set_weights(w_query=layer.w_query.copy())
    repr(layer)
    return out


def _exercise_mha(layer, rng):
    b, l, s = 2, 3, 5
    q = rng.standard_normal((b, l, layer.embed_dim)).astype(layer.dtype)
    k = rng.standard_normal((b, s, layer.kdim)).astype(layer.dtype)
    v = rng.standard_normal((b, s, layer.vdim)).astype(layer.dtype)
    out = list(layer(q, k, v, key_mask=np.arange(s) < np.array([[5], [2]]), need_weights=True))
    out += list(layer(q, k, v, attn_mask=np.tril(np.ones((l, s), bool)), need_weights=True,
                      average_attn_weights=False))
    if layer.kdim == layer.vdim == layer.embed_dim:
        out.append(layer(q, need_weights=False)[0])
        cache = attnext.KVCache()
        out += [layer.step(q[:, :2], cache), layer.step(q[:, 2], cache)]
    layer.load_state_dict(layer.state_dict())
    repr(layer)
    return out


LAYERS = {
    "bahdanau": (lambda: attnext.BahdanauAttention(4, 3, 5, rng=0), _exercise_bahdanau),
    "bahdanau_normalize": (lambda: attnext.BahdanauAttention(4, 3, 5, normalize=True, dtype=np.float64, rng=1),
                           _exercise_bahdanau),
    "luong_dot": (lambda: attnext.LuongAttention(4, rng=2), _exercise_luong),
    "luong_general": (lambda: attnext.LuongAttention(4, 3, "general", value_dim=2, scale=True, rng=3),
                      _exercise_luong),
    "luong_concat": (lambda: attnext.LuongAttention(4, 3, "concat", units=6, scale=True, dtype=np.float64, rng=4),
                     _exercise_luong),
    "self": (lambda: attnext.SelfAttention(6, qk_dim=4, v_dim=5, bias=True, rng=5), _exercise_self),
    "self_exclude": (lambda: attnext.SelfAttention(6, exclude_self=True, dtype=np.float64, rng=6), _exercise_self),
    "mha": (lambda: attnext.MultiHeadAttention(8, 2, rng=7), _exercise_mha),
    "mha_gqa": (lambda: attnext.MultiHeadAttention(8, 4, num_kv_heads=2, dtype=np.float64, rng=8), _exercise_mha),
    "mha_kdim": (lambda: attnext.MultiHeadAttention(8, 2, kdim=3, vdim=5, bias=False, rng=9), _exercise_mha),
}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", LAYERS)
def test_round_trip_then_every_method(name, how):
    make, exercise = LAYERS[name]
    layer = make()
    clone = COPIES[how](layer)
    assert type(clone) is type(layer) and repr(clone) == repr(layer)
    for (a_name, a), (b_name, b) in zip(sorted(params(layer).items()), sorted(params(clone).items())):
        assert a_name == b_name and np.array_equal(a, b)
    got = exercise(clone, np.random.default_rng(0))
    want = exercise(layer, np.random.default_rng(0))
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w), equal_nan=True), name


@pytest.mark.parametrize("how", COPIES)
def test_finding_9_mha_copies_keep_projection_views(how):
    layer = COPIES[how](attnext.MultiHeadAttention(8, 2, rng=0))
    for w in (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight):
        assert np.shares_memory(w, layer.in_proj_weight)
    rng = np.random.default_rng(1)
    wq, wk, wv = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    layer.load_projections(q=(wq, None), k=(wk, None), v=(wv, None))
    np.testing.assert_array_equal(layer.state_dict()["in_proj_weight"], np.concatenate([wq, wk, wv]))
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    self_out = layer(x)[0]  # one packed GEMM
    cross_out = layer(x, x.copy(), x.copy())[0]  # separate q, k, v projections
    np.testing.assert_allclose(self_out, cross_out, rtol=1e-5, atol=1e-6)
    fresh = attnext.MultiHeadAttention(8, 2, rng=5)
    fresh.load_state_dict(layer.state_dict())
    np.testing.assert_allclose(fresh(x)[0], self_out, rtol=1e-6, atol=1e-7)


def test_finding_10_bahdanau_memory_owns_values_and_lengths():
    rng = np.random.default_rng(0)
    layer = attnext.BahdanauAttention(4, 3, 5, rng=0)
    keys = rng.standard_normal((2, 6, 3)).astype(np.float32)
    values = rng.standard_normal((2, 6, 2)).astype(np.float32)
    lengths = np.array([6, 4])
    q = rng.standard_normal((2, 4)).astype(np.float32)
    for vals in (None, values):  # values default to the keys
        memory = layer.precompute(keys, vals, key_lengths=lengths)
        before = layer(q, memory)
        assert not np.shares_memory(memory.values, keys) and not np.shares_memory(memory.values, values)
        assert not np.shares_memory(memory.key_lengths, lengths)
        keys_saved, values_saved, lengths_saved = keys.copy(), values.copy(), lengths.copy()
        keys[...] = 7.0  # the caller reuses its encoder buffers for the next sentence
        values[...] = -3.0
        lengths[...] = 1
        after = layer(q, memory)
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a, b)
        keys[...], values[...], lengths[...] = keys_saved, values_saved, lengths_saved


def test_finding_10_projected_keys_and_kv_cache_own_their_data():
    rng = np.random.default_rng(1)
    key = rng.standard_normal((2, 5, 3))
    w_key = rng.standard_normal((3, 4))
    pk = attnext.project_keys(key, w_key)
    saved = pk.projected.copy()
    key[...] = 0
    w_key[...] = 0
    np.testing.assert_array_equal(pk.projected, saved)
    cache = attnext.KVCache()
    k = rng.standard_normal((1, 2, 3, 4))
    v = rng.standard_normal((1, 2, 3, 4))
    cache.append(k, v)
    k[...] = 0
    v[...] = 0
    assert np.all(cache.keys != 0) and np.all(cache.values != 0)


def test_kv_cache_accepts_big_endian_and_refuses_masked_arrays():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 2, 3, 4))
    cache = attnext.KVCache()
    keys, values = cache.append(k.astype(">f8"), k.astype(">f8"))
    assert keys.dtype == np.float64 and keys.dtype.isnative
    np.testing.assert_array_equal(keys, k)
    with pytest.raises(TypeError, match="masked array"):
        cache.append(np.ma.masked_array(k), k)


def test_shared_layer_helpers():
    assert layer_dtype("float64") == np.float64
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        layer_dtype(np.int32)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        layer_dtype("no such dtype")
    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int64(3), "n")) is int
    with pytest.raises(TypeError, match="n must be an int"):
        positive_int(3.0, "n")
    with pytest.raises(TypeError, match="n must be an int"):
        positive_int(True, "n")
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        positive_int(0, "n")
    with pytest.raises(ValueError, match="n is too large"):
        positive_int(2**64, "n")
    # (in, out) and (out, in) layouts draw the same numbers: one initialiser for both files
    a = glorot_uniform(np.random.default_rng(0), (3, 5), np.float32)
    b = glorot_uniform(np.random.default_rng(0), (5, 3), np.float32)
    np.testing.assert_array_equal(a.ravel(), b.ravel())
    assert np.all(np.abs(a) <= np.sqrt(6 / 8))
    # every layer takes NumPy ints for its sizes
    attnext.BahdanauAttention(np.int64(4), np.int32(3), np.int64(5))
    attnext.MultiHeadAttention(np.int64(8), np.int64(2))


def test_mask_fold_and_combination_keep_hidden_keys_hidden():
    m = np.array([True, False, True])
    np.testing.assert_array_equal(fold_mask(m, np.float32), np.array([0, -np.inf, 0], np.float32))
    f = np.array([np.nan, np.nan, np.inf], np.float64)
    both = combine_masks(m, f, np.float64)
    # a key the bool mask hides stays -inf whatever the float mask says (NaN included)
    assert both[1] == -np.inf and np.isnan(both[0]) and both[2] == np.inf
    assert combine_masks(np.array([-np.inf]), np.array([np.inf]), np.float64)[0] == -np.inf
    np.testing.assert_array_equal(combine_masks(m, ~m, np.float32), np.zeros(3, bool))
    assert combine_masks(None, m, np.float32) is m


def test_key_mask_as_lengths_only_for_padding_masks():
    pad = np.arange(5) < np.array([[5], [2], [0]])
    np.testing.assert_array_equal(key_mask_as_lengths(pad), [5, 2, 0])
    assert key_mask_as_lengths(np.array([[True, False, True]])) is None  # a gap: stays a mask
    assert key_mask_as_lengths(pad.astype(np.float32)) is None


def test_mha_key_mask_padding_and_gaps_match_the_reference():
    rng = np.random.default_rng(3)
    layer = attnext.MultiHeadAttention(8, 2, dtype=np.float64, rng=0)
    q = rng.standard_normal((2, 3, 8))
    k = rng.standard_normal((2, 5, 8))
    state = layer.state_dict()
    w_q, w_k, w_v = np.split(state["in_proj_weight"], 3)
    for key_mask in (np.arange(5) < np.array([[5], [2]]), np.array([[True, False, True, True, False]] * 2),
                     np.where(rng.random((2, 5)) < 0.3, -np.inf, rng.standard_normal((2, 5)))):
        got, gw = layer(q, k, k, key_mask=key_mask, need_weights=True, average_attn_weights=False)
        km = key_mask[:, None, None, :]
        want, ww = attnext.reference.multi_head_attention(
            q, k, k, 2, w_q, w_k, w_v, state["out_proj.weight"], q_bias=state["in_proj_bias"][:8],
            k_bias=state["in_proj_bias"][8:16], v_bias=state["in_proj_bias"][16:], out_bias=state["out_proj.bias"],
            attn_mask=km)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gw, ww, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", COPIES)
def test_kv_cache_and_projected_keys_round_trip(how):
    rng = np.random.default_rng(4)
    cache = attnext.KVCache(capacity=4)
    k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3, 5))
    cache.append(k, v)
    twin = COPIES[how](cache)
    assert len(twin) == 3 and twin.capacity == cache.capacity and repr(twin) == repr(cache)
    k2, v2 = rng.standard_normal((1, 2, 20, 4)), rng.standard_normal((1, 2, 20, 5))
    for c in (cache, twin):
        c.append(k2, v2)
    np.testing.assert_array_equal(twin.keys, cache.keys)
    np.testing.assert_array_equal(twin.values, cache.values)
    assert not np.shares_memory(twin.keys, cache.keys)
    twin.reset()
    assert len(twin) == 0 and len(cache) == 23
    keys = attnext.project_keys(rng.standard_normal((2, 5, 3)), rng.standard_normal((3, 4)))
    twin_keys = COPIES[how](keys)
    assert repr(twin_keys) == repr(keys) and twin_keys.batch_shape == (2,)
    np.testing.assert_array_equal(twin_keys.projected, keys.projected)


@pytest.mark.parametrize("make", [
    lambda: attnext.SelfAttention(6, qk_dim=2, v_dim=2, bias=True, dtype=np.float64, rng=5),
    lambda: attnext.LuongAttention(4, 3, "general", dtype=np.float64, rng=3),
    lambda: attnext.LuongAttention(4, 3, "concat", units=6, dtype=np.float64, rng=4),
], ids=["self", "luong_general", "luong_concat"])
def test_layer_results_do_not_depend_on_where_memory_is_allocated(make):
    # The layers' projections read their weights as (out, in) rows: a transposed view put
    # _core.linear on a float64 path whose result changed with the output's address (two
    # distinct results in 300 calls), so a layer and its pickled copy could disagree.
    layer, rng = make(), np.random.default_rng(0)
    if isinstance(layer, attnext.SelfAttention):
        args = (rng.standard_normal((2, 3, 6)),)
    else:
        args = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 3)))
    first = layer(*args)
    first = first[0] if isinstance(first, tuple) else first
    held = []
    for size in rng.integers(1, 64, size=200):
        held.append(np.empty(size))  # moves where the next outputs land
        again = layer(*args)
        assert np.array_equal(again[0] if isinstance(again, tuple) else again, first)
