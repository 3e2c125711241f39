"""SDPA: extreme finite values (PLAN.md rule 3), empty outputs (rule 9), workspace release
(rule 10) and thread-count independence, on every kernel path (decode: L <= 16 without
weights; blocked: L > 16 or weights)."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref

F32 = np.float32
PATHS = [(16, False), (16, True), (17, False), (17, True), (70, False)]  # (L, return_weights)


def sdpa(q, k, v, mask=None, scale=1.0, weights=False):
    out, w, lse = _core.sdpa(q, k, v, mask, False, 0, -1, -1, None, scale, weights, True)
    return out, lse


@pytest.mark.parametrize("L,weights", PATHS)
def test_scale_folded_into_q_would_overflow(L, weights):
    """q = 1e20, k = 1e-20 * x, scale = 1e30: q * scale overflows float32 but q . k * scale
    (~1e30) does not; the formula's answer is a softmax of finite scores."""
    rng = np.random.default_rng(0)
    q = np.full((L, 4), 1e20, F32)
    k = (rng.standard_normal((9, 4)) * 1e-20).astype(F32)
    v = rng.standard_normal((9, 3)).astype(F32)
    out, lse = sdpa(q, k, v, scale=1e30, weights=weights)
    want = ref.scaled_dot_product_attention(q, k, v, scale=1e30)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,weights", PATHS)
def test_small_scale_is_folded_first(L, weights):
    """q ~ 1e30, k ~ 1e10, scale = 1e-39: q . k alone would overflow float32, folding the scale
    into q first keeps every score finite (the order the fast path uses whenever it is safe)."""
    rng = np.random.default_rng(1)
    q = (rng.standard_normal((L, 4)) * 1e30).astype(F32)
    k = (rng.standard_normal((9, 4)) * 1e10).astype(F32)
    v = rng.standard_normal((9, 3)).astype(F32)
    out, lse = sdpa(q, k, v, scale=1e-39, weights=weights)
    assert np.isfinite(out).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("L,weights", PATHS)
