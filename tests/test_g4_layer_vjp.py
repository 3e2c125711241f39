"""Layer gradients (issue 15, "Layers"): every layer's vjp against float64 central finite
differences of the layer's own call, param_grads keyed like state_dict, the Bahdanau decoder loop
(precompute_vjp + memory gradients summed over steps) against the plain-keys vjp, dropout (fixed
seed, other seed, plain calls untouched), and MultiHeadAttention against torch autograd."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import attnext
from attnext import BahdanauAttention, LuongAttention, MultiHeadAttention, SelfAttention
from attnext.rnn import BahdanauMemoryGrad

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes, many calls: one thread keeps them fast on a loaded machine (the threads'
    results are bit-identical anyway)."""
    with attnext.threads(1):
        yield


STEP = 1e-5  # central differences in float64: truncation ~STEP**2, rounding ~1e-16 / STEP
FD_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# helpers


def outputs_of(result):
    return result if isinstance(result, tuple) else (result,)


def random_cotangent(rng, result, skip=()):
    """A random cotangent shaped like result (None for outputs that are None or in skip)."""
    cts = tuple(None if o is None or i in skip else rng.standard_normal(o.shape) for i, o in enumerate(outputs_of(result)))
    return cts if isinstance(result, tuple) else cts[0]


def loss(result, cotangent) -> float:
    cts = outputs_of(cotangent) if isinstance(result, tuple) else (cotangent,)
    return sum(float(np.sum(c * o)) for c, o in zip(cts, outputs_of(result)) if c is not None)


def directional_error(fd: float, grad: np.ndarray, direction: np.ndarray) -> float:
    """|finite difference - <grad, direction>| relative to ||grad|| ||direction|| (the largest
    the directional derivative can be), so a direction that happens to be near-orthogonal to
    the gradient does not inflate the error; a gradient that is zero (key biases under a
    softmax) is held to 1e-3 ||direction||, far above the differences' rounding (~1e-10)."""
    exact = float(np.sum(grad * direction))
    return abs(fd - exact) / (max(float(np.linalg.norm(grad)), 1e-3) * float(np.linalg.norm(direction)))


def check_against_fd(layer, call, inputs, rng, *, vjp=None, skip=(), directions=2):
    """layer.vjp(*inputs) (or vjp(layer, *inputs)) against central differences of
    call(layer, *inputs), for every input and every parameter, along random directions."""
    result, pullback = (vjp or (lambda lay, *a: lay.vjp(*a)))(layer, *inputs)
    cotangent = random_cotangent(rng, result, skip)
    input_grads, param_grads = pullback(cotangent)
    state = layer.state_dict()
    assert list(param_grads) == list(state)
    for name, g in param_grads.items():
        assert g.shape == state[name].shape and g.dtype == state[name].dtype, name
    assert len(input_grads) == len(inputs)
    for g, x in zip(input_grads, inputs):
        assert g.shape == np.shape(x) and g.dtype == np.asarray(x).dtype

    def value(inps, st):
        layer.load_state_dict(st)
        return loss(call(layer, *inps), cotangent)

    try:
        for i, x in enumerate(inputs):
            for _ in range(directions):
                d = rng.standard_normal(np.shape(x))
                plus = [a + STEP * d if j == i else a for j, a in enumerate(inputs)]
                minus = [a - STEP * d if j == i else a for j, a in enumerate(inputs)]
                fd = (value(plus, state) - value(minus, state)) / (2 * STEP)
                assert directional_error(fd, input_grads[i], d) <= FD_RTOL, f"input {i}"
        for name, p in state.items():
            for _ in range(directions):
                d = rng.standard_normal(p.shape)
                fd = (value(inputs, {**state, name: p + STEP * d}) - value(inputs, {**state, name: p - STEP * d})) / (
                    2 * STEP)
                assert directional_error(fd, param_grads[name], d) <= FD_RTOL, name
    finally:
        layer.load_state_dict(state)
    return result, input_grads, param_grads


def randomize(layer, rng):
    """Random weights everywhere, biases included (zero biases would hide their gradients)."""
    layer.load_state_dict({k: rng.standard_normal(v.shape) * 0.5 for k, v in layer.state_dict().items()})
    return layer


