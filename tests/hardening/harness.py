"""The one test harness: dtypes, tolerances, error measures, memory layouts and small helpers.

Every test module takes these from here (the top-level tests as ``hardening.harness`` or
through ``conftest``, the hardening suites as ``.harness``), so a tolerance or a layout is
defined once. Hypothesis settings profiles live in ``tests/conftest.py``.

Tolerances: ``max|got - want| / max(max|want|, 1e-30)`` (the relative error) at most
1e-5 for float32 and 1e-12 for float64; tests comparing against another engine with its own
rounding (PyTorch) use the absolute form ``max|got - want|`` with the same figures.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]
class _ByDtype(dict):
    """A dict keyed by np.dtype that also answers np.float32, "float32" and other dtype-likes."""

    def __missing__(self, key):
        return self[np.dtype(key)]


TOLERANCE = _ByDtype({np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12})
RTOL = TOLERANCE  # the name the first tests used

# 16-bit types (docs/precision.md): the unit roundoff u, half the spacing of the numbers in
# [1, 2): 2^-11 for float16 (11 significant bits), 2^-8 for bfloat16 (8 significant bits).
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def low_precision_tolerance(dtype, roundings: int) -> float:
    """The relative distance a kernel may keep from the reference twin that applies the same
    rounding points: ``roundings`` x one unit in the last place (2u) of a 16-bit ``dtype``.

    Each rounding point where the kernel's float32 value and the reference's exact value sit
    on either side of a rounding boundary can land one ulp apart; count one for the final
    store, one more for bfloat16 SDPA's P (rounded against the running maximum of the key
    tiles in the kernel, the row's maximum in the reference), and those of MultiHeadAttention's
    intermediate stores. float32's own arithmetic (2^-24 per operation) is well inside it."""
    return roundings * 2.0 * UNIT_ROUNDOFF[np.dtype(dtype).name]

# float32 arithmetic beside the reference's float64 in the 16-bit checks: 2^-24 per operation,
# summed over at most a few hundred terms in the tests' shapes; relative to the result's scale.
FLOAT32_SLACK = 1e-5


def assert_low_precision_close(got, want, dtype, roundings: int, scale: float, what: str = "") -> None:
    """A 16-bit call's result against the reference twin (docs/precision.md): same dtype, and
    max|got - want| <= (low_precision_tolerance(dtype, roundings) + FLOAT32_SLACK) * scale, with
    ``scale`` the magnitude of what is rounded. A float32 result (out_dtype=np.float32, or the
    weights) skips the final store, so one rounding fewer is counted."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}"
    if got.dtype.name not in UNIT_ROUNDOFF:
        roundings = max(0, roundings - 1)
    tol = (low_precision_tolerance(dtype, roundings) + FLOAT32_SLACK) * scale
    err = absolute_error(got.astype(np.float64), want.astype(np.float64))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


# Every layout a kernel must accept without changing its result. "strided" puts every axis at
# stride 2 (offset 1 element into a bigger buffer), so no axis has unit stride.
LAYOUTS = ("C", "F", "strided", "negative", "readonly", "broadcast")
# The layouts in which every value of the array survives (no repeated leading axis).
EXACT_LAYOUTS = ("C", "F", "strided", "negative", "readonly")
# The three the per-kernel tests run (the registry suites draw all of LAYOUTS).
BASIC_LAYOUTS = ["C", "F", "strided"]


def is_floating(a) -> bool:
    """Whether a is a floating array: float16/32/64, or ml_dtypes.bfloat16 (which NumPy files
    under kind "V", a user-defined type)."""
    return isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype.name == "bfloat16")


def tolerance(dtype) -> float:
    """The project's relative tolerance for results of `dtype`. A 16-bit result (float16,
    bfloat16) is a float32 computation rounded once at the store: two of its ulps, one for the
    store of values that differ in float32's last bits, one of margin for that arithmetic."""
    dt = np.dtype(dtype)
    if dt.name in UNIT_ROUNDOFF:
        return low_precision_tolerance(dt, 2)
    return TOLERANCE[np.dtype(dt.type)]


