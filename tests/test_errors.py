"""Every error path of the foundation API raises the documented exception with a message
that names the argument and the shapes."""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import _core

F = np.float32


def z(*shape, dtype=F):
    return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("bad", [np.arange(6).reshape(2, 3), np.ones((2, 3), dtype=bool),
                                 np.ones((2, 3), dtype=np.complex64)])
def test_non_float_inputs_are_type_errors(bad):
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        attnext.score(bad, z(2, 3))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        attnext.softmax(bad)
    with pytest.raises(TypeError, match="value must be a floating-point array"):
        attnext.weighted_sum(z(2, 3), bad.T)


def test_shape_mismatches_name_arguments_and_shapes():
    with pytest.raises(ValueError, match=r"query has shape \(2, 5, 8\) but key has \(2, 6, 7\)"):
        attnext.score(z(2, 5, 8), z(2, 6, 7))
    with pytest.raises(ValueError, match=r"batch dimensions do not broadcast: query has shape \(2, 5, 8\), key has "
                                         r"shape \(3, 6, 8\)"):
        attnext.score(z(2, 5, 8), z(3, 6, 8))
    with pytest.raises(ValueError, match=r"weights has shape \(2, 5, 6\) but value has \(2, 7, 3\)"):
        attnext.weighted_sum(z(2, 5, 6), z(2, 7, 3))
    with pytest.raises(ValueError, match=r"query must have at least 2 dimensions .* got shape \(5,\)"):
        attnext.score(z(5), z(3, 5))
    with pytest.raises(ValueError, match=r"key has 6 positions but value has shape \(2, 7, 3\)"):
        attnext.attention(z(2, 5, 8), z(2, 6, 8), z(2, 7, 3))


def test_method_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        attnext.score(z(2, 3), z(2, 3), "cosine")
    with pytest.raises(ValueError, match="method='general' needs weight"):
        attnext.score(z(2, 3), z(2, 3), "general")
    with pytest.raises(ValueError, match="method='additive' needs v, w_key, w_query"):
        attnext.score(z(2, 3), z(2, 3), "additive")
    with pytest.raises(ValueError, match="weight is not used by method='dot'"):
        attnext.score(z(2, 3), z(2, 3), "dot", weight=z(3, 3))
    with pytest.raises(ValueError, match=r"query has shape \(2, 3\) but weight has \(4, 3\)"):
        attnext.score(z(2, 3), z(2, 3), "general", weight=z(4, 3))
    with pytest.raises(ValueError, match=r"w_query has shape \(3, 4\) but w_key has \(3, 5\): the number of units"):
        attnext.score(z(2, 3), z(2, 3), "additive", w_query=z(3, 4), w_key=z(3, 5), v=z(4))
    with pytest.raises(ValueError, match=r"v has shape \(5,\) but the number of units is 4"):
        attnext.score(z(2, 3), z(2, 3), "additive", w_query=z(3, 4), w_key=z(3, 4), v=z(5))
    with pytest.raises(TypeError, match="unexpected keyword"):
        attnext.attention(z(2, 3), z(2, 3), z(2, 3), wieght=z(3, 3))


def test_mask_errors():
    with pytest.raises(TypeError, match="mask must be bool .* got dtype int64"):
        attnext.softmax(z(3, 4), mask=np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 5\), which does not broadcast to the scores' shape "
                                         r"\(3, 4\)"):
        attnext.softmax(z(3, 4), mask=np.ones((3, 5), dtype=bool))
    with pytest.raises(ValueError, match="is_causal must be"):
        attnext.attention(z(2, 3), z(2, 3), z(2, 3), is_causal="top")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        attnext.softmax(z(3, 4), axis=2)


def test_sdpa_argument_errors():
    q = z(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\]"):
        attnext.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"key has shape \(2, 4, 5, 8\) but value has \(2, 4, 6, 8\)"):
        attnext.scaled_dot_product_attention(q, q, z(2, 4, 6, 8))
    with pytest.raises(ValueError, match="enable_gqa needs query heads to be a multiple of key heads"):
        attnext.scaled_dot_product_attention(q, z(2, 3, 5, 8), z(2, 3, 5, 8), enable_gqa=True)
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 5\]"):
        attnext.scaled_dot_product_attention(q, q, q, key_lengths=np.array([3, 6]))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 5\]"):
        attnext.scaled_dot_product_attention(q, q, q, key_lengths=np.array([-1, 2]))
    with pytest.raises(TypeError, match="key_lengths must be integers"):
        attnext.scaled_dot_product_attention(q, q, q, key_lengths=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="window left must be a non-negative int"):
        attnext.scaled_dot_product_attention(q, q, q, window=(-1, None))


def test_core_rejects_bad_calls_without_crashing():
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got int64"):
        _core.softmax(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="key has dtype float64 but query has float32"):
        _core.score_product(z(2, 3), z(2, 3, dtype=np.float64))
    with pytest.raises(ValueError, match="leading .batch. dimensions must match"):
        _core.score_product(z(2, 2, 3), z(3, 2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but the scores have \(2, 3\)"):
        _core.softmax(z(2, 3), np.ones(2, dtype=bool))
    with pytest.raises(TypeError):
        _core.softmax([[1.0, 2.0]])  # lists are not arrays at this level
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        _core.weighted_sum(z(3), z(3, 2))


def test_threads_setting():
    before = attnext.get_num_threads()
    try:
        attnext.set_num_threads(3)
        assert attnext.get_num_threads() == 3
        with pytest.raises(ValueError, match=r"n must be in \[1, 256\], got 0"):
            attnext.set_num_threads(0)
        with pytest.raises(TypeError, match="n must be an int"):
            attnext.set_num_threads(2.0)
    finally:
        attnext.set_num_threads(before)
