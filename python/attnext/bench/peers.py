"""Peer engines for the SDPA cases: ONNX Runtime and OpenVINO, each only when importable.

Both get the case's inputs and the benchmark's thread count, and a user's natural setup:

- ``onnxruntime``: a one-node model with the standard ONNX ``Attention`` operator (opset 23),
  built with the ``onnx`` package's helper; a session with ``intra_op_num_threads`` = the
  benchmark's threads.
- ``openvino-f32`` / ``openvino-bf16`` / ``openvino-default``: ``openvino.opset13``'s
  ``scaled_dot_product_attention`` compiled for the CPU with ``INFERENCE_PRECISION_HINT``
  forced to f32, forced to bf16, and left at the plugin's default (bfloat16 on CPUs with
  AVX512_BF16 or AMX); ``INFERENCE_NUM_THREADS`` = the benchmark's threads. Inputs are float32
  (a bfloat16 case passes its bfloat16 values exactly in float32); the output is float32.

The runner checks every peer's output against the case's reference before timing it: a peer
outside the case's tolerance is reported as ``inaccurate`` with its error, never timed.
"""

from __future__ import annotations

import os

import numpy as np

ONNX_OPSET = 23
# contender name -> OpenVINO precision hint (None: the plugin's default)
OPENVINO_PRECISIONS = {"openvino-f32": "f32", "openvino-bf16": "bf16", "openvino-default": None}
PEERS = ("onnxruntime", *OPENVINO_PRECISIONS)


class Unavailable(Exception):
    """A peer cannot run here (not installed, or cannot build this case); the message says why."""


# Set to 0 to leave the peers out of a run as if they were not installed (tools/sanitize.sh
# does: ONNX Runtime and OpenVINO are not built for AddressSanitizer, and OpenVINO aborts under
# its preloaded runtime).
PEERS_SWITCH = "ATTNEXT_BENCH_PEERS"


def _import(name: str, extra: str = 'pip install "attnext[peers]"'):
    if os.environ.get(PEERS_SWITCH) == "0":
        raise Unavailable(f"{name} left out ({PEERS_SWITCH}=0)")
    try:
        return __import__(name, fromlist=["_"])
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise Unavailable(f"{name} not importable ({type(exc).__name__}: {exc}); {extra}") from exc


def availability() -> dict:
    """{peer: reason it cannot run at all, or None} for the contenders list of the results."""
    out = {}
    for peer, modules in (("onnxruntime", ("onnxruntime", "onnx")), ("openvino", ("openvino",))):
        reason = None
        for name in modules:
            try:
                _import(name)
            except Unavailable as exc:
                reason = str(exc)
                break
        if peer == "openvino":
            out.update({p: reason for p in OPENVINO_PRECISIONS})
        else:
            out[peer] = reason
    return out


def _as_float32(*arrays):
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in arrays)


# --------------------------------------------------------------------------------------------
# ONNX Runtime

def _onnx_attention_model(shapes, causal: bool):
    """A model with one opset-23 ``Attention`` node on 4-D (B, H, L, E) inputs; GQA is the
    standard operator's own (K/V with fewer heads than Q)."""
    onnx = _import("onnx")
    from onnx import TensorProto, helper

    names = ("Q", "K", "V")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in zip(names, shapes)]
    b, hq, lq, _ = shapes[0]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [b, hq, lq, shapes[2][3]])
    node = helper.make_node("Attention", list(names), ["Y"], is_causal=int(causal))
    graph = helper.make_graph([node], "attnext_bench_attention", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnxruntime_sdpa(q, k, v, *, causal: bool, threads: int):
    """A callable running ONNX Runtime's Attention on float32 copies of q, k, v."""
    ort = _import("onnxruntime")
    q, k, v = _as_float32(q, k, v)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(_onnx_attention_model((q.shape, k.shape, v.shape), causal), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Unavailable(f"onnxruntime cannot run ONNX Attention (opset {ONNX_OPSET}) here: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    feeds = {"Q": q, "K": k, "V": v}
    return lambda: sess.run(None, feeds)[0]


# --------------------------------------------------------------------------------------------
# OpenVINO

def _openvino_sdpa_model(ov, ops, shapes, causal: bool):
    """Parameters -> (GQA: K/V heads repeated by broadcast and reshape, the pattern OpenVINO's
    CPU plugin fuses) -> ``scaled_dot_product_attention``."""
    params = [ops.parameter(list(s), np.float32, name=n) for n, s in zip(("q", "k", "v"), shapes)]
    q, k, v = params
    hq, hk = shapes[0][1], shapes[1][1]
    if hq != hk:
        k, v = (_repeat_heads(ops, x, s, hq // hk) for x, s in ((k, shapes[1]), (v, shapes[2])))
    out = ops.scaled_dot_product_attention(q, k, v, causal=causal)
    return ov.Model([out], params, "attnext_bench_sdpa")


def _repeat_heads(ops, x, shape, group: int):
    b, hk, s, e = shape
    x = ops.unsqueeze(x, ops.constant(np.array([2], dtype=np.int64)))  # (B, Hk, 1, S, E)
    x = ops.broadcast(x, ops.constant(np.array([b, hk, group, s, e], dtype=np.int64)))
    return ops.reshape(x, ops.constant(np.array([b, hk * group, s, e], dtype=np.int64)), special_zero=False)


def openvino_sdpa(q, k, v, *, causal: bool, threads: int, precision):
    """A callable running OpenVINO's SDPA compiled with ``precision`` ("f32", "bf16" or None =
    the plugin's default) on float32 copies of q, k, v; returns the float32 output."""
    ov = _import("openvino")
    ops = _import("openvino.opset13")
    q, k, v = _as_float32(q, k, v)
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    try:
        compiled = ov.Core().compile_model(_openvino_sdpa_model(ov, ops, (q.shape, k.shape, v.shape), causal),
                                           "CPU", config)
    except Exception as exc:
        raise Unavailable(f"OpenVINO cannot compile SDPA here: {type(exc).__name__}: {str(exc)[:200]}") from exc
    request = compiled.create_infer_request()
    feeds = {0: q, 1: k, 2: v}

    def run():
        request.infer(feeds, share_inputs=True)
        return request.get_output_tensor(0).data

    return run


def sdpa_contenders(q, k, v, *, causal: bool, threads: int, dtype: str) -> dict:
    """{peer: callable | Unavailable} for an SDPA case of ``dtype``. Forced precisions run where
    they match the case's type (f32 on float32 cases, bf16 on bfloat16 cases); the default runs
    on both and is held to the case's tolerance like every peer."""
    out = {}
    if dtype not in ("float32", "bfloat16"):
        reason = Unavailable(f"peers are run on float32 and bfloat16 cases, not {dtype}")
        return {p: reason for p in PEERS}
    out["onnxruntime"] = _build(onnxruntime_sdpa, q, k, v, causal=causal, threads=threads) if dtype == "float32" \
        else Unavailable("ONNX Runtime 1.x has no CPU bfloat16 kernel for ONNX Attention (a bfloat16 "
                    "model fails with NOT_IMPLEMENTED); it runs on the float32 cases")
    for name, precision in OPENVINO_PRECISIONS.items():
        wanted = {"f32": "float32", "bf16": "bfloat16"}.get(precision, dtype)
        if wanted != dtype:
            out[name] = Unavailable(f"forced {precision} runs on the {wanted} cases")
            continue
        out[name] = _build(openvino_sdpa, q, k, v, causal=causal, threads=threads, precision=precision)
    return out


def _build(factory, *args, **kwargs):
    try:
        return factory(*args, **kwargs)
    except Unavailable as exc:
        return exc
