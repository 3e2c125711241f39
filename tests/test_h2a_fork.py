"""After fork() a child computes correctly (serially) instead of hanging in the OpenMP runtime.

Each scenario runs in a fresh interpreter with a timeout, so a hang fails the test instead of
hanging the suite. The parent runs a parallel kernel first: that is what used to make the
child's first parallel kernel wait forever (GNU libgomp's pool does not survive fork).
"""
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import os, sys, multiprocessing as mp
    import numpy as np
    import attnext

    rng = np.random.default_rng(0)
    Q = rng.standard_normal((4, 2, 40, 16))
    K = rng.standard_normal((4, 2, 50, 16))
    V = rng.standard_normal((4, 2, 50, 8))
    lengths = np.array([50, 3, 0, 17])
    WQ, WK, VV = rng.standard_normal((16, 6)), rng.standard_normal((16, 6)), rng.standard_normal(6)

    def compute(_=None):
        out = attnext.scaled_dot_product_attention(Q, K, V, is_causal=True, return_lse=True)
        add = attnext.additive_attention(Q[:, 0], K[:, 0], V[:, 0], WQ, WK, VV, key_lengths=lengths)
        return np.concatenate([out[0].ravel(), out[1].ravel(), add.ravel()]), attnext.get_num_threads()

    attnext.set_num_threads(2)
    expected, threads = compute()  # the parent runs parallel kernels (2 threads) before forking
    assert threads == 2 or __name__ != "__main__"  # (forkserver children import this file too)
""")

SCENARIOS = {
    "os.fork": """
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got, threads = compute()
            attnext.set_num_threads(2)  # accepted, but the child stays serial
            again, threads_after = compute()
            ok = np.array_equal(got, expected) and np.array_equal(again, expected)
            os.write(w, b"ok %d %d" % (threads, threads_after) if ok else b"wrong")
            os._exit(0)
        os.close(w)
        msg = os.read(r, 100)
        os.waitpid(pid, 0)
        assert msg == b"ok 1 1", msg
        assert attnext.get_num_threads() == 2  # the parent keeps its setting
        assert np.array_equal(compute()[0], expected)
    """,
    "multiprocessing-fork": """
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map(compute, range(4))
        for got, threads in results:
            assert np.array_equal(got, expected) and threads == 1
    """,
    "multiprocessing-forkserver": """
        if __name__ == "__main__":
            with mp.get_context("forkserver").Pool(2) as pool:
                results = pool.map(compute, range(4))
            for got, threads in results:
                assert np.array_equal(got, expected)
    """,
    "fork-twice": """
        pid = os.fork()
        if pid == 0:
            pid2 = os.fork()
            if pid2 == 0:
                os._exit(0 if np.array_equal(compute()[0], expected) else 3)
            _, status = os.waitpid(pid2, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    """,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_child_of_fork_computes(name, tmp_path):
    script = tmp_path / "scenario.py"  # a file, so that forkserver children can import __main__
    script.write_text(PRELUDE + textwrap.dedent(SCENARIOS[name]))
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the child hung (no result within 120 s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
