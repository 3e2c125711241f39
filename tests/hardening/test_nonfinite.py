"""Non-finite inputs: NaN and +-inf propagate exactly as the plain NumPy formula (the
reference) propagates them, and never into rows they cannot reach; -inf in a float mask
hides a key. See docs/robustness.md.
"""

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref

from .harness import is_floating
from .kernels import FULL_OPTIONS, KERNELS, Case, check_against_reference

SPECIALS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def inject(a, value, rng, count=2):
    """A copy of a with `count` random entries set to value."""
    b = np.array(a)
    if b.size:
        b.flat[rng.choice(b.size, size=min(count, b.size), replace=False)] = value
    return b


# Model parameters (a Bahdanau v, projection matrices): a non-finite parameter is outside the
# exact contract (the additive kernel's factored tanh can give 0 * inf = NaN where the textbook
# tanh gives a tiny number times inf); we only promise the output is non-finite wherever the
# plain formula's is.
PARAMETERS = {"v", "w_query", "w_key", "weight", "bias",
              # MultiHeadAttention's state dict
              "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
              "out_proj.weight", "out_proj.bias",
              # BahdanauAttention's and LuongAttention's
              "g", "w_a", "w_c"}
# Arrays that reach the output through the weighted sum of values (a layer's value projection
# too): a query for which key j is hidden may skip key j's value, as check_value_injection allows.
VALUE_SIDE = {"value", "v_proj_weight", "in_proj_weight", "in_proj_bias", "values"}
# One parameter array projecting both keys and values (MultiHeadAttention's packed in_proj): an
# inf there can give key j the score -inf and value row j an inf at once. Whether such a key is
# hidden (the reference: a final score of -inf hides a key) or a visible key of weight 0
# (0 * inf = NaN, the plain formula) is a parameter's "NaN and inf may differ" (robustness.md),
# so there a NaN is allowed where the reference is finite.
KEY_AND_VALUE_PARAMETERS = {"in_proj_weight", "in_proj_bias"}


def check_value_injection(kernel, kw, bad_kw, name):
    """A non-finite value vector v_j: rows that give key j weight get what the plain formula
    gives; rows for which key j is hidden either stay exactly as without the bad value (the
    fused kernels skip hidden tiles) or turn NaN (0 * NaN, as the plain formula does), or equal the formula's own non-finite value.
    `name` may also be a layer's value projection (see VALUE_SIDE)."""
    got, want = kernel.call(bad_kw), kernel.reference(bad_kw)
    clean = kernel.reference(dict(kw, **{name: np.where(np.isfinite(bad_kw[name]), bad_kw[name], 0)}))
    for g, w, c in zip(got, want, clean):
        g, w, c = (np.asarray(x, dtype=np.float64) for x in (g, w, c))
        fin = np.isfinite(w)
        if name in KEY_AND_VALUE_PARAMETERS:
            fin &= ~np.isnan(g)
        assert np.array_equal(np.isfinite(g[fin]), np.ones(fin.sum(), bool)), kernel.name
        np.testing.assert_allclose(g[fin], w[fin], rtol=1e-4, atol=1e-6)
        either = ~fin
        ok = (np.isnan(g[either]) | (g[either] == w[either])
              | np.isclose(g[either], c[either], rtol=1e-4, atol=1e-6))
        # MultiHeadAttention projects its `value` input per head, so it is a value projection too
        # (under "hidden is hidden" a head that hides key j gives the clean result, a head that
        # sees it gives +-inf, and the output projection mixes them where the formula has NaN).
        if name not in ("value", "values", "keys") or kernel.name == "MultiHeadAttention":
            # A value projection's entry reaches every key of its head; the output projection
            # then mixes a head the row cannot see (0 * inf = NaN in the formula) with heads it
            # sees (+-inf): where the formula is non-finite the layer may be non-finite of another kind.
            ok |= ~np.isfinite(g[either])
        assert ok.all(), f"{kernel.name}: {np.count_nonzero(~ok)} entries neither NaN nor the clean result"


def check_gradient_injection(kernel, bad_kw):
    """A non-finite input to a backward: wherever the plain formula's gradient stays finite the
    backward's is finite and equal (a NaN never leaks into entries it cannot reach). Where the
    formula's is not finite the backward may be finite: it keeps hidden and dropped entries
    exactly zero (hidden is hidden, as in the forward) where the formula multiplies 0 * NaN."""
    for i, (g, w) in enumerate(zip(kernel.call(bad_kw), kernel.reference(bad_kw))):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        fin = np.isfinite(w)
        assert np.isfinite(g[fin]).all(), f"{kernel.name} output {i}: non-finite where the formula is finite"
        np.testing.assert_allclose(g[fin], w[fin], rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(w[fin]).max(
            initial=0.0))))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_propagates_like_reference(kernel, special, dtype):
    # NaN/inf inputs make NumPy's plain formula (the reference, the harness's projections and the
    # layers' NumPy parts) warn "invalid value encountered" (inf - inf, 0 * inf, inf / inf): that
    # arithmetic is exactly what this test compares against, so those warnings are expected here.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _propagates_like_reference(kernel, special, dtype)


