"""attnext.torch.scaled_dot_product_attention and additive_attention: the custom operators,
their gradients (gradcheck in float64, PyTorch's own in float32), opcheck, dropout seeding,
zero-copy, errors."""
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import attnext  # noqa: E402
import attnext.torch as at  # noqa: E402
from attnext import functional  # noqa: E402

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny tensors: see conftest


def _qkv(shape_q, shape_k, ev=None, dtype=F64, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    ev = shape_k[-1] if ev is None else ev
    q = torch.randn(shape_q, dtype=dtype, generator=gen)
    k = torch.randn(shape_k, dtype=dtype, generator=gen)
    v = torch.randn(shape_k[:-1] + (ev,), dtype=dtype, generator=gen)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _gradcheck(fn, inputs):
    # fast_mode checks random projections of the Jacobian (a few evaluations instead of one per element)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# gradcheck, float64, every option


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_gradcheck_causal(causal):
    q, k, v = _qkv((2, 2, 5, 4), (2, 2, 7, 4), ev=3)
    _gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, is_causal=causal), (q, k, v))


def test_gradcheck_float_mask_gets_its_gradient():
    q, k, v = _qkv((2, 2, 4, 3), (2, 2, 6, 3))
    mask = torch.randn(2, 1, 4, 6, dtype=F64, requires_grad=True)  # broadcast over heads: summed back
    _gradcheck(lambda a, b, c, m: at.scaled_dot_product_attention(a, b, c, m), (q, k, v, mask))


def test_gradcheck_bool_mask_key_padding():
    q, k, v = _qkv((3, 2, 4, 3), (3, 2, 6, 3), seed=1)
    lengths = torch.tensor([6, 2, 4])
    padding = (torch.arange(6) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S), True = may attend
    _gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, padding), (q, k, v))
    out = at.scaled_dot_product_attention(q, k, v, padding)
    out[1].sum().backward()
    assert torch.all(k.grad[1, :, 2:] == 0) and torch.all(v.grad[1, :, 2:] == 0)  # hidden keys: exactly zero


def test_gradcheck_gqa_with_scale():
    q, k, v = _qkv((2, 6, 4, 3), (2, 2, 5, 3), ev=2, seed=2)
    _gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, scale=0.7, enable_gqa=True), (q, k, v))


def test_gradcheck_dropout_fixed_seed():
    q, k, v = _qkv((1, 2, 5, 3), (1, 2, 6, 3), seed=3)

    def fn(a, b, c):
        torch.manual_seed(11)  # the op's seed comes from torch's generator: each evaluation drops the same
        return at.scaled_dot_product_attention(a, b, c, dropout_p=0.3)

    _gradcheck(fn, (q, k, v))


def test_gradcheck_broadcast_batch():
    q, _, _ = _qkv((2, 3, 4, 3), (1, 1, 5, 3), seed=4)
    _, k, v = _qkv((1,), (1, 3, 5, 3), seed=5)  # key/value broadcast over the batch
    _gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c), (q, k, v))


def test_gradcheck_additive_all_arguments():
    gen = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)

    q, k, v, wq, wk, vv, b, m = r(2, 4, 3), r(2, 5, 2), r(2, 5, 3), r(3, 6), r(2, 6), r(6), r(6), r(1, 4, 5)

    def fn(*a):
        return at.additive_attention(*a[:6], bias=a[6], attn_mask=a[7], return_weights=True)

    _gradcheck(fn, (q, k, v, wq, wk, vv, b, m))
    padding = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, :]
    _gradcheck(lambda *a: at.additive_attention(*a, attn_mask=padding), (q, k, v, wq, wk, vv))


