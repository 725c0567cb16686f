"""The ``hydraulis`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hydraulis")
    except PackageNotFoundError:  # running from a source tree without install
        ver = "unknown"
    parser = argparse.ArgumentParser(
        prog="hydraulis",
        description="Sequence-balancing data middleware for variable-length Transformer training.",
    )
    parser.add_argument("--version", action="version", version=f"hydraulis {ver}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