# --------------------------------------------------------------------------------------------
# MultiHeadAttention


def mha_call(**kw):
    return lambda layer, *inputs: layer(*inputs, **kw)


def mha_vjp(**kw):
    return lambda layer, *inputs: layer.vjp(*inputs, **kw)


MHA_CASES = {
    "self": (dict(), 1, {}),
    "self_no_bias": (dict(bias=False), 1, {}),
    "cross_key": (dict(), 2, {}),
    "cross_key_value": (dict(), 3, {}),
    "kdim_vdim": (dict(kdim=3, vdim=5), 3, {}),
    "seq_first": (dict(batch_first=False), 3, {}),
    "gqa": (dict(num_kv_heads=1), 1, {}),
    "gqa_cross": (dict(num_kv_heads=2, kdim=3, vdim=5), 3, {}),
    "causal": (dict(), 1, dict(is_causal=True)),
    "causal_bottom_right": (dict(num_kv_heads=2), 2, dict(is_causal="bottom_right")),
    "window": (dict(), 1, dict(window=(1, 0))),
    "key_lengths": (dict(), 3, dict(key_lengths=np.array([3, 5]))),
    "padding_key_mask": (dict(), 1, dict(key_mask=np.arange(5)[None, :] < np.array([[4], [2]]))),
    "bool_attn_mask": (dict(), 1, dict(attn_mask=np.tril(np.ones((5, 5), dtype=bool), 1))),
    "float_attn_mask": (dict(), 2, dict(attn_mask="float")),
    "weights_averaged": (dict(), 1, dict(return_weights=True)),
    "weights_per_head": (dict(num_kv_heads=2), 3, dict(return_weights=True, average_attn_weights=False)),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_vjp_matches_finite_differences(case):
    rng = np.random.default_rng(sum(map(ord, case)))
    config, n_inputs, kw = MHA_CASES[case]
    e = 8
    layer = randomize(MultiHeadAttention(e, 4, dtype=np.float64, rng=1, **config), rng)
    lq, s, b = 4, 5, 2
    if n_inputs == 1:
        lq = s
    kw = dict(kw)
    if isinstance(kw.get("attn_mask"), str):
        kw["attn_mask"] = rng.standard_normal((lq, s))
    shape = (lambda n, f: (b, n, f)) if layer.batch_first else (lambda n, f: (n, b, f))
    inputs = [rng.standard_normal(shape(lq, e)), rng.standard_normal(shape(s, layer.kdim)),
              rng.standard_normal(shape(s, layer.vdim))][:n_inputs]
    if n_inputs == 2 and layer.kdim != layer.vdim:
        pytest.skip("value defaults to key only when kdim == vdim")
    check_against_fd(layer, mha_call(**kw), inputs, rng, vjp=mha_vjp(**kw))


def test_mha_unbatched_and_same_array_thrice():
    rng = np.random.default_rng(3)
    layer = randomize(MultiHeadAttention(6, 2, dtype=np.float64, rng=0), rng)
    x = rng.standard_normal((4, 6))
    check_against_fd(layer, mha_call(), [x], rng, vjp=mha_vjp())
    # The same array as query, key and value: one gradient per argument, summing to the self-attention one.
    xb = rng.standard_normal((2, 4, 6))
    (out1, _), pb1 = layer.vjp(xb)
    (out3, _), pb3 = layer.vjp(xb, xb, xb)
    assert np.array_equal(out1, out3)
    g = rng.standard_normal(out1.shape)
    (dx,), p1 = pb1((g, None))
    (dq, dk, dv), p3 = pb3((g, None))
    np.testing.assert_allclose(dq + dk + dv, dx, rtol=1e-12, atol=1e-12)
    for name in p1:
        np.testing.assert_allclose(p3[name], p1[name], rtol=1e-12, atol=1e-12)


def test_mha_vjp_output_is_the_call_and_pullback_is_repeatable():
    rng = np.random.default_rng(5)
    layer = randomize(MultiHeadAttention(8, 2, dtype=np.float32, rng=0), rng)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    (out, w), pullback = layer.vjp(x, return_weights=True)
    ref_out, ref_w = layer(x, return_weights=True)
    assert np.array_equal(out, ref_out) and np.array_equal(w, ref_w)
    g = (rng.standard_normal(out.shape).astype(np.float32), rng.standard_normal(w.shape).astype(np.float32))
    first = pullback(g)
    x[...] = 0  # the caller's array changes; the pullback kept its own
    layer.load_state_dict({k: v * 0 for k, v in layer.state_dict().items()})  # so do the weights
    second = pullback(g)
    for a, b in zip(first[0], second[0]):
        assert np.array_equal(a, b)
    for name in first[1]:
        assert np.array_equal(first[1][name], second[1][name]) and first[1][name].dtype == np.float32
    assert pullback.seed is None


def test_mha_cotangent_checks():
    layer = MultiHeadAttention(4, 2, rng=0)
    x = np.ones((1, 3, 4), dtype=np.float32)
    (out, _), pullback = layer.vjp(x)
    with pytest.raises(TypeError, match="cotangent must be a tuple of 2"):
        pullback(np.ones_like(out))
    with pytest.raises(ValueError, match=r"cotangent\[0\] has shape \(1, 3, 5\) but the output has \(1, 3, 4\)"):
        pullback((np.ones((1, 3, 5)), None))
    with pytest.raises(ValueError, match=r"cotangent\[1\] is given but that output is None"):
        pullback((np.ones_like(out), np.ones((1, 3, 3))))
    (dx,), params = pullback((None, None))  # nothing differentiated: zero gradients
    assert not dx.any() and not any(p.any() for p in params.values())


def torch_mha(torch, layer: MultiHeadAttention):
    m = torch.nn.MultiheadAttention(layer.embed_dim, layer.num_heads, kdim=layer.kdim, vdim=layer.vdim,
                                    bias=layer.bias, batch_first=layer.batch_first)
    with torch.no_grad():
        for name, p in m.state_dict().items():
            p.copy_(torch.from_numpy(layer.state_dict()[name]))
    return m.train()


@pytest.mark.parametrize("config,kw", [
    (dict(), dict()),
    (dict(kdim=3, vdim=5), dict(cross=True)),
    (dict(batch_first=False), dict(is_causal=True)),
    (dict(), dict(key_mask=True, weights=True)),
])
def test_mha_grads_match_torch_autograd(config, kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    layer = randomize(MultiHeadAttention(8, 2, rng=0, **config), rng)
    m = torch_mha(torch, layer)
    b, lq, s = 2, 5, 5
    shape = (lambda n, f: (b, n, f)) if layer.batch_first else (lambda n, f: (n, b, f))
    cross = kw.get("cross", False)
    q = rng.standard_normal(shape(lq, 8)).astype(np.float32)
    k = rng.standard_normal(shape(s, layer.kdim)).astype(np.float32) if cross else q
    v = rng.standard_normal(shape(s, layer.vdim)).astype(np.float32) if cross else q
    ours_kw, torch_kw = {}, {}
    if kw.get("is_causal"):
        ours_kw["is_causal"] = True
        torch_kw.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(lq), is_causal=True)
    if kw.get("key_mask"):
        keep = np.arange(s)[None, :] < np.array([[5], [3]])
        ours_kw["key_mask"] = keep
        torch_kw["key_padding_mask"] = torch.from_numpy(~keep)
    weights = kw.get("weights", False)
    (out, w), pullback = layer.vjp(q, k, v, return_weights=weights, **ours_kw) if cross else \
        layer.vjp(q, return_weights=weights, **ours_kw)
    g_out = rng.standard_normal(out.shape).astype(np.float32)
    g_w = rng.standard_normal(w.shape).astype(np.float32) if weights else None
    input_grads, params = pullback((g_out, g_w))

    tq = torch.from_numpy(q).requires_grad_()
    tk = torch.from_numpy(k).requires_grad_() if cross else tq
    tv = torch.from_numpy(v).requires_grad_() if cross else tq
    t_out, t_w = m(tq, tk, tv, need_weights=weights, **torch_kw)
    total = (t_out * torch.from_numpy(g_out)).sum()
    if weights:
        total = total + (t_w * torch.from_numpy(g_w)).sum()
    total.backward()
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-5)

    def close(ours, theirs, what):
        err = np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30)
        assert err <= 1e-5, f"{what}: relative error {err:.2e}"

    for ours, t in zip(input_grads, (tq, tk, tv) if cross else (tq,)):
        close(ours, t.grad.numpy(), "input")
    named = dict(m.named_parameters())
    for name, g in params.items():
        close(g, named[name].grad.numpy(), name)


