"""Bad input never crashes: every registry entry, public and _core, raises the documented
exception (TypeError for dtypes, ValueError for shapes/values, MemoryError for allocations)
with a message naming the argument; empty sequences give empty outputs or zeros; odd memory
(read-only, negative strides, unaligned, non-native byte order) is accepted or refused cleanly.
"""

import numpy as np
import pytest

import attnext
from attnext import _core

from .harness import unaligned
from .kernels import FULL_OPTIONS, KERNELS, Case, check_against_reference

PUBLIC = [k for k in KERNELS if not k.core]
UPCASTING = [k for k in PUBLIC if not k.grad]  # a backward returns gradients in its arguments' dtypes
CORE = [k for k in KERNELS if k.core]
ids = lambda k: k.name  # noqa: E731


def float_args(kw):
    return [n for n, v in kw.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
@pytest.mark.parametrize("bad", ["int32", "int64", "bool", "complex128", "object", "U1"])
def test_non_float_dtype_is_type_error(kernel, bad):
    kw = kernel.make(Case(seed=1, options=FULL_OPTIONS))
    for name in float_args(kw):
        if kernel.name == "softmax" and name == "mask":
            continue
        if name == "mask" and bad == "bool":
            continue  # a bool mask is legal
        if name.startswith("cotangent") and bad in ("int32", "int64"):
            continue  # a pullback takes any real cotangent, cast to the output's dtype
        bad_kw = dict(kw, **{name: kw[name].astype(bad) if bad != "U1" else np.full(kw[name].shape, "a")})
        with pytest.raises(TypeError, match=name if not kernel.core or name != "query" else "query"):
            kernel.call(bad_kw)


@pytest.mark.parametrize("kernel", CORE, ids=ids)
def test_core_rejects_a_lone_float16_argument(kernel):
    # _core reads float16 (issue 17), but a call's floating operands share one dtype: one float16
    # argument among float64 ones is a TypeError. A kernel with a single floating argument
    # takes it as a float16 call (tests/test_l1_lowp_core.py checks those).
    kw = kernel.make(Case(seed=1, options=FULL_OPTIONS))
    names = float_args(kw)
    for name in names if len(names) > 1 else []:
        with pytest.raises(TypeError):
            kernel.call(dict(kw, **{name: kw[name].astype(np.float16)}))


@pytest.mark.parametrize("kernel", UPCASTING, ids=ids)
def test_public_upcasts_float16_to_float32(kernel):
    kw = kernel.make(Case(seed=1, options=FULL_OPTIONS, dtype=np.float16))
    for out in kernel.call(kw):
        assert out.dtype == np.float32
    check_against_reference(kernel, kw)


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
def test_zero_dimensional_argument_is_value_error(kernel):
    kw = kernel.make(Case(seed=2, options=FULL_OPTIONS))
    for name in float_args(kw):
        if name in ("mask", "attn_mask"):
            continue  # a 0-d mask broadcasts to anything
        if kw[name].ndim == 0:  # a scalar parameter (a layer's g): a 1-d one is the wrong shape
            with pytest.raises(ValueError, match=name):
                kernel.call(dict(kw, **{name: kw[name].reshape(1)}))
            continue
        with pytest.raises(ValueError, match=name):
            kernel.call(dict(kw, **{name: np.asarray(kw[name].flat[0] if kw[name].size else 0.0,
                                                      dtype=kw[name].dtype)}))


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
@pytest.mark.parametrize("sizes", [dict(lq=0), dict(lk=0), dict(lq=0, lk=0), dict(d=0), dict(dv=0), dict(units=0),
                                   dict(batch=(0,)), dict(batch=(2, 0))])
def test_empty_sizes_give_empty_or_zeros(kernel, sizes):
    if kernel.name.startswith("scaled_dot_product") and sizes.get("batch") == (0,):
        sizes = dict(batch=(0, 2))
    kw = kernel.make(Case(seed=3, options=FULL_OPTIONS, mask="bool", causal=True, **sizes))
    outs = kernel.call(kw)
    check_against_reference(kernel, kw)
    if sizes == dict(lk=0) and kernel.name in ("weighted_sum", "_core.weighted_sum"):
        assert outs[0].size and not outs[0].any()  # Lk = 0: a sum over nothing is 0


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
def test_unaligned_inputs(kernel):
    kw = kernel.make(Case(seed=4, options=FULL_OPTIONS, mask="float"))
    for name in float_args(kw):
        bad = dict(kw, **{name: unaligned(kw[name])})
        if kernel.core:
            with pytest.raises(ValueError, match=f"{name}.*not aligned"):
                kernel.call(bad)
        else:
            check_against_reference(kernel, bad)


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
@pytest.mark.parametrize("layout", ["readonly", "negative", "strided", "F", "broadcast"])
def test_odd_layouts_accepted(kernel, layout):
    check_against_reference(kernel, kernel.make(Case(seed=5, options=FULL_OPTIONS, layout=layout, batch=(3, 2), lq=9,
                                                     lk=11)))


@pytest.mark.parametrize("kernel", KERNELS, ids=ids)
def test_non_native_byte_order(kernel):
    kw = kernel.make(Case(seed=6, options=FULL_OPTIONS))
    for name in float_args(kw):
        swapped = dict(kw, **{name: kw[name].astype(kw[name].dtype.newbyteorder(">"))})
        if kernel.core:
            with pytest.raises(TypeError, match=name):
                kernel.call(swapped)
        else:
            check_against_reference(kernel, swapped)


def test_structured_field_views():
    s = np.zeros((3, 4), dtype=[("a", "f8"), ("b", "f4")])
    s["a"] = np.arange(12).reshape(3, 4)
    np.testing.assert_allclose(attnext.softmax(s["a"]), attnext.softmax(np.arange(12.0).reshape(3, 4)))
    with pytest.raises(ValueError, match="x"):
        _core.softmax(s["a"])


# --- shapes ------------------------------------------------------------------------------

Q, K, V = np.ones((2, 5, 4)), np.ones((2, 6, 4)), np.ones((2, 6, 3))


def _core_additive(bias=None, key_lengths=None):
    return _core.additive_attention(Q, np.ones((4, 3)), bias, *_core.additive_keys(K, np.ones((4, 3))), V, np.ones(3),
                                    None, key_lengths)


@pytest.mark.parametrize("call, match", [
    (lambda: attnext.score(Q, np.ones((2, 6, 5))), r"query has shape \(2, 5, 4\) but key has \(2, 6, 5\)"),
    (lambda: attnext.score(Q, np.ones((3, 6, 4))), r"query has shape \(2, 5, 4\), key has shape \(3, 6, 4\)"),
    (lambda: attnext.score(Q, K, "general", weight=np.ones((3, 4))), r"weight has \(3, 4\)"),
    (lambda: attnext.score(Q, K, "additive", w_query=np.ones((4, 3)), w_key=np.ones((4, 2)), v=np.ones(3)),
     r"w_query has shape \(4, 3\) but w_key has \(4, 2\)"),
    (lambda: attnext.score(Q, K, "additive", w_query=np.ones((4, 3)), w_key=np.ones((4, 3)), v=np.ones(2)),
     r"v has shape \(2,\) but the number of units is 3"),
    (lambda: attnext.score(np.ones(4), K), r"query must have at least 2 dimensions.*\(4,\)"),
    (lambda: attnext.weighted_sum(np.ones((2, 5, 6)), np.ones((2, 7, 3))),
     r"weights has shape \(2, 5, 6\) but value has \(2, 7, 3\)"),
    (lambda: attnext.softmax(np.ones((2, 3)), mask=np.ones((4,), bool)), r"mask has shape \(4,\).*\(2, 3\)"),
    (lambda: attnext.softmax(np.ones((2, 3)), axis=2), r"axis 2 .* \(2, 3\)"),
    (lambda: attnext.attention(Q, K, np.ones((2, 7, 3))), r"value has shape \(2, 7, 3\)"),
    (lambda: attnext.attention(Q, K, V, mask=np.ones((5, 7), bool)), r"mask has shape \(5, 7\).*\(2, 5, 6\)"),
    (lambda: attnext.attention(Q, K, V, is_causal="left"), r"is_causal"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, np.ones((2, 5, 3))), r"key has shape .* value has"),
    (lambda: attnext.scaled_dot_product_attention(Q, np.ones((2, 6, 3)), np.ones((2, 6, 3))),
     r"query has shape \(2, 5, 4\) but key has \(2, 6, 3\)"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, key_lengths=-1), r"key_lengths must lie in \[0, 6\]"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, key_lengths=7), r"key_lengths must lie in \[0, 6\]"),
    (lambda: attnext.scaled_dot_product_attention(Q[None], K[None], V[None], key_lengths=np.array([1, 2])),
     r"key_lengths has shape \(2,\).*batch shape \(1,\)"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, window=(1,)), r"window"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, window=(-1, 2)), r"window left"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, dropout_p=1.5), r"dropout_p"),
    (lambda: attnext.scaled_dot_product_attention(np.ones((3, 5, 4)), K, V, enable_gqa=True), r"enable_gqa"),
    (lambda: attnext.set_num_threads(0), r"n must be in \[1, 256\]"),
    (lambda: attnext.score(Q, K, scale=10**400), r"scale is too large"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, scale=10**400), r"scale is too large"),
    (lambda: attnext.set_num_threads(10**6), r"n must be in \[1, 256\]"),
    (lambda: _core.score_product(Q, np.ones((3, 6, 4))), r"query has shape \(2, 5, 4\) but key has \(3, 6, 4\)"),
    (lambda: _core.score_product(Q, K, np.ones((4, 4, 1))), r"weight must have 2 dimensions"),
    (lambda: _core.weighted_sum(np.ones((2, 5, 6)), np.ones((2, 7, 3))), r"number of keys"),
    (lambda: _core.softmax(np.ones((2, 3)), np.ones((3,), bool)), r"mask has shape \(3,\) but the scores have"),
    (lambda: _core.softmax(np.ones(3), None, True, 0), r"x must have at least 2 dimensions"),
    (lambda: _core.score_additive(Q, K, np.ones((4, 3)), np.ones((4, 3)), np.ones(3), np.ones(2)),
     r"bias has shape \(2,\)"),
    (lambda: _core.sdpa(Q, K, V, key_lengths=np.array([-1, 2])), r"key_lengths must lie in \[0, 6\].*got -1"),
    (lambda: _core.sdpa(Q, K, V, key_lengths=np.array([7, 2])), r"key_lengths must lie in \[0, 6\].*got 7"),
    (lambda: _core.sdpa(Q, K, V, key_lengths=np.array([1, 2, 3])), r"key_lengths has shape \(3,\)"),
    (lambda: _core_additive(key_lengths=np.array([7, 2])), r"key_lengths must lie in \[0, 6\].*got 7"),
    (lambda: _core_additive(key_lengths=np.array([-1, 2])), r"key_lengths must lie in \[0, 6\].*got -1"),
    (lambda: _core_additive(key_lengths=np.array([1, 2, 3])), r"key_lengths has shape \(3,\)"),
    (lambda: _core_additive(bias=np.ones(2)), r"bias has shape \(2,\) but the number of units is 3"),
    (lambda: _core.linear(np.ones((2, 5, 2, 2)), np.ones((3, 5)), None), r"x has shape \(2, 5, 2, 2\).*weight has"),
    (lambda: _core.linear(np.ones((2, 5, 2, 2)), np.ones((3, 4)), np.ones(4)), r"bias has shape \(4,\)"),
])
def test_shape_errors_name_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: attnext.softmax(np.ones((2, 3)), mask=np.ones((2, 3), int)), "mask must be bool"),
    (lambda: attnext.scaled_dot_product_attention(Q, K, V, key_lengths=2.0), "key_lengths must be integers"),
    (lambda: attnext.set_num_threads(2.0), "n must be an int"),
    (lambda: attnext.score(Q, K, scale="big"), "scale must be a real number"),
    (lambda: _core.score_product(Q, K, [[1.0] * 4] * 4), "weight must be a NumPy array, got list"),
    (lambda: _core.score_additive(Q, K, np.ones((4, 3)), np.ones((4, 3)), np.ones(3), [1.0] * 3),
     "bias must be a NumPy array"),
    (lambda: _core.softmax(np.ones((2, 3)), [[True] * 3] * 2), "mask must be a NumPy array"),
    (lambda: _core.softmax(np.ones((2, 3)), np.ones((2, 3), np.float32)), "mask must be bool .* or float64"),
    (lambda: _core.score_product(Q, K.astype(np.float32)), "key has dtype float32 but query has float64"),
    (lambda: _core.softmax([1.0, 2.0]), "incompatible function arguments"),
    (lambda: attnext.additive_attention(Q, K, None, np.ones((4, 3)), np.ones((4, 3)), np.ones(3)),
     "value must be an array, got None"),
    (lambda: attnext.project_keys(K, None), "w_key must be an array, got None"),
    (lambda: _core_additive(bias=[1.0] * 3), "bias must be a NumPy array"),
    (lambda: _core_additive(key_lengths=np.array([1.0, 2.0])), "key_lengths must be int64"),
    (lambda: _core.sdpa(Q, K, V, key_lengths=[1, 2]), "key_lengths must be a NumPy int64 array"),
    (lambda: _core.linear(np.ones((2, 5, 2, 2)), np.ones((3, 4)), [1.0] * 3), "bias must be a NumPy array"),
])

