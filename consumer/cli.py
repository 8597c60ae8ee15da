"""``python -m consumer``: parse settings (defaults < YAML < env < flags) and tail alerts, or run
one of the verdict commands (``--verdict``, ``--verdict-history``, ``--republish-verdicts``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Final

from consumer.render import use_color
from fraudstream.logs import setup_logging
from fraudstream.settings import ConsumerSettings, load_settings, run_entry_point
from fraudstream.verdicts.model import VERDICTS

__all__ = ["ANALYST_ENV", "main"]

#: Who gives a verdict when --analyst is not given (the same variable the rules CLI reads).
ANALYST_ENV: Final = "FRAUDSTREAM_ANALYST"


def add_verdict_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the verdict commands (not settings: they say what to do, not how)."""
    group = parser.add_argument_group(
        "verdicts", "Analysts' verdicts on alerts, kept in the database of VERDICTS_URL (the "
        "source of truth, with every change) and published to the verdicts topic.")
    actions = group.add_mutually_exclusive_group()
    actions.add_argument("--show-verdicts", action="store_true", default=False,
                         help="end each alert's line with its current verdict and analyst")
    actions.add_argument("--verdict", nargs=2, metavar=("ALERT_ID", "WORD"), default=None,
                         help=f"record a verdict ({', '.join(VERDICTS)}) on an alert and "
                              "publish it")
    actions.add_argument("--verdict-history", metavar="ALERT_ID", default=None,
                         help="print every verdict given on an alert, oldest first")
    actions.add_argument("--republish-verdicts", action="store_true", default=False,
                         help="publish every recorded verdict to the verdicts topic again")
    group.add_argument("--note", metavar="TEXT", default=None,
                       help="with --verdict: why (kept with the verdict)")
    group.add_argument("--analyst", metavar="NAME", default=None,
                       help=f"with --verdict: who decides (default: ${ANALYST_ENV}, else the "
                            "login name)")


def wants_verdict_command(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a verdict command instead of tailing alerts."""
    return bool(args.verdict or args.verdict_history or args.republish_verdicts
                or args.note is not None or args.analyst is not None)


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, args = load_settings(ConsumerSettings, argv, extra_args=add_verdict_flags)
        if wants_verdict_command(args):
            # Quiet by default: what goes wrong is one line; LOG_LEVEL=INFO shows more.
            setup_logging("consumer", level=os.environ.get("LOG_LEVEL", "CRITICAL"))
            from consumer.verdicts import run_verdict_command  # SQLAlchemy only when needed

            return run_verdict_command(settings, args, os.environ)
        setup_logging("consumer")
        from consumer.app import run as run_consumer  # after validation: --help stays fast

        store = None
        if args.show_verdicts:
            from consumer.verdicts import open_store

            store = open_store(settings)
            if store is None:
                return 1
        color = use_color(settings.color, isatty=sys.stdout.isatty(), environ=os.environ)
        try:
            return run_consumer(settings, color=color, verdicts=store)
        finally:
            if store is not None:
                store.close()

    run_entry_point(ConsumerSettings.PROG, run)
