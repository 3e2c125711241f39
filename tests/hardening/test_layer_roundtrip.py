"""Layers and kept objects after pickle and deepcopy: every method of the copy gives exactly
what the original gives (issue 13, finding 9), and a copy is independent of its original. And
ownership (finding 10): anything a layer or a precomputed object keeps between calls owns its
data, so a caller reusing its buffers afterwards changes nothing.
"""

import copy
import pickle

import numpy as np
import pytest

import attnext

ROUNDTRIPS = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[n], b[n]) for n in a)
    if a is None or b is None:
        return a is b
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _randomize(layer, rng):
    state = {n: rng.standard_normal(np.shape(v)).astype(np.asarray(v).dtype) * 0.3
             for n, v in layer.state_dict().items()}
    if "g" in state:
        state["g"] = np.abs(state["g"]) + 0.5
    layer.load_state_dict(state)
    return layer


# --- MultiHeadAttention -------------------------------------------------------------------

MHA_CONFIGS = {"packed": dict(), "gqa": dict(num_kv_heads=2), "kdim_vdim": dict(kdim=5, vdim=7),
               "no_bias": dict(bias=False), "seq_first": dict(batch_first=False)}


def _mha_methods(layer, cfg):
    """Every method of the layer, in order, with fixed inputs; returns their results."""
    rng = _rng(1)
    e = layer.embed_dim if hasattr(layer, "embed_dim") else 8
    bf = cfg.get("batch_first", True)
    shape = (2, 5, e) if bf else (5, 2, e)
    x = rng.standard_normal(shape).astype(np.float32)
    kd, vd = cfg.get("kdim", e), cfg.get("vdim", e)
    kshape, vshape = ((2, 6, kd), (2, 6, vd)) if bf else ((6, 2, kd), (6, 2, vd))
    key, value = rng.standard_normal(kshape).astype(np.float32), rng.standard_normal(vshape).astype(np.float32)
    res = {}
    if "kdim" not in cfg:
        res["self"] = layer(x, need_weights=True)
        res["self_causal"] = layer(x, is_causal=True, key_lengths=np.array([5, 3]), average_attn_weights=False,
                                   need_weights=True)
        res["cross_same"] = layer(x, x, x, need_weights=True)
        cache = attnext.KVCache()
        res["step"] = [layer.step(x[:, t] if bf else x[t], cache) for t in range(3)]
        res["cache"] = (cache.keys, cache.values)
    res["cross"] = layer(x, key, value, need_weights=True)
    res["state"] = layer.state_dict()
    return res


@pytest.mark.parametrize("how", ROUNDTRIPS)
@pytest.mark.parametrize("cfg", MHA_CONFIGS)
def test_multihead_attention_roundtrip(how, cfg):
    kw = MHA_CONFIGS[cfg]
    layer = _randomize(attnext.MultiHeadAttention(8, 4, rng=0, **kw), _rng(2))
    twin = ROUNDTRIPS[how](layer)
    assert _same(_mha_methods(twin, kw), _mha_methods(layer, kw))
    # load_projections on both, then every method again: the copy must still keep q/k/v as
    # views of in_proj_weight (packed), so state_dict shows the loaded weights and self- and
    # cross-attention on the same data agree.
    rng = _rng(3)
    new = {n: rng.standard_normal(getattr(layer, f"{n}_proj_weight").shape).astype(np.float32)
           for n in ("q", "k", "v", "out")}
    pairs = {n: (w, None) for n, w in new.items()}
    for obj in (layer, twin):
        obj.load_projections(**pairs)
    a, b = _mha_methods(twin, kw), _mha_methods(layer, kw)
    assert _same(a, b), f"{how}: the copy differs from the original after load_projections"
    for n, w in new.items():
        assert np.array_equal(getattr(twin, f"{n}_proj_weight"), w), f"{n}_proj_weight of the copy"
    if "self" in a:
        np.testing.assert_allclose(a["self"][0], a["cross_same"][0], rtol=1e-5, atol=1e-6)
    assert _same(twin.state_dict(), layer.state_dict())
    # The copy is independent of its original.
    layer.load_projections(q=(np.zeros_like(new["q"]), None))
    assert np.array_equal(twin.q_proj_weight, new["q"])


