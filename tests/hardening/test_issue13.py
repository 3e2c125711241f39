"""Regression tests of issue 13's remaining findings: the thread-count cap (3), empty outputs in
O(1) (4), per-thread scratch released after the call (12), and the undocumented exceptions
(each bad argument raises TypeError or ValueError naming it, or is handled as documented)."""

import numpy as np
import pytest

import attnext

from .harness import NOT_UNDER_SANITIZERS, peak_rss_growth, run_python

sdpa = attnext.scaled_dot_product_attention


# --- 3. thread counts -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 1025, 2**31, 2**63, 10**30])
def test_thread_counts_out_of_range_are_value_errors(n):
    saved = attnext.get_num_threads()
    with pytest.raises(ValueError, match=r"\[1, \d+\]"):
        attnext.set_num_threads(n)
    assert attnext.get_num_threads() == saved


def test_numpy_integer_thread_counts_are_accepted():
    saved = attnext.get_num_threads()
    try:
        for n in (np.int64(2), np.int32(3), np.uint8(1)):
            attnext.set_num_threads(n)
            assert attnext.get_num_threads() == int(n)
    finally:
        attnext.set_num_threads(saved)


@pytest.mark.parametrize("n", [1.0, "2", None, True])
def test_non_integer_thread_counts_are_type_errors(n):
    with pytest.raises(TypeError, match="n"):
        attnext.set_num_threads(n)


@NOT_UNDER_SANITIZERS
def test_largest_thread_count_under_address_space_limit_does_not_end_the_process():
    """The cap itself must be survivable: under a 2 GiB address-space limit, the largest
    accepted count either runs or raises; the process never exits on its own."""
    r = run_python("""
        import resource, re, numpy as np, attnext
        try:
            attnext.set_num_threads(10**9)
        except ValueError as e:
            cap = int(re.search(r"\\[1, (\\d+)\\]", str(e)).group(1))
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        try:
            attnext.set_num_threads(cap)
            q = np.ones((64, 4, 64, 16), np.float32)
            attnext.scaled_dot_product_attention(q, q, q)
        except (ValueError, MemoryError, RuntimeError) as e:
            print("refused:", type(e).__name__)
        print("alive")
    """, timeout=120)
    assert "alive" in r.stdout, f"exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-2000:]}"


# --- 4. empty outputs return at once ----------------------------------------------------------


def _huge(shape, dtype=np.float32):
    return np.broadcast_to(np.ones((1,) * len(shape), dtype), shape)


S_LONG = 2**26  # stride-0 keys: a scan over them takes visible time, an O(1) return none


@pytest.mark.parametrize("call", [
    lambda: sdpa(_huge((1, 1, 4)), _huge((1, S_LONG, 4)), _huge((1, S_LONG, 0))),
    lambda: sdpa(_huge((1, 0, 4)), _huge((1, S_LONG, 4)), _huge((1, S_LONG, 3))),
    lambda: sdpa(_huge((0, 1, 1, 4)), _huge((0, 1, S_LONG, 4)), _huge((0, 1, S_LONG, 3))),
    lambda: attnext.attention(_huge((1, 1, 4)), _huge((1, S_LONG, 4)), _huge((1, S_LONG, 0))),
], ids=["sdpa_Ev0", "sdpa_L0", "sdpa_B0", "attention_Dv0"])
def test_empty_outputs_take_no_time(call):
    """Outputs with a zero-size axis return at once, however long the other axes (a linear scan
    of 2**28 stride-0 keys took 1.1 s)."""
    import time

    start = time.perf_counter()
    out = call()
    out = out[0] if isinstance(out, tuple) else out
    assert out.size == 0
    assert time.perf_counter() - start < 0.25, "an empty output took time proportional to the keys"


@pytest.mark.parametrize("shape", ["Dv0", "Lq0"])
def test_empty_additive_outputs_build_no_projections(shape):
    """additive_attention with an empty output must not project 2**22 keys ((S, U) = 128 MiB)."""
    lq, dv = (1, 0) if shape == "Dv0" else (0, 3)
    grown, _ = peak_rss_growth(f"""
        big = lambda s: np.broadcast_to(np.ones((1,) * len(s), np.float32), s)
        q, k, v = big((1, {lq}, 4)), big((1, 2**22, 4)), big((1, 2**22, {dv}))
        w = np.ones((4, 8), np.float32)
    """, "attnext.additive_attention(q, k, v, w, w, np.ones(8, np.float32)).sum() + 1")
    assert grown < 16 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB for an empty output"


# --- 12. scratch memory is released after the call ---------------------------------------------


