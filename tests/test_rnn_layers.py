"""BahdanauAttention and LuongAttention: against the reference math, one step vs many, weights
handling, and the end-to-end GRU example."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import attnext
from attnext import reference as ref
from hardening.harness import DTYPES, unaligned
from hardening.harness import TOLERANCE as TOL
from hardening.harness import relative_error as rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]


def randomize(layer, rng):
    """Random weights of healthy size in every parameter (g stays positive)."""
    for name, value in layer.state_dict().items():
        new = rng.standard_normal(value.shape)
        if name.startswith("w_"):
            new /= np.sqrt(value.shape[0])
        if name == "g":
            new = np.abs(new) + 0.5
        setattr(layer, name, new)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_bahdanau_matches_formula(dtype, normalize):
    rng = np.random.default_rng(0)
    layer = attnext.BahdanauAttention(11, 7, 33, normalize=normalize, dtype=dtype, rng=1)
    randomize(layer, rng)
    keys = rng.standard_normal((3, 13, 7)).astype(dtype)
    values = rng.standard_normal((3, 13, 5)).astype(dtype)
    lengths = np.array([13, 6, 1])
    memory = layer.precompute(keys, values, key_lengths=lengths)
    extra = dict(g=layer.g, bias=layer.bias) if normalize else {}
    for query in (rng.standard_normal((3, 11)), rng.standard_normal((3, 4, 11))):
        query = query.astype(dtype)
        context, weights = layer(query, memory)
        r_context, r_weights = ref.bahdanau_attention(query, keys, values, layer.w_query, layer.w_key, layer.v,
                                                      key_lengths=lengths, **extra)
        assert context.dtype == dtype and context.shape == r_context.shape and weights.shape == r_weights.shape
        assert rel_err(context, r_context) <= TOL[dtype]
        assert rel_err(weights, r_weights) <= TOL[dtype]
        assert np.all(weights[2, ..., 1:] == 0)
    # the formula written out, one step, batch entry 0 (all 13 keys visible)
    s = rng.standard_normal(11).astype(dtype)
    v_eff = layer.g * layer.v / np.linalg.norm(layer.v) if normalize else layer.v
    b = layer.bias if normalize else 0
    e = np.array([v_eff @ np.tanh(s @ layer.w_query + h @ layer.w_key + b) for h in keys[0]])
    a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
    context, weights = layer(np.broadcast_to(s, (3, 11)), memory)
    assert rel_err(weights[0], a) <= TOL[dtype] and rel_err(context[0], a @ values[0]) <= TOL[dtype]
    if normalize:
        np.testing.assert_allclose(layer.effective_v, layer.g * layer.v / np.linalg.norm(layer.v), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bahdanau_one_step_equals_many(dtype):
    rng = np.random.default_rng(2)
    layer = attnext.BahdanauAttention(16, 9, 24, dtype=dtype, rng=3)
    memory = layer.precompute(rng.standard_normal((2, 10, 9)))
    queries = rng.standard_normal((2, 6, 16)).astype(dtype)
    context, weights = layer(queries, memory)
    for t in range(6):
        c, w = layer(queries[:, t], memory)
        assert rel_err(c, context[:, t]) <= TOL[dtype]
        assert rel_err(w, weights[:, t]) <= TOL[dtype]
    only = layer(queries[:, 0], memory, return_weights=False)
    assert np.array_equal(only, layer(queries[:, 0], memory)[0])


def test_bahdanau_memory_checks():
    rng = np.random.default_rng(4)
    layer = attnext.BahdanauAttention(4, 3, 5, rng=0)
    memory = layer.precompute(rng.standard_normal((2, 6, 3)))
    layer(rng.standard_normal((2, 4)), memory)
    with pytest.raises(ValueError, match=r"query has shape \(3, 4\) but the memory's batch shape is \(2,\)"):
        layer(rng.standard_normal((3, 4)), memory)
    with pytest.raises(ValueError, match="query has shape"):
        layer(rng.standard_normal((2, 5)), memory)
    with pytest.raises(TypeError, match="memory must be a BahdanauMemory"):
        layer(rng.standard_normal((2, 4)), rng.standard_normal((2, 6, 3)))
    other = attnext.BahdanauAttention(4, 3, 5, rng=0)
    with pytest.raises(ValueError, match="precompute"):
        other(rng.standard_normal((2, 4)), memory)
    layer.w_key = layer.w_key * 2
    with pytest.raises(ValueError, match="precompute"):
        layer(rng.standard_normal((2, 4)), memory)
    layer(rng.standard_normal((2, 4)), layer.precompute(rng.standard_normal((2, 6, 3))))
    with pytest.raises(ValueError, match=r"keys must have shape \(\.\.\., Lk, 3\)"):
        layer.precompute(rng.standard_normal((2, 6, 4)))
    with pytest.raises(ValueError, match="values have"):
        layer.precompute(rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 5, 3)))
    with pytest.raises(ValueError, match="key_lengths must lie in"):
        layer.precompute(rng.standard_normal((2, 6, 3)), key_lengths=[7, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dot", "general", "concat"])
@pytest.mark.parametrize("scale", [False, True])
def test_luong_matches_formula(dtype, method, scale):
    rng = np.random.default_rng(5)
    key_dim = 10 if method == "dot" else 7
    layer = attnext.LuongAttention(10, key_dim, method, attentional_units=6, value_dim=5, units=12, scale=scale,
                                   dtype=dtype, rng=6)
    randomize(layer, rng)
    keys = rng.standard_normal((3, 9, key_dim)).astype(dtype)
    values = rng.standard_normal((3, 9, 5)).astype(dtype)
    params = layer.state_dict()
    w_c = params.pop("w_c")
    for query in (rng.standard_normal((3, 10)), rng.standard_normal((3, 4, 10))):
        query = query.astype(dtype)
        mask = rng.random(query.shape[:-1] + (9,)) < 0.8
        for kwargs in (dict(), dict(mask=mask), dict(key_lengths=[9, 3, 5]), dict(mask=mask, key_lengths=4)):
            got = layer(query, keys, values, **kwargs)
            want = ref.luong_attention(query, keys, values, w_c, method=method, **params, **kwargs)
            for a, b in zip(got, want):
                assert a.dtype == dtype and a.shape == b.shape
                assert rel_err(a, b) <= TOL[dtype], (method, kwargs.keys())


@pytest.mark.parametrize("dtype", DTYPES)
def test_luong_dot_is_softmax_of_dot_joined_through_w_c(dtype):
    rng = np.random.default_rng(7)
    layer = attnext.LuongAttention(8, dtype=dtype, rng=8)
    s = rng.standard_normal((2, 8)).astype(dtype)
    h = rng.standard_normal((2, 5, 8)).astype(dtype)
    hidden, context, weights = layer(s, h)
    e = np.einsum("bd,bjd->bj", s, h)
    a = np.exp(e - e.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    c = np.einsum("bj,bjd->bd", a, h)
    want = np.tanh(np.concatenate([c, s], axis=-1) @ layer.w_c)
    assert rel_err(weights, a) <= TOL[dtype]
    assert rel_err(context, c) <= TOL[dtype]
    assert rel_err(hidden, want) <= TOL[dtype]


@pytest.mark.parametrize("method", ["dot", "general", "concat"])
def test_luong_one_step_equals_many(method):
    rng = np.random.default_rng(9)
    layer = attnext.LuongAttention(6, 6, method, dtype=np.float64, rng=10)
    keys = rng.standard_normal((2, 7, 6))
    queries = rng.standard_normal((2, 5, 6))
    mask = rng.random((2, 7)) < 0.7
    mask[:, 0] = True
    many = layer(queries, keys, mask=mask[:, None, :], key_lengths=[7, 4])
    for t in range(5):
        one = layer(queries[:, t], keys, mask=mask, key_lengths=[7, 4])
        for a, b in zip(one, many):
            assert rel_err(a, b[:, t]) <= 1e-12


def test_luong_errors():
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="method must be one of"):
        attnext.LuongAttention(4, method="bilinear")
    with pytest.raises(ValueError, match="method='dot' needs key_dim == query_dim"):
        attnext.LuongAttention(4, 5)
    layer = attnext.LuongAttention(4, 3, "general", rng=0)
    keys = rng.standard_normal((2, 5, 3))
    with pytest.raises(ValueError, match=r"query has shape \(2, 5\) but keys have \(2, 5, 3\)"):
        layer(rng.standard_normal((2, 5)), keys)
    with pytest.raises(ValueError, match=r"keys must have shape \(\.\.\., Lk, 3\)"):
        layer(rng.standard_normal((2, 4)), rng.standard_normal((2, 5, 4)))
    with pytest.raises(ValueError, match="mask has shape"):
        layer(rng.standard_normal((2, 4)), keys, mask=np.ones((2, 6), bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        layer(rng.standard_normal((2, 4)), keys, mask=np.ones((2, 5), int))
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        layer(np.ones((2, 4), int), keys)


def test_weights_attributes_and_state_dict():
    layer = attnext.BahdanauAttention(4, 3, 5, normalize=True, dtype=np.float64, rng=0)
    assert layer.w_query.shape == (4, 5) and layer.w_key.shape == (3, 5) and layer.v.shape == (5,)
    assert layer.g.shape == () and np.all(layer.bias == 0) and layer.w_query.dtype == np.float64
    assert np.isclose(layer.g, np.sqrt(1 / 5))
    same = attnext.BahdanauAttention(4, 3, 5, normalize=True, dtype=np.float64, rng=0)
    other = attnext.BahdanauAttention(4, 3, 5, normalize=True, dtype=np.float64, rng=1)
    assert np.array_equal(same.w_query, layer.w_query) and not np.array_equal(other.w_query, layer.w_query)
    with pytest.raises(ValueError, match=r"w_query has shape \(5, 4\) but this layer needs \(4, 5\)"):
        layer.w_query = np.zeros((5, 4))
    with pytest.raises(TypeError):
        layer.v = np.arange(5)
    layer.v = np.arange(1.0, 6.0)
    assert layer.v.dtype == np.float64
    np.testing.assert_allclose(layer.effective_v, layer.g * np.arange(1.0, 6.0) / np.linalg.norm(np.arange(1.0, 6.0)))
    state = layer.state_dict()
    assert set(state) == {"w_query", "w_key", "v", "g", "bias"}
    state["v"][:] = 0  # a copy: the layer is unchanged
    assert layer.v[0] == 1.0
    other.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert np.array_equal(getattr(other, name), value)
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        other.load_state_dict({**state, "extra": np.zeros(1)})
    luong = attnext.LuongAttention(4, 3, "general", attentional_units=2, scale=True, rng=0)
    assert set(luong.state_dict()) == {"w_a", "g", "w_c"} and luong.w_c.shape == (7, 2)
    assert luong.w_a.dtype == np.float32 and luong.g == 1.0
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        attnext.LuongAttention(4, dtype=np.int32)
    with pytest.raises(ValueError, match="units must be a positive int"):
        attnext.BahdanauAttention(4, 3, 0)



# --- regressions found by the hardening registry (tests/hardening/kernels.py) ------------------


@pytest.mark.parametrize("single", [True, False], ids=["one_step", "many_steps"])
def test_key_lengths_with_unbatched_keys(single):
    # Keys (Lk, D) with no batch axis and a scalar key_lengths: the lengths used to become
    # shape (1,) (np.ascontiguousarray of a 0-d array) and the call raised a ValueError.
    rng = np.random.default_rng(20)
    keys, values = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    query = rng.standard_normal(4) if single else rng.standard_normal((5, 4))
    bahdanau = attnext.BahdanauAttention(4, 3, 5, dtype=np.float64, rng=0)
    got = bahdanau(query, bahdanau.precompute(keys, values, key_lengths=2))
    want = ref.bahdanau_attention(query, keys, values, bahdanau.w_query, bahdanau.w_key, bahdanau.v, key_lengths=2)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-12
    assert np.all(got[1][..., 2:] == 0)
    for method in ("dot", "general", "concat"):
        luong = attnext.LuongAttention(4, 4 if method == "dot" else 3, method, dtype=np.float64, rng=1)
        k = rng.standard_normal((6, luong.key_dim))
        params = luong.state_dict()
        w_c = params.pop("w_c")
        got = luong(query, k, key_lengths=np.int64(3))
        want = ref.luong_attention(query, k, None, w_c, method=method, key_lengths=3, **params)
        for a, b in zip(got, want):
            assert a.shape == b.shape and rel_err(a, b) <= 1e-12, method
        assert np.all(got[2][..., 3:] == 0)


def test_unaligned_inputs_are_copied():
    # Unaligned data of the layer's dtype used to reach _core, which refuses it with ValueError;
    # the public API copies it (docs/robustness.md).
    rng = np.random.default_rng(21)
    query, keys, values = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 2))
    bahdanau = attnext.BahdanauAttention(4, 4, 5, dtype=np.float64, rng=0)
    want = bahdanau(query, bahdanau.precompute(keys, values, key_lengths=[6, 2]))
    got = bahdanau(unaligned(query), bahdanau.precompute(unaligned(keys), unaligned(values), key_lengths=[6, 2]))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for method in ("dot", "general", "concat"):
        luong = attnext.LuongAttention(4, 4, method, value_dim=2, dtype=np.float64, rng=1)
        mask = rng.standard_normal((2, 3, 6))
        want = luong(query, keys, values, mask=mask)
        got = luong(unaligned(query), unaligned(keys), unaligned(values), mask=unaligned(mask))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("special", [np.nan, np.inf])
def test_bahdanau_normalize_non_finite_v_propagates(special):
    # With normalize=True a NaN in v made ||v|| NaN, which the zero-norm guard (norm > 0 is
    # False for NaN) turned into a zero effective v: finite, uniform weights instead of NaN.
    rng = np.random.default_rng(22)
    layer = attnext.BahdanauAttention(4, 3, 5, normalize=True, dtype=np.float64, rng=0)
    v = layer.v.copy()
    v[2] = special
    # ||v|| = inf makes g * v / ||v|| hold inf / inf: NumPy's "invalid value" RuntimeWarning is
    # the point of this input (the NaN must propagate), not a defect.
    with np.errstate(invalid="ignore", over="ignore"):
        layer.v = v
        assert not np.isfinite(layer.effective_v).all()
        query, keys = rng.standard_normal((2, 4)), rng.standard_normal((2, 6, 3))
        context, weights = layer(query, layer.precompute(keys))
        r_context, r_weights = ref.bahdanau_attention(query, keys, keys, layer.w_query, layer.w_key, v, g=layer.g,
                                                      bias=layer.bias)
    assert np.isnan(r_weights).all() and np.isnan(weights).all() and np.isnan(context).all()
    # A zero v stays the documented special case: a zero effective v, uniform weights.
    layer.v = np.zeros(5)
    assert not layer.effective_v.any()
    np.testing.assert_allclose(layer(query, layer.precompute(keys))[1], 1 / 6)


@pytest.mark.parametrize("make", [lambda n: attnext.BahdanauAttention(2, 2, n), lambda n: attnext.BahdanauAttention(n, 2, 2),
                                  lambda n: attnext.LuongAttention(2, 3, "concat", units=n),
                                  lambda n: attnext.LuongAttention(2, attentional_units=n)])
def test_huge_layer_sizes_are_value_errors(make):
    # A size beyond 1e308 used to escape as OverflowError from the Glorot initialisation.
    with pytest.raises(ValueError, match="too large"):
        make(10**400)
    with pytest.raises((ValueError, MemoryError)):
        make(2**62)


def load_example():
    spec = importlib.util.spec_from_file_location("rnn_attention_example", ROOT / "examples" / "rnn_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_example_alignment(task):
    results = load_example().main(["--task", task, "--length", "9", "--batch", "3", "--quiet"])
    tokens = results["tokens"]
    n = tokens.shape[1]
    target = np.arange(n) if task == "copy" else np.arange(n)[::-1]
    for name in ("luong", "bahdanau"):
        outputs, weights = results[name]
        assert weights.shape == (3, n, n)
        assert np.array_equal(np.argmax(weights, axis=-1), np.broadcast_to(target, (3, n))), name
        assert np.all(weights[:, np.arange(n), target] > 0.9), name
        assert np.array_equal(outputs, tokens[:, target]), name


def test_example_runs_as_a_script():
    # The child imports the attnext this test imported (installed or the developer tree).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "rnn_attention.py"), "--task", "reverse",
                          "--length", "5"], capture_output=True, text=True, env=env, check=True).stdout
    assert "step 0: weights" in out and "attends to position 4" in out
