"""The dashboard where pyspark is not installed (the app image): starting a backtest fails at
once with what to do instead, and leaves nothing behind. Run in a fresh interpreter in which
``import pyspark`` finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fraudstream.testing import REPO_ROOT

CODE = """
import sys
sys.modules["pyspark"] = None  # what find_spec sees when pyspark is not installed
import pyarrow as pa
from dashboard.data import backtest as bt
try:
    bt.start_backtest(None, None, place="velocity", hours=24.0, event_times=pa.array([]),
                      parquet_dir="parquet_data", retention_seconds=600.0, verdicts_url="")
except bt.SparkUnavailable as exc:
    print(exc)
    sys.exit(0)
sys.exit("started without pyspark")
"""


def test_starting_a_backtest_without_pyspark_says_what_to_do(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CODE], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    message = done.stdout.strip()
    assert message.startswith(f"this dashboard's Python ({sys.executable}) has no pyspark")
    assert "pip install -e . and Java 17" in message
    assert "docker compose run --rm trainer python -m spark_job.backtest" in message
    assert list(tmp_path.iterdir()) == [], "no backtest folder is made"
