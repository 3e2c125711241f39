"""Shared test helpers: seeded data, layouts, and the tolerances of the project."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]
# max|a - b| / max(|b|, 1e-30), the project's yardstick for kernel vs reference.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
LAYOUTS = ["C", "F", "strided"]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_close(actual, expected, dtype) -> None:
    err = relative_error(actual, expected)
    assert err <= RTOL[np.dtype(dtype)], f"relative error {err:.3g} > {RTOL[np.dtype(dtype)]:.0e}"


def layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values as a C array, a Fortran array, or a non-contiguous strided view."""
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        # Every axis doubled in a bigger buffer, then sliced back: no axis has unit stride.
        big = np.zeros(tuple(2 * d for d in a.shape), dtype=a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    raise ValueError(kind)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def unaligned(a):
    """A copy of a whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize, dtype=np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    grown, biggest = out.split()
    return int(grown), float(biggest)
