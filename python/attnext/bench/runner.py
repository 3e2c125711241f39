"""Running the cases: threads, warm-up, interleaved repeats, statistics, ratios, progress."""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np

from . import cases as cases_mod
from . import machine, peers
from .schema import SCHEMA_ID

# Per suite: (minimum repeats, maximum repeats, target seconds of samples per contender and case,
# shortest sample in seconds: calls faster than this are looped inside one sample).
TIMING = {
    "full": (5, 25, 1.5, 0.02),
    "quick": (3, 7, 0.3, 0.01),
    "tiny": (2, 3, 0.01, 0.0),
}


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, label: str, advance: int = 0, quiet: bool = False):
        """Advances by `advance` steps and shows `label` (`quiet`: advance without a line)."""
        self.done += advance
        if not self.enabled or (quiet and not self.tty):
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 28
            fill = int(frac * width)
            bar = "#" * fill + "-" * (width - fill)
            line = f"\r[{bar}] {self.done:>3}/{self.total} {elapsed:6.1f}s  {label}"
            cols = _terminal_width(self.stream)
            self.stream.write(line[:cols - 1].ljust(min(cols - 1, 110)))
        elif advance:
            self.stream.write(f"[{self.done}/{self.total}] {elapsed:6.1f}s {label}\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * (min(_terminal_width(self.stream), 111) - 1) + "\r")
            self.stream.flush()


def _terminal_width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 100


# --------------------------------------------------------------------------------------------
# threads

def apply_threads(n: int, torch=None) -> dict:
    """Sets ``n`` threads for attnext, PyTorch and NumPy's BLAS; returns what each now uses and how.

    BLAS: through threadpoolctl when it is installed; otherwise only the environment
    (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS), which BLAS reads when it loads;
    the CLI restarts itself with those set when they disagree with ``n`` (see cli.py).
    """
    import attnext

    attnext.set_num_threads(n)
    out = {"requested": n, "attnext": attnext.get_num_threads()}
    if torch is not None:
        torch.set_num_threads(n)
        out["torch"] = torch.get_num_threads()
    else:
        out["torch"] = None
    try:
        import threadpoolctl
    except ImportError:
        env = machine.env_blas_threads()
        if env is not None:
            out["blas"], out["blas_method"] = env, "environment (OPENBLAS_NUM_THREADS/OMP_NUM_THREADS)"
        else:
            out["blas"], out["blas_method"] = machine.available_cores(), "BLAS default (all available cores)"
    else:
        apply_threads.limiter = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        infos = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        out["blas"] = infos[0]["num_threads"] if infos else None
        out["blas_method"] = "threadpoolctl"
    return out


# --------------------------------------------------------------------------------------------
# timing

def _sample(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _quiesce(limit: float = 1.0, window: float = 0.005) -> float:
    """Waits until no thread of this process is using the CPU; returns the seconds waited.

    After a call, a library's worker threads keep spinning for a while before they sleep
    (OpenBLAS ~0.1 s, OpenMP runtimes less). Timed right after another contender, a call
    would share the cores with those spinning threads: on the 2-core test machine that made
    attnext's additive attention 1.7x slower after the NumPy reference than after itself. So
    each sample waits until the process's CPU time stops advancing (under 10% of one core over
    a 5 ms window), at most ``limit`` seconds.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        cpu = time.process_time()
        time.sleep(window)
        if time.process_time() - cpu < 0.1 * window:
            break
    return time.perf_counter() - start


def _stats(times) -> dict:
    a = np.asarray(times, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "min_s": float(a.min()),
            "max_s": float(a.max())}


def _plan(est: float, suite: str) -> tuple:
    """(calls per sample, samples) for a call that takes about ``est`` seconds, per the suite's TIMING."""
    min_rep, max_rep, target, min_sample = TIMING[suite]
    number = max(1, math.ceil(min_sample / max(est, 1e-9))) if min_sample else 1
    floor = min_rep if est * number < 1.0 else min(min_rep, 3)  # calls over a second: 3 repeats do
    repeats = int(min(max_rep, max(floor, target // max(est * number, 1e-9))))
    return number, repeats


def _backward_summary(case, forward: dict | None, record: dict) -> dict:
    """A fwd+bwd case's own numbers: attnext's forward alone on the same inputs (``forward``: its
    timing statistics, or {"error": ...}), the fwd+bwd throughput (the case's rate: 3.5 x forward
    flops / time) as a fraction of that forward's throughput, the ratio against torch, and
    whether each of the issue's targets is met."""
    info = case.backward
    out = {"forward_work": info["forward_work"], "targets": dict(info["targets"]), "met": {}}
    attnext = record["results"].get("attnext", {})
    if forward is not None and "error" in forward:
        out["forward_error"] = forward["error"]
    if attnext.get("status") != "ok" or forward is None or "error" in forward:
        return out
    out["forward_median_s"] = forward["median_s"]
    out["forward_rate"] = info["forward_work"] / forward["median_s"] / 1e9
    out["fwd_bwd_rate"] = attnext["rate"]
    out["fraction_of_forward"] = attnext["rate"] / out["forward_rate"]
    vs_torch = record["ratios"].get("attnext_vs_torch")
    if vs_torch is not None:
        out["attnext_vs_torch"] = vs_torch
    for key, target in info["targets"].items():
        if out.get(key) is not None:
            out["met"][key] = out[key] >= target
    return out


def measure_case(case, env, rng, suite: str, peaks: dict, progress: Progress) -> dict:
    """Runs one case: warm-up each contender, then interleaved repeats (contender order rotates
    each round, so drifts in machine load spread over all of them)."""
    record = {"name": case.name, "group": case.group, "description": case.description, "dtype": case.dtype,
              "params": case.params, "metric": case.metric, "work": case.work, "tolerance": case.tolerance,
              "results": {}, "ratios": {}, "check": {}, "extra": {}}
    try:
        run = case.setup(rng, env)
    except Exception as exc:  # a setup failure is reported, the suite goes on
        run = {c: cases_mod.Skip(f"setup failed: {type(exc).__name__}: {exc}") for c in cases_mod.CONTENDERS}
    live, outputs, plan = {}, {}, {}
    for cname in cases_mod.CONTENDERS:
        fn = run.get(cname)
        if fn is None or isinstance(fn, cases_mod.Skip):
            reason = fn.reason if fn is not None else cases_mod.NO_IMPLEMENTATION
            record["results"][cname] = {"status": "skipped", "reason": reason}
            # A contender missing from the whole run (PyTorch not importable) is named once, in the
            # list under the table; a progress line per case would repeat it.
            progress.update(f"{case.name}: {cname} skipped", 1, quiet=cname in getattr(env, "unavailable", ()))
            continue
        progress.update(f"{case.name}: {cname} warm-up")
        try:
            gc.collect()
            t_first = _sample(lambda: outputs.__setitem__(cname, fn()), 1)
            est = _sample(fn, 1) if t_first < 1.0 else t_first
        except Exception as exc:
            record["results"][cname] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
            outputs.pop(cname, None)
            progress.update(f"{case.name}: {cname} failed", 1)
            continue
        live[cname], plan[cname] = fn, _plan(est, suite)
    record["check"] = cases_mod.check_outputs(outputs)
    outputs.clear()
    _drop_inaccurate_peers(case, record, live, progress)
    forward = _add_forward(case, run, live, plan, suite, progress)
    times = {c: [] for c in live}
    rounds = max((r for _, r in plan.values()), default=0)
    order = list(live)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            progress.update(f"{case.name}: round {r + 1}/{rounds}")
            rot = order[r % len(order):] + order[:r % len(order)]
            for cname in rot:
                number, repeats = plan[cname]
                if len(times[cname]) < repeats:
                    # Other contenders' threads gone quiet, then one untimed call to wake this
                    # contender's threads (and the cores they run on) before the timed sample.
                    _quiesce()
                    live[cname]()
                    times[cname].append(_sample(live[cname], number))
    finally:
        if gc_was:
            gc.enable()
    if forward is None and cases_mod.FORWARD in live:
        forward = _stats(times[cases_mod.FORWARD])
        del live[cases_mod.FORWARD]
    if live:
        peaks, read_probe = machine.reprobe_read(case, peaks, env.threads, suite)
        if read_probe:
            record["read_probe"] = read_probe
    for cname in live:
        number, repeats = plan[cname]
        st = _stats(times[cname])
        rate = case.work / st["median_s"] / 1e9
        record["results"][cname] = {"status": "ok", "times_s": times[cname], "repeats": repeats, "number": number,
                                    **st, "rate": rate, **_fraction_of_peak(rate, machine.peak_for(case, peaks, cname))}
        progress.update(f"{case.name}: {cname} done", 1)
    if case.extra is not None and live:
        try:
            record["extra"] = case.extra(live)
        except Exception as exc:
            record["extra"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if case.accuracy is not None:  # called even with nothing live: it releases the case's inputs
        try:
            record["accuracy"] = case.accuracy(live)
        except Exception as exc:
            record["accuracy"] = {"attnext": {"against": "float64", "error": f"{type(exc).__name__}: {exc}"[:500]}}
    ok = [c for c in cases_mod.CONTENDERS if record["results"].get(c, {}).get("status") == "ok"]
    for a in ok:
        for b in ok:
            if a != b:
                record["ratios"][f"{a}_vs_{b}"] = (record["results"][b]["median_s"] /
                                                   record["results"][a]["median_s"])
    if case.backward is not None:
        record["backward"] = _backward_summary(case, forward, record)
    if case.targets:
        record["targets"] = {"targets": dict(case.targets),
                             "met": {k: record["ratios"][k] >= t for k, t in case.targets.items()
                                     if k in record["ratios"]}}
    return record


def _fraction_of_peak(rate: float, peak) -> dict:
    """The result's fraction of its peak, never above 1: a rate above the probed peak means the
    probe fell short, so it shows as 100% with the raw fraction kept in ``over_peak``."""
    if not peak:
        return {"fraction_of_peak": None}
    raw = rate / peak
    return {"fraction_of_peak": min(raw, 1.0), **({"over_peak": raw} if raw > 1.0 else {})}


def _drop_inaccurate_peers(case, record: dict, live: dict, progress: Progress) -> None:
    """A peer whose output is outside the case's tolerance (or could not be compared) is not
    timed: a fast wrong answer is no win. Its result says how far off it was."""
    for cname in [c for c in live if c in cases_mod.PEERS]:
        check = record["check"].get(cname)
        if check is None:
            continue
        diff = check.get("max_rel_diff")
        if diff is not None and diff <= case.tolerance:
            continue
        why = check.get("error") or f"max relative difference {diff:.3g} from {check['against']}"
        record["results"][cname] = {"status": "inaccurate",
                                    "reason": f"{why}, outside the case's tolerance {case.tolerance:.3g}"}
        del live[cname]
        progress.update(f"{case.name}: {cname} inaccurate", 1)


def _add_forward(case, run: dict, live: dict, plan: dict, suite: str, progress: Progress) -> dict | None:
    """For a fwd+bwd case whose attnext contender runs: warms up attnext's forward alone (the
    setup's ``FORWARD`` entry) and adds it to ``live``/``plan``, so it is timed in the same
    interleaved rounds as the contenders. Returns None, or {"error": ...} when it failed."""
    fn = run.get(cases_mod.FORWARD)
    if case.backward is None or "attnext" not in live or not callable(fn):
        return None
    progress.update(f"{case.name}: attnext forward alone, warm-up")
    try:
        t_first = _sample(fn, 1)
        est = _sample(fn, 1) if t_first < 1.0 else t_first
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    live[cases_mod.FORWARD], plan[cases_mod.FORWARD] = fn, _plan(est, suite)
    return None


def run_suite(suite: str = "full", patterns=None, threads=None, seed: int = 0, progress: bool = True,
              max_reference_mb: float = 1024.0, probe: bool = True, argv=None) -> dict:
    """Runs the benchmark and returns the results document (see schema.py)."""
    selected = cases_mod.select(suite, patterns)
    torch, torch_reason = machine.torch_or_reason()
    n = threads or machine.available_cores()
    load_before = machine.load_avg()
    thread_info = apply_threads(n, torch)
    started = time.perf_counter()
    bar = Progress(len(selected) * len(cases_mod.CONTENDERS) + 1, enabled=progress)
    bar.update("probing the arithmetic peaks, GEMM and read bandwidth")
    peaks = machine.run_probes(n, suite) if probe else {"method": "skipped (--no-probe)", "threads": n}
    bar.update("probes done", 1)
    env = cases_mod.Env(torch, torch_reason, max_reference_mb, threads=n)
    peer_reasons = peers.availability()
    env.unavailable = {c for c, why in peer_reasons.items() if why} | ({"torch"} if torch is None else set())
    records = []
    try:
        for i, case in enumerate(selected):
            records.append(measure_case(case, env, np.random.default_rng(seed + i), suite, peaks, bar))
    finally:
        bar.close()
    contenders = {"attnext": {"available": True, "reason": None},
                  "attnext-float32": {"available": True, "reason": None},
                  "torch": {"available": torch is not None, "reason": torch_reason},
                  **{c: {"available": why is None, "reason": why} for c, why in peer_reasons.items()},
                  "reference": {"available": True, "reason": None}}
    info = machine.machine_info(thread_info)
    info["load_avg_before"] = load_before
    return {
        "schema": SCHEMA_ID,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": suite,
        "argv": list(argv) if argv is not None else None,
        "seed": seed,
        "elapsed_s": time.perf_counter() - started,
        "machine": info,
        "peak": peaks,
        "contenders": contenders,
        "cases": records,
    }
