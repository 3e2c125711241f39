"""Kernels release the GIL and are re-entrant: 8 Python threads calling different registry
entries concurrently give results bit-identical to serial calls, also while another thread
keeps changing set_num_threads. ``ATTNEXT_HEAVY=1`` runs 2,000 calls per thread instead of 150.
"""

import os
import threading

import numpy as np
import pytest

import attnext

from .kernels import FULL_OPTIONS, KERNELS, Case

CALLS_PER_THREAD = 2000 if os.environ.get("ATTNEXT_HEAVY") else 150
THREADS = 8


def _inputs(i, kernel):
    # Big enough to split into several parallel blocks (65 query rows, batch 2 x 2); every
    # other job with every option on (key_lengths, windows, biases, GQA, ...).
    return kernel.make(Case(seed=100 + i, batch=(2, 2), lq=65, lk=33, d=8, dv=5, units=7, mask="bool",
                            causal="bottom_right", layout=("C", "F", "strided", "negative")[i % 4],
                            options=FULL_OPTIONS if i % 2 else {}))


def _same(a, b):
    return all(x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


@pytest.mark.parametrize("toggle_threads", [False, True], ids=["fixed", "set_num_threads_in_flight"])
def test_threads_match_serial(toggle_threads):
    saved = attnext.get_num_threads()
    # Every registry entry at least once; each thread cycles through `per_thread` jobs.
    per_thread = max(2, -(-len(KERNELS) // THREADS))
    jobs = [(KERNELS[i % len(KERNELS)], _inputs(i, KERNELS[i % len(KERNELS)])) for i in range(THREADS * per_thread)]
    serial = [kernel.call(kw) for kernel, kw in jobs]
    errors, mismatches, done = [], [], threading.Event()
    calls = [0] * THREADS
    barrier = threading.Barrier(THREADS + (1 if toggle_threads else 0))

    def run(t):
        try:
            barrier.wait()
            for n in range(CALLS_PER_THREAD):
                j = t + THREADS * (n % per_thread)
                kernel, kw = jobs[j]
                if not _same(kernel.call(kw), serial[j]):
                    mismatches.append((t, kernel.name))
                calls[t] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def toggler():
        barrier.wait()
        n = 0
        while not done.is_set():
            attnext.set_num_threads(1 + n % 4)
            n += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    tog = threading.Thread(target=toggler) if toggle_threads else None
    try:
        for th in threads + ([tog] if tog else []):
            th.start()
        for th in threads:
            th.join()
    finally:
        done.set()
        if tog:
            tog.join()
        attnext.set_num_threads(saved)
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]
    assert sum(calls) == THREADS * CALLS_PER_THREAD
