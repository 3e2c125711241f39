"""The benchmark cases: what is run, by whom, and how much work it is.

Each case builds its inputs once from a seeded generator and gives every contender a
zero-argument callable on those same inputs (PyTorch tensors share the NumPy arrays' memory
through ``torch.from_numpy``). A contender that cannot run the case is a :class:`Skip` with the
reason. Contenders:

- ``attnext``: the compiled library.
- ``torch``: PyTorch on the CPU, the way a PyTorch user writes it (its SDPA, its
  ``nn.MultiheadAttention`` in eval mode under ``no_grad``, the usual additive formula).
- ``reference``: :mod:`attnext.reference`, the plain NumPy twin (dense scores, materialised masks).
- ``attnext-float32`` (bfloat16 cases only): attnext in float32 on the same values, so each
  bfloat16 case reports its speedup over float32 from one run.
- peers (SDPA cases, each only when importable; see :mod:`.peers`): ``onnxruntime``,
  ``openvino-f32``, ``openvino-bf16``, ``openvino-default``. A peer is checked against the
  case's reference first; outside the case's tolerance (:data:`TOLERANCE`) it is reported as
  ``inaccurate`` with its error and not timed.

bfloat16 cases (``…-bfloat16``) need ``ml_dtypes`` and an attnext with bfloat16 kernels; they
skip with the reason otherwise. Their SDPA cases also record each contender's max and mean
abs error against a float64 computation on the same (unit-normal, bfloat16-rounded) inputs.

Work counted per call (documented in docs/benchmarks.md):

- attention: 4·B·H·L·S·D flops (two GEMMs), half of it when causal;
- additive attention: 2·B·U·(Lq·Dq + Lk·Dk) (projections) + 4·B·Lq·Lk·U (add, tanh, multiply,
  sum per unit) + 2·B·Lq·Lk·Dv (weighted sum); the additive score alone drops the last term;
- multi-head attention: 8·B·L·E² (four projections) + 4·B·L²·E (attention);
- memory-bound cases count bytes: decode reads K and V once (2·B·Hk·S·D·itemsize); softmax
  reads and writes its tensor once (2·N·itemsize); KV-cache decoding reads the four projection
  matrices per token and the cached K/V (Σ_t 2·B·t·E·itemsize);
- forward + backward (``fwdbwd-…`` cases): 3.5 × the forward's flops (the issue's convention:
  the backward of attention is about 2.5 forwards: it recomputes the scores and the
  probabilities, then forms dV, dP, dQ and dK), so the rate is the fwd+bwd throughput that the
  runner also puts beside attnext's own forward on the same inputs.

Each fwd+bwd call returns :class:`Parts` (the output, then every gradient), and the output
check compares each part: a fast wrong gradient shows as well as a wrong output.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Contenders held to the case's tolerance before they are timed (the runner's gate).
from .peers import PEERS  # noqa: F401

CONTENDERS = ("attnext", "attnext-float32", "torch", "onnxruntime", "openvino-f32", "openvino-bf16",
              "openvino-default", "reference")
# The largest relative difference (to the largest magnitude of the reference output) a peer may
# have: float32 and float64 a few hundred units of roundoff over sums of thousands of terms;
# bfloat16 8 units of its roundoff 2^-8 (the output's own rounding, Q·scale and P rounded to
# bfloat16, averaged over the keys), so forced-bfloat16 engines fail a float32 case.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 8 * 2.0 ** -8}
ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2}
NO_IMPLEMENTATION = "no implementation for this case"
# The key under which a fwd+bwd case's setup also returns attnext's forward pass alone on the
# same inputs (timed in the contenders' interleaved rounds, for the fwd+bwd throughput's share
# of the forward's).
FORWARD = "attnext_forward"
# A fwd+bwd call does 3.5 forwards' worth of flops (see the module docstring).
FWD_BWD_FLOPS = 3.5


class Skip:
    """A contender that does not run this case, and why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"Skip({self.reason!r})"


@dataclass
class Case:
    name: str
    group: str
    description: str
    dtype: str
    params: dict
    metric: str  # "GFLOP/s" or "GB/s"
    work: float  # flops or bytes per call
    setup: Callable  # (rng, env) -> {contender: callable | Skip}
    suites: tuple = ("full",)
    extra: Callable | None = None  # (callables) -> dict of additional measurements
    notes: list = field(default_factory=list)
    # fwd+bwd cases: {"forward_work": flops of the forward alone, "targets": {measure: minimum}}
    backward: dict | None = None
    # memory-bound cases: the bytes they keep reading (which cache level's bandwidth applies)
    working_set: float | None = None
    # (callables) -> {contender: {"max_abs_err", "mean_abs_err", "against"}} (bfloat16 SDPA)
    accuracy: Callable | None = None
    # {"attnext_vs_<contender>": minimum ratio}: the speed targets for this case
    targets: dict = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def dtype_for(self, contender: str) -> str:
        """The type a contender computes in (attnext-float32 runs a bfloat16 case in float32)."""
        return "float32" if contender == "attnext-float32" else self.dtype


class Parts(tuple):
    """Several results of one call (a forward output and its gradients), checked part by part."""


