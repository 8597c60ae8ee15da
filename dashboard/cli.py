"""``python -m dashboard``: check the settings, then replace this process with
``python -m streamlit run dashboard/app.py``.

Settings flags are validated here, so a bad value exits 2 with a one-line message before a
server starts; the app then reads the same flags from ``FRAUDSTREAM_DASHBOARD_ARGS`` (Streamlit
runs the app script in-process, where ``sys.argv`` is not ours to parse). Streamlit's own
settings stay Streamlit's: ``dashboard/.streamlit/config.toml`` holds our defaults (bind
127.0.0.1:8501, headless, static files for the map), and ``STREAMLIT_SERVER_PORT`` /
``STREAMLIT_SERVER_ADDRESS`` and any other ``STREAMLIT_*`` variable override them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fraudstream.settings import DashboardSettings, load_settings, run_entry_point

__all__ = [
    "ARGS_ENV",
    "main",
    "streamlit_command",
]

ARGS_ENV = "FRAUDSTREAM_DASHBOARD_ARGS"
APP = Path(__file__).resolve().with_name("app.py")


def streamlit_command() -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP)]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        load_settings(DashboardSettings, args)
        command = streamlit_command()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command[0], command, {**os.environ, ARGS_ENV: json.dumps(args)})
        return 0  # not reached: execve replaces the process

    run_entry_point(DashboardSettings.PROG, run)