def _propagates_like_reference(kernel, special, dtype):
    rng = np.random.default_rng(11)
    for mask in ("none", "bool", "float_ninf"):
        # Every option on; the RNN layers' keys serve as their values under the bool mask.
        options = dict(FULL_OPTIONS, separate_values=mask != "bool")
        kw = kernel.make(Case(seed=7, dtype=dtype, mask=mask, causal=True, batch=(2, 3), lq=6, lk=9, options=options))
        for name, a in kw.items():
            if not is_floating(a) or name in ("mask", "attn_mask"):
                continue
            bad_kw = dict(kw, **{name: inject(a, SPECIALS[special], rng)})
            if kernel.grad:
                check_gradient_injection(kernel, bad_kw)
            elif name in VALUE_SIDE or (name == "keys" and "values" not in kw):
                check_value_injection(kernel, kw, bad_kw, name)
            elif name in PARAMETERS:
                for g, w in zip(kernel.call(bad_kw), kernel.reference(bad_kw)):
                    assert not np.isfinite(g[~np.isfinite(w)]).any(), f"{kernel.name}: {name} non-finite lost"
            else:
                check_against_reference(kernel, bad_kw)


def test_nan_stays_in_its_rows():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 7, 4)), rng.standard_normal((2, 3, 7, 2))
    q[1, 2, 3, 0] = np.nan  # batch 1, head 2, query 3
    out, w = attnext.scaled_dot_product_attention(q, k, v, return_weights=True)
    bad = np.zeros(out.shape[:-1], bool)
    bad[1, 2, 3] = True
    assert np.isnan(out[bad]).all() and np.isnan(w[bad]).all()
    assert np.isfinite(out[~bad]).all() and np.isfinite(w[~bad]).all()
    # A NaN key reaches every query of its (batch, head) through its score, and no other head.
    k2 = k.copy()
    k2[0, 1, 4, 2] = np.nan
    out = attnext.scaled_dot_product_attention(q[:1], k2[:1], v[:1])
    assert np.isnan(out[0, 1]).all()
    assert np.isfinite(out[0, [0, 2]]).all()


def test_masked_nan_score_is_hidden_by_bool_mask():
    x = np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 1.0]])
    keep = np.array([[True, False, True], [False, True, True]])
    w = attnext.softmax(x, mask=keep)
    np.testing.assert_allclose(w, ref.softmax(x, mask=keep))
    assert np.isfinite(w).all() and w[0, 1] == 0 and w[1, 0] == 0


def test_ninf_in_float_mask_is_a_mask():
    x = np.random.default_rng(1).standard_normal((4, 5))
    m = np.zeros((4, 5))
    m[:, 2] = -np.inf
    m[3] = -np.inf  # a row with nothing to attend: zeros, not NaN
    for w in (attnext.softmax(x, mask=m), _core.softmax(x, m)):
        assert (w[:, 2] == 0).all() and (w[3] == 0).all()
        np.testing.assert_allclose(w[:3].sum(-1), 1.0)
        np.testing.assert_array_equal(w, attnext.softmax(x, mask=np.isfinite(m)))


def test_inf_scores():
    # +inf among finite scores: inf - inf is NaN in the plain formula, so the row is NaN.
    w = attnext.softmax(np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]]))
    assert np.isnan(w[0]).all() and np.isfinite(w[1]).all()
    # -inf scores are simply invisible keys; an all -inf row is zeros.
    w = attnext.softmax(np.array([[-np.inf, 0.0], [-np.inf, -np.inf]]))
    np.testing.assert_array_equal(w, [[0.0, 1.0], [0.0, 0.0]])


def test_large_finite_scores_do_not_overflow():
    x = np.array([[1e30, 1e30 - 1e15, -1e30]], dtype=np.float32)
    w = attnext.softmax(x)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


def test_ninf_in_float_mask_hides_nan_and_inf_scores():
    x = np.array([[np.nan, 1.0, 2.0], [np.inf, 0.0, 1.0]])
    m = np.array([[-np.inf, 0.5, 0.0], [-np.inf, 0.0, 0.0]])
    # inf + -inf where the mask hides the key (here and in the reference's mask step): NumPy warns
    # "invalid value", and np.where discards that entry, so the warning is expected.
    with np.errstate(invalid="ignore"):
        want = attnext.softmax(np.where(np.isfinite(m), x + m, -np.inf))
        r = ref.softmax(x, mask=m)
    for w in (attnext.softmax(x, mask=m), _core.softmax(x, m), r):
        np.testing.assert_array_equal(w, want)
        assert np.isfinite(w).all() and w[0, 0] == 0 and w[1, 0] == 0