class Env:
    """What the cases may use: attnext, its reference, torch (or why not), limits."""

    def __init__(self, torch=None, torch_reason=None, max_reference_mb=1024.0, threads=1):
        import attnext
        from attnext import reference

        self.attnext = attnext
        self.reference = reference
        self.torch = torch
        self.torch_reason = torch_reason
        self.max_reference_mb = max_reference_mb
        self.threads = threads  # the peers' thread count (attnext's and torch's are set globally)

    def need_torch(self):
        return Skip(self.torch_reason) if self.torch is None else None

    def reference_too_big(self, nbytes: float):
        mb = nbytes / 2 ** 20
        if mb > self.max_reference_mb:
            return Skip(f"would build a {mb:.0f} MiB dense tensor (limit {self.max_reference_mb:.0f} MiB, "
                        "--max-reference-mb)")
        return None


def _np_dtype(name):
    if name == "bfloat16":  # NumPy's bfloat16 comes from ml_dtypes (optional: see lowp_cases)
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name).type


def _to_numpy(x):
    if isinstance(x, tuple):
        x = x[0]
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # NumPy has no torch bf16
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# scaled dot-product attention

def sdpa_case(name, b, hq, l, s, d, *, hk=None, causal=False, dtype="float32", suites=("full",), note="",
              targets=None):
    hk = hq if hk is None else hk
    gqa = hk != hq
    itemsize = ITEMSIZE[dtype]
    decode = l <= 16 and s >= 256
    if decode:
        metric, work = "GB/s", 2.0 * b * hk * s * d * itemsize
    else:
        metric, work = "GFLOP/s", 4.0 * b * hq * l * s * d * (0.5 if causal else 1.0)
    kind = ", ".join(x for x in ("causal" if causal else "", "decode" if decode else "",
                                 f"GQA {hq}:{hk}" if gqa else "", dtype if dtype != "float32" else "") if x)
    desc = f"SDPA B={b} H={hq} L={l} S={s} D={d}" + (f" ({kind})" if kind else "") + (f"; {note}" if note else "")
    lowp = dtype == "bfloat16"
    state = {}  # the inputs, for the accuracy measurement after timing

    def setup(rng, env):
        from . import lowp_cases

        missing = lowp_cases.inputs_missing(dtype)
        if missing:
            return {c: missing for c in CONTENDERS}
        t = _np_dtype(dtype)
        q, k, v = (rng.standard_normal(shape).astype(t) for shape in ((b, hq, l, d), (b, hk, s, d), (b, hk, s, d)))
        state.update(q=q, k=k, v=v, env=env)
        kwargs = {"is_causal": causal, "enable_gqa": gqa}
        run = {"attnext": lowp_cases.attnext_missing(env, dtype) or _attnext_sdpa(env, q, k, v, kwargs)}
        if lowp:
            q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
            run["attnext-float32"] = _attnext_sdpa(env, q32, k32, v32, kwargs)
        run["torch"] = env.need_torch() or _torch_sdpa(env, q, k, v, causal, gqa)
        ref = env.reference
        run["reference"] = (env.reference_too_big(3.0 * b * hq * l * s * max(itemsize, 4))
                            or lowp_cases.reference_missing(env, dtype)
                            or (lambda: ref.scaled_dot_product_attention(q, k, v, **kwargs)))
        run.update(_peer_runs(env, q, k, v, causal, dtype))
        return run

    def accuracy(live):
        from . import lowp_cases

        return lowp_cases.sdpa_accuracy(state, live, causal, gqa) if state else {}

    return Case(name, "sdpa", desc, dtype, {"B": b, "Hq": hq, "Hk": hk, "L": l, "S": s, "D": d, "causal": causal},
                metric, work, setup, suites, working_set=work if decode else None,
                accuracy=accuracy if lowp else None, targets=dict(targets or {}))


def _attnext_sdpa(env, q, k, v, kwargs):
    sdpa = env.attnext.scaled_dot_product_attention
    return lambda: sdpa(q, k, v, **kwargs)


def _torch_sdpa(env, q, k, v, causal, gqa):
    """PyTorch's SDPA on the same values (bfloat16 arrays become bfloat16 tensors: a copy made
    once here, since NumPy's bfloat16 is not a type torch.from_numpy knows)."""
    torch = env.torch
    tq, tk, tv = (_torch_tensor(torch, x) for x in (q, k, v))
    f = torch.nn.functional.scaled_dot_product_attention
    kwargs = {"is_causal": causal, **({"enable_gqa": True} if gqa else {})}
    return lambda: f(tq, tk, tv, **kwargs)


def _torch_tensor(torch, a):
    """The array as a tensor: shared memory, except bfloat16 (NumPy's comes from ml_dtypes, a type
    torch.from_numpy does not know), which becomes a bfloat16 tensor by a copy made at setup."""
    if str(a.dtype) == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)


def _peer_runs(env, q, k, v, causal, dtype) -> dict:
    """The peers' callables, or a Skip saying why a peer does not run this case."""
    from . import peers

    built = peers.sdpa_contenders(q, k, v, causal=causal, threads=env.threads, dtype=dtype)
    return {name: Skip(str(fn)) if isinstance(fn, peers.Unavailable) else fn for name, fn in built.items()}


