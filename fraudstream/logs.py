"""One logging format for every service: timestamp, level, service name, message."""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging"]


def setup_logging(service: str, level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)-5s {service} %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
