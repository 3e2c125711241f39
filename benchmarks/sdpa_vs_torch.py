"""attnext.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention.

The cases of issue 3's table, same inputs and thread count for both, calls alternated in one
process, medians of repeats; a NumPy float32 GEMM in the same run gives the machine's scale.

    python benchmarks/sdpa_vs_torch.py [--threads 2] [--repeats 7] [case indices...]

(OpenBLAS settings such as OPENBLAS_CORETYPE slow NumPy's GEMM; unset them for this command
only if your environment sets them.)
"""

import argparse
import time

import numpy as np
import torch

import attnext

CASES = [  # B, H, L, S, D, causal, dtype
    (1, 8, 1024, 1024, 64, False, np.float32),
    (4, 12, 512, 512, 64, False, np.float32),
    (1, 8, 4096, 4096, 64, False, np.float32),
    (1, 8, 4096, 4096, 64, True, np.float32),
    (1, 8, 2048, 2048, 128, False, np.float32),
    (32, 8, 1, 4096, 64, False, np.float32),
    (8, 1, 128, 128, 256, False, np.float32),
    (1, 8, 1024, 1024, 64, False, np.float64),
]


def median_time(f, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("cases", nargs="*", type=int)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    attnext.set_num_threads(args.threads)
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    print(f"numpy float32 2048^2 GEMM: {2 * 2048**3 / median_time(lambda: a @ a, 5) / 1e9:.0f} GFLOP/s")
    for ci in args.cases or range(len(CASES)):
        B, H, L, S, D, causal, dt = CASES[ci]
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, H, n, D)).astype(dt) for n in (L, S, S))
        tq, tk, tv = map(torch.from_numpy, (q, k, v))

        def ours():
            attnext.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def theirs():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        ours(), theirs()
        ta, tt = [], []
        for _ in range(args.repeats):  # alternate so both see the same machine load
            ta.append(median_time(ours, 1))
            tt.append(median_time(theirs, 1))
        ta, tt = float(np.median(ta)), float(np.median(tt))
        flops = 4 * B * H * L * S * D * (0.5 if causal else 1)
        extra = f", K/V {2 * B * H * S * D * q.itemsize / ta / 1e9:.1f} GB/s" if L == 1 else ""
        print(f"B={B} H={H} L={L} S={S} D={D}{' causal' if causal else ''} {np.dtype(dt).name}: "
              f"attnext {ta * 1e3:.2f} ms ({flops / ta / 1e9:.0f} GFLOP/s{extra}), "
              f"torch {tt * 1e3:.2f} ms ({flops / tt / 1e9:.0f} GFLOP/s), ratio {tt / ta:.2f}x")


if __name__ == "__main__":
    main()
