"""The bfloat16 cases (issue 17) and what they need: ml_dtypes for NumPy's bfloat16, an attnext
with bfloat16 kernels, and a float64 computation for the accuracy they record.

Each bfloat16 case runs ``attnext-float32`` (attnext in float32 on the same values) beside
``attnext`` in bfloat16, so its ratio ``attnext_vs_attnext-float32`` is the bfloat16 speedup
measured in one run; the issue's targets are attached to the cases (``Case.targets``). Without
ml_dtypes every contender skips with the reason; without bfloat16 kernels in attnext its
contender skips and the others still run.
"""

from __future__ import annotations

import numpy as np

from .cases import Skip, kvcache_case, mha_case, sdpa_case

BF16 = "bfloat16"
# The speed targets: bfloat16 over attnext's float32 (D = 64 and the layers 1.5x, D = 128
# 1.6x, decode 1.8x: half the bytes) and over OpenVINO's bfloat16 (1.1x).
SDPA_D64_TARGETS = {"attnext_vs_attnext-float32": 1.5, "attnext_vs_openvino-bf16": 1.1}
SDPA_D128_TARGETS = {"attnext_vs_attnext-float32": 1.6, "attnext_vs_openvino-bf16": 1.1}
DECODE_TARGETS = {"attnext_vs_attnext-float32": 1.8}
LAYER_TARGETS = {"attnext_vs_attnext-float32": 1.5}
# Contenders whose error against float64 the bfloat16 SDPA cases record (besides attnext).
ACCURACY_PEERS = ("openvino-bf16", "openvino-default")


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def inputs_missing(dtype: str):
    """A Skip when the case's type cannot even be made (bfloat16 without ml_dtypes), else None."""
    if dtype != BF16:
        return None
    try:
        _bf16()
    except ImportError as exc:
        return Skip(f"bfloat16 cases need ml_dtypes ({exc}): pip install ml_dtypes, or \"attnext[bench]\"")
    return None


_TRIED: dict = {}


def _try(what: str, fn) -> str | None:
    """Why ``fn()`` fails, or None (cached per ``what``: the answer does not change within a
    process, and each case asks again)."""
    if what not in _TRIED:
        try:
            fn()
            _TRIED[what] = None
        except Exception as exc:
            _TRIED[what] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return _TRIED[what]


def attnext_missing(env, dtype: str):
    """A Skip when attnext's SDPA does not take bfloat16 inputs (a build before issue 17)."""
    if dtype != BF16:
        return None
    x = np.zeros((1, 1, 2, 8), dtype=_bf16())
    why = _try("attnext sdpa", lambda: _same_type(env.attnext.scaled_dot_product_attention(x, x, x), x))
    return Skip(f"this attnext has no bfloat16 SDPA ({why})") if why else None


def layer_missing(env, e: int, h: int, dtype: str):
    """A Skip when attnext's MultiHeadAttention/KVCache do not take dtype=bfloat16."""
    if dtype != BF16:
        return None
    why = _try("attnext layers", lambda: _layers_run(env.attnext, _bf16()))
    return Skip(f"this attnext has no bfloat16 MultiHeadAttention/KVCache ({why})") if why else None


def _layers_run(ax, t):
    """A bfloat16 MultiHeadAttention forward and one step with a bfloat16 KVCache, tiny."""
    m = ax.MultiHeadAttention(8, 2, batch_first=True, dtype=t, rng=np.random.default_rng(0))
    x = np.zeros((1, 2, 8), dtype=t)
    m(x, need_weights=False)
    m.step(x[:, :1], ax.KVCache(capacity=1, dtype=t))


def reference_missing(env, dtype: str, layer: bool = False):
    """A Skip for the NumPy reference in a bfloat16 case: the layer cases' hand-written NumPy
    formula would multiply bfloat16 matrices without BLAS (minutes), and attnext-float32 runs
    the same values; the SDPA cases use the reference twin when it takes bfloat16."""
    if dtype != BF16:
        return None
    if layer:
        return Skip("NumPy multiplies bfloat16 matrices without BLAS (too slow to time); attnext-float32 runs "
                    "the same values in float32")
    x = np.zeros((1, 1, 2, 8), dtype=_bf16())
    why = _try("reference sdpa", lambda: env.reference.scaled_dot_product_attention(x, x, x))
    return Skip(f"the reference has no bfloat16 SDPA ({why})") if why else None


