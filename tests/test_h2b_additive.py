"""Additive attention under the rules of issues 12 and 13 (h2b's kernels).

- Hidden is hidden: a key hidden by key_lengths, a False or a -inf float-mask entry never
  reaches the output, even when its value row holds NaN or inf; a row that sees no key gives
  zeros; a NaN mask entry on a key hidden by its length changes nothing.
- Empty outputs return at once with the right shapes.
- Results are bit-identical for any thread count, whichever execution strategy the count picks.
- The factored form's range limit is read from _core (one source).
"""

import numpy as np
import pytest

import attnext
from attnext import _core, reference

from hardening.harness import HIDES_EVERY_KEY

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-4, np.float64: 1e-10}


def problem(rng, dtype, batch=(3,), lq=5, lk=7, d=6, units=12, dv=4):
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(batch + (lk, d)).astype(dtype)
    val = rng.standard_normal(batch + (lk, dv)).astype(dtype)
    wq = (0.4 * rng.standard_normal((d, units))).astype(dtype)
    wk = (0.4 * rng.standard_normal((d, units))).astype(dtype)
    v = rng.standard_normal(units).astype(dtype)
    return q, k, val, wq, wk, v


@pytest.fixture
def threads():
    before = attnext.get_num_threads()
    yield
    attnext.set_num_threads(before)


