"""The dtype rules of the public API (issue 17): float16 and bfloat16 in, the same type out
unless ``out_dtype=np.float32``; mixed inputs by NumPy's promotion; weights and lse float32;
bad ``out_dtype`` and bfloat16 gradients refused; attnext without ml_dtypes; ATTNEXT_BF16."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnext
from attnext import _core
from conftest import bf16_cap
from hardening.harness import subprocess_env

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """code in a fresh interpreter importing this attnext, with ``env`` added to its environment."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(subprocess_env(), **(env or {})), timeout=120)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, dtype, b=2, h=2, lq=5, lk=7, e=8):
    return (normal(rng, (b, h, lq, e), dtype), normal(rng, (b, h, lk, e), dtype),
            normal(rng, (b, h, lk, e), dtype))


def additive_args(rng, dtype, lq=4, lk=6, d=5, u=7):
    return (normal(rng, (2, lq, d), dtype), normal(rng, (2, lk, d), dtype), normal(rng, (2, lk, 3), dtype),
            normal(rng, (d, u), dtype), normal(rng, (d, u), dtype), normal(rng, (u,), dtype))


# Every public function that takes 16-bit inputs, as (name, call(rng, dtype, **kw) -> main output).
CALLS = {
    "score[scaled_dot]": lambda rng, dt, **kw: attnext.score(*qkv(rng, dt)[:2], **kw),
    "score[general]": lambda rng, dt, **kw: attnext.score(*qkv(rng, dt)[:2], "general",
                                                          weight=normal(rng, (8, 8), dt), **kw),
    "score[additive]": lambda rng, dt, **kw: attnext.score(*additive_args(rng, dt)[:2], "additive",
                                                           w_query=normal(rng, (5, 7), dt),
                                                           w_key=normal(rng, (5, 7), dt), v=normal(rng, (7,), dt),
                                                           **kw),
    "softmax": lambda rng, dt, **kw: attnext.softmax(normal(rng, (3, 9), dt), **kw),
    "weighted_sum": lambda rng, dt, **kw: attnext.weighted_sum(normal(rng, (3, 4, 6), dt),
                                                               normal(rng, (3, 6, 2), dt), **kw),
    "attention": lambda rng, dt, **kw: attnext.attention(*(x[:, 0] for x in qkv(rng, dt)), **kw),
    "attention[additive]": lambda rng, dt, **kw: attnext.attention(
        *additive_args(rng, dt)[:3], method="additive", w_query=normal(rng, (5, 7), dt),
        w_key=normal(rng, (5, 7), dt), v=normal(rng, (7,), dt), scale=0.5, **kw),
    "scaled_dot_product_attention": lambda rng, dt, **kw: attnext.scaled_dot_product_attention(*qkv(rng, dt), **kw),
    "sdpa[decode]": lambda rng, dt, **kw: attnext.scaled_dot_product_attention(*qkv(rng, dt, lq=1, lk=40), **kw),
    "additive_attention": lambda rng, dt, **kw: attnext.additive_attention(*additive_args(rng, dt), **kw),
    "MultiHeadAttention": lambda rng, dt, **kw: attnext.MultiHeadAttention(8, 2, dtype=dt, rng=1)(
        normal(rng, (2, 5, 8), dt), **kw)[0],
    "MultiHeadAttention.step": lambda rng, dt, **kw: attnext.MultiHeadAttention(8, 2, dtype=dt, rng=1).step(
        normal(rng, (2, 8), dt), attnext.KVCache(), **kw),
}


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", CALLS)
def test_16_bit_inputs_give_their_own_type_or_float32_when_asked(rng, name, dtype):
    out = CALLS[name](rng, dtype)
    assert out.dtype == dtype
    assert np.all(np.isfinite(out.astype(F32)))
    assert CALLS[name](rng, dtype, out_dtype=dtype).dtype == dtype  # the inputs' own type: the default
    wide = CALLS[name](rng, dtype, out_dtype=np.float32)
    assert wide.dtype == F32


@pytest.mark.parametrize("name", CALLS)
def test_out_dtype_is_refused_unless_it_names_an_exact_output(rng, name):
    with pytest.raises(ValueError, match=r"out_dtype must be None, the inputs' dtype \(bfloat16\) or float32"):
        CALLS[name](rng, BF16, out_dtype=np.float64)
    with pytest.raises(ValueError, match=r"out_dtype must be None, the inputs' dtype \(float64\), got float32"):
        CALLS[name](rng, F64, out_dtype=np.float32)
    with pytest.raises(TypeError, match="out_dtype must be a NumPy dtype"):
        CALLS[name](rng, BF16, out_dtype="not a dtype")
    assert CALLS[name](rng, F32, out_dtype=np.float32).dtype == F32  # float32's own type: accepted