# --- SelfAttention, Bahdanau, Luong ----------------------------------------------------------


def _self_attention_methods(layer):
    x = _rng(4).standard_normal((2, 6, 8)).astype(np.float32)
    return dict(plain=layer(x, return_weights=True), causal=layer(x, is_causal=True, return_weights=True),
                masked=layer(x, mask=_rng(5).random((6, 6)) < 0.7, return_weights=True))


@pytest.mark.parametrize("how", ROUNDTRIPS)
@pytest.mark.parametrize("kw", [dict(), dict(bias=True, qk_dim=5, v_dim=3), dict(exclude_self=True)],
                         ids=["plain", "bias_dims", "exclude_self"])
def test_self_attention_roundtrip(how, kw):
    layer = attnext.SelfAttention(8, rng=0, **kw)
    twin = ROUNDTRIPS[how](layer)
    assert _same(_self_attention_methods(twin), _self_attention_methods(layer))
    rng = _rng(6)
    new = dict(w_query=rng.standard_normal(layer.w_query.shape).astype(np.float32))
    layer.set_weights(**new)
    twin.set_weights(**new)
    assert _same(_self_attention_methods(twin), _self_attention_methods(layer))


def _bahdanau_methods(layer):
    rng = _rng(7)
    keys = rng.standard_normal((2, 7, 5)).astype(np.float32)
    values = rng.standard_normal((2, 7, 3)).astype(np.float32)
    q1, qt = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    mem = layer.precompute(keys, values, key_lengths=np.array([7, 2]))
    mem_keys = layer.precompute(keys)
    return dict(step=layer(q1, mem), steps=layer(qt, mem), keys_as_values=layer(q1, mem_keys),
                effective_v=layer.effective_v, state=layer.state_dict())


@pytest.mark.parametrize("how", ROUNDTRIPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_bahdanau_roundtrip(how, normalize):
    layer = _randomize(attnext.BahdanauAttention(4, 5, 6, normalize=normalize, rng=0), _rng(8))
    twin = ROUNDTRIPS[how](layer)
    assert _same(_bahdanau_methods(twin), _bahdanau_methods(layer))
    state = _randomize(attnext.BahdanauAttention(4, 5, 6, normalize=normalize, rng=1), _rng(9)).state_dict()
    layer.load_state_dict(state)
    twin.load_state_dict(state)
    assert _same(_bahdanau_methods(twin), _bahdanau_methods(layer))


@pytest.mark.parametrize("how", ROUNDTRIPS)
def test_bahdanau_memory_roundtrip(how):
    layer = _randomize(attnext.BahdanauAttention(4, 5, 6, rng=0), _rng(10))
    rng = _rng(11)
    mem = layer.precompute(rng.standard_normal((2, 7, 5)).astype(np.float32), key_lengths=np.array([3, 7]))
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    # A memory belongs to its layer: they travel together.
    twin_layer, twin_mem = ROUNDTRIPS[how]((layer, mem))
    assert _same(twin_layer(q, twin_mem), layer(q, mem))


def _luong_methods(layer, kd):
    rng = _rng(12)
    keys = rng.standard_normal((2, 7, kd)).astype(np.float32)
    values = rng.standard_normal((2, 7, 3)).astype(np.float32)
    q1, qt = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    return dict(step=layer(q1, keys, values), steps=layer(qt, keys, values, key_lengths=np.array([7, 1])),
                masked=layer(qt, keys, values, mask=rng.random((2, 3, 7)) < 0.6), state=layer.state_dict())


@pytest.mark.parametrize("how", ROUNDTRIPS)
@pytest.mark.parametrize("method", ["dot", "general", "concat"])
@pytest.mark.parametrize("scale", [False, True])
def test_luong_roundtrip(how, method, scale):
    kd = 4 if method == "dot" else 5
    layer = _randomize(attnext.LuongAttention(4, kd, method, units=6, value_dim=3, scale=scale, rng=0), _rng(13))
    twin = ROUNDTRIPS[how](layer)
    assert _same(_luong_methods(twin, kd), _luong_methods(layer, kd))


# --- KVCache and ProjectedKeys ------------------------------------------------------------


@pytest.mark.parametrize("how", ROUNDTRIPS)
def test_kv_cache_roundtrip(how):
    rng = _rng(14)
    cache = attnext.KVCache()
    for _ in range(3):
        cache.append(rng.standard_normal((2, 2, 1, 4)), rng.standard_normal((2, 2, 1, 3)))
    twin = ROUNDTRIPS[how](cache)
    assert len(twin) == len(cache) and _same((twin.keys, twin.values), (cache.keys, cache.values))
    k, v = rng.standard_normal((2, 2, 2, 4)), rng.standard_normal((2, 2, 2, 3))
    assert _same(twin.append(k, v), cache.append(k, v))
    cache.append(k, v)  # the copy does not see its original's appends
    assert len(twin) == 5 and len(cache) == 7
    empty = ROUNDTRIPS[how](attnext.KVCache())
    assert len(empty) == 0 and empty.keys is None


@pytest.mark.parametrize("how", ROUNDTRIPS)
def test_projected_keys_roundtrip(how):
    rng = _rng(15)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 6, 5)), rng.standard_normal((2, 6, 3))
    wq, wk, vv = rng.standard_normal((4, 7)), rng.standard_normal((5, 7)), rng.standard_normal(7)
    pk = attnext.project_keys(k, wk)
    twin = ROUNDTRIPS[how](pk)
    assert _same(attnext.additive_attention(q, twin, v, wq, None, vv, return_weights=True),
                 attnext.additive_attention(q, pk, v, wq, None, vv, return_weights=True))