# --------------------------------------------------------------------------------------------
# SelfAttention


SELF_CASES = {
    "plain": (dict(), {}),
    "bias_dims": (dict(bias=True, qk_dim=3, v_dim=5), {}),
    "exclude_self_causal": (dict(exclude_self=True, bias=True), dict(is_causal=True)),
    "key_lengths_weights": (dict(bias=True), dict(key_lengths=np.array([4, 2]), return_weights=True)),
    "mask_window": (dict(), dict(attn_mask="float", window=(2, 1), return_weights=True)),
}


@pytest.mark.parametrize("case", list(SELF_CASES))
def test_self_attention_vjp_matches_finite_differences(case):
    rng = np.random.default_rng(sum(map(ord, case)) + 7)
    config, kw = SELF_CASES[case]
    kw = dict(kw)
    if isinstance(kw.get("attn_mask"), str):
        kw["attn_mask"] = rng.standard_normal((2, 4, 4))
    layer = randomize(SelfAttention(6, dtype=np.float64, rng=0, **config), rng)
    x = rng.standard_normal((2, 4, 6))
    check_against_fd(layer, lambda lay, a: lay(a, **kw), [x], rng, vjp=lambda lay, a: lay.vjp(a, **kw))


def test_self_attention_state_dict_keys_and_pickled_dropout():
    layer = SelfAttention(4, bias=True, dropout=0.25, rng=0)
    assert list(layer.state_dict()) == ["query.weight", "key.weight", "value.weight", "query.bias", "key.bias",
                                        "value.bias"]
    assert "dropout=0.25" in repr(layer)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert clone.dropout == 0.25 and repr(clone) == repr(layer)
    mha = MultiHeadAttention(4, 2, dropout=0.5, rng=0)
    assert "dropout=0.5" in repr(mha) and pickle.loads(pickle.dumps(mha)).dropout == 0.5
    assert "dropout" not in repr(MultiHeadAttention(4, 2))
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\], got 1.5"):
        MultiHeadAttention(4, 2, dropout=1.5)
    with pytest.raises(TypeError, match="dropout"):
        SelfAttention(4, dropout="0.1")


