#!/usr/bin/env python3
"""Leak check: 20,000 calls (or --calls N) of every kernel in the hardening registry, printing
resident memory before and after each kernel's calls and the growth of traced allocations.

    PYTHONPATH=python python tools/leak_check.py [--calls 20000]

Exits 1 if any kernel's RSS grows by more than --limit-mib (default 4 MiB).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.hardening.leaks import rss_bytes, run_all  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--limit-mib", type=float, default=4.0)
    ap.add_argument("--errors", action="store_true", help="also calls that raise TypeError (the error path)")
    args = ap.parse_args()
    start_rss, t0 = rss_bytes(), time.time()
    print(f"{'kernel':46s} {'RSS before':>11s} {'RSS after':>11s} {'growth':>9s} {'traced':>9s}  ({args.calls} calls each)")
    bad = []
    for name, before, after, traced in run_all(args.calls, args.errors):
        growth = after - before
        print(f"{name:46s} {before / 2**20:9.1f} M {after / 2**20:9.1f} M {growth / 2**10:7.0f} K {traced / 2**10:7.0f} K")
        if growth > args.limit_mib * 2**20:
            bad.append(name)
    print(f"process RSS {start_rss / 2**20:.1f} MiB -> {rss_bytes() / 2**20:.1f} MiB; {time.time() - t0:.1f} s")
    if bad:
        print("grew beyond the limit:", ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
