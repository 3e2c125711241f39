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
    """Random weights of healthy size in every parameter (g stays positive), set by their
    textbook attribute names (set_weights, the (in, out) alias of load_state_dict)."""
    new = {}
    for name, shape in layer._shapes.items():
        value = rng.standard_normal(shape)
        if name.startswith("w_"):
            value /= np.sqrt(shape[0])
        if name == "g":
            value = np.abs(value) + 0.5
        new[name] = value
    layer.set_weights(**new)


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
    params = {name: getattr(layer, name) for name in ("w_a", "w_query", "w_key", "v", "g") if name in layer._shapes}
    w_c = layer.w_c
    for query in (rng.standard_normal((3, 10)), rng.standard_normal((3, 4, 10))):
        query = query.astype(dtype)
        mask = rng.random(query.shape[:-1] + (9,)) < 0.8
        for kwargs in (dict(), dict(mask=mask), dict(key_lengths=[9, 3, 5]), dict(mask=mask, key_lengths=4)):
            got = layer(query, keys, values, **kwargs)
            want = ref.luong_attention(query, keys, values, w_c, method=method, **params, **kwargs)
            by_state = ref.luong_attention(query, keys, values, method=method, **layer.state_dict(), **kwargs)
            for a, b, c in zip(got, want, by_state):
                assert a.dtype == dtype and a.shape == b.shape
                assert rel_err(a, b) <= TOL[dtype], (method, kwargs.keys())
                assert rel_err(c, b) <= TOL[dtype]


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
    # state_dict: PyTorch's names and (out, in) layout (issue 14; the keys were the attribute
    # names, in (in, out) orientation, before).
    state = layer.state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        "query_proj.weight": (5, 4), "query_proj.bias": (5,), "key_proj.weight": (5, 3), "v.weight": (1, 5),
        "g": ()}
    np.testing.assert_array_equal(state["query_proj.weight"], layer.w_query.T)
    np.testing.assert_array_equal(state["key_proj.weight"], layer.w_key.T)
    np.testing.assert_array_equal(state["v.weight"][0], layer.v)
    np.testing.assert_array_equal(state["query_proj.bias"], layer.bias)
    state["v.weight"][:] = 0  # a copy: the layer is unchanged
    assert layer.v[0] == 1.0
    other.load_state_dict(layer.state_dict())
    for name in layer._shapes:
        assert np.array_equal(getattr(other, name), getattr(layer, name))
    with pytest.raises(ValueError, match=r"missing keys \['query_proj.bias'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "query_proj.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        other.load_state_dict({**state, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"query_proj.weight has shape \(4, 5\) but this layer needs \(5, 4\)"):
        other.load_state_dict({**state, "query_proj.weight": np.zeros((4, 5))})
    # the textbook names: set_weights (the alias), and a whole dict of them in load_state_dict
    before = other.state_dict()
    with pytest.raises(TypeError, match="unexpected names"):
        other.set_weights(w_query=np.zeros((4, 5)), w_value=np.zeros((4, 5)))
    assert all(np.array_equal(before[k], v) for k, v in other.state_dict().items())
    other.set_weights(w_query=np.ones((4, 5)))
    assert np.all(other.state_dict()["query_proj.weight"] == 1)
    other.load_state_dict({name: getattr(layer, name) for name in ("w_query", "w_key", "v", "g", "bias")})
    assert all(np.array_equal(layer.state_dict()[k], v) for k, v in other.state_dict().items())
    luong = attnext.LuongAttention(4, 3, "general", attentional_units=2, scale=True, rng=0)
    assert {k: v.shape for k, v in luong.state_dict().items()} == {
        "key_proj.weight": (4, 3), "g": (), "out_proj.weight": (2, 7)} and luong.w_c.shape == (7, 2)
    np.testing.assert_array_equal(luong.state_dict()["key_proj.weight"], luong.w_a)
    np.testing.assert_array_equal(luong.state_dict()["out_proj.weight"], luong.w_c.T)
    concat = attnext.LuongAttention(4, 3, "concat", units=6, rng=0)
    assert {k: v.shape for k, v in concat.state_dict().items()} == {
        "query_proj.weight": (6, 4), "key_proj.weight": (6, 3), "v.weight": (1, 6), "out_proj.weight": (4, 7)}
    assert luong.w_a.dtype == np.float32 and luong.g == 1.0
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
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
        got = luong(query, k, key_lengths=np.int64(3))
        want = ref.luong_attention(query, k, None, method=method, key_lengths=3, **luong.state_dict())
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


# --- PyTorch modules load as they are (issue 14: one vocabulary, PyTorch's (out, in) layout) ----


def _torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bias", [True, False])
def test_bahdanau_loads_a_pytorch_module(bias):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Bahdanau(nn.Module):  # the usual PyTorch form: three nn.Linear
        def __init__(self, dq, dk, units):
            super().__init__()
            self.query_proj = nn.Linear(dq, units, bias=bias)
            self.key_proj = nn.Linear(dk, units, bias=bias)
            self.v = nn.Linear(units, 1, bias=bias)

        def forward(self, s, h, values):  # s (B, T, dq), h (B, Lk, dk)
            e = self.v(torch.tanh(self.query_proj(s)[:, :, None, :] + self.key_proj(h)[:, None, :, :])).squeeze(-1)
            a = torch.softmax(e, dim=-1)
            return a @ values, a

    torch.manual_seed(0)
    module = Bahdanau(6, 5, 7)
    with torch.no_grad():
        for p in module.parameters():  # biases of weight-like size, so they matter
            p.normal_(0, 0.5)
    layer = attnext.BahdanauAttention(6, 5, 7, bias=bias)
    layer.load_state_dict(_torch_state(module))
    assert _same_state(layer.state_dict(), _torch_state(module))
    rng = np.random.default_rng(30)
    s = rng.standard_normal((2, 3, 6)).astype(np.float32)
    h = rng.standard_normal((2, 4, 5)).astype(np.float32)
    values = rng.standard_normal((2, 4, 3)).astype(np.float32)
    with torch.no_grad():
        want_c, want_a = (t.numpy() for t in module(torch.from_numpy(s), torch.from_numpy(h),
                                                    torch.from_numpy(values)))
    got_c, got_a = layer(s, layer.precompute(h, values))
    np.testing.assert_allclose(got_a, want_a, atol=1e-5)
    np.testing.assert_allclose(got_c, want_c, atol=1e-5)
    ref_c, ref_a = ref.bahdanau_attention(s, h, values, **layer.state_dict())
    np.testing.assert_allclose(ref_a, want_a, atol=1e-5)
    np.testing.assert_allclose(ref_c, want_c, atol=1e-5)


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].shape == np.shape(b[k]) and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["dot", "general", "concat"])
def test_luong_loads_a_pytorch_module(method):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    dq, dk, dv, units, att = 6, (6 if method == "dot" else 5), 4, 7, 3

    class Luong(nn.Module):
        def __init__(self):
            super().__init__()
            if method == "general":
                self.key_proj = nn.Linear(dk, dq, bias=False)  # e_tj = s_t . key_proj(h_j) = s_t W_a h_j
            elif method == "concat":
                self.query_proj = nn.Linear(dq, units, bias=False)
                self.key_proj = nn.Linear(dk, units, bias=False)
                self.v = nn.Linear(units, 1, bias=False)
            self.g = nn.Parameter(torch.tensor(1.3))
            self.out_proj = nn.Linear(dv + dq, att, bias=False)  # W_c on [c_t; s_t]

        def forward(self, s, h, values):  # s (B, T, dq)
            if method == "dot":
                e = s @ h.transpose(-1, -2)
            elif method == "general":
                e = s @ self.key_proj(h).transpose(-1, -2)
            else:
                e = self.v(torch.tanh(self.query_proj(s)[:, :, None] + self.key_proj(h)[:, None])).squeeze(-1)
            a = torch.softmax(self.g * e, dim=-1)
            c = a @ values
            return torch.tanh(self.out_proj(torch.cat([c, s], dim=-1))), c, a

    torch.manual_seed(1)
    module = Luong()
    layer = attnext.LuongAttention(dq, dk, method, units=units, value_dim=dv, attentional_units=att, scale=True)
    layer.load_state_dict(_torch_state(module))
    assert _same_state(layer.state_dict(), _torch_state(module))
    rng = np.random.default_rng(31)
    s = rng.standard_normal((2, 3, dq)).astype(np.float32)
    h = rng.standard_normal((2, 5, dk)).astype(np.float32)
    values = rng.standard_normal((2, 5, dv)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in module(*(torch.from_numpy(x) for x in (s, h, values)))]
    for got in (layer(s, h, values), ref.luong_attention(s, h, values, method=method, **layer.state_dict())):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_textbook_names_in_load_state_dict_point_to_set_weights():
    layer = attnext.BahdanauAttention(4, 3, 5, rng=0)
    with pytest.raises(ValueError, match=r"\['w_query'\] are attribute names .* set_weights"):
        layer.load_state_dict({"w_query": np.zeros((4, 5))})
