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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnext", description="attnext: attention kernels for the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print how this build was made (SIMD, OpenMP, Eigen, compiler)")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
