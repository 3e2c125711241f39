"""Side-by-side timings for issue 4 (fused additive attention, RNN attention layers).

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=python python tools/bench_additive.py
Each case alternates attnext and its comparison in one process and reports medians and ratios.
Not a test: timings on a shared machine are noisy; the full suite is `attnext bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import attnext
from attnext import reference as ref


def median_ms(fn, repeats, number=1):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return float(np.median(times)) * 1e3


def side_by_side(fns: dict, repeats: int, rounds: int = 3, number: int = 1) -> dict:
    """Alternates the functions for a few rounds; the median of each function's round medians."""
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(median_ms(fn, repeats, number))
    return {name: float(np.median(v)) for name, v in results.items()}


def inputs(rng, b, lq, lk, d, u, dtype=np.float32):
    q = rng.standard_normal((b, lq, d)).astype(dtype)
    k = rng.standard_normal((b, lk, d)).astype(dtype)
    val = rng.standard_normal((b, lk, d)).astype(dtype)
    wq = (rng.standard_normal((d, u)) / np.sqrt(d)).astype(dtype)
    wk = (rng.standard_normal((d, u)) / np.sqrt(d)).astype(dtype)
    v = (rng.standard_normal(u) / np.sqrt(u)).astype(dtype)
    return q, k, val, wq, wk, v


def bench_fused(threads, repeats):
    import torch

    torch.set_num_threads(threads)
    attnext.set_num_threads(threads)
    q, k, val, wq, wk, v = inputs(np.random.default_rng(0), 8, 128, 128, 256, 256)
    tq, tk, tval, twq, twk, tv = map(torch.from_numpy, (q, k, val, wq, wk, v))

    def torch_formula():
        with torch.no_grad():
            qp, kp = tq @ twq, tk @ twk
            scores = torch.tanh(qp[:, :, None] + kp[:, None]) @ tv
            return torch.bmm(torch.softmax(scores, dim=-1), tval)

    out = attnext.additive_attention(q, k, val, wq, wk, v)
    err = float(np.max(np.abs(out - torch_formula().numpy())) / np.max(np.abs(out)))
    t = side_by_side({
        "attnext": lambda: attnext.additive_attention(q, k, val, wq, wk, v),
        "torch": torch_formula,
    }, repeats)
    t_ref = side_by_side({
        "attnext": lambda: attnext.additive_attention(q, k, val, wq, wk, v),
        "reference": lambda: ref.additive_attention(q, k, val, wq, wk, v),
    }, max(2, repeats // 5), rounds=2)
    t_score = side_by_side({
        "attnext": lambda: attnext.score(q, k, "additive", w_query=wq, w_key=wk, v=v),
        "reference": lambda: ref.score(q, k, "additive", w_query=wq, w_key=wk, v=v),
    }, max(2, repeats // 5), rounds=2)
    return {
        "case": "B=8 Lq=Lk=128 Dq=Dk=U=Dv=256 float32", "threads": threads, "max_rel_diff_vs_torch": err,
        "additive_attention_ms": t["attnext"], "torch_formula_ms": t["torch"],
        "speedup_vs_torch": t["torch"] / t["attnext"],
        "reference_ms": t_ref["reference"], "speedup_vs_reference": t_ref["reference"] / t_ref["attnext"],
        "score_additive_ms": t_score["attnext"], "reference_score_ms": t_score["reference"],
        "score_speedup_vs_reference": t_score["reference"] / t_score["attnext"],
    }


def _vm_hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def memory_child(threads):
    attnext.set_num_threads(threads)
    q, k, val, wq, wk, v = inputs(np.random.default_rng(0), 8, 1024, 1024, 256, 256)
    small = inputs(np.random.default_rng(1), 1, 4, 4, 256, 256)
    attnext.additive_attention(*small)  # load everything once
    before = _vm_hwm_kb()
    out = attnext.additive_attention(q, k, val, wq, wk, v)
    after = _vm_hwm_kb()
    print(json.dumps({"case": "B=8 Lq=Lk=1024 D=U=Dv=256 float32", "threads": threads,
                      "peak_extra_MB": (after - before) / 1024, "output_MB": out.nbytes / 2**20,
                      "4d_tensor_would_be_GiB": 8 * 1024 * 1024 * 256 * 4 / 2**30}))


def bench_memory(threads):
    cmd = [sys.executable, __file__, "--memory-child", "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ).stdout)


def bench_step(threads, repeats):
    attnext.set_num_threads(threads)
    rng = np.random.default_rng(0)
    layer = attnext.BahdanauAttention(256, 256, 256, rng=0)
    memory = layer.precompute(rng.standard_normal((1, 50, 256)).astype(np.float32))
    s = rng.standard_normal((1, 256)).astype(np.float32)
    t = side_by_side({"step": lambda: layer(s, memory)}, repeats, rounds=3, number=200)
    t_ctx = side_by_side({"step": lambda: layer(s, memory, return_weights=False)}, repeats, rounds=3, number=200)
    return {"case": "decoder step B=1 Lk=50 Dq=Dk=U=Dv=256 float32, precomputed memory", "threads": threads,
            "step_us": t["step"] * 1e3, "step_context_only_us": t_ctx["step"] * 1e3}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--memory-child", action="store_true")
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.threads)
        return
    for result in (bench_fused(args.threads, args.repeats), bench_memory(args.threads),
                   bench_step(args.threads, args.repeats)):
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
