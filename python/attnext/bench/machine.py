"""What the machine is and what it can do: CPU, versions, thread settings, and the probes.

Probes (run once at the start of a benchmark run, on the benchmark's thread count):

- **Arithmetic peak per type** (attnext's compiled probe, cpp/include/attnext/probe.hpp): a
  register-only multiply-add loop with enough independent chains to fill every FMA port, in
  the widest vectors the CPU has (chosen by CPUID at run time, not by build flags or a BLAS
  setting), best of a few runs: float32 and float64 FMA; bfloat16 through AMX ``tdpbf16ps``
  or ``vdpbf16ps`` (two multiply-adds per float32 lane), whichever attnext's kernels use, else
  the float32 peak (their fallback computes in float32; ``bf16_isa`` says which).
- **GEMM**: a square matrix product through NumPy's BLAS (in a subprocess without
  ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE``, with the benchmark's BLAS threads) and
  ``torch.mm`` when PyTorch is importable; for bfloat16, attnext's own packed GEMM. The reported peak of a type is the higher of the
  loop and the best GEMM, so no library can measure above it (were one to, the loop would be
  the wrong probe, and the higher number is the truer peak).
- **Read bandwidth**, cache-aware: threads summing a buffer (each its part, as 1 to 8
  sequential streams side by side, the best count: one stream per core under-reads memory)
  well above the last-level cache (4 x its size from sysfs, at least 256 MiB; 256 MiB when
  the size is unknown) for
  memory-bound cases whose data does not fit in that cache, a buffer of half the cache for
  those whose data does (a KV cache of a few MiB is read from the cache, faster than memory),
  and half the threads' L2 caches together for those whose data fits there (a decoding step's
  weights: where the last level is shared or far, as in some VMs, L2 reads many times faster).

"Fraction of peak" in the results is a case's GFLOP/s over the peak of its dtype, or its GB/s
over the bandwidth of the level its working set lives in. It never shows above 100%: a rate
above its peak is reported as 100% with ``over_peak`` (the raw fraction) in the JSON and a
flag in the table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# Variables that change how OpenBLAS picks its kernels; the probe removes them together.
PROBE_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Environment variables recorded with the results (they change what BLAS/OpenMP do).
RECORDED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_PROBE_CODE = r"""
import json, sys, time
import numpy as np
n, n64, reps = (int(a) for a in sys.argv[1:4])
out = {}
def best(fn, reps):
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); t = min(t, time.perf_counter() - t0)
    return t
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
out["gemm_f32_gflops"] = 2 * n**3 / best(lambda: a @ b, reps) / 1e9
a = rng.standard_normal((n64, n64)); b = rng.standard_normal((n64, n64))
out["gemm_f64_gflops"] = 2 * n64**3 / best(lambda: a @ b, max(2, reps // 2)) / 1e9
print(json.dumps(out))
"""

PROBE_SIZES = {  # suite -> (GEMM n float32, GEMM n float64, smallest memory read set MiB, repeats)
    "full": (2048, 1536, 256, 5),
    "quick": (2048, 1024, 256, 3),
    "tiny": (256, 128, 64, 2),
}
# Used when sysfs/sysconf do not tell the last-level cache's size.
UNKNOWN_LLC_BYTES = 256 * 2 ** 20
# The memory probe's read set is this many times the last-level cache (LRU caches keep nothing
# of a stream over twice their size; 4x leaves margin for adjacent-line prefetch and victims).
MEMORY_SET_OVER_LLC = 4


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def torch_or_reason():
    """(torch module, None) or (None, why it cannot be used)."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"PyTorch not importable ({type(exc).__name__}: {exc})"
    return torch, None


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info(threads: dict) -> dict:
    import attnext

    torch, _ = torch_or_reason()
    info = attnext.build_info()
    return {
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count() or 1,
        "cores_available": available_cores(),
        "simd": str(info.get("simd", "unknown")),
        "platform": platform.platform(),
        "build_info": {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
                       for k, v in info.items()},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "attnext": attnext.__version__,
            "torch": getattr(torch, "__version__", None) if torch is not None else None,
            "threadpoolctl": _version("threadpoolctl"),
            "matplotlib": _version("matplotlib"),
        },
        "threads": threads,
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        "load_avg": load_avg(),
    }


def load_avg():
    """The 1-minute load average (None where the OS has none). Above the core count, other
    processes compete for the cores, and OpenMP's spin-waiting threads can lose whole scheduler
    time slices per parallel region: timings are then unreliable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def env_blas_threads():
    """The BLAS thread count the environment asks for (OpenBLAS's order), or None."""
    for var in BLAS_THREAD_VARS[:3]:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _cache_sizes() -> dict:
    """{level: bytes} of the data and unified caches sysfs lists for cpu0 ({} when it does not)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = {}
    try:
        for entry in os.listdir(base):
            if entry.startswith("index"):
                with open(f"{base}/{entry}/type") as f:
                    if f.read().strip() == "Instruction":
                        continue
                with open(f"{base}/{entry}/level") as f:
                    level = int(f.read())
                with open(f"{base}/{entry}/size") as f:
                    sizes[level] = _parse_size(f.read().strip())
    except (OSError, ValueError):
        return {}
    return sizes


def l2_bytes():
    """One core's L2 cache in bytes (sysfs), or None when it is unknown or the last level."""
    sizes = _cache_sizes()
    return sizes[2] if 2 in sizes and max(sizes) > 2 else None


def llc_bytes():
    """The last-level cache's size in bytes (the highest cache level sysfs lists for cpu0, else
    os.sysconf), or None when the system does not say."""
    sizes = _cache_sizes()
    if sizes:
        return sizes[max(sizes)]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            value = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if value > 0:
            return value
    return None


def _parse_size(text: str) -> int:
    """sysfs's cache size ("32768K", "1M") in bytes."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _gemm_probes(threads: int, suite: str) -> dict:
    """NumPy's GEMMs (subprocess, see the module docstring) and torch.mm, in GFLOP/s."""
    n, n64, _, reps = PROBE_SIZES.get(suite, PROBE_SIZES["full"])
    env = {k: v for k, v in os.environ.items() if k not in PROBE_UNSET}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(n), str(n64), str(reps)],
                              env=env, capture_output=True, text=True, timeout=300)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        raise RuntimeError(f"the GEMM probe failed: {exc}") from exc
    torch, _ = torch_or_reason()
    if torch is not None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out["torch_gemm_f32_gflops"] = 2 * n ** 3 / best / 1e9
    return out


