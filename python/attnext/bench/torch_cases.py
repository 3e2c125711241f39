"""Benchmark cases for :mod:`attnext.torch` (issue 16's speed targets), registered in
:func:`attnext.bench.cases.all_cases`.

Contenders, per case:

- ``attnext``: through the PyTorch adapter (:mod:`attnext.torch`), forward + backward;
- ``torch``: PyTorch's own (its SDPA, the usual additive formula, the encoder layer without the
  switch), forward + backward, same inputs;
- ``reference``: skipped (the NumPy twin is benchmarked in the other groups).

Work counted: 3.5 × the forward's flops (the backward's two to three GEMMs per forward GEMM,
the convention of the backward cases); the forward's flops as in :mod:`attnext.bench.cases`,
and for the encoder layer 8·B·L·E² (projections) + 4·B·L²·E (attention) + 4·B·L·E·F (FFN).

The SDPA case's ``extra`` times the raw kernels (``attnext.vjp`` on NumPy arrays) against the
adapter on the same inputs and reports ``adapter_over_raw`` (the adapter's cost; target ≤ 1.1).
The adapter runs attnext's kernels on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .cases import Case, Skip, _additive_inputs, _np_dtype

NOT_REFERENCE = Skip("the NumPy reference is benchmarked in the sdpa/additive groups")
FWD_BWD = 3.5


def _need(env):
    """Skip for both contenders when torch (and so the adapter) is missing."""
    missing = env.need_torch()
    return {"attnext": missing, "torch": missing, "reference": NOT_REFERENCE} if missing else None


def _fwd_bwd(torch, forward, leaves, cotangent):
    """A callable running forward, then backward into ``leaves`` (their grads reset each call);
    returns the forward's output (what check_outputs compares)."""

    def step():
        for t in leaves:
            t.grad = None
        out = forward()
        out.backward(cotangent)
        return out.detach()

    return step


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa_case(name, b, h, l, s, d, *, causal=False, dtype="float32", suites=("full",)):
    work = FWD_BWD * 4.0 * b * h * l * s * d * (0.5 if causal else 1.0)
    raw = {}

    def setup(rng, env):
        skip = _need(env)
        if skip:
            return skip
        import attnext.torch as at

        torch, t = env.torch, _np_dtype(dtype)
        q, k, v, g = (rng.standard_normal(shape).astype(t) for shape in
                      [(b, h, l, d), (b, h, s, d), (b, h, s, d), (b, h, l, d)])
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        tg = torch.from_numpy(g)
        f = torch.nn.functional.scaled_dot_product_attention
        run = {"attnext": _fwd_bwd(torch, lambda: at.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
                                   (tq, tk, tv), tg),
               "torch": _fwd_bwd(torch, lambda: f(tq, tk, tv, is_causal=causal), (tq, tk, tv), tg),
               "reference": NOT_REFERENCE}
        vjp, sdpa = env.attnext.vjp, env.attnext.scaled_dot_product_attention

        def raw_kernels():
            with env.attnext.threads(torch.get_num_threads()):  # the adapter's thread count
                out, pullback = vjp(sdpa, q, k, v, is_causal=causal)
                return out, pullback(g)

        raw["fn"] = raw_kernels
        return run

    def extra(live):
        if "attnext" not in live:
            return {}
        adapter, kernels = _median_time(live["attnext"]), _median_time(raw["fn"])
        return {"adapter_s": adapter, "raw_kernels_s": kernels, "adapter_over_raw": adapter / kernels}

    return Case(name, "sdpa", f"attnext.torch SDPA fwd+bwd B={b} H={h} L={l} S={s} D={d}"
                + (" causal" if causal else "") + "; extra: the raw kernels (vjp)", dtype,
                {"B": b, "H": h, "L": l, "S": s, "D": d, "causal": causal}, "GFLOP/s", work, setup, suites,
                extra=extra)


