"""Light leak check: 1,000 calls of every registry entry leave resident memory and NumPy's
traced allocations flat. tools/leak_check.py runs 20,000 calls per kernel and prints figures.
Skipped under the sanitizers (ASan's quarantine holds freed memory on purpose)."""

import os

import pytest

from .kernels import KERNELS
from .leaks import measure, measure_errors, rss_bytes

pytestmark = pytest.mark.skipif(bool(os.environ.get("ATTNEXT_SANITIZED")) or not rss_bytes(),
                                reason="needs /proc RSS and no sanitizer")

CALLS = 20000 if os.environ.get("ATTNEXT_HEAVY") else 1000


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_memory_flat(kernel):
    before, after, traced = measure(kernel, CALLS)
    # A leaked output (>= 3 KiB each) would add >= 3 MiB here; tools/leak_check.py runs 20x more.
    assert after - before < 2 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
    assert traced < 256 * 2**10, f"traced allocations grew by {traced / 2**10:.0f} KiB"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_error_path_memory_flat(kernel):
    before, after, _ = measure_errors(kernel, CALLS)
    assert after - before < 4 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