@pytest.mark.parametrize("a,b,want", [(BF16, F32, F32), (BF16, F16, F32), (F16, F32, F32), (BF16, F64, F64),
                                      (F16, F16, F16), (BF16, BF16, BF16)])
def test_mixed_inputs_compute_in_numpys_result_type(rng, a, b, want):
    q, k, v = qkv(rng, F64)
    out = attnext.scaled_dot_product_attention(q.astype(a), k.astype(b), v.astype(a))
    assert out.dtype == want
    assert attnext.weighted_sum(normal(rng, (3, 4), a), normal(rng, (4, 2), b)).dtype == want


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_weights_and_lse_of_16_bit_inputs_are_float32(rng, dtype):
    out, w, lse = attnext.scaled_dot_product_attention(*qkv(rng, dtype), return_weights=True, return_lse=True)
    assert (out.dtype, w.dtype, lse.dtype) == (dtype, F32, F32)
    out, w = attnext.additive_attention(*additive_args(rng, dtype), return_weights=True)
    assert (out.dtype, w.dtype) == (dtype, F32)
    out, w = attnext.attention(*(x[:, 0] for x in qkv(rng, dtype)), return_weights=True)
    assert (out.dtype, w.dtype) == (dtype, F32)
    out, w = attnext.MultiHeadAttention(8, 2, dtype=dtype, rng=2)(normal(rng, (2, 5, 8), dtype), need_weights=True)
    assert (out.dtype, w.dtype) == (dtype, F32)


def test_float_masks_of_16_bit_calls_are_read_as_float32(rng):
    q, k, v = qkv(rng, BF16)
    # 1e-3 is below bfloat16's resolution at 1 (2^-7): kept, it moves the weights measurably.
    small = np.zeros((5, 7), np.float64)
    small[:, 0] = 1e-3
    _, w0 = attnext.scaled_dot_product_attention(q, k, v, return_weights=True)
    _, w1 = attnext.scaled_dot_product_attention(q, k, v, small, return_weights=True)
    ratio = (w1[..., 0] / w0[..., 0]) / (w1[..., 1] / w0[..., 1])
    np.testing.assert_allclose(ratio, np.exp(1e-3), rtol=1e-5)


def test_bfloat16_gradients_are_refused_before_any_work(rng):
    q, k, v = qkv(rng, BF16)
    message = "bfloat16 backward is not supported; cast to float32"
    with pytest.raises(TypeError, match=message):
        attnext.vjp(attnext.scaled_dot_product_attention, q, k, v)
    with pytest.raises(TypeError, match=message):
        attnext.vjp(attnext.score, q, k.astype(np.float32))  # one bfloat16 argument is enough
    with pytest.raises(TypeError, match=message):
        attnext.vjp(attnext.reference.softmax, q)
    out = np.zeros(q.shape, np.float32)
    with pytest.raises(TypeError, match=message):
        attnext.scaled_dot_product_attention_backward(out, q, k, v, out, out[..., 0])
    with pytest.raises(TypeError, match=message):
        attnext.softmax_backward(out, q)
    with pytest.raises(TypeError, match=message):
        attnext.weighted_sum_backward(out[..., :5, :7], q[..., :7], v)
    with pytest.raises(TypeError, match=message):
        attnext.linear_backward(out[0, 0], q[0, 0], v[0, 0])
    args = additive_args(rng, BF16)
    with pytest.raises(TypeError, match=message):
        attnext.additive_attention_backward(np.zeros((2, 4, 3), np.float32), *args, None, None)
    with pytest.raises(TypeError, match=message):
        attnext.additive_attention_backward(np.zeros((2, 4, 3), np.float32), args[0].astype(np.float32),
                                            attnext.project_keys(args[1], args[4]), *args[2:4], None, args[5],
                                            None, None)
    with pytest.raises(TypeError, match=message):
        attnext.MultiHeadAttention(8, 2, dtype=BF16).vjp(normal(rng, (2, 5, 8), np.float32))


def test_float16_gradients_still_compute_in_float32(rng):
    q, k, v = qkv(rng, F16)
    out, pullback = attnext.vjp(attnext.scaled_dot_product_attention, q, k, v)
    assert out.dtype == F16
    dq, dk, dv = pullback(np.ones(out.shape, np.float32))[:3]
    assert (dq.dtype, dk.dtype, dv.dtype) == (F16, F16, F16)
    want = attnext.vjp(attnext.scaled_dot_product_attention, *(x.astype(np.float32) for x in (q, k, v)))[1](
        np.ones(out.shape, np.float32))
    np.testing.assert_allclose(dv.astype(np.float32), want[2], rtol=0, atol=4 * 2.0 ** -11 * np.abs(want[2]).max())