def relative_error(actual, expected) -> float:
    """max|a - b| / max(max|b|, 1e-30) over the finite entries of b. The shapes must be equal and
    NaN, +inf and -inf must sit in the same places (else the error is inf)."""
    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    if a.size == 0:
        return 0.0
    if not (np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isposinf(a), np.isposinf(b))
            and np.array_equal(np.isneginf(a), np.isneginf(b))):
        return math.inf
    fin = np.isfinite(b)
    if not fin.any():
        return 0.0
    return float(np.max(np.abs(a[fin] - b[fin])) / max(float(np.max(np.abs(b[fin]))), 1e-30))


def absolute_error(actual, expected) -> float:
    """max|a - b| (shapes must be equal; NaN anywhere gives NaN, which no tolerance accepts)."""
    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    return 0.0 if a.size == 0 else float(np.max(np.abs(a - b)))


def assert_close(actual, expected, dtype=None, *, factor: float = 1.0, absolute: bool = False, what="") -> None:
    """actual agrees with expected within factor x the tolerance of `dtype` (default: actual's)."""
    tol = factor * tolerance(dtype if dtype is not None else np.asarray(actual).dtype)
    err = (absolute_error if absolute else relative_error)(actual, expected)
    kind = "absolute" if absolute else "relative"
    assert err <= tol, f"{what + ': ' if what else ''}{kind} error {err:.3g} > {tol:.0e}"


def layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values as `a` in another memory layout (one of LAYOUTS)."""
    if kind == "C" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":  # every other element of a larger buffer, along every axis
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "negative":  # negative strides on every axis
        flipped = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        return flipped[tuple(slice(None, None, -1) for _ in a.shape)]
    if kind == "readonly":
        r = np.array(a)
        r.flags.writeable = False
        return r
    if kind == "broadcast":  # stride 0 on the leading axis (its values then repeat)
        if a.shape[0] == 0:
            return a
        return np.broadcast_to(a[:1], a.shape) if a.ndim >= 3 else np.ascontiguousarray(a)
    raise ValueError(kind)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def unaligned(a):
    """A copy of a whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize, dtype=np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


def subprocess_env() -> dict:
    """The environment for a child interpreter that must import this attnext and these tests."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def run_python(code: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with a timeout (so a crash or hang fails one test only)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, **kw)


# Memory and address-space measurements measure AddressSanitizer instead of attnext under
# tools/sanitize.sh (terabytes of shadow mappings, a quarantine of freed blocks, redzones).
NOT_UNDER_SANITIZERS = pytest.mark.skipif(bool(os.environ.get("ATTNEXT_SANITIZED")),
                                          reason="measures memory or address space, which ASan inflates")


def peak_rss_growth(setup: str, call: str) -> tuple[int, float]:
    """Runs `setup` then `res = <call>` in a fresh interpreter (importing this attnext); returns
    how much the peak resident memory (VmHWM) grew during the call, in bytes, and max|res|."""
    code = "import numpy as np, attnext\n" + textwrap.dedent(setup) + textwrap.dedent(f"""
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        base = hwm()
        res = {call}
        print(hwm() - base, float(np.abs(res).max()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         check=True).stdout
    grown, biggest = out.split()
    return int(grown), float(biggest)


# A filterwarnings spec for tests that hide every key of a batch entry on purpose (fully masked
# rows, randomly drawn masks): attnext's MaskWarning ("<name> hides every key for ...", the mark
# of an inverted PyTorch mask) is expected there and is not what those tests check. Matched by
# message (MaskWarning is a UserWarning) so the spec also loads where attnext has no MaskWarning.
# Use: @pytest.mark.filterwarnings(HIDES_EVERY_KEY).
HIDES_EVERY_KEY = r"ignore:\w+ hides every key for:UserWarning"
