"""``attnext bench``: argument parsing and the run / render / compare commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

REEXEC_MARK = "ATTNEXT_BENCH_REEXEC"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("quick", "full", "tiny"), default="full",
                   help="quick (under a minute on 2 cores) or full (the default, under 10 minutes); "
                        "tiny is for tests")
    p.add_argument("--case", action="append", metavar="NAME", dest="cases",
                   help="run only the cases of the suite matching NAME (a glob such as 'sdpa-*'); repeatable")
    p.add_argument("--list", action="store_true", help="list the suite's cases and exit")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for every contender: attnext, PyTorch and NumPy's BLAS (default: all available "
                        "cores)")
    p.add_argument("--json", metavar="PATH", help="write the results document (schema: attnext bench --schema)")
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per case and contender")
    p.add_argument("--markdown", metavar="PATH", help="write the README results table ('-' = stdout)")
    p.add_argument("--plot", metavar="PATH.png", help="write a chart of attnext's speedups (needs matplotlib)")
    p.add_argument("--from", dest="from_json", metavar="RESULTS.json",
                   help="render a saved run (table, --csv, --markdown, --plot) instead of running")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print each case's change from A to B")
    p.add_argument("--fail-slower", type=float, metavar="PCT",
                   help="with --compare: exit 1 when an attnext case is more than PCT percent slower in B")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of the results and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--max-reference-mb", type=float, default=1024.0, metavar="MB",
                   help="skip the NumPy reference where it would build a dense tensor larger than this "
                        "(default 1024)")
    p.add_argument("--no-probe", action="store_true", help="skip the GEMM/bandwidth probes (no %% of peak)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _blas_threads_need_env(n: int) -> bool:
    """True when NumPy's BLAS would not use n threads and only the environment can change that
    (threadpoolctl is not installed)."""
    try:
        import threadpoolctl  # noqa: F401
        return False
    except ImportError:
        pass
    from . import machine

    current = machine.env_blas_threads() or machine.available_cores()
    return current != n


def _reexec_with_threads(n: int, argv) -> None:
    """BLAS reads its thread count when it loads, which has happened by now: run again with it set."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(n)
    env[REEXEC_MARK] = "1"
    print(f"attnext bench: restarting with OPENBLAS_NUM_THREADS={n} (install threadpoolctl to avoid this)",
          file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "attnext", "bench", *argv], env)


def run(args, argv=(), allow_reexec: bool = False) -> int:
    from . import report
    from .schema import SCHEMA

    if args.schema:
        print(json.dumps(SCHEMA, indent=1))
        return 0
    if args.compare:
        a, b = (report.load(p) for p in args.compare)
        text, rows = report.compare(a, b, names=("A", "B"))
        print(text)
        if args.fail_slower is not None:
            worst = [r for r in rows if r[1] == "attnext" and 100 * r[4] > args.fail_slower]
            return 1 if worst else 0
        return 0
    if args.list:
        from .cases import select

        for case in select(args.suite, args.cases):
            print(f"{case.name:<34} {case.description}")
        return 0
    if args.from_json:
        doc = report.load(args.from_json)
    else:
        if args.threads is not None and args.threads < 1:
            print("attnext bench: --threads must be at least 1", file=sys.stderr)
            return 2
        if (allow_reexec and args.threads and os.environ.get(REEXEC_MARK) != "1"
                and _blas_threads_need_env(args.threads)):
            _reexec_with_threads(args.threads, argv)
        from .cases import select
        from .runner import run_suite

        try:
            select(args.suite, args.cases)
        except ValueError as exc:
            print(f"attnext bench: {exc}", file=sys.stderr)
            return 2
        doc = run_suite(args.suite, args.cases, args.threads, seed=args.seed, progress=not args.quiet,
                        max_reference_mb=args.max_reference_mb, probe=not args.no_probe, argv=list(argv))
    print(report.table(doc))
    if args.json and not args.from_json:
        report.save_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        report.save_csv(doc, args.csv)
        print(f"wrote {args.csv}")
    if args.markdown:
        text = report.markdown(doc)
        if args.markdown == "-":
            print(text)
        else:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {args.markdown}")
    if args.plot:
        try:
            report.plot(doc, args.plot)
        except ImportError as exc:
            print(f"attnext bench: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}")
    return 0
