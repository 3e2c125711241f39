"""Every registry entry is bit-identical across thread counts (1, 2, 3, 8) and repeated runs,
on inputs large enough to be split into many parallel blocks."""

import numpy as np
import pytest

import attnext

from .kernels import FULL_OPTIONS, KERNELS, Case


@pytest.fixture
def restore_threads():
    saved = attnext.get_num_threads()
    yield
    attnext.set_num_threads(saved)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_across_thread_counts(kernel, dtype, restore_threads):
    kw = kernel.make(Case(seed=21, dtype=dtype, batch=(3, 2), lq=130, lk=67, d=19, dv=9, units=13, mask="float_ninf",
                          causal=True, layout="strided", options=FULL_OPTIONS))
    attnext.set_num_threads(1)
    want = [o.tobytes() for o in kernel.call(kw)]
    for threads in (2, 3, 8, 1, 8):
        attnext.set_num_threads(threads)
        for _ in range(2):
            got = [o.tobytes() for o in kernel.call(kw)]
            assert got == want, f"{kernel.name} differs with {threads} threads"