# --------------------------------------------------------------------------------------------
# additive (Bahdanau) attention and the additive score

def _additive_inputs(rng, b, lq, lk, dq, dk, u, dv, dtype):
    t = _np_dtype(dtype)
    q = rng.standard_normal((b, lq, dq)).astype(t)
    k = rng.standard_normal((b, lk, dk)).astype(t)
    v = rng.standard_normal((b, lk, dv)).astype(t)
    wq = (rng.standard_normal((dq, u)) / math.sqrt(dq)).astype(t)
    wk = (rng.standard_normal((dk, u)) / math.sqrt(dk)).astype(t)
    vv = (rng.standard_normal(u) / math.sqrt(u)).astype(t)
    return q, k, v, wq, wk, vv


def additive_case(name, b, lq, lk, u, *, d=None, dtype="float32", suites=("full",)):
    d = u if d is None else d
    work = 2.0 * b * u * (lq * d + lk * d) + 4.0 * b * lq * lk * u + 2.0 * b * lq * lk * d
    itemsize = np.dtype(dtype).itemsize

    def setup(rng, env):
        q, k, v, wq, wk, vv = _additive_inputs(rng, b, lq, lk, d, d, u, d, dtype)
        run = {}
        f = env.attnext.additive_attention
        run["attnext"] = lambda: f(q, k, v, wq, wk, vv)
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tq, tk, tv, twq, twk, tvv = (torch.from_numpy(x) for x in (q, k, v, wq, wk, vv))

            def torch_additive():  # the formula as PyTorch users write it: the (B, Lq, Lk, U) tensor
                s = torch.tanh((tq @ twq)[:, :, None] + (tk @ twk)[:, None]) @ tvv
                return torch.bmm(torch.softmax(s, dim=-1), tv)

            run["torch"] = torch_additive
        ref = env.reference
        big = env.reference_too_big(2.0 * b * lq * lk * u * itemsize)
        if big is not None:
            run["reference"] = big
        elif hasattr(ref, "additive_attention"):
            run["reference"] = lambda: ref.additive_attention(q, k, v, wq, wk, vv)
        else:  # the same formula through the reference's three steps
            run["reference"] = lambda: ref.attention(q, k, v, method="additive", w_query=wq, w_key=wk, v=vv)
        return run

    return Case(name, "additive", f"additive attention B={b} Lq={lq} Lk={lk} Dq=Dk=Dv={d} U={u}", dtype,
                {"B": b, "Lq": lq, "Lk": lk, "D": d, "U": u}, "GFLOP/s", work, setup, suites)


def score_additive_case(name, b, lq, lk, u, *, d=None, dtype="float32", suites=("full",)):
    d = u if d is None else d
    work = 2.0 * b * u * (lq * d + lk * d) + 4.0 * b * lq * lk * u
    itemsize = np.dtype(dtype).itemsize

    def setup(rng, env):
        q, k, _, wq, wk, vv = _additive_inputs(rng, b, lq, lk, d, d, u, 1, dtype)
        f = env.attnext.score
        run = {"attnext": lambda: f(q, k, "additive", w_query=wq, w_key=wk, v=vv)}
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tq, tk, twq, twk, tvv = (torch.from_numpy(x) for x in (q, k, wq, wk, vv))
            run["torch"] = lambda: torch.tanh((tq @ twq)[:, :, None] + (tk @ twk)[:, None]) @ tvv
        ref = env.reference
        run["reference"] = env.reference_too_big(2.0 * b * lq * lk * u * itemsize) or (
            lambda: ref.score(q, k, "additive", w_query=wq, w_key=wk, v=vv))
        return run

    return Case(name, "score", f"additive score B={b} Lq={lq} Lk={lk} Dq=Dk={d} U={u}", dtype,
                {"B": b, "Lq": lq, "Lk": lk, "D": d, "U": u}, "GFLOP/s", work, setup, suites)


# --------------------------------------------------------------------------------------------
# softmax

def softmax_case(name, shape, *, dtype="float32", suites=("full",)):
    n = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize

    def setup(rng, env):
        x = rng.standard_normal(shape).astype(_np_dtype(dtype))
        f = env.attnext.softmax
        run = {"attnext": lambda: f(x)}
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tx = torch.from_numpy(x)
            run["torch"] = lambda: torch.softmax(tx, dim=-1)
        ref = env.reference
        run["reference"] = lambda: ref.softmax(x)
        return run

    return Case(name, "softmax", f"softmax over the last axis of {tuple(shape)}", dtype, {"shape": list(shape)},
                "GB/s", 2.0 * n * itemsize, setup, suites, working_set=2.0 * n * itemsize)


# --------------------------------------------------------------------------------------------
# multi-head attention and KV-cache decoding

def _mha_weights(rng, e, dtype):
    t = _np_dtype(dtype)
    bound = 1.0 / math.sqrt(e)
    return {
        "in_proj_weight": rng.uniform(-bound, bound, (3 * e, e)).astype(t),
        "in_proj_bias": rng.uniform(-bound, bound, 3 * e).astype(t),
        "out_proj.weight": rng.uniform(-bound, bound, (e, e)).astype(t),
        "out_proj.bias": rng.uniform(-bound, bound, e).astype(t),
    }


