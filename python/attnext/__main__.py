"""The ``attnext`` console command (also ``python -m attnext``)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import attnext

    info = attnext.build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args) -> int:
    from .bench.cli import run

    return run(args, args.argv, allow_reexec=args.allow_reexec)


def _demo(args) -> int:
    from .demo import run

    return run(out=args.out, show_steps=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnext", description="attnext: attention kernels for the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print how this build was made (SIMD, OpenMP, Eigen, compiler)")
    info.set_defaults(run=_info)
    from .bench.cli import add_arguments

    bench = sub.add_parser("bench", help="benchmark attnext against PyTorch and the NumPy reference",
                           description="Times attnext, PyTorch (CPU, when importable) and the NumPy reference on "
                                       "the same inputs with the same thread count; see docs/benchmarks.md.")
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="attention step by step on a small sentence, with heatmaps",
                          description="Shows the three steps of attention on a small sentence, then Luong attention "
                                      "in an RNN encoder-decoder; writes heatmap PNGs when matplotlib is installed.")
    demo.add_argument("--out", metavar="DIR", default="attnext-demo", help="where the PNGs go (default attnext-demo)")
    demo.add_argument("--quiet", action="store_true", help="print nothing (the PNGs are still written)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    allow_reexec = argv is None  # only a real command line may restart itself (see bench --threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv, args.allow_reexec = argv[1:], allow_reexec
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