def test_type_errors_name_arguments(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_core_additive_attention_empty_keys():
    # additive_keys returns zero-stride empty arrays for Lk = 0; they are legal projected keys.
    q, k, v = np.ones((2, 5, 4)), np.ones((2, 0, 4)), np.ones((2, 0, 3))
    out, w = _core.additive_attention(q, np.ones((4, 3)), None, *_core.additive_keys(k, np.ones((4, 3))), v,
                                      np.ones(3), None, None, True)
    assert out.shape == (2, 5, 3) and not out.any() and w.shape == (2, 5, 0)


# --- sizes that cannot exist --------------------------------------------------------------


def huge(shape, dtype=np.float64):
    """A stride-0 view with an enormous shape, costing one element of memory."""
    return np.broadcast_to(np.ones((1,) * len(shape), dtype=dtype), shape)


@pytest.mark.parametrize("call", [
    lambda: _core.score_product(huge((2**40, 1)), huge((2**40, 1))),
    lambda: attnext.score(huge((2**40, 1)), huge((2**40, 1))),
    lambda: attnext.score(huge((2**21, 2**21, 1)), huge((2**21, 2**21, 1))),
    lambda: _core.score_additive(huge((2**44, 1, 3)), huge((2**44, 0, 3)), np.ones((3, 2**20)), np.ones((3, 2**20)),
                                 np.ones(2**20)),
    lambda: _core.score_additive(huge((2**44, 1, 3)), huge((2**44, 1, 3)), np.ones((3, 2**20)),
                                 np.ones((3, 2**20)), np.ones(2**20)),
    lambda: attnext.weighted_sum(huge((2**31, 2**31, 1)), huge((2**31, 1, 2**31))),
])
def test_overflowing_sizes_are_value_errors(call):
    with pytest.raises(ValueError, match="too large|too big|overflow"):
        call()


@pytest.mark.parametrize("call", [
    lambda: _core.score_product(huge((2**24, 1)), huge((2**24, 1))),  # 2 PiB of scores
    lambda: attnext.softmax(huge((2**20, 2**26))),
    lambda: _core.score_additive(np.ones((1, 3)), np.ones((1, 3)), huge((3, 2**42)), huge((3, 2**42)),
                                 huge((2**42,))),  # v must be copied to be contiguous: 32 TiB
    lambda: attnext.weighted_sum(huge((2**20, 2**20, 1)), huge((2**20, 1, 2**10))),
])
def test_unsatisfiable_allocations_are_memory_errors(call):
    with pytest.raises(MemoryError):
        call()


def test_causal_offset_extremes():
    x = np.random.default_rng(0).standard_normal((3, 4))
    np.testing.assert_array_equal(_core.softmax(x, None, True, 2**63 - 1), _core.softmax(x))
    np.testing.assert_array_equal(_core.softmax(x, None, True, -(2**63)), np.zeros_like(x))
    # Beyond int64 an offset saturates (it means the same as the bound), rather than leaking
    # pybind's "incompatible function arguments" TypeError.
    np.testing.assert_array_equal(_core.softmax(x, None, True, 2**64), _core.softmax(x))
    np.testing.assert_array_equal(_core.softmax(x, None, True, -(2**200)), np.zeros_like(x))


def test_key_lengths_range_check_reads_broadcast_views_once():
    # A stride-0 key_lengths over 2**40 batch entries: checked over its one value, not 2**40 times.
    q = huge((2**20, 2**20, 8, 2), np.float32)
    k = huge((2**20, 2**20, 2, 2), np.float32)
    lengths = np.broadcast_to(np.int64(3), (2**20, 2**20))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 2\].*got 3"):
        _core.sdpa(q, k, k, key_lengths=lengths)
    raw, expo, ok = (np.broadcast_to(a, (2**20, 2**20) + a.shape) for a in
                     _core.additive_keys(np.ones((2, 2), np.float32), np.ones((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 2\].*got 3"):
        _core.additive_attention(q, np.ones((2, 3), np.float32), None, raw, expo, ok, k, np.ones(3, np.float32), None,
                                 lengths)
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 2\].*from 3 to 3"):
        attnext.additive_attention(q, np.ones((2, 2), np.float32), k, np.ones((2, 3), np.float32),
                                   np.ones((2, 3), np.float32), np.ones(3, np.float32), key_lengths=3)
