"""``python -m producer``: parse settings (defaults < YAML < env < flags) and run."""

from __future__ import annotations

from collections.abc import Sequence

from fraudstream.logs import setup_logging
from fraudstream.settings import ProducerSettings, load_settings, run_entry_point

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, _ = load_settings(ProducerSettings, argv)
        setup_logging("producer")
        from producer.app import run as run_producer  # after validation: --help stays fast

        return run_producer(settings)

    run_entry_point(ProducerSettings.PROG, run)
