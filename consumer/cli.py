"""``python -m consumer``: parse settings (defaults < YAML < env < flags) and tail alerts."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from consumer.render import use_color
from fraudstream.logs import setup_logging
from fraudstream.settings import ConsumerSettings, load_settings, run_entry_point


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, _ = load_settings(ConsumerSettings, argv)
        setup_logging("consumer")
        from consumer.app import run as run_consumer  # after validation: --help stays fast

        color = use_color(settings.color, isatty=sys.stdout.isatty(), environ=os.environ)
        return run_consumer(settings, color=color)

    run_entry_point(ConsumerSettings.PROG, run)