def test_from_torch_keeps_the_modules_dropout():
    torch = pytest.importorskip("torch")
    layer = MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(4, 2, dropout=0.125))
    assert layer.dropout == 0.125 and "dropout=0.125" in repr(layer)


# --------------------------------------------------------------------------------------------
# dropout (needs the dropout kernels and attnext.grad's dropout backward)


def dropout_layers(rng):
    pytest.importorskip("attnext._philox", reason="the dropout generator (g1b's branch) is not merged")
    mha = randomize(MultiHeadAttention(8, 2, dropout=0.4, dtype=np.float64, rng=0), rng)
    sa = randomize(SelfAttention(6, bias=True, dropout=0.4, dtype=np.float64, rng=0), rng)
    return [(mha, rng.standard_normal((2, 5, 8))), (sa, rng.standard_normal((2, 5, 6)))]


def test_dropout_is_seeded_and_only_in_vjp():
    rng = np.random.default_rng(21)
    for layer, x in dropout_layers(rng):
        first, pb1 = layer.vjp(x, seed=123)
        again, pb2 = layer.vjp(x, seed=123)
        other, _ = layer.vjp(x, seed=124)
        out = outputs_of(first)[0]
        assert np.array_equal(out, outputs_of(again)[0]) and not np.allclose(out, outputs_of(other)[0])
        assert pb1.seed == 123
        ct = random_cotangent(rng, first)
        g1, g2 = pb1(ct), pb2(ct)
        assert all(np.array_equal(a, b) for a, b in zip(g1[0], g2[0]))
        assert all(np.array_equal(g1[1][n], g2[1][n]) for n in g1[1])
        # plain calls never drop: the same as a layer without dropout
        plain = copy.deepcopy(layer)
        plain.dropout = 0.0
        assert np.array_equal(outputs_of(layer(x))[0], outputs_of(plain(x))[0])
        assert not np.allclose(outputs_of(layer(x))[0], out)
        # seed=None draws one and records it: rerunning with it repeats the step
        drawn, pb = layer.vjp(x)
        assert isinstance(pb.seed, int) and np.array_equal(outputs_of(layer.vjp(x, seed=pb.seed)[0])[0],
                                                            outputs_of(drawn)[0])