def _attnext_mha(env, e, h, weights, dtype):
    m = env.attnext.MultiHeadAttention(e, h, bias=True, batch_first=True, dtype=_np_dtype(dtype),
                                       rng=np.random.default_rng(0))
    m.load_state_dict(weights)
    return m


def _torch_mha(env, e, h, weights):
    torch = env.torch
    m = torch.nn.MultiheadAttention(e, h, bias=True, batch_first=True)
    lowp = str(weights["in_proj_weight"].dtype) == "bfloat16"
    with torch.no_grad():
        for key, value in m.state_dict().items():
            value.copy_(_torch_tensor(torch, weights[key]))
    return (m.to(torch.bfloat16) if lowp else m).eval()


def _float32_mha(env, e, h, weights, x):
    """attnext-float32 of a bfloat16 layer case: the same (bfloat16) values in float32."""
    w32 = {k: v.astype(np.float32) for k, v in weights.items()}
    return _attnext_mha(env, e, h, w32, "float32"), x.astype(np.float32)


def _ref_heads(x, b, l, h, dh):  # (B, L, E) -> (B, H, L, Dh)
    return x.reshape(b, l, h, dh).transpose(0, 2, 1, 3)


def mha_case(name, b, l, e, h, *, dtype="float32", suites=("full",), targets=None):
    work = 8.0 * b * l * e * e + 4.0 * b * l * l * e

    def setup(rng, env):
        from . import lowp_cases

        missing = lowp_cases.inputs_missing(dtype)
        if missing:
            return {c: missing for c in CONTENDERS}
        x = rng.standard_normal((b, l, e)).astype(_np_dtype(dtype))
        w = _mha_weights(rng, e, dtype)
        run = {}
        m = lowp_cases.layer_missing(env, e, h, dtype) or _attnext_mha(env, e, h, w, dtype)
        run["attnext"] = m if isinstance(m, Skip) else (lambda: m(x, need_weights=False))
        if dtype == "bfloat16":
            m32, x32 = _float32_mha(env, e, h, w, x)
            run["attnext-float32"] = lambda: m32(x32, need_weights=False)
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tm, tx = _torch_mha(env, e, h, w), _torch_tensor(torch, x)

            def torch_mha():
                with torch.no_grad():
                    return tm(tx, tx, tx, need_weights=False)

            run["torch"] = torch_mha
        ref, dh = env.reference, e // h

        def reference_mha():
            qkv = x @ w["in_proj_weight"].T + w["in_proj_bias"]
            q, k, v = (_ref_heads(p, b, l, h, dh) for p in np.split(qkv, 3, axis=-1))
            o = ref.scaled_dot_product_attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, l, e)
            return o @ w["out_proj.weight"].T + w["out_proj.bias"]

        run["reference"] = lowp_cases.reference_missing(env, dtype, layer=True) or reference_mha
        return run

    return Case(name, "mha", f"multi-head self-attention forward B={b} L={l} E={e} heads={h}" +
                (f" ({dtype})" if dtype != "float32" else ""), dtype,
                {"B": b, "L": l, "E": e, "heads": h}, "GFLOP/s", work, setup, suites, targets=dict(targets or {}))


