"""Subcommands of the ``hydraulis`` CLI, one module each.

Every module has ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules import only the standard library at import time; numpy, torch, matplotlib and
the planner are imported inside ``run``, so ``hydraulis --help`` stays fast.
"""

from __future__ import annotations

COMMANDS: dict[str, str] = {
    "profile": "hydraulis.commands.profile",
    "plan": "hydraulis.commands.plan",
    "simulate": "hydraulis.commands.simulate",
    "calibrate": "hydraulis.commands.calibrate",
    "measure": "hydraulis.commands.measure",
    "demo": "hydraulis.commands.demo",
}
"""Subcommand name → module, in the order ``--help`` lists them."""

__all__ = ["COMMANDS"]
