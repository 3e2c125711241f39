"""Issue 15's dropout: the documented counter-based rule, bit for bit, and its statistics.

The rule (docs/backward.md, PLAN: "Dropout rule"): element (n, i, j) of the (batch..., query
head) entry n (flat C-order over the broadcast batch shape of the query; under GQA the query
head's index), query i, key j is dropped iff word (j & 3) of Philox4x32-10 on counter
(j >> 2, i, n mod 2^32, n >> 32) with key (seed mod 2^32, seed >> 32) is < floor(p 2^32); kept
weights are scaled by 1 / (1 - p). This file holds its own implementation of that text (below,
checked against Random123's published known answers) and holds attnext._philox, the kernels and
the NumPy reference to it.

Statistics: keep rate within 4 sigma of 1 - p over >= 10^7 decisions; no correlation
(|r| < 5 / sqrt(n)) between neighbouring rows, columns, heads, batch entries or consecutive
seeds; the mean output over many seeds converges to the no-dropout output at the rate the
exact variance predicts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import attnext
from attnext import _philox
from attnext import reference as ref
from hardening.harness import relative_error, tolerance

SDPA = attnext.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny calls: on one thread (results do not depend on the count; on a busy
    # machine waking a second thread per tiny call costs milliseconds).
    with attnext.threads(1):
        yield
MASK32 = np.uint64(0xFFFFFFFF)

# Random123's known-answer vectors for Philox4x32-10 (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_spec(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 as the plan words it, on uint64 arrays holding 32-bit values."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & MASK32, (k1 + np.uint64(0xBB67AE85)) & MASK32
    return np.stack([c0, c1, c2, c3], axis=-1)


def keep_spec(seed: int, p: float, n, i, j) -> np.ndarray:
    """True where element (n, i, j) is kept (n, i, j broadcast together)."""
    n, i, j = np.broadcast_arrays(np.asarray(n, np.uint64), np.asarray(i, np.uint64), np.asarray(j, np.uint64))
    words = philox_spec(j >> np.uint64(2), i, n & MASK32, n >> np.uint64(32), seed & 0xFFFFFFFF, seed >> 32)
    word = np.take_along_axis(words, (j & np.uint64(3)).astype(np.intp)[..., None], axis=-1)[..., 0]
    return word >= np.uint64(math.floor(p * 2**32))


def keep_spec_grid(seed, p, batch_shape, lq, lk):
    n = np.arange(math.prod(batch_shape), dtype=np.uint64).reshape(batch_shape + (1, 1))
    return keep_spec(seed, p, n, np.arange(lq)[:, None], np.arange(lk)[None, :])


# --- the generator --------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, want", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, want):
    assert tuple(int(w) for w in philox_spec(*counter, *key)) == want  # this file's implementation
    got = _philox.philox4x32_10(np.array(counter, dtype=np.uint32), key[0], key[1])
    assert got.dtype == np.uint32 and tuple(int(w) for w in got) == want


def test_philox_vectorised_matches_spec():
    rng = np.random.default_rng(5)
    ctr = rng.integers(0, 2**32, size=(3, 50, 4), dtype=np.uint64).astype(np.uint32)
    got = _philox.philox4x32_10(ctr, 0x12345678, 0x9ABCDEF0)
    want = philox_spec(*(ctr[..., w].astype(np.uint64) for w in range(4)), 0x12345678, 0x9ABCDEF0)
    assert got.shape == (3, 50, 4)
    np.testing.assert_array_equal(got.astype(np.uint64), want)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**64 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.77])
def test_keep_mask_is_the_documented_rule(seed, p):
    batch, lq, lk = (2, 3), 7, 11  # key counts not a multiple of 4: a partial last Philox word group
    got = _philox.keep_mask(seed, p, batch, lq, lk)
    assert got.dtype == np.bool_ and got.shape == batch + (lq, lk)
    np.testing.assert_array_equal(got, keep_spec_grid(seed, p, batch, lq, lk))


def test_threshold_edges():
    assert not _philox.keep_mask(3, 1.0, (2,), 5, 9).any()  # p = 1 drops everything
    assert _philox.keep_mask(3, 0.0, (2,), 5, 9).all()
    # The smallest p > 0 whose threshold is 1 drops only a word equal to 0: practically nothing.
    assert _philox.keep_mask(3, 2.0**-32, (2,), 5, 9).all()


def test_draw_seed_is_fresh_and_leaves_numpy_alone():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    seeds = {_philox.draw_seed() for _ in range(50)}
    assert len(seeds) == 50 and all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds)
    assert max(seeds) >= 2**40  # 64 random bits, not a small range
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # no global generator involved


# --- the kernels and the reference use the rule ------------------------------------------------

def _inputs(rng, batch, hq, hk, lq, lk, e=8, ev=5, dtype=np.float64):
    q = (rng.standard_normal(batch + (hq, lq, e)) * 0.3).astype(dtype)
    k = (rng.standard_normal(batch + (hk, lk, e)) * 0.3).astype(dtype)
    v = rng.standard_normal(batch + (hk, lk, ev)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [((2, 3), 3, 3, 7, 11), ((1,), 2, 2, 130, 67), ((), 1, 1, 65, 200),
                                   ((2,), 4, 2, 9, 13)], ids=["batch2x3", "blocks", "long_keys", "gqa"])
def test_kernel_weights_follow_the_rule(dtype, shape, rng):
    batch, hq, hk, lq, lk = shape
    q, k, v = _inputs(rng, batch, hq, hk, lq, lk, dtype=dtype)
    seed, p = 2**40 + 17, 0.35
    gqa = hq != hk
    out, w = SDPA(q, k, v, dropout_p=p, seed=seed, enable_gqa=gqa, return_weights=True)
    clean = SDPA(q, k, v, enable_gqa=gqa, return_weights=True)[1]
    keep = keep_spec_grid(seed, p, batch + (hq,), lq, lk)  # query-head coordinates, also under GQA
    np.testing.assert_array_equal(w != 0, keep)
    assert relative_error(w, np.where(keep, clean / (1 - p), 0)) <= 4 * tolerance(dtype)
    assert relative_error(out, (np.where(keep, clean / (1 - p), 0).astype(np.float64) @
                                np.repeat(v, hq // hk, axis=-3).astype(np.float64))) <= 4 * tolerance(dtype)


@pytest.mark.parametrize("lq", [1, 5, 16])
def test_decode_path_output_follows_the_rule(lq, rng):
    # Few query rows without weights: the decode path, whose dropout must be the same rule.
    q, k, v = _inputs(rng, (2,), 4, 2, lq, 300)
    seed, p = 7, 0.5
    out = SDPA(q, k, v, dropout_p=p, seed=seed, enable_gqa=True)
    clean = SDPA(q, k, v, enable_gqa=True, return_weights=True)[1]
    keep = keep_spec_grid(seed, p, (2, 4), lq, 300)
    want = np.where(keep, clean / (1 - p), 0) @ np.repeat(v, 2, axis=-3)
    assert relative_error(out, want) <= 1e-12
    with_weights = SDPA(q, k, v, dropout_p=p, seed=seed, enable_gqa=True, return_weights=True)[0]
    assert relative_error(out, with_weights) <= 1e-12  # every path, one rule


def test_broadcast_batch_uses_the_broadcast_index(rng):
    # query (1, 3, L, E) against keys (2, 3, S, E): the dropout batch is (2, 3), n = 3 b + h.
    q, k, v = _inputs(rng, (2,), 3, 3, 6, 10)
    w = SDPA(q[:1], k, v, dropout_p=0.5, seed=4, return_weights=True)[1]
    np.testing.assert_array_equal(w != 0, keep_spec_grid(4, 0.5, (2, 3), 6, 10))
    full = SDPA(np.broadcast_to(q[:1], q.shape), k, v, dropout_p=0.5, seed=4, return_weights=True)[1]
    np.testing.assert_array_equal(w, full)


@pytest.mark.parametrize("opts", [{}, dict(is_causal=True, key_lengths=np.array([7, 3])), dict(enable_gqa=True)],
                         ids=["plain", "masked", "gqa"])
def test_reference_matches_kernel_bit_for_bit_masks(opts, rng):
    q, k, v = _inputs(rng, (2,), 4, 2 if opts.get("enable_gqa") else 4, 8, 10)
    seed, p = 31337, 0.3
    got = SDPA(q, k, v, dropout_p=p, seed=seed, return_weights=True, **opts)
    want = ref.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=seed, return_weights=True, **opts)
    np.testing.assert_array_equal(got[1] != 0, want[1] != 0)
    assert relative_error(got[1], want[1]) <= 1e-12 and relative_error(got[0], want[0]) <= 1e-12


def test_fixed_seed_is_deterministic_and_seeds_differ(rng):
    q, k, v = _inputs(rng, (2,), 2, 2, 20, 30)
    a = SDPA(q, k, v, dropout_p=0.4, seed=5, return_weights=True)
    b = SDPA(q, k, v, dropout_p=0.4, seed=5, return_weights=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    c = SDPA(q, k, v, dropout_p=0.4, seed=6, return_weights=True)
    assert not np.array_equal(a[1] != 0, c[1] != 0)
    d = SDPA(q, k, v, dropout_p=0.4, seed=5 + 2**32, return_weights=True)  # the seed's high word counts
    assert not np.array_equal(a[1] != 0, d[1] != 0)
    # Gradients too: two pullbacks with the same seed, bit for bit.
    g = rng.standard_normal(a[0].shape)
    grads = [attnext.vjp(SDPA, q, k, v, None, 0.4, seed=5)[1](g) for _ in range(2)]
    for x, y in zip(grads[0][:3], grads[1][:3]):
        assert x.tobytes() == y.tobytes()


def test_seed_none_draws_fresh_seeds_and_vjp_records_it(rng):
    q, k, v = _inputs(rng, (2,), 2, 2, 10, 12)
    a = SDPA(q, k, v, dropout_p=0.5, return_weights=True)[1]
    b = SDPA(q, k, v, dropout_p=0.5, return_weights=True)[1]
    assert not np.array_equal(a != 0, b != 0)
    # vjp draws one seed and the pullback uses it: out = W' v, so dvalue = W'^T g exactly.
    (out, w), pb = attnext.vjp(SDPA, q, k, v, dropout_p=0.5, return_weights=True)
    g = rng.standard_normal(out.shape)
    np.testing.assert_allclose(out, w @ v, rtol=1e-12, atol=1e-14)
    dv = pb((g, None))[2]
    np.testing.assert_allclose(dv, np.swapaxes(w, -1, -2) @ g, rtol=1e-12, atol=1e-14)


def test_p_zero_and_one(rng):
    q, k, v = _inputs(rng, (2,), 2, 2, 9, 12)
    plain = SDPA(q, k, v, return_weights=True)
    zero = SDPA(q, k, v, dropout_p=0.0, seed=3, return_weights=True)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(plain, zero))
    out, w = SDPA(q, k, v, dropout_p=1.0, seed=3, return_weights=True)
    assert not out.any() and not w.any()
    _, pb = attnext.vjp(SDPA, q, k, v, dropout_p=1.0, seed=3)
    for grad in pb(rng.standard_normal(out.shape))[:3]:
        assert not grad.any()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_dropout_p_is_value_error(bad, rng):
    q, k, v = _inputs(rng, (1,), 1, 1, 3, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        SDPA(q, k, v, dropout_p=bad, seed=1)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_bad_seed_is_value_error(bad, rng):
    q, k, v = _inputs(rng, (1,), 1, 1, 3, 4)
    with pytest.raises(ValueError, match="seed"):
        SDPA(q, k, v, dropout_p=0.5, seed=bad)


# --- statistics ------------------------------------------------------------------------------

def _sigma_bound(keep: np.ndarray, p: float) -> tuple[float, float]:
    n = keep.size
    return abs(float(keep.mean()) - (1 - p)), 4 * math.sqrt(p * (1 - p) / n)


def test_keep_rate_over_ten_million_decisions():
    p = 0.3
    keep = _philox.keep_mask(2024, p, (10,), 1000, 1000)
    assert keep.size >= 10**7
    dev, bound = _sigma_bound(keep, p)
    assert dev < bound, f"keep rate off by {dev:.3g} > 4 sigma {bound:.3g}"
    # The 4-sigma bound is 5.8e-4 here: a threshold off by 0.1% of p would already fail it.
    assert bound < 0.001


def test_kernel_keep_rate_over_ten_million_decisions(rng):
    p = 0.1
    q = (rng.standard_normal((10, 1, 1000, 4)) * 0.1).astype(np.float32)
    k = (rng.standard_normal((10, 1, 1000, 4)) * 0.1).astype(np.float32)
    v = np.ones((10, 1, 1000, 1), np.float32)
    w = SDPA(q, k, v, dropout_p=p, seed=77, return_weights=True)[1]
    dev, bound = _sigma_bound(w != 0, p)
    assert w.size >= 10**7 and dev < bound, f"keep rate off by {dev:.3g} > 4 sigma {bound:.3g}"


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(|Pearson correlation|, 5 / sqrt(n)) of two equally shaped keep masks."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return abs(float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))), 5 / math.sqrt(a.size)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_no_correlation_between_neighbours(p):
    z = _philox.keep_mask(11, p, (2, 2), 400, 1000)  # (batch, head, query, key)
    pairs = {
        "rows": (z[..., :-1, :], z[..., 1:, :]),
        "columns": (z[..., :-1], z[..., 1:]),  # words of one Philox output, and across outputs
        "columns_4_apart": (z[..., :-4], z[..., 4:]),  # same word of consecutive counters
        "heads": (z[:, 0], z[:, 1]),
        "batch": (z[0], z[1]),
        "flat_neighbours": (z[0, 1], z[1, 0]),  # n = 1 and n = 2
    }
    for what, (a, b) in pairs.items():
        r, bound = _corr(a, b)
        assert r < bound, f"{what}: |corr| {r:.3g} >= {bound:.3g}"


@pytest.mark.parametrize("step", [1, 2**32], ids=["consecutive", "high_word"])
def test_no_correlation_between_seeds(step):
    a = _philox.keep_mask(1000, 0.5, (4,), 300, 300)
    b = _philox.keep_mask(1000 + step, 0.5, (4,), 300, 300)
    r, bound = _corr(a, b)
    assert r < bound, f"|corr| {r:.3g} >= {bound:.3g}"


def test_correlation_check_catches_a_repeated_mask():
    # The measure is not vacuous: masks repeated across heads (the rule ignoring n) correlate fully.
    z = _philox.keep_mask(11, 0.5, (1,), 300, 300)
    r, bound = _corr(z, z)
    assert r > 0.99 > bound


def test_mean_over_seeds_converges_to_no_dropout_output(rng):
    # E[out] is the clean output and Var[out_id] = p / (1 - p) sum_j P_ij^2 v_jd^2 exactly, so the
    # mean over K seeds has z-scores (mean - clean) / sqrt(Var / K) that are ~ N(0, 1) and
    # independent: max |z| < 6 over 240 entries and mean z^2 ~ 1 (chi^2 / n, sd sqrt(2 / n)).
    # A wrong keep scale (1 - p instead of 1 / (1 - p)) or correlated decisions break these.
    p, seeds = 0.4, 3000
    q, k, v = _inputs(rng, (2,), 2, 2, 6, 9, e=4, ev=10)
    clean, w = SDPA(q, k, v, return_weights=True)
    total = np.zeros_like(clean)
    for s in range(seeds):
        total += SDPA(q, k, v, dropout_p=p, seed=10**6 + s)
    mean = total / seeds
    var = p / (1 - p) * (w**2 @ v**2)
    z = (mean - clean) / np.sqrt(var / seeds)
    assert np.abs(z).max() < 6, f"max |z| {np.abs(z).max():.2f}"
    chi = float(np.mean(z**2))
    assert abs(chi - 1) < 5 * math.sqrt(2 / z.size), f"mean z^2 {chi:.3f}"
