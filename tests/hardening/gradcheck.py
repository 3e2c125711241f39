"""Gradient checking: central finite differences of a scalar loss <cotangent, f(args)>, compared
with an analytic pullback, entry by entry.

Used by tests/test_grad_*.py. The loss of a function with several outputs (return_weights,
return_lse) is the sum of each output against its cotangent; entries that are not finite (the
lse of a row with no visible key is -inf) are left out of the loss, so the loss stays finite
and a perturbation that cannot reach such an entry does not change it.

Error measure: the harness's relative error, max|analytic - numeric| / max|numeric|. Central
differences with step h in float64 are exact to O(h^2 f''') + O(eps |loss| / h); with h = 1e-5
and O(1) inputs both are ~1e-10, four orders below the 1e-6 the tests ask for, while a wrong
gradient (a missing term, a wrong scale, a transposed index, a mishandled broadcast) is off by
O(1) relative.
"""

from __future__ import annotations

import numpy as np

from .harness import relative_error

FD_STEP = 1e-5
FD_TOLERANCE = 1e-6  # issue 15: relative error <= 1e-6 against float64 central differences


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def random_cotangent(out, rng):
    """A random cotangent of the structure of `out` (an array or a tuple of arrays), each entry
    of the output's dtype; non-finite output entries get 0."""
    if isinstance(out, tuple):
        return tuple(random_cotangent(o, rng) for o in out)
    o = np.asarray(out)
    ct = rng.standard_normal(o.shape).astype(o.dtype)
    return np.where(np.isfinite(o), ct, 0).astype(o.dtype)


def loss(out, cotangent) -> float:
    """sum over the outputs of <cotangent, output>, over the finite entries of each output (a
    None cotangent leaves that output out)."""
    total = 0.0
    for o, g in zip(as_tuple(out), as_tuple(cotangent)):
        if g is None:
            continue
        o = np.asarray(o, dtype=np.float64)
        fin = np.isfinite(o)
        total += float(np.sum(np.asarray(g, dtype=np.float64)[fin] * o[fin]))
    return total


def numeric_gradient(f, x: np.ndarray, cotangent, h: float = FD_STEP) -> np.ndarray:
    """d loss(f(), cotangent) / dx by central differences, perturbing x in place (any writable
    layout: F order, strided and negative-stride views keep their layout). f takes no argument
    and reads x. Entries of x that are +-inf stay fixed (their numeric gradient is 0)."""
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        orig = x[idx]
        if not np.isfinite(orig):
            continue
        x[idx] = orig + h
        up = loss(f(), cotangent)
        x[idx] = orig - h
        down = loss(f(), cotangent)
        x[idx] = orig
        grad[idx] = (up - down) / (2 * h)
    return grad


def float_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind == "f"


# Below this magnitude a gradient counts as zero: a gradient that is exactly zero in exact
# arithmetic (a mask broadcast along the softmax axis shifts every score of a row equally)
# comes out as rounding noise ~1e-16 analytically and ~1e-10 numerically, whose ratio means
# nothing. The error is then absolute, still 1e3 x below the O(1) error of a wrong gradient.
ZERO_GRADIENT = 1e-3


def gradient_error(analytic, numeric) -> float:
    """max|analytic - numeric| / max(max|numeric|, ZERO_GRADIENT): the harness's relative error
    (NaN/inf placement must agree), with a floor for gradients that are zero."""
    rel = relative_error(analytic, numeric)
    scale = float(np.max(np.abs(numeric))) if numeric.size else 0.0
    return rel * max(scale, 1e-30) / max(scale, ZERO_GRADIENT) if np.isfinite(rel) else rel


def check_gradient(what: str, analytic, x: np.ndarray, numeric: np.ndarray, tol: float = FD_TOLERANCE) -> None:
    assert analytic is not None, f"{what}: no gradient returned"
    analytic = np.asarray(analytic)
    assert analytic.shape == x.shape, f"{what}: gradient shape {analytic.shape}, argument {x.shape}"
    assert analytic.dtype == x.dtype, f"{what}: gradient dtype {analytic.dtype}, argument {x.dtype}"
    err = gradient_error(analytic, numeric)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} against finite differences"


def check_vjp(vjp, fn, args: tuple, kwargs: dict, rng, *, cotangent=None, tol: float = FD_TOLERANCE,
              skip=()) -> tuple:
    """vjp(fn, *args, **kwargs) against fn itself and finite differences.

    Checks: the primal output equals fn(*args, **kwargs) bit for bit; the pullback returns one
    entry per positional argument, None for each non-float argument (None, ints, bools, bool
    masks, strings), and for each float array (positional, or keyword by name) a gradient of its
    shape and dtype within `tol` of central differences. Names in `skip` (positional indices or
    keyword names) are not differentiated numerically. Returns (out, grads)."""
    args, kwargs = list(args), dict(kwargs)
    out, pullback = vjp(fn, *args, **kwargs)
    want = fn(*args, **kwargs)
    for o, w in zip(as_tuple(out), as_tuple(want)):
        assert np.array_equal(o, w, equal_nan=True) and o.dtype == w.dtype, "vjp's out differs from fn(...)"
    assert len(as_tuple(out)) == len(as_tuple(want))
    ct = random_cotangent(out, rng) if cotangent is None else cotangent
    grads = pullback(ct)
    assert isinstance(grads, tuple) and len(grads) == len(args), f"{len(grads)} gradients for {len(args)} arguments"

    def call():
        return fn(*args, **kwargs)

    for i, a in enumerate(args):
        if not float_array(a):
            assert grads[i] is None, f"argument {i} ({type(a).__name__}) got a gradient"
            continue
        if i in skip:
            continue
        check_gradient(f"argument {i}", grads[i], a, numeric_gradient(call, a, ct), tol)
    for name, a in kwargs.items():
        if not float_array(a) or name in skip:
            continue
        check_gradient(f"keyword {name}", grads[name], a, numeric_gradient(call, a, ct), tol)
    return out, grads