def _fma_probes(threads: int) -> dict:
    from attnext import _core

    out = {}
    for dtype, key in (("float32", "f32"), ("float64", "f64"), ("bfloat16", "bf16")):
        out[f"fma_{key}_gflops"], out[f"{key}_isa"] = _core.probe_peak_gflops(dtype, threads)
    return out


def _own_bf16_gemm(threads: int, n: int, reps: int) -> float:
    """GFLOP/s of attnext's own bfloat16 GEMM (the projections' packed kernel), x (n, n) W^T
    (n, n); 0 without ml_dtypes. The vdpbf16ps loop alone under-read this machine's bfloat16
    peak in some runs (a GEMM beat it), so the peak is the higher of the two, as for float32."""
    try:
        import ml_dtypes
    except ImportError:
        return 0.0
    import attnext
    from attnext import _core

    rng = np.random.default_rng(0)
    # _core.linear reads x as (B, L, C, D) with C * D input features: one batch of n rows.
    x = rng.standard_normal((1, n, 1, n), dtype=np.float32).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((n, n), dtype=np.float32).astype(ml_dtypes.bfloat16)
    best = float("inf")
    with attnext.threads(threads):
        _core.linear(x, w, None)
        for _ in range(reps):
            t0 = time.perf_counter()
            _core.linear(x, w, None)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _bandwidth_probes(threads: int, suite: str) -> dict:
    from attnext import _core

    _, _, min_mib, reps = PROBE_SIZES.get(suite, PROBE_SIZES["full"])
    llc = llc_bytes()
    memory_set = max(MEMORY_SET_OVER_LLC * (llc or UNKNOWN_LLC_BYTES), min_mib * 2 ** 20)
    out = {"llc_bytes": llc, "read_set_bytes": memory_set,
           "peak_read_gbs": _core.probe_read_gbs(memory_set, threads, reps)}
    if llc:
        out["llc_read_set_bytes"] = llc // 2
        out["peak_read_gbs_llc"] = _core.probe_read_gbs(llc // 2, threads, reps)
    l2 = l2_bytes()
    if l2:  # each thread reads its part of the set from its own core's L2
        out["l2_bytes"] = l2 * threads
        out["l2_read_set_bytes"] = l2 * threads // 2
        out["peak_read_gbs_l2"] = _core.probe_read_gbs(l2 * threads // 2, threads, reps)
    return out


def run_probes(threads: int, suite: str) -> dict:
    """Measures the per-type arithmetic peaks and the read bandwidths (see the module docstring)."""
    n, n64, _, _ = PROBE_SIZES.get(suite, PROBE_SIZES["full"])
    result = {"method": f"multiply-add register loop per type on {threads} threads (attnext probe); GEMM "
                        f"{n}x{n} float32, {n64}x{n64} float64 (NumPy without {' and '.join(PROBE_UNSET)}, "
                        f"torch.mm); read streams below and above the last-level cache",
              "threads": threads}
    result.update(_fma_probes(threads))
    result.update(_gemm_probes(threads, suite))
    result["gemm_bf16_gflops"] = _own_bf16_gemm(threads, n, PROBE_SIZES.get(suite, PROBE_SIZES["full"])[3])
    result.update(_bandwidth_probes(threads, suite))
    gemm32 = max(result["gemm_f32_gflops"], result.get("torch_gemm_f32_gflops", 0.0))
    result["peak_gflops_float32"] = max(result["fma_f32_gflops"], gemm32)
    result["peak_gflops_float64"] = max(result["fma_f64_gflops"], result["gemm_f64_gflops"])
    # Without vdpbf16ps the bfloat16 kernels compute in float32: their peak is float32's.
    result["peak_gflops_bfloat16"] = max(result["fma_bf16_gflops"], result["gemm_bf16_gflops"],
                                         result["peak_gflops_float32"])
    return result


def read_level(case, peaks: dict):
    """The read-bandwidth level a GB/s case is measured against, as (the peaks key of its GB/s,
    the probe's set bytes or None where the peaks do not say): the threads' L2 caches when its
    working set fits there, else the last-level cache when it holds it, else memory; None
    without bandwidth probes."""
    ws = case.working_set
    if peaks.get("l2_bytes") and "peak_read_gbs_l2" in peaks and ws is not None and ws <= peaks["l2_bytes"]:
        return "peak_read_gbs_l2", peaks.get("l2_read_set_bytes")
    if peaks.get("llc_bytes") and "peak_read_gbs_llc" in peaks and ws is not None and ws <= peaks["llc_bytes"]:
        return "peak_read_gbs_llc", peaks.get("llc_read_set_bytes")
    if "peak_read_gbs" in peaks:
        return "peak_read_gbs", peaks.get("read_set_bytes")
    return None


def reprobe_read(case, peaks: dict, threads: int, suite: str):
    """Measures the read bandwidth again right after the case's timings, over a set of the
    case's own working-set size (the level's probe set when the case does not say). Shared
    machines move their memory bandwidth by tens of percent within minutes, and a level's
    probe set is not the case's: on the SPR VM half the last-level cache read at memory speed
    while the 12 MiB KV-cache case read 22% faster. Returns (the peaks the case is measured
    against: its level at the larger of the two probes, the record of both), or (peaks, None)
    when there is nothing to probe."""
    level = read_level(case, peaks) if case.metric == "GB/s" else None
    if level is None or not (case.working_set or level[1]):
        return peaks, None
    from attnext import _core

    key, level_set = level
    nbytes = max(int(case.working_set or level_set), _core.probe_read_min_bytes)
    again = _core.probe_read_gbs(nbytes, threads, PROBE_SIZES.get(suite, PROBE_SIZES["full"])[3])
    return ({**peaks, key: max(peaks[key], again)},
            {"level": key, "at_start": peaks[key], "after_case": again, "set_bytes": nbytes})


def peak_for(case, peaks: dict, contender: str = "attnext"):
    """The peak a contender's rate in a case is measured against: the GFLOP/s of the type it
    computes in, or the read bandwidth of the level the case's working set fits in
    (read_level); None without probes."""
    if case.metric == "GFLOP/s":
        return peaks.get(f"peak_gflops_{case.dtype_for(contender)}")
    level = read_level(case, peaks)
    return peaks[level[0]] if level else None
