"""Issue 14, the Python API: mask warnings, layout hints, one vocabulary, scoped threads, the
BERT helper."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import attnext
from attnext import reference as ref

rng = np.random.default_rng(14)


def randn(*shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---- masks -----------------------------------------------------------------------------------


def test_inverted_key_padding_mask_warns_once_per_call():
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8)
    lengths = np.array([5, 3])
    key_padding_mask = np.arange(5) >= lengths[:, None]  # PyTorch: True = ignore
    with pytest.warns(attnext.MaskWarning, match=r"1 of 2 batch entries.*pass ~mask") as record:
        attnext.scaled_dot_product_attention(q, k, v, key_padding_mask[:, None, None, :])
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    x = randn(2, 5, 8, dtype=np.float32)
    mha = attnext.MultiHeadAttention(8, 2)
    with pytest.warns(attnext.MaskWarning, match="key_mask hides every key"):
        mha(x, key_mask=key_padding_mask)
    with pytest.warns(attnext.MaskWarning):
        attnext.attention(q[:, 0], k[:, 0], v[:, 0], attn_mask=key_padding_mask[:, None, :])
    with pytest.warns(attnext.MaskWarning):
        attnext.LuongAttention(8)(q[:, 0, 0], k[:, 0], attn_mask=key_padding_mask)


def test_float_mask_of_zeros_and_ones_warns():
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8)
    hf_mask = (np.arange(5) < np.array([5, 3])[:, None]).astype(np.float32)  # attention_mask.float()
    with pytest.warns(attnext.MaskWarning, match="only 0 and 1"):
        attnext.scaled_dot_product_attention(q, k, v, hf_mask[:, None, None, :])
    with pytest.warns(attnext.MaskWarning, match="only 0 and 1"):
        attnext.MultiHeadAttention(8, 2)(randn(2, 5, 8), key_mask=hf_mask)
    with pytest.warns(attnext.MaskWarning, match="only 0 and 1"):
        attnext.additive_attention(q[:, 0], k[:, 0], v[:, 0], randn(8, 3), randn(8, 3), randn(3),
                                   attn_mask=hf_mask[:, None, :])


def test_legitimate_masks_do_not_warn(no_warnings):
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8)
    keep = np.arange(5) < np.array([5, 3])[:, None]
    attnext.scaled_dot_product_attention(q, k, v, keep[:, None, None, :])
    additive = np.where(keep, 0.0, -np.inf)[:, None, None, :]
    attnext.scaled_dot_product_attention(q, k, v, additive)
    attnext.scaled_dot_product_attention(q, k, v, np.zeros((4, 5)))  # all zeros changes nothing
    attnext.scaled_dot_product_attention(q, k, v, key_lengths=[0, 3])  # an empty sequence
    attnext.scaled_dot_product_attention(q, k[:, :, :5], v, is_causal=True)
    attnext.scaled_dot_product_attention(randn(1, 6, 8), randn(1, 2, 8), randn(1, 2, 8),
                                         is_causal="bottom_right")  # early rows see nothing
    attnext.MultiHeadAttention(8, 2)(randn(2, 5, 8), key_lengths=np.array([0, 5]))


def test_warnings_silenced_per_call_and_globally(no_warnings):
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8)
    blind = np.zeros((2, 1, 1, 5), bool)
    attnext.scaled_dot_product_attention(q, k, v, blind, warn=False)
    attnext.attention(q, k, v, attn_mask=blind, warn=False)
    attnext.MultiHeadAttention(8, 2)(randn(2, 5, 8), key_mask=blind[:, 0, 0], warn=False)
    attnext.SelfAttention(8)(randn(2, 5, 8), attn_mask=blind[:, 0], warn=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=attnext.MaskWarning)
        attnext.scaled_dot_product_attention(q, k, v, blind)


def test_warned_call_still_computes_the_formula():
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 5, 8), randn(2, 1, 5, 8)
    mask = np.zeros((2, 1, 1, 5), bool)
    mask[1, ..., :2] = True
    with pytest.warns(attnext.MaskWarning):
        out = attnext.scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(out, ref.scaled_dot_product_attention(q, k, v, mask), atol=1e-12)
    assert not out[0].any()


# ---- layouts ---------------------------------------------------------------------------------


def test_sdpa_3d_input_with_key_lengths_says_add_a_head_axis():
    x = randn(2, 6, 8)
    with pytest.raises(ValueError, match=r"SDPA expects \(\.\.\., H, L, E\).*x\[:, None\]"):
        attnext.scaled_dot_product_attention(x, x, x, key_lengths=[5, 3])
    out = attnext.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], key_lengths=[5, 3])[:, 0]
    np.testing.assert_allclose(out, attnext.attention(x, x, x, key_lengths=[5, 3]), atol=1e-12)


def test_sdpa_heads_and_positions_swapped_says_transpose():
    q, k = randn(2, 6, 4, 8), randn(2, 7, 4, 8)  # (B, L, H, D), (B, S, H, D)
    with pytest.raises(ValueError, match=r"\(B, L, H, E\).*transpose\(0, 2, 1, 3\)"):
        attnext.scaled_dot_product_attention(q, k, k)


def test_from_torch_returns_attnext_layout():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 4).eval()  # PyTorch's default: batch_first=False
    layer = attnext.MultiHeadAttention.from_torch(module)
    assert layer.batch_first is True
    assert attnext.MultiHeadAttention.from_torch(module, batch_first=None).batch_first is False
    x = randn(2, 5, 16, dtype=np.float32)  # (B, L, E)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(x.transpose(1, 0, 2)),) * 3, need_weights=False)[0].numpy()
    np.testing.assert_allclose(layer(x)[0], expected.transpose(1, 0, 2), atol=1e-5)


def test_mha_layout_mistakes_ask_about_batch_first():
    layer = attnext.MultiHeadAttention(8, 2)  # batch_first=True
    x_lbe = randn(5, 2, 8)  # (L, B, E) given to a batch-first layer
    with pytest.raises(ValueError, match=r"did you mean batch_first=False\?"):
        layer(x_lbe, key_lengths=np.array([5, 3]))
    with pytest.raises(ValueError, match=r"did you mean batch_first=False\?"):
        layer(x_lbe, key_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"did you mean batch_first=False\?"):
        layer(x_lbe, randn(7, 2, 8))
    seq_first = attnext.MultiHeadAttention(8, 2, batch_first=False)
    with pytest.raises(ValueError, match=r"did you mean batch_first=True\?"):
        seq_first(randn(2, 5, 8), key_lengths=np.array([5, 3]))


# ---- one vocabulary ----------------------------------------------------------------------------


def test_return_weights_and_need_weights_alias():
    layer = attnext.MultiHeadAttention(8, 2, dtype=np.float64, rng=0)
    x = randn(2, 5, 8)
    out, w = layer(x, return_weights=True)
    out2, w2 = layer(x, need_weights=True)
    np.testing.assert_array_equal(w, w2)
    assert layer(x)[1] is None
    with pytest.raises(TypeError, match="disagree"):
        layer(x, return_weights=True, need_weights=False)


@pytest.mark.parametrize("method", ["scaled_dot", "dot", "general", "additive"])
def test_attention_takes_key_lengths_and_window(method):
    q, k, v = randn(3, 4, 6), randn(3, 7, 6), randn(3, 7, 5)
    args = {"general": {"weight": randn(6, 6)},
            "additive": {"w_query": randn(6, 4), "w_key": randn(6, 4), "v": randn(4)}}.get(method, {})
    lengths = np.array([7, 2, 0])
    for kwargs in ({"key_lengths": lengths}, {"window": (1, 2)}, {"key_lengths": lengths, "window": (None, 1),
                                                                   "is_causal": True}):
        got, w = attnext.attention(q, k, v, method=method, return_weights=True, **kwargs, **args)
        want, ww = ref.attention(q, k, v, method=method, return_weights=True, **kwargs, **args)
        np.testing.assert_allclose(got, want, atol=1e-10)
        np.testing.assert_allclose(w, ww, atol=1e-10)


def test_attn_mask_is_the_name_and_mask_still_works():
    q, k, v = randn(2, 4, 6), randn(2, 5, 6), randn(2, 5, 6)
    m = rng.random((2, 4, 5)) > 0.3
    m[..., 0] = True
    new = attnext.attention(q, k, v, attn_mask=m)
    np.testing.assert_array_equal(new, attnext.attention(q, k, v, mask=m))
    np.testing.assert_allclose(new, ref.attention(q, k, v, attn_mask=m), atol=1e-12)
    with pytest.raises(TypeError, match="both attn_mask and"):
        attnext.attention(q, k, v, attn_mask=m, mask=m)
    w = (randn(6, 3), randn(6, 3), randn(3))
    np.testing.assert_array_equal(attnext.additive_attention(q, k, v, *w, attn_mask=m),
                                  attnext.additive_attention(q, k, v, *w, mask=m))
    layer = attnext.SelfAttention(6, dtype=np.float64, rng=1)
    np.testing.assert_array_equal(layer(q, attn_mask=m[:, :, :4]), layer(q, mask=m[:, :, :4]))


def test_additive_attention_causal_and_window():
    q, k, v = randn(2, 5, 6), randn(2, 5, 6), randn(2, 5, 3)
    w = (randn(6, 4), randn(6, 4), randn(4))
    for kwargs in ({"is_causal": True}, {"window": (1, 0)}, {"is_causal": "bottom_right", "window": (2, None)}):
        got = attnext.additive_attention(q, k, v, *w, return_weights=True, **kwargs)
        want = ref.additive_attention(q, k, v, *w, return_weights=True, **kwargs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_self_attention_state_dict_is_torch_layout():
    layer = attnext.SelfAttention(6, qk_dim=4, v_dim=5, bias=True, dtype=np.float64, rng=3)
    sd = layer.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {
        "query.weight": (4, 6), "key.weight": (4, 6), "value.weight": (5, 6),
        "query.bias": (4,), "key.bias": (4,), "value.bias": (5,)}
    np.testing.assert_array_equal(sd["query.weight"], layer.w_query.T)
    other = attnext.SelfAttention(6, qk_dim=4, v_dim=5, bias=True, dtype=np.float64, rng=4)
    other.load_state_dict(sd)
    x = randn(2, 3, 6)
    np.testing.assert_array_equal(other(x), layer(x))
    sd["query.weight"][...] = 0  # a copy
    assert layer.w_query.any()
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({"query.weight": sd["query.weight"]})
    other.set_weights(w_query=np.zeros((6, 4)))  # the textbook-orientation alias still works
    assert not other.state_dict()["query.weight"].any()


def test_self_attention_key_lengths_and_window():
    layer = attnext.SelfAttention(6, dtype=np.float64, rng=2)
    x = randn(3, 5, 6)
    lengths = np.array([5, 2, 0])
    q, k, v = x @ layer.w_query, x @ layer.w_key, x @ layer.w_value
    got, w = layer(x, key_lengths=lengths, window=(1, 1), return_weights=True)
    want, ww = ref.attention(q, k, v, key_lengths=lengths, window=(1, 1), return_weights=True)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(w, ww, atol=1e-12)


def test_mha_window_and_reference_takes_layer_arguments():
    layer = attnext.MultiHeadAttention(8, 2, dtype=np.float64, rng=5)
    x = randn(2, 6, 8)
    km = np.ones((2, 6), bool)
    km[1, 3] = False
    sd = layer.state_dict()
    w = sd["in_proj_weight"]
    b = sd["in_proj_bias"]
    out, weights = layer(x, key_mask=km, key_lengths=np.array([6, 5]), window=(2, 1), return_weights=True,
                         average_attn_weights=False)
    want, wweights = ref.multi_head_attention(x, x, x, 2, w[:8], w[8:16], w[16:], sd["out_proj.weight"],
                                              q_bias=b[:8], k_bias=b[8:16], v_bias=b[16:],
                                              out_bias=sd["out_proj.bias"], key_mask=km,
                                              key_lengths=np.array([6, 5]), window=(2, 1))
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(weights, wweights, atol=1e-12)


def test_luong_reference_takes_the_layer_state_dict():
    for method in ("dot", "general", "concat"):
        layer = attnext.LuongAttention(6, method=method, scale=True, dtype=np.float64, rng=7)
        q, k = randn(2, 6), randn(2, 5, 6)
        m = np.ones((2, 5), bool)
        m[0, 1] = False
        got = layer(q, k, attn_mask=m, key_lengths=[5, 4])
        sd = layer.state_dict()
        sd["g"] = float(sd["g"])
        want = ref.luong_attention(q, k, method=method, attn_mask=m, key_lengths=[5, 4], **sd)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_layers_repr_is_useful():
    assert repr(attnext.MultiHeadAttention(8, 2)) == (
        "MultiHeadAttention(embed_dim=8, num_heads=2, bias=True, batch_first=True, dtype=float32)")
    assert "embed_dim=6" in repr(attnext.SelfAttention(6)) and "dtype=float32" in repr(attnext.SelfAttention(6))
    assert repr(attnext.LuongAttention(4)).startswith("LuongAttention(query_dim=4")
    assert repr(attnext.BahdanauAttention(4, 5, 3)).startswith("BahdanauAttention(query_dim=4, key_dim=5, units=3")


# ---- threads -----------------------------------------------------------------------------------


def test_threads_context_restores_even_on_error():
    before = attnext.get_num_threads()
    with attnext.threads(1) as n:
        assert n == 1 and attnext.get_num_threads() == 1
    assert attnext.get_num_threads() == before
    with pytest.raises(KeyError):
        with attnext.threads(1):
            raise KeyError("boom")
    assert attnext.get_num_threads() == before
    with pytest.raises(ValueError):
        with attnext.threads(0):
            pass
    assert attnext.get_num_threads() == before


def test_more_threads_than_cores_warns():
    import os

    cores = len(os.sched_getaffinity(0))
    before = attnext.get_num_threads()
    try:
        if cores + 1 <= 256:
            with pytest.warns(attnext.ThreadWarning, match="more threads than"):
                attnext.set_num_threads(cores + 1)
            assert issubclass(attnext.ThreadWarning, RuntimeWarning)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attnext.set_num_threads(cores)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", attnext.ThreadWarning)
            attnext.set_num_threads(before)


# ---- BERT --------------------------------------------------------------------------------------


def test_from_bert_attention_matches_a_small_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 60, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    captured = {}

    def hook(module, args, kwargs, output):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().numpy()
        captured["y"] = (output[0] if isinstance(output, tuple) else output).detach().numpy()

    block = model.encoder.layer[1].attention
    handle = block.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    handle.remove()

    layer = attnext.transformer.from_bert_attention(model.encoder.layer[1])
    assert layer.batch_first and layer.num_heads == 4 and layer.embed_dim == 32
    x = captured["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe's bool key_mask raises no MaskWarning
        y, _ = layer(x, key_mask=attention_mask.numpy().astype(bool))
    ln = block.output.LayerNorm
    h = x + y
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    out = (h - mean) / np.sqrt(var + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()
    np.testing.assert_allclose(out, captured["y"], atol=2e-5)
    with pytest.raises(TypeError, match="BertAttention"):
        attnext.transformer.from_bert_attention(torch.nn.Linear(2, 2))


def test_self_attention_reference_takes_the_layer_arguments():
    layer = attnext.SelfAttention(6, qk_dim=4, bias=True, exclude_self=True, dtype=np.float64, rng=8)
    layer.set_weights(b_query=randn(4), b_key=randn(4), b_value=randn(6))
    x = randn(2, 5, 6)
    m = rng.random((2, 5, 5)) > 0.2
    args = dict(attn_mask=m, is_causal=True, key_lengths=np.array([5, 3]), window=(3, None), return_weights=True)
    got = layer(x, warn=False, **args)
    want = ref.self_attention(x, layer.w_query, layer.w_key, layer.w_value, b_query=layer.b_query,
                              b_key=layer.b_key, b_value=layer.b_value, exclude_self=True, **args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-12)