def additive_case(name, b, lq, lk, u, *, dtype="float32", suites=("full",)):
    d = u
    work = FWD_BWD * (2.0 * b * u * (lq * d + lk * d) + 4.0 * b * lq * lk * u + 2.0 * b * lq * lk * d)

    def setup(rng, env):
        skip = _need(env)
        if skip:
            return skip
        import attnext.torch as at

        torch = env.torch
        leaves = tuple(torch.from_numpy(x).requires_grad_() for x in _additive_inputs(rng, b, lq, lk, d, d, u, d,
                                                                                         dtype))
        tq, tk, tv, twq, twk, tvv = leaves
        tg = torch.from_numpy(rng.standard_normal((b, lq, d)).astype(_np_dtype(dtype)))

        def usual():  # the formula as PyTorch users write it: the (B, Lq, Lk, U) tensor
            s = torch.tanh((tq @ twq)[:, :, None] + (tk @ twk)[:, None]) @ tvv
            return torch.bmm(torch.softmax(s, dim=-1), tv)

        return {"attnext": _fwd_bwd(torch, lambda: at.additive_attention(*leaves), leaves, tg),
                "torch": _fwd_bwd(torch, usual, leaves, tg), "reference": NOT_REFERENCE}

    return Case(name, "additive", f"attnext.torch additive attention fwd+bwd B={b} Lq={lq} Lk={lk} D={d} U={u} "
                "vs autograd of the usual formula", dtype, {"B": b, "Lq": lq, "Lk": lk, "D": d, "U": u}, "GFLOP/s",
                work, setup, suites)


def encoder_case(name, b, l, e, h, ffn, *, suites=("full",)):
    work = FWD_BWD * (8.0 * b * l * e * e + 4.0 * b * l * l * e + 4.0 * b * l * e * ffn)

    def setup(rng, env):
        skip = _need(env)
        if skip:
            return skip
        import attnext.torch as at

        torch = env.torch
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(e, h, ffn, dropout=0.0, batch_first=True).train()
        x = torch.from_numpy(rng.standard_normal((b, l, e)).astype(np.float32))
        params = tuple(layer.parameters())

        def step():  # a training step's forward and backward (the optimizer's update is not timed)
            for p in params:
                p.grad = None
            out = layer(x)
            out.sum().backward()
            return out.detach()

        def routed():
            with at.enabled() as stats:
                out = step()
            if stats.routed != 1:
                raise RuntimeError(f"expected one routed SDPA call per step, got {stats}")
            return out

        return {"attnext": routed, "torch": step, "reference": NOT_REFERENCE}

    return Case(name, "mha", f"nn.TransformerEncoderLayer({e}, {h}, {ffn}, dropout=0) training step "
                f"(fwd+bwd) B={b} L={l}: under attnext.torch.enabled() vs without", "float32",
                {"B": b, "L": l, "E": e, "heads": h, "ffn": ffn}, "GFLOP/s", work, setup, suites)


def cases():
    """The adapter's cases (issue 16's targets in the full suite, smaller ones in quick and tiny)."""
    q, f, qf, tiny = ("quick",), ("full",), ("quick", "full"), ("tiny",)
    return [
        sdpa_case("torch-sdpa-fwdbwd-1x8x1024x1024x64", 1, 8, 1024, 1024, 64, suites=qf),
        additive_case("torch-additive-fwdbwd-32x50x50x256", 32, 50, 50, 256, suites=qf),
        additive_case("torch-additive-fwdbwd-32x1x50x256", 32, 1, 50, 256, suites=qf),
        encoder_case("torch-encoder-train-2x2048-e256h4f512", 2, 2048, 256, 4, 512, suites=f),
        encoder_case("torch-encoder-train-2x512-e256h4f512", 2, 512, 256, 4, 512, suites=q),
        sdpa_case("tiny-torch-sdpa-fwdbwd", 1, 2, 16, 16, 8, causal=True, suites=tiny),
        additive_case("tiny-torch-additive-fwdbwd", 2, 5, 7, 8, suites=tiny),
        encoder_case("tiny-torch-encoder-train", 2, 8, 16, 2, 32, suites=tiny),
    ]
