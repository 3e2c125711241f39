#!/usr/bin/env python3
"""Crash fuzzer: throws malformed arguments at every public function and every attnext._core
function, in worker subprocesses so that a segfault or abort is caught and reported.

Each call is one of
- a valid call from the hardening registry (tests/hardening/kernels.py) with one to three
  arguments mutated: replaced by garbage (wrong dtype, wrong ndim, random shapes, empty,
  huge stride-0 views, unaligned or byte-swapped data, lists, None, strings, extreme numbers),
  reshaped, given a dimension off by one, transposed, flipped, or dropped; unknown keywords;
- a registry function called with random positional garbage;
- a direct _core call with random positional garbage.

A call may succeed or raise TypeError, ValueError or MemoryError (the documented errors);
any other exception is reported, and a worker that dies by a signal is a crash.

    PYTHONPATH=python python tools/fuzz_crash.py                 # 40,000 calls, 4 workers
    PYTHONPATH=python python tools/fuzz_crash.py --calls 200000 --seed 7

Exit status 0 only when there was no crash, no hang and no undocumented exception.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- worker -------------------------------------------------------------------------------


def _garbage_pool(np, rng):
    """Callables producing one malformed argument each."""

    def rand_shape(max_ndim=5, max_dim=4):
        return tuple(int(d) for d in rng.integers(0, max_dim + 1, size=int(rng.integers(0, max_ndim + 1))))

    def huge():
        # Stride-0 views whose element count is >= 2**40 with a last axis of 1, so a call
        # either refuses them or fails to allocate its output; none can be computed for real.
        shape = [(2**40, 1), (2**21, 2**21, 1), (2**58, 1), (2**29, 2**29, 1), (1, 2**40, 1), (2**20, 2**20, 2**3, 1),
                 (2**40,)][int(rng.integers(0, 7))]
        return np.broadcast_to(np.ones((1,) * len(shape), dtype=[np.float32, np.float64][int(rng.integers(0, 2))]),
                               shape)

    def unaligned():
        shape = rand_shape(4, 3)
        n = int(np.prod(shape))
        dt = np.dtype([np.float32, np.float64][int(rng.integers(0, 2))])
        buf = np.zeros(n * dt.itemsize + dt.itemsize, dtype=np.uint8)
        return np.frombuffer(buf.data, dtype=dt, count=n, offset=int(rng.integers(1, dt.itemsize))).reshape(shape)

    def structured_field():
        s = np.zeros(rand_shape(3, 3), dtype=[("a", "f8"), ("b", "f4"), ("c", "?")])
        return s[["a", "b", "c"][int(rng.integers(0, 3))]]

    dtypes = ["f4", "f8", "f2", "i4", "i8", "u1", "?", "c8", "c16", "O", "U2", ">f8", ">f4", "g", "m8[s]"]

    def rand_array():
        dt = dtypes[int(rng.integers(0, len(dtypes)))]
        shape = rand_shape()
        if dt == "O":
            return np.full(shape, 1.0, dtype=object)
        if dt == "U2":
            return np.full(shape, "ab")
        if dt == "m8[s]":
            return np.zeros(shape, dtype=dt)
        return (rng.standard_normal(shape) * 3).astype(dt)

    scalars = [None, 0, 1, -1, 2, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30, 10**400, 0.0, 1.5, -2.5, float("nan"),
               float("inf"), -float("inf"), True, False, "x", "bottom_right", "top_left", b"\x00", [], [[1.0, 2.0]],
               [1, "a"], (), (1,), (1, 2, 3), (None, None), (-1, 2), {}, object(), 1j, np.float64(np.nan),
               np.int64(-5), np.float32(2.0)]

    return [
        rand_array, rand_array, rand_array, huge, unaligned, structured_field,
        lambda: scalars[int(rng.integers(0, len(scalars)))],
        lambda: scalars[int(rng.integers(0, len(scalars)))],
        lambda: np.array(float(rng.standard_normal())),
        lambda: np.zeros(rand_shape() + (3,), dtype=np.float64)[..., ::-1] if rng.random() < 0.5 else np.zeros((0,)),
        lambda: rng.standard_normal(rand_shape()).tolist(),
        lambda: np.asfortranarray(rng.standard_normal(rand_shape())).T,
    ]


def _mutate_array(np, rng, a):
    """a with its shape, layout or contents changed."""
    if a.size > 2**20:  # a huge stride-0 view: transposing it could ask for real (hours of) work
        return a
    choice = int(rng.integers(0, 9))
    if choice == 0 and a.ndim:
        shape = list(a.shape)
        ax = int(rng.integers(0, a.ndim))
        shape[ax] = max(0, shape[ax] + int(rng.choice([-1, 1, 2])))
        return rng.standard_normal(shape).astype(a.dtype)
    if choice == 1 and a.ndim:
        shape = list(a.shape)
        shape[int(rng.integers(0, a.ndim))] = 0
        return np.zeros(shape, dtype=a.dtype)
    if choice == 2:
        return a[None]
    if choice == 3 and a.ndim:
        return a[..., 0] if a.shape[-1] else a.sum(-1)
    if choice == 4 and a.ndim >= 2:
        return np.swapaxes(a, -1, -2)
    if choice == 5 and a.ndim:
        return a[..., ::-1]
    if choice == 6 and a.size:
        b = np.array(a)
        b.flat[int(rng.integers(0, b.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
        return b
    if choice == 7 and a.ndim:
        return a.reshape(-1)
    return a.astype([np.float32, np.float64, np.float16][int(rng.integers(0, 3))])


WORKER_ADDRESS_SPACE = 8 << 30


def worker(seed: int, calls: int, progress_path: str) -> None:
    # A legal but huge request (a layer with key_dim = 2**31: 8 GB of weights) must end in the
    # documented MemoryError, not in the kernel's OOM killer taking the machine's memory first.
    # (Not under ASan: its shadow memory alone reserves terabytes of address space, and its
    # allocator returns null for huge requests anyway: tools/sanitize.sh sets ATTNEXT_SANITIZED.)
    if not os.environ.get("ATTNEXT_SANITIZED"):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))
    sys.path.insert(0, ROOT)
    import numpy as np

    import attnext
    from tests.hardening import kernels as reg

    np.seterr(all="ignore")
    import warnings

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(seed)
    pool = _garbage_pool(np, rng)
    documented = reg.DOCUMENTED_ERRORS
    counts = collections.Counter()
    undocumented = []
    public_fns = list(reg.PUBLIC_FUNCTIONS.items())
    core_fns = list(reg.CORE_FUNCTIONS.items())
    progress = open(progress_path, "w")
    attnext.set_num_threads(int(rng.integers(1, 4)))

    def garbage():
        return pool[int(rng.integers(0, len(pool)))]()

    for i in range(calls):
        mode = rng.random()
        if mode < 0.8:
            kernel = reg.KERNELS[int(rng.integers(0, len(reg.KERNELS)))]
            case = reg.Case(seed=int(rng.integers(0, 2**31)), dtype=[np.float32, np.float64][int(rng.integers(0, 2))],
                            batch=tuple(int(d) for d in rng.integers(0, 3, size=int(rng.integers(0, 3)))),
                            lq=int(rng.integers(0, 6)), lk=int(rng.integers(0, 6)), d=int(rng.integers(0, 5)),
                            dv=int(rng.integers(0, 4)), units=int(rng.integers(0, 5)),
                            layout=reg.LAYOUTS[int(rng.integers(0, len(reg.LAYOUTS)))],
                            mask=reg.MASKS[int(rng.integers(0, len(reg.MASKS)))],
                            causal=reg.CAUSAL[int(rng.integers(0, 3))])
            kw = kernel.make(case)
            names = list(kw)
            for _ in range(int(rng.integers(1, 4))):
                name = names[int(rng.integers(0, len(names)))]
                if name not in kw:
                    continue
                r = rng.random()
                if r < 0.45:
                    kw[name] = garbage()
                elif r < 0.85 and isinstance(kw[name], np.ndarray):
                    try:  # mutating an earlier mutation's garbage may itself fail: keep it then
                        kw[name] = _mutate_array(np, rng, kw[name])
                    except Exception:  # noqa: BLE001
                        pass
                elif r < 0.93:
                    kw.pop(name, None)
                else:
                    kw["unknown_" + name] = garbage()
            label, target = kernel.name, (lambda kw=kw, kernel=kernel: kernel.call(kw))
            desc = f"{kernel.name}(" + ", ".join(f"{k}={_describe(np, v)}" for k, v in kw.items()) + ")"
        else:
            fns = public_fns if mode < 0.9 else core_fns
            fname, fn = fns[int(rng.integers(0, len(fns)))]
            if fname in ("set_num_threads",):
                args = [[0, -1, 1025, 10**6, 2**31, 2**63, -(2**63), 1.5, "2", None, 1, 2, 3][int(rng.integers(0, 13))]]
            else:
                args = [garbage() for _ in range(int(rng.integers(0, 9)))]
            label = ("_core." if mode >= 0.9 else "") + fname
            target = (lambda fn=fn, args=args: fn(*args))
            desc = f"{label}(" + ", ".join(_describe(np, a) for a in args) + ")"
        progress.seek(0)
        progress.write(desc[:4000] + "\n" + " " * 64)
        progress.flush()
        try:
            target()
            counts[(label, "ok")] += 1
        except documented as e:
            counts[(label, next(c.__name__ for c in documented if isinstance(e, c)))] += 1
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            counts[(label, "UNDOCUMENTED " + type(e).__name__)] += 1
            if len(undocumented) < 20:
                undocumented.append(desc[:1000] + "\n  " + "".join(traceback.format_exception_only(type(e), e)))
        if "set_num_threads" in label and attnext.get_num_threads() > 8:
            attnext.set_num_threads(2)
    progress.close()
    print(json.dumps({"counts": [[k[0], k[1], v] for k, v in counts.items()], "undocumented": undocumented}))


def _describe(np, v):
    if isinstance(v, np.ndarray):
        return f"array{v.shape}:{v.dtype}{'' if v.flags.aligned else ':unaligned'}{':' + str(v.strides)}"
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


# --- parent -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40000, help="total calls (default 40000)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes, run one after another")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per worker before it counts as a hang")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.seed, args.calls, args.progress)
        return 0

    import tempfile

    totals = collections.Counter()
    failures = []
    per_worker = max(1, args.calls // args.workers)
    start = time.time()
    for w in range(args.workers):
        seed = args.seed * 1000 + w
        with tempfile.NamedTemporaryFile("r", suffix=".txt", delete=False) as tmp:
            progress = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--calls", str(per_worker),
               "--progress", progress]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            failures.append(f"worker seed={seed}: HANG (>{args.timeout}s) during: {open(progress).read().strip()}")
            continue
        finally:
            pass
        last = open(progress).read().strip()
        os.unlink(progress)
        if r.returncode != 0:
            failures.append(f"worker seed={seed}: CRASH (exit {r.returncode}) during: {last}\n{r.stderr[-3000:]}")
            continue
        report = json.loads(r.stdout.strip().splitlines()[-1])
        for fn, outcome, n in report["counts"]:
            totals[(fn, outcome)] += n
        failures.extend(report["undocumented"])
    elapsed = time.time() - start

    by_fn = collections.defaultdict(dict)
    for (fn, outcome), n in sorted(totals.items()):
        by_fn[fn][outcome] = n
    total = sum(totals.values())
    print(f"fuzz_crash: {total} calls in {elapsed:.1f} s ({args.workers} workers, seed {args.seed})")
    for fn, outcomes in sorted(by_fn.items()):
        print(f"  {fn:34s} " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    undocumented = sum(n for (fn, outcome), n in totals.items() if outcome.startswith("UNDOCUMENTED"))
    crashes = sum(1 for f in failures if "CRASH" in f or "HANG" in f)
    print(f"crashes/hangs: {crashes}, undocumented exceptions: {undocumented}")
    for f in failures:
        print("---\n" + f)
    return 1 if failures or undocumented else 0


if __name__ == "__main__":
    sys.exit(main())
