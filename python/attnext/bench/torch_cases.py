"""Benchmark cases for :mod:`attnext.torch` (issue 16's speed targets), registered in
:func:`attnext.bench.cases.all_cases`.

Contenders, per case:

- ``attnext``: through the PyTorch adapter (:mod:`attnext.torch`), forward + backward;
- ``torch``: PyTorch's own (its SDPA, the usual additive formula, the encoder layer without the
  switch), forward + backward, same inputs;
- ``reference``: skipped (the NumPy twin is benchmarked in the other groups).

Cases: the SDPA operator; the additive operator at Lq = Lk (teacher forcing) and Lq = 1 on raw
keys; one decoder step on a projected memory; a GRU encoder-decoder training step with
BahdanauAttention; a TransformerEncoderLayer training step under the routing switch.

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


def additive_step_case(name, b, lk, u, *, dtype="float32", suites=("full",)):
    """One decoder step (Lq = 1) on a memory projected once per sentence, forward + backward:
    both contenders take the projected keys as given (a leaf that gets the step's gradient),
    as a decoder does (attnext.torch.project_keys / BahdanauAttention.precompute; the usual
    code's ``keys @ w_key`` hoisted out of the step loop)."""
    d = u
    work = FWD_BWD * (2.0 * b * u * d + 4.0 * b * lk * u + 2.0 * b * lk * d)

    def setup(rng, env):
        skip = _need(env)
        if skip:
            return skip
        import attnext.torch as at

        torch = env.torch
        q, k, v, wq, wk, vv = (torch.from_numpy(x) for x in _additive_inputs(rng, b, 1, lk, d, d, u, d, dtype))
        memory = at.project_keys(k, wk)
        kp = memory.projected.clone()
        leaves = tuple(t.requires_grad_() for t in (q, kp, v, wq, vv))
        memory = at.AdditiveMemory(kp, memory.expo, memory.ok)
        tg = torch.from_numpy(rng.standard_normal((b, 1, d)).astype(_np_dtype(dtype)))

        def usual():
            s = torch.tanh((q @ wq)[:, :, None] + kp[:, None]) @ vv
            return torch.bmm(torch.softmax(s, dim=-1), v)

        return {"attnext": _fwd_bwd(torch, lambda: at.additive_attention(q, memory, v, wq, None, vv), leaves, tg),
                "torch": _fwd_bwd(torch, usual, leaves, tg), "reference": NOT_REFERENCE}

    return Case(name, "additive", f"attnext.torch additive attention, one decoder step (Lq=1) on a projected memory, "
                f"fwd+bwd B={b} Lk={lk} D={d} U={u} vs autograd of the usual formula", dtype,
                {"B": b, "Lq": 1, "Lk": lk, "D": d, "U": u}, "GFLOP/s", work, setup, suites)


def _seq2seq(torch, vocab, emb, hidden, attention):
    """A GRU encoder-decoder with Bahdanau (additive) attention, teacher forced: the decoder GRU
    runs over the shifted target, its states are the queries of one attention call over the
    encoder states (Lq = target length), and tanh(W_c [c_t; s_t]) feeds the output layer.
    ``attention`` is attnext.torch.BahdanauAttention or the usual formula (same parameters)."""
    nn = torch.nn

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, emb)
            self.encoder = nn.GRU(emb, hidden, batch_first=True)
            self.decoder = nn.GRU(emb, hidden, batch_first=True)
            self.attention = attention
            self.combine = nn.Linear(2 * hidden, hidden)
            self.out = nn.Linear(hidden, vocab)

        def forward(self, source, target_in):
            keys, last = self.encoder(self.embed(source))
            states, _ = self.decoder(self.embed(target_in), last)
            context = self.attention(states, keys)
            return self.out(torch.tanh(self.combine(torch.cat([context, states], dim=-1))))

    return Seq2Seq()


def _attnext_bahdanau(at, h, u):
    """attnext.torch.BahdanauAttention called as the model calls its attention: the context only."""

    class Bahdanau(at.BahdanauAttention):
        def forward(self, states, keys):
            return super().forward(states, keys, return_weights=False)

    return Bahdanau(h, h, u)


def _usual_bahdanau(torch, at, h, u):
    """attnext.torch.BahdanauAttention's parameters (same state_dict) computed by the usual
    PyTorch formula: v . tanh(s W_q + k W_k) over a (B, T, Lk, U) tensor, softmax, weights
    times the keys."""

    class UsualBahdanau(at.BahdanauAttention):
        def forward(self, states, keys):
            scores = torch.tanh(self.query_proj(states)[:, :, None] + self.key_proj(keys)[:, None]) @ self.v.weight[0]
            return torch.softmax(scores, dim=-1) @ keys

    return UsualBahdanau(h, h, u)


def seq2seq_case(name, b, src, tgt, units, *, vocab=40, emb=64, suites=("full",)):
    """A training step (forward, cross-entropy loss, backward, Adam step) of the GRU
    encoder-decoder of :func:`_seq2seq` with attnext.torch.BahdanauAttention vs the usual
    formula in the same model (same initial weights, same batch)."""
    h = u = units
    gru = 2.0 * 3 * 2 * b * (src + tgt) * (emb * h + h * h)
    attention = 2.0 * b * u * (tgt * h + src * h) + 4.0 * b * tgt * src * u + 2.0 * b * tgt * src * h
    work = FWD_BWD * (gru + attention + 2.0 * b * tgt * (2 * h * h + h * vocab))

    def setup(rng, env):
        skip = _need(env)
        if skip:
            return skip
        import attnext.torch as at

        torch = env.torch
        torch.manual_seed(0)
        ours = _seq2seq(torch, vocab, emb, h, _attnext_bahdanau(at, h, u))
        theirs = _seq2seq(torch, vocab, emb, h, _usual_bahdanau(torch, at, h, u))
        theirs.load_state_dict(ours.state_dict())
        tokens = torch.from_numpy(rng.integers(1, vocab, size=(b, src + tgt + 1)))
        source, target_in, target_out = tokens[:, :src], tokens[:, src:src + tgt], tokens[:, src + 1:]

        def training_step(model, optimizer):
            def step():
                optimizer.zero_grad(set_to_none=True)
                logits = model(source, target_in)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target_out.reshape(-1))
                loss.backward()
                optimizer.step()
                return logits.detach()

            return step

        return {"attnext": training_step(ours, torch.optim.Adam(ours.parameters(), lr=1e-3)),
                "torch": training_step(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3)),
                "reference": NOT_REFERENCE}

    return Case(name, "additive", f"GRU encoder-decoder training step (loss, backward, Adam) with Bahdanau attention, "
                f"B={b} source={src} target={tgt} U=hidden={units}: attnext.torch.BahdanauAttention vs the usual "
                "formula in the same model", "float32",
                {"B": b, "source": src, "target": tgt, "U": units, "vocab": vocab, "embedding": emb}, "GFLOP/s", work,
                setup, suites)


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
        additive_step_case("torch-additive-step-memory-32x50x256", 32, 50, 256, suites=qf),
        seq2seq_case("torch-seq2seq-train-32x50x50-u256", 32, 50, 50, 256, suites=qf),
        encoder_case("torch-encoder-train-2x2048-e256h4f512", 2, 2048, 256, 4, 512, suites=f),
        encoder_case("torch-encoder-train-2x512-e256h4f512", 2, 512, 256, 4, 512, suites=q),
        sdpa_case("tiny-torch-sdpa-fwdbwd", 1, 2, 16, 16, 8, causal=True, suites=tiny),
        additive_case("tiny-torch-additive-fwdbwd", 2, 5, 7, 8, suites=tiny),
        additive_step_case("tiny-torch-additive-step-memory", 2, 7, 8, suites=tiny),
        seq2seq_case("tiny-torch-seq2seq-train", 2, 6, 5, 8, vocab=7, emb=4, suites=tiny),
        encoder_case("tiny-torch-encoder-train", 2, 8, 16, 2, 32, suites=tiny),
    ]