# ---------------------------------------------------------------------------------------------
# equal to PyTorch's own SDPA (float32)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa", "scale", "mask_and_causal"])
def test_matches_torch_sdpa_float32(case):
    gqa = case == "gqa"
    q, k, v = _qkv((2, 4, 9, 16), (2, 2 if gqa else 4, 11, 16), ev=8, dtype=torch.float32, seed=7)
    gen = torch.Generator().manual_seed(8)
    kwargs = {"plain": {}, "causal": {"is_causal": True}, "gqa": {"enable_gqa": True}, "scale": {"scale": 0.3},
              "bool_mask": {"attn_mask": torch.rand(2, 1, 9, 11, generator=gen) > 0.3},
              "float_mask": {"attn_mask": torch.randn(9, 11, generator=gen).requires_grad_()},
              "mask_and_causal": {"attn_mask": torch.rand(9, 11, generator=gen) > 0.3, "is_causal": True}}[case]
    if case in ("bool_mask", "mask_and_causal"):
        kwargs["attn_mask"][..., 0] = True  # every row sees a key (PyTorch's paths differ on empty rows)
    g = torch.randn(2, 4, 9, 8, generator=gen)
    ours = at.scaled_dot_product_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(ours, [q, k, v] + ([kwargs["attn_mask"]] if case == "float_mask" else []), g)
    if case == "mask_and_causal":  # PyTorch refuses the pair under autograd: both as one mask
        kwargs = {"attn_mask": kwargs["attn_mask"] & torch.ones(9, 11, dtype=torch.bool).tril()}
    theirs = F.scaled_dot_product_attention(q, k, v, **kwargs)
    expected = torch.autograd.grad(theirs, [q, k, v] + ([kwargs["attn_mask"]] if case == "float_mask" else []), g)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_additive_matches_the_usual_formula_float32():
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 7, 6, generator=gen)
    wq, wk, vv = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen), torch.randn(8, generator=gen)
    params = [t.requires_grad_() for t in (q, k, wq, wk, vv)]
    ours, w_ours = at.additive_attention(q, k, k, wq, wk, vv, return_weights=True)
    scores = torch.tanh((q @ wq)[:, :, None, :] + (k @ wk)[:, None, :, :]) @ vv
    w_ref = scores.softmax(-1)
    ref = w_ref @ k
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_ours, w_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(3, 4, 6, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the operators


def test_opcheck_sdpa():
    q, k, v = _qkv((2, 4, 5, 3), (2, 2, 6, 3), seed=10)
    q2 = q[:, :2].detach().requires_grad_()  # opcheck wants leaves
    mask = torch.randn(5, 6, dtype=F64, requires_grad=True)
    for args in [(q, k, v, None, 0.0, False, None, True, 0), (q, k, v, None, 0.0, True, None, True, 0),
                 (q2, k, v, mask, 0.25, False, 0.5, False, 123), (q2, k, v, mask.detach() > 0, 0.0, False, None,
                                                                  False, 0)]:
        torch.library.opcheck(torch.ops.attnext.sdpa.default, args)


def test_opcheck_additive():
    gen = torch.Generator().manual_seed(12)

    def r(*shape):
        return torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)

    q, k, v, wq, wk, vv, b = r(2, 4, 3), r(2, 5, 2), r(2, 5, 3), r(3, 6), r(2, 6), r(6), r(6)
    torch.library.opcheck(torch.ops.attnext.additive_keys.default, (k, wk))
    raw, expo, ok = (t.detach() for t in torch.ops.attnext.additive_keys(k, wk))
    keys = (raw.requires_grad_(), expo, ok)
    for args in [(q, *keys, v, wq, vv, b, None), (q, *keys, v, wq, vv, None, r(4, 5)),
                 (q, *keys, v, wq, vv, None, torch.ones(4, 5, dtype=torch.bool))]:
        torch.library.opcheck(torch.ops.attnext.additive_attention.default, args)


def test_compile_keeps_one_opaque_op():
    q, k, v = _qkv((1, 2, 4, 3), (1, 2, 5, 3), seed=13)
    compiled = torch.compile(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, is_causal=True) * 2,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), 2 * at.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("which", ["sdpa", "additive"])
def test_double_backward_raises_clearly(which):
    q, k, v = _qkv((1, 2, 3, 4), (1, 2, 5, 4), seed=14)
    if which == "sdpa":
        out = at.scaled_dot_product_attention(q, k, v)
    else:
        out = at.additive_attention(q[0], k[0], v[0], torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64),
                                    torch.randn(3, dtype=F64))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_dropout_seed_follows_torch_manual_seed():
    q, k, v = _qkv((1, 2, 6, 4), (1, 2, 8, 4), dtype=torch.float32, seed=15, grad=False)
    torch.manual_seed(3)
    a = at.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    b = at.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    c = at.scaled_dot_product_attention(q, k, v, dropout_p=0.4)  # the generator moved on
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, at.scaled_dot_product_attention(q, k, v))


