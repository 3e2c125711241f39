"""attnext.torch.enabled() / enable() / disable(): which PyTorch SDPA calls go to attnext, which
fall through (and why), training a transformer under the switch, threads, tracing."""
import contextlib
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import attnext  # noqa: E402
import attnext.torch as at  # noqa: E402
from attnext import functional  # noqa: E402

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _routing_off_after(torch_one_thread):
    yield
    at.disable()
    assert F.scaled_dot_product_attention is ORIGINAL


def _qkv(dtype=torch.float32, shape=(2, 2, 5, 4)):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(3))


def _train(route: bool, steps: int = 50):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    layer.train()  # train mode: nn.MultiheadAttention takes the Python path that calls SDPA
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 6, 16, generator=gen)
    losses = []
    with (at.enabled() if route else contextlib.nullcontext()) as stats:
        for _ in range(steps):
            opt.zero_grad()
            loss = ((layer(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, stats


def test_transformer_trains_the_same_under_the_switch():
    plain, _ = _train(False)
    routed, stats = _train(True)
    assert stats.routed == 50 and stats.fell_through == 0
    assert plain[-1] < 0.9 * plain[0]  # it learned something
    for a, b in zip(plain, routed):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_inference_fast_path_is_not_seen():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with at.enabled() as stats, torch.no_grad():
        layer(x)  # torch._transformer_encoder_layer_fwd: C++ all the way, no Python SDPA call
    assert stats.routed == 0 and stats.fell_through == 0


def test_routed_call_equals_torch_and_counts():
    q, k, v = _qkv()
    with at.enabled() as stats:
        ours = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ours_kw = torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.5)
    assert stats.routed == 2 and stats.fell_through == 0
    torch.testing.assert_close(ours, ORIGINAL(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_kw, ORIGINAL(q, k, v, scale=0.5), atol=1e-5, rtol=1e-5)
    assert F.scaled_dot_product_attention is ORIGINAL


def _fall_through_cases():
    q, k, v = _qkv()
    return {
        "dtype torch.float16": lambda: F.scaled_dot_product_attention(q.half(), k.half(), v.half()),
        "dtype torch.bfloat16": lambda: F.scaled_dot_product_attention(*(t.bfloat16() for t in (q, k, v))),
        "device meta": lambda: F.scaled_dot_product_attention(q.to("meta"), k.to("meta"), v.to("meta")),
        "attn_mask with is_causal": lambda: F.scaled_dot_product_attention(
            q, k, v, torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.5, is_causal=True),
        "rank (attnext takes (..., H, L, E) with one rank for query, key and value)":
            lambda: F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
        "autocast": lambda: _under_autocast(q, k, v),
    }


def _under_autocast(q, k, v):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("reason", list(_fall_through_cases()))
def test_falls_through_unchanged_with_its_reason(reason):
    call = _fall_through_cases()[reason]
    expected = call()  # PyTorch's own result, routing off
    with at.enabled() as stats:
        result = call()
    assert stats.routed == 0 and stats.fell_through == 1 and stats.reasons == {reason: 1}
    assert result.dtype == expected.dtype and result.device == expected.device and result.shape == expected.shape
    if result.device.type == "cpu":
        torch.testing.assert_close(result, expected, equal_nan=True)


def test_torch_errors_reach_the_user_unchanged():
    q, k, v = _qkv()
    with at.enabled() as stats:
        with pytest.raises(RuntimeError):  # PyTorch's own error for mixed dtypes
            F.scaled_dot_product_attention(q, k.double(), v)
        with pytest.raises(RuntimeError, match="attn_mask dtype"):  # and for an integer mask
            F.scaled_dot_product_attention(q, k, v, torch.ones(5, 5, dtype=torch.int64))
        with pytest.raises(TypeError, match="is_causal"):
            F.scaled_dot_product_attention(q, k, v, is_causal=1)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, None, v)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, bogus=True)
    assert stats.routed == 0 and stats.reasons == {"mixed dtypes": 1, "attn_mask dtype torch.int64": 1,
                                                   "is_causal not a bool": 1, "arguments": 2}


def test_nested_tensors_fall_through():
    q = torch.nested.nested_tensor([torch.randn(2, 3, 4), torch.randn(2, 5, 4)], layout=torch.jagged)
    with at.enabled() as stats, contextlib.suppress(RuntimeError, NotImplementedError):
        F.scaled_dot_product_attention(q, q, q)  # whatever PyTorch does with it on the CPU
    assert stats.routed == 0 and stats.reasons == {"not a plain tensor (subclass, fake or traced)": 1} or \
        stats.reasons == {"nested tensor": 1}


def test_enable_disable_and_nesting():
    q, k, v = _qkv()
    stats = at.enable()
    assert at.enable() is stats and at.is_enabled()
    with at.enabled() as inner:
        F.scaled_dot_product_attention(q, k, v)
    F.scaled_dot_product_attention(q, k, v)
    assert inner.routed == 1 and stats.routed == 2 and at.is_enabled()  # the block's exit kept enable()'s routing
    at.disable()
    assert not at.is_enabled()
    F.scaled_dot_product_attention(q, k, v)
    assert stats.routed == 2
    at.disable()  # no-op


def test_routed_kernels_use_torchs_thread_count(monkeypatch):
    q, k, v = _qkv()
    seen = []
    real = functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((attnext.get_num_threads(), torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
    torch_threads, attnext_threads = torch.get_num_threads(), attnext.get_num_threads()
    try:
        for n_torch, n_attnext in [(1, 2), (2, 1)]:
            torch.set_num_threads(n_torch)
            attnext.set_num_threads(n_attnext)
            with at.enabled():
                F.scaled_dot_product_attention(q, k, v)
            # inside: attnext ran on torch's count (no second pool of threads on top of torch's);
            # after: attnext's own setting is back, torch's untouched
            assert seen[-1] == (n_torch, n_torch)
            assert attnext.get_num_threads() == n_attnext and torch.get_num_threads() == n_torch
    finally:
        torch.set_num_threads(torch_threads)
        attnext.set_num_threads(attnext_threads)


def test_jit_trace_falls_through():
    q, k, v = _qkv()
    with at.enabled() as stats, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own deprecation notice
        traced = torch.jit.trace(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v), check_trace=False)
    assert stats.routed == 0 and stats.reasons == {"torch.jit tracing": 1}
    assert "attnext::" not in str(traced.graph) and "aten::scaled_dot_product_attention" in str(traced.graph)
    torch.testing.assert_close(traced(q, k, v), ORIGINAL(q, k, v))


def test_export_sees_torchs_op():
    class Attend(torch.nn.Module):
        def forward(self, a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    q, k, v = _qkv()
    with at.enabled() as stats:
        program = torch.export.export(Attend(), (q, k, v))
    graph = str(program.graph)
    assert "attnext" not in graph and "scaled_dot_product" in graph and stats.routed == 0 and stats.fell_through == 0