def kvcache_case(name, b, e, h, t, *, dtype="float32", suites=("full",), targets=None):
    itemsize = ITEMSIZE[dtype]
    weight_bytes = (4.0 * e * e + 4.0 * e) * itemsize
    work = t * weight_bytes + sum(2.0 * b * (i + 1) * e * itemsize for i in range(t))
    dh = e // h

    def setup(rng, env):
        from . import lowp_cases

        missing = lowp_cases.inputs_missing(dtype)
        if missing:
            return {c: missing for c in CONTENDERS}
        x = rng.standard_normal((b, t, e)).astype(_np_dtype(dtype))
        w = _mha_weights(rng, e, dtype)
        run = {}
        m = lowp_cases.layer_missing(env, e, h, dtype) or _attnext_mha(env, e, h, w, dtype)
        run["attnext"] = m if isinstance(m, Skip) else _attnext_decode(env, m, x, t, dtype)
        if dtype == "bfloat16":
            run["attnext-float32"] = _attnext_decode(env, *_float32_mha(env, e, h, w, x), t, "float32")
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tx = _torch_tensor(torch, x)
            tw = {k: _torch_tensor(torch, v) for k, v in w.items()}
            f = torch.nn.functional

            def torch_decode(step_times=None):  # the usual hand-written cache: preallocated K/V
                kc = torch.empty((b, h, t, dh), dtype=tx.dtype)
                vc = torch.empty((b, h, t, dh), dtype=tx.dtype)

                def step(i):
                    qkv = f.linear(tx[:, i:i + 1], tw["in_proj_weight"], tw["in_proj_bias"])
                    q, k, v = (p.reshape(b, 1, h, dh).transpose(1, 2) for p in qkv.chunk(3, dim=-1))
                    kc[:, :, i:i + 1] = k
                    vc[:, :, i:i + 1] = v
                    o = f.scaled_dot_product_attention(q, kc[:, :, :i + 1], vc[:, :, :i + 1])
                    return f.linear(o.transpose(1, 2).reshape(b, 1, e), tw["out_proj.weight"], tw["out_proj.bias"])

                with torch.no_grad():
                    return _decode(step, t, step_times)

            run["torch"] = torch_decode
        ref = env.reference

        def reference_decode(step_times=None):
            kc = np.empty((b, h, t, dh), dtype=x.dtype)
            vc = np.empty((b, h, t, dh), dtype=x.dtype)

            def step(i):
                qkv = x[:, i:i + 1] @ w["in_proj_weight"].T + w["in_proj_bias"]
                q, k, v = (_ref_heads(p, b, 1, h, dh) for p in np.split(qkv, 3, axis=-1))
                kc[:, :, i:i + 1] = k
                vc[:, :, i:i + 1] = v
                o = ref.scaled_dot_product_attention(q, kc[:, :, :i + 1], vc[:, :, :i + 1])
                return o.transpose(0, 2, 1, 3).reshape(b, 1, e) @ w["out_proj.weight"].T + w["out_proj.bias"]

            return _decode(step, t, step_times)

        run["reference"] = lowp_cases.reference_missing(env, dtype, layer=True) or reference_decode
        return run

    def extra(run):
        """Per-token cost at the start and the end of the sequence (one instrumented pass)."""
        out = {}
        window = min(64, max(1, t // 4))
        for cname, fn in run.items():
            if isinstance(fn, Skip):
                continue
            times = []
            fn(times)
            out[cname] = {f"first_{window}_tokens_ms_per_token": 1e3 * float(np.mean(times[:window])),
                          f"last_{window}_tokens_ms_per_token": 1e3 * float(np.mean(times[-window:]))}
        return out

    # Read per token: the four projection matrices and the cache so far (at most the last token's).
    working_set = weight_bytes + 2.0 * b * t * e * itemsize
    return Case(name, "kvcache", f"KV-cache decoding of {t} tokens one by one, B={b} E={e} heads={h}" +
                (f" ({dtype} weights and cache)" if dtype != "float32" else ""), dtype,
                {"B": b, "E": e, "heads": h, "tokens": t}, "GB/s", work, setup, suites, extra,
                working_set=working_set, targets=dict(targets or {}))


def _attnext_decode(env, m, x, t, dtype):
    """Token-by-token decoding through m.step with a fresh KVCache of the case's type per call."""
    cache_kwargs = {"dtype": _np_dtype(dtype)} if dtype == "bfloat16" else {}

    def attnext_decode(step_times=None):
        cache = env.attnext.KVCache(capacity=t, **cache_kwargs)
        return _decode(lambda i: m.step(x[:, i:i + 1], cache), t, step_times)

    return attnext_decode


def _decode(step, t, step_times):
    import time

    out = None
    for i in range(t):
        if step_times is None:
            out = step(i)
        else:
            t0 = time.perf_counter()
            out = step(i)
            step_times.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------
# forward + backward (training): attnext.vjp / layer.vjp beside PyTorch autograd

# The speed targets for the fwd+bwd cases: attnext's speedup over PyTorch's fwd+bwd, and
# the fwd+bwd throughput (3.5 x forward flops / time) as a fraction of attnext's own forward's.
SDPA_BACKWARD_TARGETS = {"attnext_vs_torch": 1.5, "fraction_of_forward": 0.6}
ADDITIVE_BACKWARD_TARGETS = {"attnext_vs_torch": 15.0}
MHA_BACKWARD_TARGETS = {"attnext_vs_torch": 1.5}


def _missing(module, name: str, what: str):
    """A Skip when ``module`` lacks ``name`` (a build without the gradients), else None."""
    return None if hasattr(module, name) else Skip(f"{what}.{name} not in this build")


def _torch_fwd_bwd(env, forward, arrays, grad_out):
    """PyTorch autograd on the same memory: leaf tensors that require grad, ``forward(*leaves)``,
    then ``torch.autograd.grad`` with the same cotangent (no .grad accumulates between calls)."""
    torch = env.torch
    leaves = [torch.from_numpy(a).requires_grad_() for a in arrays]
    g = torch.from_numpy(grad_out)

    def run():
        out = forward(*leaves)
        return Parts((out.detach(), *torch.autograd.grad(out, leaves, g)))

    return run


def sdpa_backward_case(name, b, hq, l, s, d, *, hk=None, causal=False, dtype="float32", suites=("full",)):
    hk = hq if hk is None else hk
    gqa = hk != hq
    itemsize = np.dtype(dtype).itemsize
    forward_work = 4.0 * b * hq * l * s * d * (0.5 if causal else 1.0)
    kind = ", ".join(x for x in ("causal" if causal else "", f"GQA {hq}:{hk}" if gqa else "") if x)
    desc = f"SDPA forward + backward B={b} H={hq} L={l} S={s} D={d}" + (f" ({kind})" if kind else "")

    def setup(rng, env):
        t = _np_dtype(dtype)
        q = rng.standard_normal((b, hq, l, d)).astype(t)
        k = rng.standard_normal((b, hk, s, d)).astype(t)
        v = rng.standard_normal((b, hk, s, d)).astype(t)
        g = rng.standard_normal((b, hq, l, d)).astype(t)
        ax = env.attnext
        sdpa = ax.scaled_dot_product_attention

        def attnext_fwd_bwd():
            out, pullback = ax.vjp(sdpa, q, k, v, is_causal=causal, enable_gqa=gqa)
            return Parts((out, *pullback(g)[:3]))

        run = {"attnext": _missing(ax, "vjp", "attnext") or attnext_fwd_bwd,
               FORWARD: lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)}
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            f = env.torch.nn.functional.scaled_dot_product_attention
            kwargs = {"is_causal": causal, **({"enable_gqa": True} if gqa else {})}
            run["torch"] = _torch_fwd_bwd(env, lambda tq, tk, tv: f(tq, tk, tv, **kwargs), (q, k, v), g)
        ref = env.reference

        def reference_fwd_bwd():
            out, lse = ref.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, return_lse=True)
            grads = ref.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=causal,
                                                              enable_gqa=gqa)
            return Parts((out, *grads[:3]))

        # The twin holds the scores, the weights, dP and dS at once.
        run["reference"] = (env.reference_too_big(5.0 * b * hq * l * s * itemsize)
                            or _missing(ref, "scaled_dot_product_attention_backward", "attnext.reference")
                            or reference_fwd_bwd)
        return run

    return Case(name, "backward", desc, dtype,
                {"B": b, "Hq": hq, "Hk": hk, "L": l, "S": s, "D": d, "causal": causal, "pass": "fwd+bwd"},
                "GFLOP/s", FWD_BWD_FLOPS * forward_work, setup, suites,
                backward={"forward_work": forward_work, "targets": SDPA_BACKWARD_TARGETS})


