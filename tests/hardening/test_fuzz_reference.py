"""Hypothesis: every registry entry agrees with attnext.reference on drawn shapes (empty and
odd sizes included), dtypes (float16 and mixed for the public API), layouts (C, F, strided,
negative strides, read-only, stride-0 broadcast), masks and causal modes.

Runs the ``ci`` profile by default (fast); ``ATTNEXT_FUZZ=thorough`` draws many more.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .harness import HIDES_EVERY_KEY
from .kernels import KERNELS, check_against_reference
from .strategies import cases


@pytest.mark.filterwarnings(HIDES_EVERY_KEY)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@given(data=st.data())
def test_matches_reference(kernel, data):
    case = data.draw(cases(kernel))
    kw = kernel.make(case)
    check_against_reference(kernel, kw)
