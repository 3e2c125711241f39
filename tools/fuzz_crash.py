#!/usr/bin/env python3
"""Crash fuzzer: throws malformed arguments at every public function and every attnext._core
function, in worker subprocesses so that a segfault or abort is caught and reported.

Each call is one of
- a valid call from the hardening registry (tests/hardening/kernels.py) with one to three
  arguments mutated: replaced by garbage (wrong dtype, wrong ndim, random shapes, empty,
  huge stride-0 views, unaligned or byte-swapped data, lists, None, strings, extreme numbers),
  reshaped, given a dimension off by one, transposed, flipped, or dropped; unknown keywords;
- a registry function called with random positional garbage;
- a direct _core call with random positional garbage;
- the classes of issue 13 ("Hardening II"), each a generator below: extreme finite values
  (scores near the float maximum, finfo.min masks, a scale that overflows when folded into
  the query), GQA x batch broadcasting x mask shapes, NaN/inf hidden behind masks, causal,
  windows and key_lengths, racing mutation of an argument from another thread during the call,
  huge and odd thread counts, empty outputs with huge other axes, and the bad arguments of
  the issue's "undocumented exceptions" list.

A call may succeed or raise TypeError, ValueError or MemoryError (the documented errors);
any other exception is reported, and a worker that dies by a signal is a crash.

    PYTHONPATH=python python tools/fuzz_crash.py                 # 40,000 calls, 4 workers
    PYTHONPATH=python python tools/fuzz_crash.py --calls 200000 --seed 7
    PYTHONPATH=python python tools/fuzz_crash.py --million         # 1,000,000 calls, 20 workers
    PYTHONPATH=python python tools/fuzz_crash.py --classes-only --calls 20000   # issue 13 classes only

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


# --- the classes of issue 13: each generator returns (label, call) --------------------------


def _class_generators(np, rng, attnext, reg):
    sdpa = attnext.scaled_dot_product_attention
    f32, f64 = np.float32, np.float64

    def dtype():
        return [f32, f64][int(rng.integers(0, 2))]

    def qkv(dt, batch=(), hq=1, hk=1, lq=None, lk=None, e=None, ev=None):
        lq = int(rng.integers(1, 40)) if lq is None else lq
        lk = int(rng.integers(0, 40)) if lk is None else lk
        e = int(rng.integers(1, 9)) if e is None else e
        ev = int(rng.integers(0, 6)) if ev is None else ev
        return (rng.standard_normal(batch + (hq, lq, e)).astype(dt),
                rng.standard_normal(batch + (hk, lk, e)).astype(dt),
                rng.standard_normal(batch + (hk, lk, ev)).astype(dt))

    def extreme():
        dt = dtype()
        q, k, v = qkv(dt, (int(rng.integers(1, 3)),))
        big = float(np.finfo(dt).max)
        which = int(rng.integers(0, 4))
        kw = {}
        if which == 0:  # scores near the float maximum
            q = (q / max(1.0, float(np.abs(q).max(initial=0)))) * np.sqrt(big) * 0.9
            k = (k / max(1.0, float(np.abs(k).max(initial=0)))) * np.sqrt(big) * 0.9
            q, k = q.astype(dt), k.astype(dt)
            kw["scale"] = 1.0
        elif which == 1:  # HuggingFace finfo.min masks, some rows full
            m = np.where(rng.random(q.shape[:-1] + (k.shape[-2],)) < 0.5, np.finfo(dt).min, 0).astype(dt)
            kw["attn_mask"] = m
        elif which == 2:  # scale that overflows when folded into the query
            q, k = (q * (1e20 if dt == f32 else 1e200)).astype(dt), (k * (1e-20 if dt == f32 else 1e-200)).astype(dt)
            kw["scale"] = 1e30 if dt == f32 else 1e300
        else:  # huge finite values everywhere
            q, k, v = (a * float(rng.choice([1e30, 1e-30, big / 4])) for a in (q, k, v))
            q, k, v = (np.asarray(a, dt) for a in (q, k, v))
        kw.update(is_causal=[False, True, "bottom_right"][int(rng.integers(0, 3))],
                  return_weights=bool(rng.integers(0, 2)), return_lse=bool(rng.integers(0, 2)))
        fn = [lambda: sdpa(q, k, v, **kw),
              lambda: attnext.softmax(q @ np.swapaxes(k, -1, -2), mask=kw.get("attn_mask")),
              lambda: attnext.attention(q[:, 0], k[:, 0], v[:, 0], method="dot", mask=kw.get("attn_mask", None)
                                        if kw.get("attn_mask") is None else kw["attn_mask"][:, 0])]
        return "extreme_values", fn[int(rng.integers(0, len(fn)))]

    def gqa_broadcast():
        dt = dtype()
        pairs = [((), ()), ((3,), ()), ((), (3,)), ((3,), (1,)), ((2, 1), (1, 3)), ((2,), (3,)), ((1,), (2, 2))]
        bq, bk = pairs[int(rng.integers(0, len(pairs)))]
        hk = int(rng.integers(1, 4))
        hq = hk * int(rng.integers(1, 4)) + (1 if rng.random() < 0.1 else 0)  # sometimes not a multiple
        q, _, _ = qkv(dt, bq, hq, hk)
        _, k, v = qkv(dt, bk, hq, hk, lq=q.shape[-2], e=q.shape[-1])
        try:
            full = np.broadcast_shapes(bq, bk) + (hq, q.shape[-2], k.shape[-2])
        except ValueError:
            full = bq + (hq, q.shape[-2], k.shape[-2])
        heads = [hq, hk, 1][int(rng.integers(0, 3))]
        mshape = full[:-3] + (heads,) + full[-2:]
        mshape = tuple(d if rng.random() < 0.7 else 1 for d in mshape)[int(rng.integers(0, len(mshape) - 1)):]
        m = [None, rng.random(mshape) < 0.6, rng.standard_normal(mshape).astype(dt)][int(rng.integers(0, 3))]
        return "gqa_broadcast", lambda: sdpa(q, k, v, m, enable_gqa=bool(rng.random() < 0.9),
                                             is_causal=[False, True, "bottom_right"][int(rng.integers(0, 3))],
                                             return_weights=bool(rng.integers(0, 2)))

    def hidden_nan():
        dt = dtype()
        b = int(rng.integers(1, 3))
        q, k, v = qkv(dt, (b,))
        lk = k.shape[-2]
        lengths = rng.integers(0, lk + 1, size=(b,))
        hide = np.arange(lk) >= lengths[:, None]  # (b, S)
        bad = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
        v = np.where(hide[:, None, :, None], bad, v).astype(dt)
        k = np.where(hide[:, None, :, None], np.nan, k).astype(dt)
        m = rng.standard_normal(q.shape[:-1] + (lk,)).astype(dt)
        m[..., rng.random(m.shape[-1]) < 0.3] = np.nan  # NaN mask entries (some hidden, some not)
        kw = dict(key_lengths=lengths, attn_mask=m if rng.random() < 0.5 else None,
                  is_causal=[False, True, "bottom_right"][int(rng.integers(0, 3))],
                  window=[None, (0, 0), (1, None), (2, 1)][int(rng.integers(0, 4))],
                  return_weights=bool(rng.integers(0, 2)))
        w = (rng.standard_normal((q.shape[-1], 5)).astype(dt), rng.standard_normal((k.shape[-1], 5)).astype(dt),
             rng.standard_normal(5).astype(dt))
        fn = [lambda: sdpa(q, k, v, **kw),
              lambda: attnext.additive_attention(q[:, 0], k[:, 0], v[:, 0], *w, key_lengths=lengths,
                                                 return_weights=True)]
        return "hidden_nan", fn[int(rng.integers(0, 2))]

    def racing():
        import threading
        kernel = reg.KERNELS[int(rng.integers(0, len(reg.KERNELS)))]
        case = reg.Case(seed=int(rng.integers(0, 2**31)), batch=(2,), lq=int(rng.integers(1, 30)),
                        lk=int(rng.integers(1, 30)), d=4, dv=3, units=5,
                        mask=["none", "bool", "float"][int(rng.integers(0, 3))], causal=True, options=reg.FULL_OPTIONS)
        kw = kernel.make(case)
        names = [n for n, a in kw.items() if isinstance(a, np.ndarray) and a.size]
        if not names:
            return "racing", lambda: kernel.call(kw)
        name = names[int(rng.integers(0, len(names)))]
        a = kw[name] = np.array(kw[name])
        if a.dtype.kind in "iu":
            values = [1 << 40, -1, case.lk + 3, -(1 << 62)]
        elif a.dtype == np.bool_:
            values = [False, True]
        else:
            values = [np.nan, np.inf, 1e38, -3e38]

        def call():
            stop = threading.Event()

            def writer():
                i = 0
                while not stop.is_set():
                    a[...] = values[i % len(values)]
                    i += 1

            t = threading.Thread(target=writer)
            t.start()
            try:
                for _ in range(3):
                    try:
                        kernel.call(kw)
                    except reg.DOCUMENTED_ERRORS:
                        pass
            finally:
                stop.set()
                t.join()

        return "racing_mutation", call

    def threads():
        n = [0, -1, 1, 2, 3, 7, 64, 256, 1023, 1024, 1025, 4096, 2**31 - 1, 2**31, 2**63, -(2**63), 10**30,
             np.int64(3), np.int32(2), np.uint8(1), np.int64(2**40), True, 1.0, "2", None][int(rng.integers(0, 25))]

        def call():
            try:
                attnext.set_num_threads(n)
                q = np.ones((2, 2, 20, 8), np.float32)
                sdpa(q, q, q)
            finally:
                attnext.set_num_threads(2)

        return "set_num_threads", call

    def empty():
        big = [2**12, 2**16, 2**20][int(rng.integers(0, 3))]  # O(1) itself: tests/hardening/test_issue13.py
        dt = dtype()

        def huge(shape):
            return np.broadcast_to(np.ones((1,) * len(shape), dt), shape)

        which = int(rng.integers(0, 4))
        if which == 0:
            return "empty_outputs", lambda: sdpa(huge((1, 1, 4)), huge((1, big, 4)), huge((1, big, 0)))
        if which == 1:
            return "empty_outputs", lambda: sdpa(huge((1, 0, 4)), huge((1, big, 4)), huge((1, big, 3)))
        if which == 2:
            return "empty_outputs", lambda: sdpa(huge((0, 1, 1, 4)), huge((0, 1, big, 4)), huge((0, 1, big, 3)),
                                                 return_weights=True)
        w = np.ones((4, 8), dt)
        return "empty_outputs", lambda: attnext.additive_attention(huge((1, 0, 4)), huge((1, 2**18, 4)),
                                                                   huge((1, 2**18, 3)), w, w, np.ones(8, dt))

    Q, K, V = np.ones((2, 5, 4)), np.ones((2, 6, 4)), np.ones((2, 6, 3))
    bad_calls = [
        lambda: sdpa(Q, K, V, dropout_p=np.zeros(2)),
        lambda: attnext.softmax(np.ones((2, 3)), axis=None),
        lambda: attnext.softmax(np.ones((2, 3)), axis=(0, 1)),
        lambda: attnext.softmax(np.ones((2, 3)), axis=True),
        lambda: attnext.set_num_threads(2**31),
        lambda: sdpa(Q, K, V, scale="2"),
        lambda: sdpa(Q, K, V, window=(True, False)),
        lambda: sdpa(Q, K, V, is_causal=np.True_),
        lambda: sdpa(np.ma.masked_array(Q, mask=Q > 0), K, V),
        lambda: attnext.softmax(np.ones((2, 3)), mask=np.ma.masked_array(np.ones((2, 3), bool))),
        lambda: attnext.KVCache().append(np.ones((1, 1, 2, 3), ">f8"), np.ones((1, 1, 2, 3), ">f8")),
        lambda: attnext.attention(Q, K, V, method="general", weight=np.ones((4, 4)), return_weights=True),
        lambda: sdpa(np.ones((4, 2, 6)), np.ones((3, 2, 5, 6)), np.ones((3, 2, 5, 6)), enable_gqa=True),
        lambda: sdpa(np.ones((2, 4, 3, 5)), np.ones((2, 2, 7, 5)), np.ones((2, 2, 7, 5)),
                     np.ones((2, 2, 3, 7), bool), enable_gqa=True),
    ]

    def bad_arguments():
        return "undocumented_list", bad_calls[int(rng.integers(0, len(bad_calls)))]

    return [extreme, gqa_broadcast, hidden_nan, racing, threads, empty, bad_arguments]


WORKER_ADDRESS_SPACE = 8 << 30


def worker(seed: int, calls: int, progress_path: str, classes_share: float = 0.3) -> None:
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
    classes = _class_generators(np, rng, attnext, reg)

    def garbage():
        return pool[int(rng.integers(0, len(pool)))]()

    for i in range(calls):
        if rng.random() < classes_share:
            # One of issue 13's classes (valid or deliberately bad calls).
            gen = classes[int(rng.integers(0, len(classes)))]
            try:
                label, target = gen()
            except Exception as e:  # noqa: BLE001 - a bug of this fuzzer, not of attnext: counted, shown
                counts[(f"generator {gen.__name__}", "FUZZER BUG " + type(e).__name__)] += 1
                continue
            desc = f"{label} (generator call {i}, worker seed {seed})"
            mode = -1.0
        else:
            mode = rng.random()
        if mode < 0:
            pass
        elif mode < 0.8:
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
        if attnext.get_num_threads() > 8:
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
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per worker before it counts as a hang (default: 600 + 10 ms per call)")
    ap.add_argument("--million", action="store_true", help="1,000,000 calls in 20 workers (the release run)")
    ap.add_argument("--classes-only", action="store_true", help="only issue 13's generators")
    ap.add_argument("--classes-share", type=float, default=0.3, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.seed, args.calls, args.progress, args.classes_share)
        return 0
    if args.million:
        args.calls, args.workers = max(args.calls, 1_000_000), max(args.workers, 20)
    share = 1.0 if args.classes_only else args.classes_share

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
               "--progress", progress, "--classes-share", str(share)]
        timeout = args.timeout or 600 + 0.01 * per_worker
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            failures.append(f"worker seed={seed}: HANG (>{timeout:.0f}s) during: {open(progress).read().strip()}")
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
