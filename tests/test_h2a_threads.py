"""set_num_threads accepts ints and NumPy integers in [1, cap]; nothing else, and no count ends
the process; build_info reports the cap."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnext
from attnext import _core

CAP = 256


@pytest.fixture
def saved_threads():
    before = attnext.get_num_threads()
    yield
    attnext.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 2, np.int64(3), np.int32(2), np.uint8(1), CAP - 255])
def test_accepts_ints_and_numpy_integers(n, saved_threads):
    attnext.set_num_threads(n)
    assert attnext.get_num_threads() == int(n)
    assert type(attnext.get_num_threads()) is int


@pytest.mark.parametrize("n", [True, False, np.True_, 2.0, np.float64(2.0), "2", None, [2], 2 + 0j])
def test_refuses_non_ints(n, saved_threads):
    attnext.set_num_threads(2)
    with pytest.raises(TypeError, match="n must be an int"):
        attnext.set_num_threads(n)
    with pytest.raises(TypeError, match="n must be an int"):
        _core.set_num_threads(n)
    assert attnext.get_num_threads() == 2


@pytest.mark.parametrize("n", [0, -1, CAP + 1, 1024, 2**31, 2**31 - 1, 2**63, 2**200, -(2**70), np.int64(2**62)])
def test_refuses_counts_outside_the_cap(n, saved_threads):
    attnext.set_num_threads(2)
    with pytest.raises(ValueError, match=rf"n must be in \[1, {CAP}\].*got {n}"):
        attnext.set_num_threads(n)
    assert attnext.get_num_threads() == 2


def test_build_info_reports_the_cap():
    info = attnext.build_info()
    assert info["thread_cap"] == CAP
    assert 1 <= info["max_threads"] <= CAP or info["max_threads"] >= 1


def test_the_cap_itself_computes(saved_threads):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((300, 5, 4))
    expected = attnext.scaled_dot_product_attention(q, q, q)
    try:
        attnext.set_num_threads(CAP)
    except ValueError as e:  # a process that cannot start that many threads says so
        assert "cannot start" in str(e)
        return
    np.testing.assert_array_equal(attnext.scaled_dot_product_attention(q, q, q), expected)


def test_address_space_limit_never_ends_the_process():
    # Under an address-space limit too small for CAP thread stacks, the count is refused with
    # ValueError (libgomp used to print "Thread creation failed" and exit with status 1).
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        import attnext
        q = np.random.default_rng(0).standard_normal((600, 5, 4))
        expected = attnext.scaled_dot_product_attention(q, q, q)
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        for n in (2, {CAP}, 200, 64):
            try:
                attnext.set_num_threads(n)
            except ValueError as e:
                assert "cannot start" in str(e), e
                continue
            got = attnext.scaled_dot_product_attention(q, q, q)
            assert np.array_equal(got, expected)
        print("alive")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "alive" in proc.stdout, proc.stderr[-3000:]
