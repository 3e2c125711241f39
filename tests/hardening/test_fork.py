"""Fork safety (issue 13, finding 2; rule 7 of docs/robustness.md): after the parent has run
parallel kernels, children started by multiprocessing ('fork' and 'forkserver') and by a bare
os.fork compute the same results as the parent (a forked child computes serially), and
never hang. Each scenario runs in its own interpreter with a timeout."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from .harness import subprocess_env

TIMEOUT = 60  # seconds; a fixed build needs a few

SCRIPT = textwrap.dedent('''
    import multiprocessing as mp
    import os
    import sys

    import numpy as np

    import attnext


    def inputs():
        rng = np.random.default_rng(0)
        q = rng.standard_normal((2, 4, 200, 32)).astype(np.float32)
        k = rng.standard_normal((2, 4, 300, 32)).astype(np.float32)
        v = rng.standard_normal((2, 4, 300, 16)).astype(np.float32)
        wq, wk, vv = (rng.standard_normal(s).astype(np.float32) for s in ((32, 24), (32, 24), (24,)))
        return q, k, v, wq, wk, vv


    def work(_=None):
        q, k, v, wq, wk, vv = inputs()
        out = attnext.scaled_dot_product_attention(q, k, v, is_causal=True)
        out_w, w = attnext.scaled_dot_product_attention(q, k, v, return_weights=True)
        add = attnext.additive_attention(q[:, 0], k[:, 0], v[:, 0], wq, wk, vv)
        s = attnext.softmax(attnext.score(q, k))
        return [a.tobytes() for a in (out, out_w, w, add, s)]


    if __name__ == "__main__":
        method = sys.argv[1]
        attnext.set_num_threads(4)
        want = work()  # the parent runs parallel kernels first
        want = work()
        if method == "os.fork":
            r, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                ok = work() == want
                os.write(wfd, b"1" if ok else b"0")
                os._exit(0)
            os.close(wfd)
            got = os.read(r, 1)
            os.waitpid(pid, 0)
            assert got == b"1", "a forked child computed something else"
        else:
            ctx = mp.get_context(method)
            with ctx.Pool(2) as pool:
                results = pool.map_async(work, range(4)).get(timeout=30)
            assert all(r == want for r in results), "a child computed something else"
        # The parent still computes in parallel, and the same.
        assert attnext.get_num_threads() == 4 and work() == want
        print("ok")
''')


@pytest.mark.parametrize("method", ["fork", "forkserver", "os.fork"])
def test_children_compute_after_parent_ran_parallel_kernels(method, tmp_path):
    script = tmp_path / "fork_case.py"
    script.write_text(SCRIPT)
    # A session of its own, so that a hung child and its own children are all killed.
    p = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=subprocess_env(), cwd=str(tmp_path), start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{method}: the children hung (no result within {TIMEOUT} s)")
    assert p.returncode == 0 and out.strip().endswith("ok"), f"exit {p.returncode}\n{err[-3000:]}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_is_documented():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "robustness.md")) as f:
        doc = f.read()
    assert "fork" in doc and "serial" in doc
