"""Benchmark: attnext.MultiHeadAttention against torch.nn.MultiheadAttention, and KV-cache decoding.

Both run side by side in one process, alternated, and the medians of the repeats are reported
(the machine is shared, so single timings are noisy). Prints a table and, with --json, writes
the numbers to a file.

    PYTHONPATH=python python benchmarks/mha.py [--threads 2] [--repeats 15] [--json out.json]

Parts:
- forward: B=4, L=512, embed 512, 8 heads, float32, need_weights=False, self-attention;
  attnext vs torch (eval, no_grad), plus attnext's time split into projections and attention.
- linear: the projection GEMMs through attnext's C++ linear kernel vs NumPy's matmul.
- decode: 512 tokens one at a time with MultiHeadAttention.step and a KVCache; time of the
  first and last 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import attnext
from attnext.transformer import _linear


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_forward(args, torch) -> dict:
    b, l, e, h = args.batch, args.length, args.embed, args.heads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, l, e), dtype=np.float32)
    layer = attnext.MultiHeadAttention(e, h, rng=1)
    fns = {"attnext": lambda: layer(x)}
    if torch is not None:
        module = torch.nn.MultiheadAttention(e, h, batch_first=True).eval()
        layer = attnext.MultiHeadAttention.from_torch(module)
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.no_grad():
                module(xt, xt, xt, need_weights=False)

        fns["torch"] = run_torch
    # attnext's pieces: the QKV GEMM, the attention, the output GEMM.
    y = _linear(x, layer.in_proj_weight, layer.in_proj_bias)
    q = layer._split_heads(y, 0, h, True)
    k = layer._split_heads(y, e, h, True)
    v = layer._split_heads(y, 2 * e, h, True)
    o = attnext.scaled_dot_product_attention(q, k, v)
    fns["qkv_projection"] = lambda: _linear(x, layer.in_proj_weight, layer.in_proj_bias)
    fns["attention"] = lambda: attnext.scaled_dot_product_attention(q, k, v)
    fns["out_projection"] = lambda: layer._project_out(o, True)
    fns["heads_copy_numpy"] = lambda: np.ascontiguousarray(o.transpose(0, 2, 1, 3))
    if torch is not None:  # PyTorch's fused SDPA on the same heads: what a fused kernel can reach
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))

        def run_torch_sdpa():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

        fns["torch_sdpa"] = run_torch_sdpa
    res = alternate(fns, args.repeats)
    flop = 2 * b * l * e * (4 * e) + 4 * b * l * l * e
    res["gflop"] = flop / 1e9
    return res


def bench_linear(args) -> dict:
    b, l, e = args.batch, args.length, args.embed
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, l, e), dtype=np.float32)
    out = {}
    for name, rows in (("qkv", 3 * e), ("out", e)):
        w = rng.standard_normal((rows, e), dtype=np.float32)
        bias = rng.standard_normal(rows, dtype=np.float32)
        res = alternate({"attnext": lambda: _linear(x, w, bias), "numpy": lambda: x @ w.T + bias}, args.repeats)
        flop = 2 * b * l * e * rows
        out[name] = {k: {"s": v, "gflops": flop / v / 1e9} for k, v in res.items()}
    return out


def bench_decode(args) -> dict:
    e, h, n = args.embed, args.heads, args.tokens
    layer = attnext.MultiHeadAttention(e, h, rng=0)
    xs = np.random.default_rng(1).standard_normal((n, 1, e), dtype=np.float32)
    per_token = []
    runs = []
    for _ in range(args.decode_repeats):
        cache = attnext.KVCache()
        t = np.empty(n)
        for i in range(n):
            start = time.perf_counter()
            layer.step(xs[i], cache)
            t[i] = time.perf_counter() - start
        runs.append(t)
    per_token = np.median(np.stack(runs), axis=0)
    return {"tokens": n, "first64_s": float(per_token[:64].sum()), "last64_s": float(per_token[-64:].sum()),
            "median_token_s": float(np.median(per_token))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    attnext.set_num_threads(args.threads)
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None
    result = {"threads": args.threads, "forward": bench_forward(args, torch), "linear": bench_linear(args),
              "decode": bench_decode(args)}
    f = result["forward"]
    print(f"forward B={args.batch} L={args.length} E={args.embed} H={args.heads} float32, threads={args.threads} "
          f"({f['gflop']:.2f} GFLOP), medians of {args.repeats}:")
    for name in ("attnext", "torch", "qkv_projection", "attention", "out_projection", "heads_copy_numpy",
                 "torch_sdpa"):
        if name in f:
            print(f"  {name:18s} {f[name] * 1e3:8.2f} ms")
    if "torch" in f:
        print(f"  speedup vs torch: {f['torch'] / f['attnext']:.2f}x")
    for name, r in result["linear"].items():
        print(f"linear {name}: " + ", ".join(f"{k} {v['s'] * 1e3:.2f} ms ({v['gflops']:.0f} GFLOP/s)"
                                             for k, v in r.items()))
    d = result["decode"]
    print(f"decode {d['tokens']} tokens (B=1): first 64 {d['first64_s'] * 1e3:.2f} ms, last 64 "
          f"{d['last64_s'] * 1e3:.2f} ms, median token {d['median_token_s'] * 1e6:.0f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
