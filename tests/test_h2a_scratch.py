"""The scratch rule (scratch.hpp): per-thread buffers above 16 MB are released after the call,
SDPA's workspaces included (issue 13, finding 12: one call with a huge embedding left its
per-thread tiles resident)."""
import subprocess
import sys
import textwrap

from conftest import NOT_UNDER_SANITIZERS

SCRIPT = textwrap.dedent("""
    import numpy as np
    import attnext

    def rss_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

    attnext.set_num_threads(2)
    rng = np.random.default_rng(0)
    E = 1 << 18  # a query block's tile of E floats per row is far above 16 MB
    q = rng.standard_normal((2, 40, E), dtype=np.float32)
    small = attnext.scaled_dot_product_attention(q[:, :20, :64], q[:, :, :64], q[:, :, :64])  # warm-up
    paths = {"blocked": dict(return_weights=True), "decode": {}}
    for name, kw in paths.items():
        rows = 40 if name == "blocked" else 8
        before = rss_mb()
        out = attnext.scaled_dot_product_attention(q[:, :rows], q, q, **kw)
        del out
        grown = rss_mb() - before
        print(name, round(grown, 1), flush=True)
        assert grown < 16 * 2 + 8, (name, grown)  # at most the kept 16 MB per thread, and noise
""")


@NOT_UNDER_SANITIZERS
def test_large_workspaces_are_released_after_the_call():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