# ~8 s (hundreds of MB of workspace on two threads): ATTNEXT_HEAVY=1 only. The default run keeps
# the behaviour through tests/test_h1_sdpa_limits.py::test_workspaces_above_16mb_are_released
# (the same E = 2**20 SDPA case through _core) and tests/test_h2a_scratch.py.
@pytest.mark.skipif(not __import__("os").environ.get("ATTNEXT_HEAVY"), reason="heavy: set ATTNEXT_HEAVY=1")
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")
def test_sdpa_workspace_released_after_call():
    """One SDPA call with E = 2**20 needs ~100s of MB of per-thread workspace; afterwards the
    resident memory must fall back (buffers above 16 MB are released after the call)."""
    r = run_python("""
        import numpy as np, attnext
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        attnext.set_num_threads(2)
        q = np.ones((2, 1, 40, 2**20), np.float32) * 1e-3
        k = np.ones((2, 1, 40, 2**20), np.float32) * 1e-3
        before = rss()
        out = attnext.scaled_dot_product_attention(q, k, k)
        del out
        print((rss() - before) / 2**20)
    """, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    grown = float(r.stdout.split()[-1])
    assert grown < 64, f"{grown:.0f} MiB still resident after the call"


# --- undocumented exceptions ------------------------------------------------------------------

Q, K, V = np.ones((2, 5, 4)), np.ones((2, 6, 4)), np.ones((2, 6, 3))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: sdpa(Q, K, V, dropout_p=np.zeros(2)), (TypeError, ValueError), "dropout_p"),
    (lambda: attnext.softmax(np.ones((2, 3)), axis=None), (TypeError, ValueError), "axis"),
    (lambda: attnext.softmax(np.ones((2, 3)), axis=(0, 1)), (TypeError, ValueError), "axis"),
    (lambda: attnext.softmax(np.ones((2, 3)), axis=True), TypeError, "axis"),
    (lambda: attnext.set_num_threads(2**31), ValueError, r"\[1, \d+\]"),
    (lambda: sdpa(Q, K, V, scale="2"), (TypeError, ValueError), "scale"),
    (lambda: attnext.score(Q, K, scale="2"), (TypeError, ValueError), "scale"),
    (lambda: sdpa(Q, K, V, window=(True, False)), (TypeError, ValueError), "window"),
    (lambda: sdpa(Q, K, V, window=(1.5, 2)), (TypeError, ValueError), "window"),
    (lambda: sdpa(np.ma.masked_array(Q, mask=Q > 2), K, V), TypeError, "masked"),
    (lambda: attnext.softmax(np.ones((2, 3)), mask=np.ma.masked_array(np.ones((2, 3), bool))), TypeError, "mask"),
    (lambda: attnext.attention(Q, K, V, mask=np.ma.masked_array(np.ones((5, 6), bool))), TypeError, "mask"),
])
def test_bad_arguments_raise_documented_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_bool_is_causal_is_accepted():
    q = np.random.default_rng(0).standard_normal((2, 5, 4))
    np.testing.assert_array_equal(sdpa(q, q, q, is_causal=np.True_), sdpa(q, q, q, is_causal=True))
    np.testing.assert_array_equal(attnext.attention(q, q, q, is_causal=np.True_),
                                  attnext.attention(q, q, q, is_causal=True))


def test_kv_cache_accepts_big_endian_like_the_rest_of_the_api():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3, 2))
    cache, swapped = attnext.KVCache(), attnext.KVCache()
    cache.append(k, v)
    swapped.append(k.astype(">f8"), v.astype(">f8"))
    np.testing.assert_array_equal(swapped.keys, cache.keys)
    np.testing.assert_array_equal(swapped.values, cache.values)


def test_general_attention_weights_are_writable():
    rng = np.random.default_rng(0)
    q, k, v, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 2)), \
        rng.standard_normal((4, 6))
    for method, kw in (("general", dict(weight=w)), ("dot", {}), ("additive", dict(w_query=np.ones((4, 3)),
                                                                                  w_key=np.ones((6, 3)),
                                                                                  v=np.ones(3)))):
        if method == "dot":
            k2 = k[..., :4]
        else:
            k2 = k
        out, weights = attnext.attention(q, k2, v, method=method, return_weights=True, **kw)
        assert out.flags.writeable and weights.flags.writeable, method


def test_torch_tensor_requiring_grad_is_a_type_error_naming_attnext_torch():
    torch = pytest.importorskip("torch")
    q = torch.ones((2, 5, 4), dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="attnext.torch"):
        sdpa(q, K, V)


def test_peak_memory_helper_still_works():
    grown, biggest = peak_rss_growth("x = np.ones((4, 4))", "attnext.softmax(x)")
    assert grown >= 0 and biggest > 0