def _same_type(out, x):
    if out.dtype != x.dtype:
        raise TypeError(f"returned {out.dtype} for {x.dtype} inputs")


def sdpa_accuracy(state: dict, live: dict, causal: bool, gqa: bool) -> dict:
    """Max and mean abs error against float64 (attnext's float64 kernel on the same bfloat16
    values) of attnext with out_dtype=np.float32 and of OpenVINO's bfloat16 (float32 output).
    Releases the case's inputs afterwards."""
    q, k, v, env = (state.pop(n) for n in ("q", "k", "v", "env"))
    state.clear()
    kwargs = {"is_causal": causal, "enable_gqa": gqa}
    sdpa = env.attnext.scaled_dot_product_attention
    exact = sdpa(*(x.astype(np.float64) for x in (q, k, v)), **kwargs)
    against = "float64 (attnext's float64 SDPA on the same bfloat16 values)"
    runs = {}
    if "attnext" in live:
        runs["attnext"] = lambda: sdpa(q, k, v, out_dtype=np.float32, **kwargs)
    runs.update({p: live[p] for p in ACCURACY_PEERS if p in live})
    return {name: _errors(fn, exact, against) for name, fn in runs.items()}


def _errors(fn, exact, against: str) -> dict:
    try:
        err = np.abs(np.asarray(fn(), dtype=np.float64) - exact)
    except Exception as exc:
        return {"against": against, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"against": against, "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())}


def cases():
    """The bfloat16 cases, in the issue's order, and their quick and tiny stand-ins."""
    q, f, tiny = ("quick",), ("full",), ("tiny",)
    qf = ("quick", "full")
    return [
        sdpa_case("sdpa-1x8x1024x1024x64-bfloat16", 1, 8, 1024, 1024, 64, dtype=BF16, suites=qf,
                  targets=SDPA_D64_TARGETS),
        sdpa_case("sdpa-4x12x512x512x64-bfloat16", 4, 12, 512, 512, 64, dtype=BF16, suites=f,
                  targets=SDPA_D64_TARGETS),
        sdpa_case("sdpa-1x8x4096x4096x64-bfloat16", 1, 8, 4096, 4096, 64, dtype=BF16, suites=f,
                  targets=SDPA_D64_TARGETS),
        sdpa_case("sdpa-1x32:8x1024x1024x64-gqa-bfloat16", 1, 32, 1024, 1024, 64, hk=8, dtype=BF16, suites=f,
                  targets=SDPA_D64_TARGETS),
        sdpa_case("sdpa-1x8x2048x2048x128-bfloat16", 1, 8, 2048, 2048, 128, dtype=BF16, suites=f,
                  targets=SDPA_D128_TARGETS),
        sdpa_case("sdpa-32x8x1x4096x64-decode-bfloat16", 32, 8, 1, 4096, 64, dtype=BF16, suites=f,
                  note="bfloat16 cache", targets=DECODE_TARGETS),
        sdpa_case("sdpa-8x8x1x2048x64-decode-bfloat16", 8, 8, 1, 2048, 64, dtype=BF16, suites=q,
                  note="bfloat16 cache", targets=DECODE_TARGETS),
        mha_case("mha-4x512x512h8-bfloat16", 4, 512, 512, 8, dtype=BF16, suites=f, targets=LAYER_TARGETS),
        mha_case("mha-2x256x512h8-bfloat16", 2, 256, 512, 8, dtype=BF16, suites=q, targets=LAYER_TARGETS),
        # MultiHeadAttention.step, one token at a time (issue 17: B 1, E 512, 8 heads).
        kvcache_case("kvcache-1x512h8-t128-bfloat16", 1, 512, 8, 128, dtype=BF16, suites=qf, targets=LAYER_TARGETS),
        sdpa_case("tiny-bfloat16-sdpa", 1, 2, 16, 16, 8, dtype=BF16, suites=tiny, targets=SDPA_D64_TARGETS),
        mha_case("tiny-bfloat16-mha", 2, 6, 16, 2, dtype=BF16, suites=tiny, targets=LAYER_TARGETS),
        kvcache_case("tiny-bfloat16-kvcache", 1, 16, 2, 6, dtype=BF16, suites=tiny, targets=LAYER_TARGETS),
    ]
