"""The ``hydraulis`` command line.

    hydraulis profile DATA [--tokenizer tokenizer.json] [--model llama-7b]
    hydraulis plan     --profile P --cluster 8xH100 --model llama-7b
    hydraulis simulate --profile P --cluster 8xH100 --model llama-7b
    hydraulis calibrate --model tiny --out cost_model.json
    hydraulis demo

Each subcommand lives in :mod:`hydraulis.commands` and imports its heavy dependencies only
when it runs, so ``hydraulis --help`` starts fast. A user error (missing file, wrong
column, bad config key...) prints one line, ``hydraulis: error: <what and how to fix>``,
to stderr and exits with 1; ``--debug`` (or ``HYDRAULIS_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from typing import Sequence

from .commands import COMMANDS

__all__ = ["main", "build_parser"]

_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, KeyError)
"""Exceptions that mean bad input or environment (ValueError covers ConfigError, CliError,
pyarrow's ArrowInvalid, JSON and TOML decode errors); anything else is a bug: traceback."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hydraulis")
    except PackageNotFoundError:  # running from a source tree without install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraulis",
        description="Sequence-balancing data middleware for variable-length Transformer training. "
        "Start with `hydraulis demo`.",
        epilog="Run `hydraulis COMMAND --help` for a command's options; docs/cli.md has them all.",
    )
    parser.add_argument("--version", action="version", version=f"hydraulis {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (the top-level one for ``None``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]  # type: ignore[no-any-return]
    return parser


def _unknown_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """``unrecognized arguments: …``, with the nearest option of ``parser`` for each mistyped one."""
    options = [s for s in parser._option_string_actions if s.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            near = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
            if near:
                hints.append(f"{extra.split('=', 1)[0]} → did you mean {near[0]}?")
    text = f"unrecognized arguments: {' '.join(extras)}"
    return text + (f" ({'; '.join(hints)})" if hints else f" (see `{parser.prog} --help`)")


def _check_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A mistyped subcommand: argparse's 'invalid choice', plus the nearest command."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        near = difflib.get_close_matches(first, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"; did you mean `hydraulis {near[0]}`?" if near else ""
        parser.error(f"unknown command {first!r}{hint} (commands: {', '.join(COMMANDS)})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)) and getattr(e, "filename", None):
        text = f"{e.strerror or type(e).__name__}: {e.filename!r}"
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_command(parser, argv)
    args, extras = parser.parse_known_args(argv)
    if extras:  # report against the subcommand, with its usage and the nearest option
        sub = _subparser(parser, args.command)
        sub.error(_unknown_message(sub, extras))
    if args.command is None:
        parser.print_help()
        return 0
    debug = bool(getattr(args, "debug", False)) or os.environ.get("HYDRAULIS_DEBUG", "") not in ("", "0")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("hydraulis: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hydraulis ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"hydraulis: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
