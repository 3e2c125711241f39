"""Resident-memory measurement shared by tests/hardening/test_leaks.py and tools/leak_check.py."""

from __future__ import annotations

import gc
import os
import tracemalloc

from .harness import is_floating
from .kernels import FULL_OPTIONS, KERNELS, Case


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def leak_inputs(kernel):
    # Outputs of several KiB per call, so that a leaked output would add megabytes.
    return kernel.make(Case(seed=31, batch=(2,), lq=24, lk=20, d=8, dv=6, units=5, mask="bool", causal=True,
                                  options=FULL_OPTIONS))


def measure(kernel, calls: int, warmup: int = 200):
    """(rss_before, rss_after, traced_growth) in bytes around `calls` calls of `kernel`."""
    kw = leak_inputs(kernel)
    for _ in range(warmup):
        kernel.call(kw)
    gc.collect()
    tracemalloc.start()
    traced0 = tracemalloc.get_traced_memory()[0]
    before = rss_bytes()
    for _ in range(calls):
        kernel.call(kw)
    gc.collect()
    after = rss_bytes()
    traced = tracemalloc.get_traced_memory()[0] - traced0
    tracemalloc.stop()
    return before, after, traced


def _failing(kernel):
    """A call of `kernel` that raises (its first float argument as int32): the error path."""
    kw = leak_inputs(kernel)
    name = next(n for n, v in kw.items() if is_floating(v))
    kw[name] = kw[name].astype("int32")

    def call(_kw=kw):
        try:
            kernel.call(_kw)
        except TypeError:
            return ()
        raise AssertionError(f"{kernel.name} accepted int32 {name}")

    return call


def measure_errors(kernel, calls: int, warmup: int = 200):
    """Like measure(), for calls that raise TypeError."""
    call = _failing(kernel)
    for _ in range(warmup):
        call()
    gc.collect()
    before = rss_bytes()
    for _ in range(calls):
        call()
    gc.collect()
    return before, rss_bytes(), 0


def run_all(calls: int, errors: bool = False):
    for kernel in KERNELS:
        yield (kernel.name,) + measure(kernel, calls)
        if errors:
            yield (kernel.name + " (TypeError path)",) + measure_errors(kernel, calls)