# --- ownership of kept data (finding 10) ----------------------------------------------------


def test_bahdanau_memory_owns_its_inputs():
    layer = _randomize(attnext.BahdanauAttention(4, 5, 6, rng=0), _rng(16))
    rng = _rng(17)
    keys = rng.standard_normal((2, 7, 5)).astype(np.float32)
    values = rng.standard_normal((2, 7, 3)).astype(np.float32)
    lengths = np.array([7, 4])
    q = rng.standard_normal((2, 4)).astype(np.float32)
    for kw in (dict(values=values, key_lengths=lengths), dict(key_lengths=lengths), dict()):
        k, kwc = keys.copy(), {n: a.copy() for n, a in kw.items()}
        mem = layer.precompute(k, **kwc)
        want = layer(q, mem)
        k[...] = 100.0  # the caller reuses its buffers for the next sentence
        for a in kwc.values():
            a[...] = 1
        assert _same(layer(q, mem), want), f"BahdanauMemory follows the caller's arrays ({sorted(kw)})"


def test_kv_cache_owns_appended_data():
    rng = _rng(18)
    cache = attnext.KVCache()
    k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3, 2))
    cache.append(k, v)
    kept = (cache.keys.copy(), cache.values.copy())
    k[...] = 0
    v[...] = 0
    assert _same((cache.keys, cache.values), kept)


def test_projected_keys_and_loaded_weights_are_owned():
    rng = _rng(19)
    k, wk = rng.standard_normal((2, 6, 5)), rng.standard_normal((5, 7))
    pk = attnext.project_keys(k, wk)
    kept = copy.deepcopy(pk)
    q, v, wq, vv = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 6, 3)), rng.standard_normal((4, 7)), \
        rng.standard_normal(7)
    want = attnext.additive_attention(q, kept, v, wq, None, vv)
    k[...] = 0
    wk[...] = 0
    assert _same(attnext.additive_attention(q, pk, v, wq, None, vv), want)
    # Weights loaded into layers are copies.
    for layer in (attnext.MultiHeadAttention(8, 2, rng=0), attnext.BahdanauAttention(4, 5, 6, rng=0),
                  attnext.LuongAttention(4, 5, "general", rng=0), attnext.SelfAttention(8, rng=0)):
        state = {n: np.array(a) + 1 for n, a in layer.state_dict().items()} if hasattr(layer, "state_dict") else None
        if state is None:
            continue
        layer.load_state_dict(state)
        kept = {n: np.array(a) for n, a in layer.state_dict().items()}
        for a in state.values():
            a[...] = 0
        assert _same({n: np.array(a) for n, a in layer.state_dict().items()}, kept), type(layer).__name__