def test_multi_head_attention_stores_bfloat16_weights(rng):
    layer = attnext.MultiHeadAttention(8, 2, dtype=ml_dtypes.bfloat16, rng=3)
    state = layer.state_dict()
    assert {a.dtype for a in state.values()} == {BF16}
    wide = {name: normal(rng, a.shape, np.float64) for name, a in state.items()}
    layer.load_state_dict(wide)  # cast, each value rounded to bfloat16
    for name, a in layer.state_dict().items():
        assert a.dtype == BF16
        np.testing.assert_array_equal(a, wide[name].astype(BF16))
    assert "dtype=bfloat16" in repr(layer)


def test_kv_cache_stores_its_own_type(rng):
    cache = attnext.KVCache(dtype=ml_dtypes.bfloat16)
    assert cache.dtype == BF16
    k, v = normal(rng, (1, 2, 3, 4), np.float32), normal(rng, (1, 2, 3, 5), np.float32)
    keys, values = cache.append(k, v)
    assert keys.dtype == values.dtype == BF16
    np.testing.assert_array_equal(keys, k.astype(BF16))
    free = attnext.KVCache()
    assert free.dtype is None
    free.append(k.astype(BF16), v.astype(BF16))
    assert free.dtype == BF16
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        attnext.KVCache(dtype=np.int8)


def test_a_bfloat16_cache_beside_float32_weights_reads_the_cache_in_place(rng):
    layer = attnext.MultiHeadAttention(16, 4, rng=4)
    x = normal(rng, (2, 3, 16), np.float32)
    wide, narrow = attnext.KVCache(), attnext.KVCache(dtype=ml_dtypes.bfloat16)
    for t in range(3):
        a, b = layer.step(x[:, t], wide), layer.step(x[:, t], narrow)
        assert a.dtype == b.dtype == F32
        # keys, values and the step's queries rounded to bfloat16: within a few of its ulps
        np.testing.assert_allclose(b, a, rtol=0, atol=16 * 2.0 ** -8 * np.abs(a).max())
    assert narrow.keys.dtype == BF16


@pytest.fixture
def restore_bf16_path():
    with bf16_cap(_core.get_bf16_cap()):
        yield


def test_bf16_path_switch_is_reported_by_build_info(restore_bf16_path):
    _core.set_bf16_path("fallback")
    assert attnext.build_info()["bf16"] == _core.get_bf16_path()
    _core.set_bf16_path("auto")
    assert attnext.build_info()["bf16"] == _core.get_bf16_path()
    with pytest.raises(ValueError):
        _core.set_bf16_path("fastest")


def test_environment_forces_the_fallback_at_import():
    forced = run_python("import attnext; print(attnext.build_info()['bf16'])", {"ATTNEXT_BF16": "fallback"})
    script = "from attnext import _core; _core.set_bf16_path('fallback'); print(_core.get_bf16_path())"
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == run_python(script).stdout.strip()
    bad = run_python("import attnext", {"ATTNEXT_BF16": "fast"})
    assert bad.returncode != 0
    assert "ATTNEXT_BF16 must be 'avx512_bf16', 'fallback', 'auto' or unset, got 'fast'" in bad.stderr
    capped = run_python("import attnext; print(attnext._core.get_bf16_cap())", {"ATTNEXT_BF16": "avx512_bf16"})
    assert capped.returncode == 0 and capped.stdout.strip() == "avx512_bf16", capped.stderr


def test_attnext_imports_and_works_without_ml_dtypes():
    script = """
import sys
sys.modules["ml_dtypes"] = None  # an import of it now fails, as where it is not installed
import numpy as np
import attnext
from attnext import _validation
assert _validation.BFLOAT16 is None
q = np.ones((1, 2, 3, 4), np.float16)
assert attnext.scaled_dot_product_attention(q, q, q).dtype == np.float16
assert attnext.MultiHeadAttention(8, 2, dtype=np.float16)(np.ones((1, 2, 8), np.float16))[0].dtype == np.float16
print("ok")
"""
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_reference_refuses_bfloat16_without_ml_dtypes(rng, monkeypatch):
    from attnext import reference
    monkeypatch.setattr(reference, "BFLOAT16", None)
    with pytest.raises(TypeError, match="the reference needs ml_dtypes to round to bfloat16"):
        reference.scaled_dot_product_attention(*qkv(rng, BF16))