def test_dropout_vjp_matches_finite_differences_with_a_fixed_seed():
    rng = np.random.default_rng(22)
    for layer, x in dropout_layers(rng):
        kw = dict(return_weights=True, seed=77)
        check_against_fd(layer, lambda lay, a: lay.vjp(a, **kw)[0], [x], rng, vjp=lambda lay, a: lay.vjp(a, **kw))


# --------------------------------------------------------------------------------------------
# Bahdanau


def bahdanau_call(values=None, key_lengths=None, return_weights=True):
    def call(layer, query, keys, *maybe_values):
        vals = maybe_values[0] if maybe_values else values
        return layer(query, layer.precompute(keys, vals, key_lengths), return_weights=return_weights)
    return call


BAHDANAU_CASES = {
    "plain_one_step": (dict(), dict(), (2, 5)),
    "bias_many_steps": (dict(bias=True), dict(), (2, 3, 5)),
    "normalize": (dict(normalize=True), dict(), (2, 3, 5)),
    "values_lengths": (dict(bias=True, normalize=True), dict(values=True, key_lengths=np.array([4, 2])), (2, 5)),
    "context_only": (dict(), dict(return_weights=False), (2, 2, 5)),
}


@pytest.mark.parametrize("case", list(BAHDANAU_CASES))
def test_bahdanau_vjp_with_encoder_states_matches_finite_differences(case):
    rng = np.random.default_rng(sum(map(ord, case)) + 3)
    config, kw, qshape = BAHDANAU_CASES[case]
    layer = randomize(BahdanauAttention(5, 3, 4, dtype=np.float64, rng=0, **config), rng)
    query, keys = rng.standard_normal(qshape), rng.standard_normal((2, 4, 3))
    inputs = [query, keys] + ([rng.standard_normal((2, 4, 6))] if kw.get("values") else [])
    lengths, rw = kw.get("key_lengths"), kw.get("return_weights", True)
    _, input_grads, params = check_against_fd(
        layer, bahdanau_call(key_lengths=lengths, return_weights=rw), inputs, rng,
        vjp=lambda lay, *a: lay.vjp(*a, key_lengths=lengths, return_weights=rw))
    assert np.any(params["key_proj.weight"])  # the encoder side trains too


