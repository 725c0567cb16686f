"""The ``hydraulis`` command line: profile, plan, simulate, calibrate, demo.

The top floor of the project. It composes the library packages (``balancer``,
``dataloader``, ``strategies``, ``strategies.runtime``) into commands, plots and the demo;
nothing imports it. The entry point is :func:`hydraulis.cli.main`.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .cli import main as _main

    return _main(argv)
