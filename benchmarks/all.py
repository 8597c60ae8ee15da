"""Run every benchmark in sequence: throughput, latency, memory, rule change, then the Quix
Streams peer (last, so it compares itself with the throughput and latency results just written).

Each one runs in its own process, one after the other (never two at once: they would share the
two cores and measure each other).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.report import DEFAULT_RESULTS_DIR, say
from fraudstream.testing import REPO_ROOT, child_env

__all__ = ["main"]

ORDER = ("throughput", "cluster", "latency", "memory", "rule_change", "quix_peer")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for every benchmark")
    parser.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER))
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    parser.add_argument("--quix-python", default=None,
                        help="interpreter with quixstreams for the peer [QUIX_PYTHON]")
    args = parser.parse_args(argv)
    codes: dict[str, int] = {}
    for name in ORDER:
        if name not in args.only:
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", f"--results-dir={args.results_dir}"]
        if args.quick:
            cmd.append("--quick")
        if name == "quix_peer" and args.quix_python:
            cmd.append(f"--quix-python={args.quix_python}")
        say(f"=== {name}: {' '.join(cmd[1:])}")
        started = time.monotonic()
        codes[name] = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), check=False).returncode
        say(f"=== {name}: exit {codes[name]} after {time.monotonic() - started:.0f} s")
    print("\n".join(f"{name}: exit {code}" for name, code in codes.items()))
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
