"""Hypothesis strategies drawing a :class:`kernels.Case` for any registry entry: sizes, dtypes,
layouts, mask kinds, causal modes and every named option the entry reads (``Kernel.options``,
choices in ``kernels.OPTION_CHOICES``), so a failing example names each choice it made."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .kernels import CAUSAL, LAYOUTS, MASKS, OPTION_CHOICES, Case, Kernel

# Sizes: empty, one, small odd, and the block-boundary sizes of the kernels (64-row blocks).
SIZES = st.one_of(st.sampled_from([0, 1, 2, 3, 7]), st.integers(0, 12), st.sampled_from([33, 65]))
SMALL = st.one_of(st.sampled_from([1, 2, 3]), st.integers(0, 3))


def options(kernel: Kernel):
    """A dict drawing every option `kernel` reads from its choices."""
    return st.fixed_dictionaries({name: st.sampled_from(OPTION_CHOICES[name]) for name in kernel.options})


@st.composite
def cases(draw, kernel: Kernel) -> Case:
    if kernel.core or kernel.grad:
        dtype, dtype2 = draw(st.sampled_from([np.float32, np.float64])), None
    else:
        dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
        dtype2 = draw(st.sampled_from([None, None, np.float32, np.float64]))
    batch = tuple(draw(st.lists(SMALL, min_size=0, max_size=2)))
    if kernel.name.startswith("scaled_dot_product") and not batch:
        batch = (draw(SMALL),)
    lq, lk = draw(SIZES), draw(SIZES)
    # Keep the work small: large sequence lengths only with a small batch.
    if lq * lk * max(1, int(np.prod(batch))) > 20000:
        batch = () if not kernel.name.startswith("scaled_dot_product") else (1,)
    return Case(seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype, dtype2=dtype2, batch=batch, lq=lq, lk=lk,
                d=draw(st.integers(0, 9)), dv=draw(st.integers(0, 6)), units=draw(st.integers(0, 9)),
                layout=draw(st.sampled_from(LAYOUTS)),
                mask=draw(st.sampled_from(MASKS)) if kernel.uses_mask else "none",
                causal=draw(st.sampled_from(CAUSAL)) if kernel.uses_causal else False,
                options=draw(options(kernel)))
