# Type stub for attnext._core, the private compiled module. Arrays must already be
# float32, float64, float16 or ml_dtypes.bfloat16 ndarrays with matching dtypes and batch shapes
# (the public API prepares them). 16-bit inputs compute in float32: their float masks and
# keys_raw/keys_exp are float32, a bias float32 or the inputs' dtype (widened exactly), weights
# and lse come back float32, and the main output is in the
# inputs' dtype unless out_float32=True asks for float32 (ignored for float32 inputs, a
# ValueError for float64). Backward entries take float32 or float64 only (TypeError otherwise).
from typing import Literal

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating] | npt.NDArray[np.void]  # np.void: ml_dtypes.bfloat16 arrays

def set_num_threads(n: int | np.integer) -> None: ...  # in [1, 256]
def get_num_threads() -> int: ...
def build_info() -> dict[str, object]: ...  # "bf16": the active bfloat16 product path (get_bf16_path())
def set_bf16_path(path: Literal["auto", "avx512_bf16", "fallback"]) -> None: ...  # any other string: ValueError
def get_bf16_cap() -> Literal["auto", "avx512_bf16", "fallback"]: ...  # what set_bf16_path last set
def get_bf16_path() -> str: ...  # "amx_bf16", "avx512_bf16", "avx512_bf16 (capped)", "float32 fallback (forced)" or "float32 fallback"
def softmax(x: Array, mask: npt.NDArray | None = None, causal: bool = False, causal_offset: int = 0,
            out_float32: bool = False) -> Array: ...
def score_product(query: Array, key: Array, weight: Array | None = None, scale: float = 1.0,
                  out_float32: bool = False) -> Array: ...
def score_additive(query: Array, key: Array, w_query: Array, w_key: Array, v: Array, bias: Array | None = None,
                   scale: float = 1.0, out_float32: bool = False) -> Array: ...
def weighted_sum(weights: Array, value: Array, out_float32: bool = False) -> Array: ...
def additive_keys(key: Array, w_key: Array) -> tuple[Array, Array, npt.NDArray[np.bool_]]: ...
def additive_attention(query: Array, w_query: Array, bias: Array | None, keys_raw: Array, keys_exp: Array,
                       keys_ok: npt.NDArray[np.bool_], value: Array, v: Array, mask: npt.NDArray | None,
                       key_lengths: npt.NDArray[np.int64] | None, return_weights: bool = False,
                       out_float32: bool = False) -> Array | tuple[Array, Array]: ...
def additive_attention_keys(query: Array, w_query: Array, bias: Array | None, key: Array, w_key: Array,
                            value: Array, v: Array, mask: npt.NDArray | None,
                            key_lengths: npt.NDArray[np.int64] | None, return_weights: bool = False,
                            out_float32: bool = False) -> Array | tuple[Array, Array]: ...
# Gradients of additive_attention given grad_out (..., Lq, Dv) [and grad_weights (..., Lq, Lk)]: a dict with
# query, w_query, bias (None when bias is None), v, keys_raw (= dL/d(key w_key)), value, mask (dL/d(score + mask)
# when mask_grad, else None); the _keys form adds key and w_key. Full batch shapes, C-contiguous. weights: the
# forward's returned weights for the same arguments (skips recomputing them; None recomputes).
def additive_attention_backward(query: Array, w_query: Array, bias: Array | None, keys_raw: Array, keys_exp: Array,
                                keys_ok: npt.NDArray[np.bool_], value: Array, v: Array, mask: npt.NDArray | None,
                                key_lengths: npt.NDArray[np.int64] | None, grad_out: Array,
                                grad_weights: Array | None = None, mask_grad: bool = False,
                                weights: Array | None = None) -> dict[str, Array | None]: ...
def additive_attention_keys_backward(query: Array, w_query: Array, bias: Array | None, key: Array, w_key: Array,
                                     value: Array, v: Array, mask: npt.NDArray | None,
                                     key_lengths: npt.NDArray[np.int64] | None, grad_out: Array,
                                     grad_weights: Array | None = None, mask_grad: bool = False,
                                     weights: Array | None = None) -> dict[str, Array | None]: ...
# y = x weight^T + bias: x (B, L, C, D), weight (out, C * D), bias (out,) of the accumulation type or x's dtype.
def linear(x: Array, weight: Array, bias: Array | None, out_float32: bool = False) -> Array: ...
# Gradients of linear: grad (B, L, out), x (B, L, C, D) -> (dx like x, dweight (out, C * D), dbias (out,) or None).
def linear_backward(grad: Array, x: Array, weight: Array, want_bias: bool) -> tuple[Array, Array, Array | None]: ...
def sdpa(query: Array, key: Array, value: Array, attn_mask: npt.NDArray | None = None, causal: bool = False,
         causal_offset: int = 0, window_left: int = -1, window_right: int = -1,
         key_lengths: npt.NDArray[np.int64] | None = None, scale: float = 1.0, return_weights: bool = False,
         return_lse: bool = False, dropout_p: float = 0.0, seed: int = 0, out_float32: bool = False
         ) -> tuple[Array, Array | None, Array | None]: ...
# Gradients of sdpa (same first ten arguments): out (..., L, Ev) and lse (..., L) as sdpa returned them, grad_out
# the cotangent of out, grad_weights (..., L, S) that of the returned weights (after dropout) -> (dq, dk, dv,
# dmask = dL/d(score + mask) when mask_grad, else None), C-contiguous with the full batch shape of the views passed.
def sdpa_backward(query: Array, key: Array, value: Array, attn_mask: npt.NDArray | None, causal: bool,
                  causal_offset: int, window_left: int, window_right: int,
                  key_lengths: npt.NDArray[np.int64] | None, scale: float, out: Array, lse: Array, grad_out: Array,
                  dropout_p: float = 0.0, seed: int = 0, grad_weights: Array | None = None, mask_grad: bool = False
                  ) -> tuple[Array, Array, Array, Array | None]: ...
# The benchmark's machine probes (cpp/bindings/probe.cpp).
def probe_peak_gflops(dtype: str, threads: int, runs: int = 3) -> tuple[float, str]: ...
def probe_read_gbs(nbytes: int, threads: int, runs: int = 3) -> float: ...
probe_read_min_bytes: int