def additive_backward_case(name, b, lq, lk, u, *, d=None, dtype="float32", suites=("full",)):
    d = u if d is None else d
    forward_work = 2.0 * b * u * (lq * d + lk * d) + 4.0 * b * lq * lk * u + 2.0 * b * lq * lk * d
    itemsize = np.dtype(dtype).itemsize

    def setup(rng, env):
        arrays = _additive_inputs(rng, b, lq, lk, d, d, u, d, dtype)
        g = rng.standard_normal((b, lq, d)).astype(_np_dtype(dtype))
        ax = env.attnext
        f = ax.additive_attention

        def attnext_fwd_bwd():
            out, pullback = ax.vjp(f, *arrays)
            return Parts((out, *pullback(g)))

        run = {"attnext": _missing(ax, "vjp", "attnext") or attnext_fwd_bwd, FORWARD: lambda: f(*arrays)}
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch

            def usual_formula(tq, tk, tv, twq, twk, tvv):  # autograd saves the (B, Lq, Lk, U) tanh
                scores = torch.tanh((tq @ twq)[:, :, None] + (tk @ twk)[:, None]) @ tvv
                return torch.bmm(torch.softmax(scores, dim=-1), tv)

            run["torch"] = _torch_fwd_bwd(env, usual_formula, arrays, g)
        ref = env.reference
        q, k, v, wq, wk, vv = arrays

        def reference_fwd_bwd():
            out = ref.additive_attention(q, k, v, wq, wk, vv)
            grads = ref.additive_attention_backward(g, q, k, v, wq, wk, vv, out, None)  # lse None: recomputed
            return Parts((out, *(grads[n] for n in ("query", "key", "value", "w_query", "w_key", "v"))))

        run["reference"] = (env.reference_too_big(4.0 * b * lq * lk * u * itemsize)
                            or _missing(ref, "additive_attention_backward", "attnext.reference")
                            or reference_fwd_bwd)
        return run

    return Case(name, "backward", f"additive attention forward + backward B={b} Lq={lq} Lk={lk} Dq=Dk=Dv={d} U={u}",
                dtype, {"B": b, "Lq": lq, "Lk": lk, "D": d, "U": u, "pass": "fwd+bwd"}, "GFLOP/s",
                FWD_BWD_FLOPS * forward_work, setup, suites,
                backward={"forward_work": forward_work, "targets": ADDITIVE_BACKWARD_TARGETS})


MHA_PARAMETERS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _reference_mha_fwd_bwd(ref, x, w, grad_out, h):
    """Multi-head self-attention forward and backward in NumPy: the projections by hand, the
    attention by the reference's SDPA and its backward twin. Returns Parts(out, dx, d params)."""
    b, l, e = x.shape
    dh = e // h
    w_in, b_in, w_out, b_out = (w[n] for n in MHA_PARAMETERS)
    qkv = x @ w_in.T + b_in
    q, k, v = (_ref_heads(p, b, l, h, dh) for p in np.split(qkv, 3, axis=-1))
    o_heads, lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True)
    o = o_heads.transpose(0, 2, 1, 3).reshape(b, l, e)
    out = o @ w_out.T + b_out
    flat_g, flat_o = grad_out.reshape(-1, e), o.reshape(-1, e)
    d_o = _ref_heads(grad_out @ w_out, b, l, h, dh)
    dq, dk, dv = ref.scaled_dot_product_attention_backward(d_o, q, k, v, o_heads, lse)[:3]
    d_qkv = np.concatenate([t.transpose(0, 2, 1, 3).reshape(b, l, e) for t in (dq, dk, dv)], axis=-1)
    flat_d = d_qkv.reshape(-1, 3 * e)
    return Parts((out, d_qkv @ w_in, flat_d.T @ x.reshape(-1, e), flat_d.sum(axis=0), flat_g.T @ flat_o,
                  flat_g.sum(axis=0)))