def test_hf_finfo_min_mask_row_gives_mean_of_values(L, weights):
    """A HuggingFace-style mask row filled with finfo(float32).min hides nothing in the formula:
    the scores all become finfo.min (absorbed), the softmax is uniform, the row is the mean of V,
    as the reference and PyTorch give (at L = 16 and L = 17 alike)."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((L, 8)).astype(F32)
    k = rng.standard_normal((33, 8)).astype(F32)
    v = rng.standard_normal((33, 5)).astype(F32)
    mask = np.zeros((L, 33), F32)
    mask[3] = np.finfo(F32).min
    mask[5, 10:] = np.finfo(F32).min  # a padding-style row: keys 10.. practically hidden
    out, lse = sdpa(q, k, v, mask=mask, scale=0.3, weights=weights)
    want = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    np.testing.assert_allclose(out[3], v.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert np.isfinite(lse).all()


@pytest.mark.parametrize("dtype,big", [(np.float32, 3e38), (np.float64, 1.7e308)])
@pytest.mark.parametrize("L,weights", PATHS)
def test_score_near_float_max(dtype, big, L, weights):
    """A score of 3e38 (float32) is finite: it wins the softmax, no NaN."""
    q = np.ones((L, 1), dtype)
    k = np.array([[big], [1.0], [-big], [2.0]], dtype)
    v = np.arange(8, dtype=dtype).reshape(4, 2)
    out, lse = sdpa(q, k, v, weights=weights)
    np.testing.assert_array_equal(out, np.broadcast_to(v[0], out.shape))
    np.testing.assert_allclose(lse, big, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mask_near_float_max_is_added_not_rescaled(dtype):
    """Score + mask with both finite and large: never multiplied by log2(e) (which overflowed)."""
    big = np.finfo(dtype).max / 2
    q = np.ones((17, 1), dtype)
    k = np.array([[0.0], [1.0], [2.0]], dtype)
    v = np.eye(3, dtype=dtype)
    mask = np.tile(np.array([big, 0.0, -big], dtype), (17, 1))
    for L in (16, 17):
        out, _ = sdpa(np.ascontiguousarray(q[:L]), k, v, mask=np.ascontiguousarray(mask[:L]))
        np.testing.assert_array_equal(out, np.tile(v[0], (L, 1)))


def _timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


@pytest.mark.parametrize("weights", [False, True])
def test_empty_outputs_return_at_once(weights):
    """A zero-size output axis: O(1) work, whatever S is (2**34 stride-0 keys would take minutes
    if any key were looked at)."""
    S = 1 << 34
    k = np.broadcast_to(np.zeros((1, 1, 4), F32), (1, S, 4))
    v0 = np.broadcast_to(np.zeros((1, 1, 0), F32), (1, S, 0))
    q = np.zeros((1, 3, 4), F32)
    (out, w, lse), dt = _timed(lambda: _core.sdpa(q, k, v0, None, False, 0, -1, -1, None, 1.0, False, False))
    assert out.shape == (1, 3, 0) and dt < 5
    (out, w, lse), dt = _timed(lambda: _core.sdpa(np.zeros((1, 0, 4), F32), k, v0, None, False, 0, -1, -1, None,
                                                  1.0, weights, True))
    assert out.shape == (1, 0, 0) and lse.shape == (1, 0) and dt < 5
    v = np.broadcast_to(np.zeros((0, 1, 2), F32), (0, S, 2))
    (out, w, lse), dt = _timed(lambda: _core.sdpa(np.zeros((0, 3, 4), F32), np.broadcast_to(k, (0, S, 4)), v, None,
                                                  False, 0, -1, -1, None, 1.0, weights, True))
    assert out.shape == (0, 3, 2) and dt < 5


def test_empty_value_width_still_gives_lse():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 20, 4)), rng.standard_normal((2, 30, 4))
    v = np.zeros((2, 30, 0))
    for L in (3, 20):
        out, w, lse = _core.sdpa(np.ascontiguousarray(q[:, :L]), k, v, None, False, 0, -1, -1, None, 0.5, False, True)
        want = ref.scaled_dot_product_attention(q[:, :L], k, np.zeros((2, 30, 1)), scale=0.5, return_lse=True)[1]
        assert out.shape == (2, L, 0)
        np.testing.assert_allclose(lse, want, rtol=1e-12)


def test_workspaces_above_16mb_are_released():
    """E = 2**20: the blocked path's packed query block is 256 MB per thread; after the call
    the process keeps none of it (scratch.hpp's 16 MB rule)."""
    code = textwrap.dedent("""
        import numpy as np, attnext
        from attnext import _core
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        E = 1 << 20
        q = np.ones((1, 17, E), np.float32) * 1e-3
        k = np.ones((1, 4, E), np.float32) * 1e-3
        v = np.ones((1, 4, 8), np.float32)
        _core.sdpa(q[:, :1], k, v, None, False, 0, -1, -1, None, 1.0, False, False)  # warm up
        base = rss()
        for L in (17, 1):
            out = _core.sdpa(np.ascontiguousarray(q[:, :L]), k, v, None, False, 0, -1, -1, None, 1.0, L == 17, True)[0]
        print(rss() - base)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                               check=True).stdout)
    assert grown < 48 << 20, f"{grown / 2**20:.0f} MB kept after the call"


CASES = [  # (batch, L, S, E, Ev, weights, causal)
    ((3,), 5, 700, 16, 8, False, False),      # decode, several chunks
    ((2,), 90, 300, 16, 8, False, True),      # blocked
    ((1,), 40, 2100, 8, 8, False, False),     # blocked, key chunks merged
    ((2,), 70, 130, 8, 4, True, True),        # weights
]


@pytest.mark.parametrize("case", CASES)
def test_bit_identical_for_any_thread_count(case):
    batch, L, S, E, Ev, weights, causal = case
    rng = np.random.default_rng(L)
    q = rng.standard_normal(batch + (L, E)).astype(F32)
    k = rng.standard_normal(batch + (S, E)).astype(F32)
    v = rng.standard_normal(batch + (S, Ev)).astype(F32)
    v[..., 3, 0] = np.nan  # hidden from early causal rows: exercises the careful P V too
    mask = np.where(rng.random(batch + (L, S)) < 0.8, 0, -np.inf).astype(F32)
    before = attnext.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            attnext.set_num_threads(n)
            r = _core.sdpa(q, k, v, mask, causal, S - L, -1, -1, None, 0.25, weights, True)
            results.append(b"".join(x.tobytes() for x in r if x is not None))
    finally:
        attnext.set_num_threads(before)
    assert all(r == results[0] for r in results)
