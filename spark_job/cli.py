"""Entry point of ``python -m spark_job`` (console script ``fraudstream-detector``)."""

from __future__ import annotations

import logging
import sys

from fraudstream.logs import setup_logging
from fraudstream.settings import DetectorSettings, load_settings, run_entry_point

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    def run() -> int:
        settings, _ = load_settings(DetectorSettings, sys.argv[1:] if argv is None else argv)
        setup_logging("detector")
        logging.getLogger("py4j").setLevel(logging.WARNING)
        from spark_job.app import (
            run as run_detector,  # Spark imports only after --help/config checks
        )

        return run_detector(settings)

    run_entry_point(DetectorSettings.PROG, run)