def mha_backward_case(name, b, l, e, h, *, dtype="float32", suites=("full",)):
    forward_work = 8.0 * b * l * e * e + 4.0 * b * l * l * e

    def setup(rng, env):
        x = rng.standard_normal((b, l, e)).astype(_np_dtype(dtype))
        w = _mha_weights(rng, e, dtype)
        g = rng.standard_normal((b, l, e)).astype(_np_dtype(dtype))
        m = _attnext_mha(env, e, h, w, dtype)

        def attnext_fwd_bwd():
            (out, _), pullback = m.vjp(x, need_weights=False)
            input_grads, param_grads = pullback((g, None))
            return Parts((out, input_grads[0], *(param_grads[n] for n in MHA_PARAMETERS)))

        run = {"attnext": _missing(m, "vjp", "MultiHeadAttention") or attnext_fwd_bwd,
               FORWARD: lambda: m(x, need_weights=False)}
        run["torch"] = env.need_torch()
        if run["torch"] is None:
            torch = env.torch
            tm = _torch_mha(env, e, h, w).train()  # training mode; its dropout is 0
            params = dict(tm.named_parameters())
            tx, tg = torch.from_numpy(x).requires_grad_(), torch.from_numpy(g)
            leaves = [tx, *(params[n] for n in MHA_PARAMETERS)]

            def torch_fwd_bwd():
                out, _ = tm(tx, tx, tx, need_weights=False)
                return Parts((out.detach(), *torch.autograd.grad(out, leaves, tg)))

            run["torch"] = torch_fwd_bwd
        ref = env.reference
        run["reference"] = (_missing(ref, "scaled_dot_product_attention_backward", "attnext.reference")
                            or (lambda: _reference_mha_fwd_bwd(ref, x, w, g, h)))
        return run

    return Case(name, "backward", f"multi-head self-attention forward + backward B={b} L={l} E={e} heads={h}",
                dtype, {"B": b, "L": l, "E": e, "heads": h, "pass": "fwd+bwd"}, "GFLOP/s",
                FWD_BWD_FLOPS * forward_work, setup, suites,
                backward={"forward_work": forward_work, "targets": MHA_BACKWARD_TARGETS})


# --------------------------------------------------------------------------------------------
# the suites