# --- hidden is hidden --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lk", [7, 40])  # 40: the weighted sum goes through the packed GEMM when lq >= 32
def test_zero_length_row_gives_zeros_despite_nonfinite_values(dtype, poison, lk):
    rng = np.random.default_rng(1)
    q, k, val, wq, wk, v = problem(rng, dtype, lq=33, lk=lk)
    val[1] = poison
    lengths = np.array([lk, 0, 3])
    val[2, 3:] = poison  # beyond entry 2's length
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, key_lengths=lengths, return_weights=True)
    assert np.all(out[1] == 0) and np.all(w[1] == 0)
    assert np.all(np.isfinite(out[2])) and np.all(w[2, :, 3:] == 0)
    clean = val.copy()
    clean[1] = 0
    clean[2, 3:] = 0
    want = reference.additive_attention(q, k, clean, wq, wk, v, key_lengths=lengths)
    np.testing.assert_allclose(out, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.filterwarnings(HIDES_EVERY_KEY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("lq", [4, 40])
def test_masked_keys_values_never_leak(dtype, kind, lq):
    rng = np.random.default_rng(2)
    q, k, val, wq, wk, v = problem(rng, dtype, lq=lq, lk=9)
    hide = np.zeros((3, lq, 9), bool)
    hide[:, :, [2, 5]] = True        # hidden for every row: their values are poisoned
    hide[0] = True                   # entry 0: no row sees anything
    hide[1, ::2, :] = True           # entry 1: every other row sees nothing
    val[:, 2] = np.nan
    val[:, 5, 1] = np.inf
    mask = ~hide if kind == "bool" else np.where(hide, -np.inf, 0.0).astype(dtype)
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, mask=mask, return_weights=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    assert np.all(out[0] == 0) and np.all(w[0] == 0)
    assert np.all(out[1, ::2] == 0)
    assert np.all(w[hide] == 0)
    clean = np.where(np.isfinite(val), val, 0).astype(dtype)
    want = reference.additive_attention(q, k, clean, wq, wk, v, mask=mask)
    np.testing.assert_allclose(out, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_nan_value_still_propagates(dtype):
    """Only hidden keys are protected: a NaN value row of a visible key reaches its rows."""
    rng = np.random.default_rng(3)
    q, k, val, wq, wk, v = problem(rng, dtype, lq=3, lk=6)
    mask = np.ones((3, 3, 6), bool)
    mask[:, 0, 4] = False  # row 0 hides key 4, rows 1 and 2 see it
    val[:, 4] = np.nan
    out = attnext.additive_attention(q, k, val, wq, wk, v, mask=mask)
    assert np.all(np.isfinite(out[:, 0])) and np.all(np.isnan(out[:, 1:]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_mask_entry_beyond_length_is_hidden(dtype):
    rng = np.random.default_rng(4)
    q, k, val, wq, wk, v = problem(rng, dtype, lq=4, lk=8)
    lengths = np.array([8, 5, 0])
    mask = np.zeros((3, 4, 8), dtype)
    mask[1, :, 5:] = np.nan
    mask[2] = np.nan
    mask[1, :, 6] = np.inf
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, mask=mask, key_lengths=lengths, return_weights=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    assert np.all(out[2] == 0) and np.all(w[1, :, 5:] == 0)
    want = reference.additive_attention(q, k, val, wq, wk, v, key_lengths=lengths)
    np.testing.assert_allclose(out, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_out_of_range_lengths_are_clamped():
    rng = np.random.default_rng(5)
    q, k, val, wq, wk, v = problem(rng, np.float64, lq=2, lk=5)
    raw, expo, ok = _core.additive_keys(k, wk)
    lengths = np.array([-(2 ** 62), 2 ** 62, 3], np.int64)
    try:
        got = _core.additive_attention(q, wq, None, raw, expo, ok, val, v, None, lengths, False)
    except ValueError:
        pytest.skip("this binding refuses out-of-range lengths before the kernel sees them")
    want = reference.additive_attention(q, k, val, wq, wk, v, key_lengths=np.array([0, 5, 3]))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# --- empty outputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [dict(lq=0), dict(dv=0), dict(batch=(0,)), dict(batch=(2, 0))])
@pytest.mark.parametrize("weights", [False, True])
def test_empty_outputs(dtype, shape, weights):
    rng = np.random.default_rng(6)
    q, k, val, wq, wk, v = problem(rng, dtype, **shape)
    got = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=weights)
    want = reference.additive_attention(q, k, val, wq, wk, v, return_weights=weights)
    for g, w in zip(got, want) if weights else [(got, want)]:
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=TOL[dtype], atol=TOL[dtype])


def test_empty_output_does_no_work_on_huge_keys():
    """Dv = 0 (no weights) and Lq = 0 return before projecting 2^24 stride-0 keys."""
    d, units, lk = 4, 64, 2 ** 24
    q = np.ones((1, 3, d), np.float32)
    k = np.broadcast_to(np.ones((1, 1, d), np.float32), (1, lk, d))
    wq = np.ones((d, units), np.float32)
    v = np.ones(units, np.float32)
    out = _core.additive_attention_keys(q, wq, None, k, wq, np.zeros((1, lk, 0), np.float32), v, None, None, False)
    assert out.shape == (1, 3, 0)
    out = _core.additive_attention_keys(q[:, :0], wq, None, k, wq, np.ones((1, lk, 2), np.float32)[:, :, :2], v,
                                        None, None, False)
    assert out.shape == (1, 0, 2)


def test_no_keys_gives_zero_context():
    rng = np.random.default_rng(7)
    q, k, val, wq, wk, v = problem(rng, np.float32, lk=0)
    out, w = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True)
    assert out.shape == (3, 5, 4) and np.all(out == 0) and w.shape == (3, 5, 0)


# --- bit-identity across thread counts ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "mask", "lengths", "poisoned"])
def test_bit_identical_for_any_thread_count(dtype, case, threads):
    rng = np.random.default_rng(8)
    # 16 batch entries of 40 keys: one thread per entry at 1-8 threads (per-entry strategy)
    # except where 2 entries per thread are not reached; 70 query rows: two row blocks.
    q, k, val, wq, wk, v = problem(rng, dtype, batch=(16,), lq=70, lk=40, d=8, units=20, dv=9)
    kwargs = {}
    if case in ("mask", "poisoned"):
        kwargs["mask"] = rng.random((16, 70, 40)) > 0.4
    if case in ("lengths", "poisoned"):
        kwargs["key_lengths"] = rng.integers(0, 41, 16)
    if case == "poisoned":
        val[:, 3] = np.nan
        kwargs["mask"][:, :, 3] = False
    results = []
    for n in (1, 2, 3, 8):
        attnext.set_num_threads(n)
        out, w = attnext.additive_attention(q, k, val, wq, wk, v, return_weights=True, **kwargs)
        keys = attnext.project_keys(k, wk)
        out2 = attnext.additive_attention(q, keys, val, wq, None, v, **kwargs)
        results.append((out.tobytes(), w.tobytes(), out2.tobytes()))
    assert all(r == results[0] for r in results)
    assert results[0][0] == results[0][2]  # projected keys or raw keys: the same bits


# --- one source for the factored form's range ---------------------------------------------------

def test_exp_form_limit_is_exposed():
    assert _core.additive_exp_form_limit == {"float32": 20.0, "float64": 170.0}
