"""What the machine is and what it can do: CPU, versions, thread settings, and two probes.

Probes (run once at the start of a benchmark run):

- **GEMM**: a square matrix product (float32, and float64 for the float64 cases) through
  NumPy's BLAS, 2·n³ flops, best of several runs. It runs in a *subprocess* whose environment
  has ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed together (some environments pin
  OpenBLAS to an older core type, which slows its GEMM and would understate the hardware) and
  ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to the benchmark's
  thread count. When PyTorch is importable its ``torch.mm`` is timed too (same thread count);
  the peak is the higher of the two.
- **Read bandwidth**: summing a large float32 array (far larger than the caches) split across
  the benchmark's threads, bytes read / time, best of several runs; and a BLAS matrix-vector
  product (which streams the matrix) in the same subprocess; the peak is the higher.

"Fraction of peak" in the results is a case's GFLOP/s over the GEMM peak of its dtype, or its
GB/s over the read-bandwidth peak.
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
import json, sys, time, threading
import numpy as np
n, n64, mib, threads, reps = (int(a) for a in sys.argv[1:6])
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
del a, b
x = np.ones(mib * 2**20 // 4, dtype=np.float32)
chunks = np.array_split(x, threads)
def parallel_sum():
    ts = [threading.Thread(target=np.add.reduce, args=(c,)) for c in chunks]
    [t.start() for t in ts]; [t.join() for t in ts]
out["read_sum_gbs"] = x.nbytes / best(parallel_sum, reps) / 1e9
m = x.reshape(-1, 1024); v = np.ones(1024, dtype=np.float32)
out["read_gemv_gbs"] = m.nbytes / best(lambda: m @ v, reps) / 1e9
print(json.dumps(out))
"""

PROBE_SIZES = {  # suite -> (GEMM n float32, GEMM n float64, bandwidth array MiB, repeats)
    "full": (2048, 1536, 512, 5),
    "quick": (2048, 1024, 256, 3),
    "tiny": (256, 128, 16, 2),
}


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


def run_probes(threads: int, suite: str) -> dict:
    """Measures the GEMM and read-bandwidth peaks (see the module docstring)."""
    n, n64, mib, reps = PROBE_SIZES.get(suite, PROBE_SIZES["full"])
    env = {k: v for k, v in os.environ.items() if k not in PROBE_UNSET}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    result = {"method": f"subprocess without {' and '.join(PROBE_UNSET)}, {threads} BLAS threads; "
                        f"GEMM {n}x{n} float32, {n64}x{n64} float64; read {mib} MiB float32",
              "threads": threads}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(n), str(n64), str(mib), str(threads), str(reps)],
                              env=env, capture_output=True, text=True, timeout=300)
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        raise RuntimeError(f"the machine probe failed: {exc}") from exc
    result.update(probe)
    torch, _ = torch_or_reason()
    if torch is not None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        result["torch_gemm_f32_gflops"] = 2 * n ** 3 / best / 1e9
    result["peak_gflops_float32"] = max(result["gemm_f32_gflops"], result.get("torch_gemm_f32_gflops", 0.0))
    result["peak_gflops_float64"] = result["gemm_f64_gflops"]
    result["peak_read_gbs"] = max(result["read_sum_gbs"], result["read_gemv_gbs"])
    return result