def all_cases():
    # Imported here: torch_cases and lowp_cases build on this module's case helpers.
    from .lowp_cases import cases as bfloat16_cases
    from .torch_cases import cases as torch_adapter_cases

    q, f, tiny = ("quick",), ("full",), ("tiny",)
    qf = ("quick", "full")
    return [
        # Issue 3's table (full suite), in its order.
        sdpa_case("sdpa-1x8x1024x1024x64", 1, 8, 1024, 1024, 64, suites=qf),
        sdpa_case("sdpa-4x12x512x512x64", 4, 12, 512, 512, 64, suites=f),
        sdpa_case("sdpa-1x8x4096x4096x64", 1, 8, 4096, 4096, 64, suites=f),
        sdpa_case("sdpa-1x8x4096x4096x64-causal", 1, 8, 4096, 4096, 64, causal=True, suites=f),
        sdpa_case("sdpa-1x8x2048x2048x128", 1, 8, 2048, 2048, 128, suites=f),
        sdpa_case("sdpa-32x8x1x4096x64-decode", 32, 8, 1, 4096, 64, suites=f),
        sdpa_case("sdpa-8x1x128x128x256", 8, 1, 128, 128, 256, suites=qf),
        sdpa_case("sdpa-1x8x1024x1024x64-float64", 1, 8, 1024, 1024, 64, dtype="float64", suites=f),
        sdpa_case("sdpa-1x32:8x1024x1024x64-gqa", 1, 32, 1024, 1024, 64, hk=8, suites=f),
        # Smaller stand-ins in the quick suite.
        sdpa_case("sdpa-1x8x1024x1024x64-causal", 1, 8, 1024, 1024, 64, causal=True, suites=q),
        sdpa_case("sdpa-8x8x1x2048x64-decode", 8, 8, 1, 2048, 64, suites=q),
        sdpa_case("sdpa-1x8x512x512x64-float64", 1, 8, 512, 512, 64, dtype="float64", suites=q),
        sdpa_case("sdpa-1x16:4x512x512x64-gqa", 1, 16, 512, 512, 64, hk=4, suites=q),
        # Issue 4.
        additive_case("additive-8x128x128x256", 8, 128, 128, 256, suites=qf),
        score_additive_case("score_additive-8x128x128x256", 8, 128, 128, 256, suites=f),
        score_additive_case("score_additive-4x64x64x128", 4, 64, 64, 128, suites=q),
        # Issue 5.
        mha_case("mha-4x512x512h8", 4, 512, 512, 8, suites=f),
        mha_case("mha-2x256x512h8", 2, 256, 512, 8, suites=q),
        kvcache_case("kvcache-4x512h8-t512", 4, 512, 8, 512, suites=f),
        kvcache_case("kvcache-1x512h8-t128", 1, 512, 8, 128, suites=q),
        softmax_case("softmax-64x1024x1024", (64, 1024, 1024), suites=f),
        softmax_case("softmax-16x1024x1024", (16, 1024, 1024), suites=q),
        # Issue 15: forward + backward beside PyTorch autograd.
        sdpa_backward_case("fwdbwd-sdpa-1x8x1024x1024x64", 1, 8, 1024, 1024, 64, suites=f),
        sdpa_backward_case("fwdbwd-sdpa-4x12x512x512x64", 4, 12, 512, 512, 64, suites=f),
        sdpa_backward_case("fwdbwd-sdpa-1x8x4096x4096x64-causal", 1, 8, 4096, 4096, 64, causal=True, suites=f),
        sdpa_backward_case("fwdbwd-sdpa-1x8x2048x2048x128", 1, 8, 2048, 2048, 128, suites=f),
        additive_backward_case("fwdbwd-additive-8x128x128x256", 8, 128, 128, 256, suites=f),
        mha_backward_case("fwdbwd-mha-4x512x512h8", 4, 512, 512, 8, suites=f),
        sdpa_backward_case("fwdbwd-sdpa-1x8x512x512x64", 1, 8, 512, 512, 64, suites=q),
        # A hidden suite of tiny sizes for tests (every group, seconds in all).
        sdpa_case("tiny-sdpa", 1, 2, 16, 16, 8, suites=tiny),
        sdpa_case("tiny-sdpa-causal-gqa", 1, 4, 16, 16, 8, hk=2, causal=True, suites=tiny),
        sdpa_case("tiny-sdpa-decode-float64", 2, 2, 1, 256, 8, dtype="float64", suites=tiny),
        additive_case("tiny-additive", 2, 5, 7, 8, suites=tiny),
        score_additive_case("tiny-score_additive", 2, 5, 7, 8, suites=tiny),
        mha_case("tiny-mha", 2, 6, 16, 2, suites=tiny),
        kvcache_case("tiny-kvcache", 1, 16, 2, 6, suites=tiny),
        softmax_case("tiny-softmax", (3, 5, 33), suites=tiny),
        sdpa_backward_case("tiny-fwdbwd-sdpa", 1, 2, 16, 12, 8, suites=tiny),
        sdpa_backward_case("tiny-fwdbwd-sdpa-causal-gqa", 2, 4, 16, 16, 8, hk=2, causal=True, suites=tiny),
        additive_backward_case("tiny-fwdbwd-additive", 2, 5, 7, 8, suites=tiny),
        mha_backward_case("tiny-fwdbwd-mha", 2, 6, 16, 2, suites=tiny),
        *bfloat16_cases(),  # issue 17
        *torch_adapter_cases(),  # attnext.torch's (issue 16)
    ]


SUITES = ("quick", "full", "tiny")


def select(suite: str, patterns=None):
    """The cases of ``suite`` whose names match any of the glob ``patterns`` (all when None)."""
    cases = [c for c in all_cases() if suite in c.suites]
    if patterns:
        chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) or c.name == p for p in patterns)]
        if not chosen:
            names = ", ".join(c.name for c in cases)
            raise ValueError(f"no case of suite {suite!r} matches {' '.join(patterns)}; its cases: {names}")
        return chosen
    return cases


def _parts(x) -> list:
    """The arrays of one call's result, as float64: every part of :class:`Parts`, else the output
    (the first element of a tuple such as (output, weights))."""
    items = list(x) if isinstance(x, Parts) else [x]
    return [_to_numpy(item).astype(np.float64) for item in items]


def check_outputs(outputs: dict) -> dict:
    """Largest relative difference of every contender's output from the first available of
    reference, torch, attnext (the same formula computed several ways must agree). For
    :class:`Parts` each part is compared with the same part, relative to that part's largest
    magnitude, and the worst part counts (``part``: its index, 0 = the output)."""
    bases = [c for c in ("reference", "torch", "attnext") if c in outputs]
    order = bases[:1] + [c for c in outputs if c not in bases[:1]]
    if len(order) < 2:
        return {}
    base = _parts(outputs[order[0]])
    result = {}
    for name in order[1:]:
        other = _parts(outputs[name])
        if len(other) != len(base):
            result[name] = {"against": order[0], "error": f"{len(other)} results vs {len(base)}"}
            continue
        worst, where, error = 0.0, 0, None
        for i, (a, b) in enumerate(zip(other, base)):
            if a.shape != b.shape:
                error = f"part {i}: shape {a.shape} vs {b.shape}"
                break
            scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
            diff = float(np.max(np.abs(a - b))) / scale if b.size else 0.0
            if math.isnan(diff):  # NaN is the worst there is
                worst, where = diff, i
                break
            if diff > worst:
                worst, where = diff, i
        if error is not None:
            result[name] = {"against": order[0], "error": error}
        else:
            result[name] = {"against": order[0], "max_rel_diff": worst}
            if len(base) > 1:
                result[name]["part"] = where
    return result