def test_bahdanau_decoder_loop_precompute_vjp_equals_plain_keys():
    rng = np.random.default_rng(31)
    layer = randomize(BahdanauAttention(5, 3, 4, bias=True, normalize=True, dtype=np.float64, rng=0), rng)
    keys, values = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 6, 7))
    lengths = np.array([6, 4])
    steps = [rng.standard_normal((2, 5)) for _ in range(3)]
    memory, pre_pullback = layer.precompute_vjp(keys, values, lengths)
    memory_grads, dqs, params = [], [], []
    plain_dk, plain_dv, plain_params = 0, 0, []
    for s in steps:
        result, pullback = layer.vjp(s, memory)
        ref_result, ref_pullback = layer.vjp(s, keys, values, key_lengths=lengths)
        assert all(np.array_equal(a, b) for a, b in zip(result, ref_result))
        ct = random_cotangent(rng, result)
        (dq, memory_grad), p = pullback(ct)
        assert isinstance(memory_grad, BahdanauMemoryGrad) and not p["key_proj.weight"].any()
        (ref_dq, dk, dv), ref_p = ref_pullback(ct)
        np.testing.assert_allclose(dq, ref_dq, rtol=1e-12, atol=1e-12)
        memory_grads.append(memory_grad)
        params.append(p)
        plain_dk, plain_dv = plain_dk + dk, plain_dv + dv
        plain_params.append(ref_p)
    total = sum(memory_grads)
    assert isinstance(total, BahdanauMemoryGrad)
    assert np.allclose((memory_grads[0] + memory_grads[1] + memory_grads[2]).projected, total.projected)
    (dk, dv), pre_params = pre_pullback(total)
    np.testing.assert_allclose(dk, plain_dk, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dv, plain_dv, rtol=1e-10, atol=1e-12)
    for name in pre_params:
        ours = pre_params[name] + sum(p[name] for p in params)
        np.testing.assert_allclose(ours, sum(p[name] for p in plain_params), rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.any(pre_params["key_proj.weight"])


def test_bahdanau_memory_grad_checks():
    rng = np.random.default_rng(32)
    layer = BahdanauAttention(4, 3, 5, rng=0)
    memory, pre = layer.precompute_vjp(rng.standard_normal((2, 6, 3)))
    _, pullback = layer.vjp(rng.standard_normal((2, 4)), memory)
    (_, grad), _ = pullback((np.ones((2, 3)), None))
    with pytest.raises(TypeError, match="BahdanauMemoryGrad"):
        pre(grad.projected)
    other, _ = layer.precompute_vjp(rng.standard_normal((2, 5, 3)))
    _, other_pullback = layer.vjp(rng.standard_normal((2, 4)), other)
    (_, other_grad), _ = other_pullback((np.ones((2, 3)), None))
    with pytest.raises(ValueError, match="different memories"):
        grad + other_grad
    with pytest.raises(ValueError, match="is not the gradient of"):
        pre(other_grad)
    with pytest.raises(TypeError, match="belong to the memory"):
        layer.vjp(rng.standard_normal((2, 4)), memory, key_lengths=[1, 2])
    (dk,), params = pre(grad)  # values defaulted to the keys: one gradient, in the keys' dtype
    assert dk.shape == (2, 6, 3) and dk.dtype == np.float64 and list(params) == list(layer.state_dict())
    assert all(p.dtype == np.float32 for p in params.values())


# --------------------------------------------------------------------------------------------
# Luong


LUONG_CASES = {
    "dot": (dict(method="dot"), dict(), (2, 4)),
    "dot_scale_mask": (dict(method="dot", scale=True), dict(attn_mask="float"), (2, 3, 4)),
    "general_values": (dict(method="general", key_dim=3, value_dim=5), dict(values=True), (2, 3, 4)),
    "general_scale_lengths": (dict(method="general", key_dim=3, scale=True), dict(key_lengths=np.array([5, 2])),
                              (2, 4)),
    "concat": (dict(method="concat", key_dim=3, units=6), dict(), (2, 3, 4)),
    "concat_scale_mask": (dict(method="concat", key_dim=3, scale=True, attentional_units=2),
                          dict(attn_mask="bool", values=True), (2, 4)),
}


@pytest.mark.parametrize("case", list(LUONG_CASES))
def test_luong_vjp_matches_finite_differences(case):
    rng = np.random.default_rng(sum(map(ord, case)) + 5)
    config, kw, qshape = LUONG_CASES[case]
    layer = randomize(LuongAttention(4, dtype=np.float64, rng=0, **config), rng)
    single = len(qshape) == 2
    call_kw = {}
    score_shape = (2, 5) if single else (2, 3, 5)
    if kw.get("attn_mask") == "float":
        call_kw["attn_mask"] = rng.standard_normal(score_shape)
    elif kw.get("attn_mask") == "bool":
        call_kw["attn_mask"] = np.arange(5) < 4
    if "key_lengths" in kw:
        call_kw["key_lengths"] = kw["key_lengths"]
    inputs = [rng.standard_normal(qshape), rng.standard_normal((2, 5, layer.key_dim))]
    if kw.get("values"):
        inputs.append(rng.standard_normal((2, 5, layer.value_dim)))
    check_against_fd(layer, lambda lay, *a: lay(*a, **call_kw), inputs, rng,
                     vjp=lambda lay, *a: lay.vjp(*a, **call_kw), skip=())


def test_luong_partial_cotangent():
    rng = np.random.default_rng(41)
    layer = randomize(LuongAttention(4, method="general", scale=True, dtype=np.float64, rng=0), rng)
    q, k = rng.standard_normal((2, 4)), rng.standard_normal((2, 5, 4))
    check_against_fd(layer, lambda lay, *a: lay(*a), [q, k], rng, skip=(1, 2))
    check_against_fd(layer, lambda lay, *a: lay(*a), [q, k], rng, skip=(0,))