def test_dropout_backward_uses_the_forwards_mask():
    q, k, v = _qkv((1, 1, 4, 3), (1, 1, 5, 3), seed=16)
    torch.manual_seed(4)
    out = at.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    (dv,) = torch.autograd.grad(out, [v], torch.ones_like(out))
    torch.manual_seed(4)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # the seed the op drew
    _, weights = attnext.scaled_dot_product_attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                                      dropout_p=0.5, seed=seed, return_weights=True)
    np.testing.assert_allclose(dv[0, 0].numpy(), weights[0, 0].sum(axis=0)[:, None] * np.ones(3), rtol=1e-12)


def test_inputs_reach_the_kernel_without_copies(monkeypatch):
    base = torch.randn(2, 7, 3, 4)  # (B, L, H, E): a strided (B, H, L, E) view
    q = k = v = base.transpose(1, 2)
    seen = []
    real = functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append(query.__array_interface__["data"][0] == q.data_ptr() and query.strides == tuple(
            4 * s for s in q.stride()))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
    out = at.scaled_dot_product_attention(q, k, v)
    assert seen == [True]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_concurrent_calls_agree():
    q, k, v = _qkv((2, 2, 16, 8), (2, 2, 16, 8), dtype=torch.float32, seed=17, grad=False)
    expected = at.scaled_dot_product_attention(q, k, v, is_causal=True)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(torch.equal(at.scaled_dot_product_attention(q, k, v, is_causal=True), expected))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(results) == 80 and all(results)


# ---------------------------------------------------------------------------------------------
# errors: the argument named


def test_bad_tensors_raise_naming_the_argument():
    q, k, v = _qkv((1, 2, 3, 4), (1, 2, 5, 4), dtype=torch.float32, grad=False)
    with pytest.raises(TypeError, match="value has dtype torch.float64 but query has torch.float32"):
        at.scaled_dot_product_attention(q, k, v.double())
    with pytest.raises(TypeError, match="query has dtype torch.float16"):
        at.scaled_dot_product_attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="query is on meta"):
        at.scaled_dot_product_attention(q.to("meta"), k, v)
    with pytest.raises(TypeError, match="value must be a torch.Tensor"):
        at.scaled_dot_product_attention(q, k, v.numpy())
    with pytest.raises(TypeError, match="attn_mask has dtype torch.int64"):
        at.scaled_dot_product_attention(q, k, v, torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="dropout_p"):
        at.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"query has shape \(1, 2, 3, 4\) but key has \(1, 2, 5, 3\)"):
        at.scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(TypeError, match="w_key has dtype torch.float64"):
        at.additive_attention(q[0], k[0], v[0], torch.ones(4, 2), torch.ones(4, 2, dtype=F64), torch.ones(2))


def test_attnext_imports_without_torch_and_the_extra_says_what_is_missing():
    code = ("import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
            "import attnext\n"
            "assert 'attnext.torch' not in sys.modules\n"
            "try:\n    import attnext.torch\nexcept ImportError as e:\n    print(e)\n")
    package_root = str(pathlib.Path(attnext.__file__).parent.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": package_root})
    assert result.returncode == 0, result.stderr
    assert 'pip install "attnext[torch]"' in result.stdout


def test_expanded_and_transposed_inputs_match_torch():
    gen = torch.Generator().manual_seed(18)
    q = torch.randn(3, 6, 2, 4, generator=gen).transpose(1, 2).requires_grad_()  # non-leaf strided view
    kv = torch.randn(1, 2, 5, 4, generator=gen, requires_grad=True)
    k = v = kv.expand(3, 2, 5, 4)  # stride 0 over the batch: read in place, gradient summed back
    g = torch.randn(3, 2, 6, 4, generator=gen)
    ours = at.scaled_dot_product_attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [q, kv], g), torch.autograd.grad(theirs, [q, kv], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
