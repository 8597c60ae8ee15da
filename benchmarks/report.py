"""What every benchmark report holds and how it is run: machine facts, versions, the
commit measured, result files (``benchmarks/results/<name>-latest.json``), result tables, and
the shared command-line flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Seed of every generated data set unless --seed says otherwise (same seed, same bytes).
DEFAULT_SEED = 20261122
#: Interpreter that has quixstreams (it pins confluent-kafka < 2.13, so it may live in its own
#: virtualenv); the default is the running one.
QUIX_PYTHON_ENV = "QUIX_PYTHON"


# --- machine facts and versions ---------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _mem_total_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on. Load average is sampled again at the end of the run: a
    busy machine (other jobs on the same cores) makes any figure meaningless."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "ram_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _command_output(cmd: Sequence[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text or None


def java_version() -> str | None:
    java = shutil.which("java")
    if java is None and os.environ.get("JAVA_HOME"):
        java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    text = _command_output([java, "-version"]) if java else None
    return text.splitlines()[0] if text else None


def resolve_quix_python(explicit: str | None = None) -> str:
    return explicit or os.environ.get(QUIX_PYTHON_ENV) or sys.executable


def quix_versions(python: str) -> dict[str, str] | None:
    """quixstreams and confluent-kafka as seen by the interpreter that runs the Quix peer."""
    code = ("import json, quixstreams, confluent_kafka; print(json.dumps({'quixstreams': "
            "quixstreams.__version__, 'confluent_kafka': confluent_kafka.__version__, "
            "'librdkafka': confluent_kafka.libversion()[0]}))")
    try:
        done = subprocess.run([python, "-W", "ignore", "-c", code], capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(lines[-1])
    return None


def versions(quix_python: str | None = None) -> dict[str, Any]:
    import confluent_kafka

    from fraudstream.broker import tansu_binary

    tansu = None
    with contextlib.suppress(FileNotFoundError):
        tansu = _command_output([tansu_binary(), "--version"])
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "fraudstream": _package_version("fraudstream"),
        "pyspark": _package_version("pyspark"),
        "java": java_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "pyarrow": _package_version("pyarrow"),
        "pandas": _package_version("pandas"),
        "tansu": tansu,
        "quixstreams": _package_version("quixstreams"),
    }
    if quix_python is not None:
        quix = quix_versions(quix_python)
        out["quix_python"] = quix_python
        out["quix_env"] = quix
        if quix:
            out["quixstreams"] = quix["quixstreams"]
    return out


def git_revision() -> dict[str, Any]:
    """The commit measured, and whether the detector had uncommitted changes (read-only git)."""
    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                             "spark_job", "fraudstream", "producer"])
    return {"commit": commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None,
            "uncommitted_changes": sorted(dirty.splitlines()) if dirty else []}


# --- results ----------------------------------------------------------------------------------


def write_results(name: str, payload: Mapping[str, Any], results_dir: Path,
                  variant: str | None = None) -> Path:
    """``<name>-latest.json``, replacing the previous run's (earlier runs live in git history;
    the payload names its commit, machine and start time); ``<name>-<variant>-latest.json``
    for a named variant of the workload, beside the default run's."""
    results_dir.mkdir(parents=True, exist_ok=True)
    latest = results_dir / f"{name}{f'-{variant}' if variant else ''}-latest.json"
    latest.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n",
                      encoding="utf-8")
    return latest


def read_latest(name: str, results_dir: Path) -> dict[str, Any] | None:
    path = results_dir / f"{name}-latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class Report:
    """Collects one benchmark's JSON payload: the machine before/after, versions, settings."""

    def __init__(self, name: str, args: argparse.Namespace, settings: Mapping[str, Any],
                 quix_python: str | None = None) -> None:
        self.name = name
        self.args = args
        self.started = utc_now()
        self.payload: dict[str, Any] = {
            "benchmark": name,
            "variant": args.variant,
            "quick": bool(args.quick),
            "started_at": self.started.isoformat(),
            "command": [sys.executable, "-m", f"benchmarks.{name}", *sys.argv[1:]],
            "machine": {**machine_facts(), "load_average_before": load_average()},
            "versions": versions(quix_python),
            "git": git_revision(),
            "settings": dict(settings),
        }

    def finish(self, **sections: Any) -> Path:
        self.payload.update(sections)
        self.payload["machine"]["load_average_after"] = load_average()
        self.payload["finished_at"] = utc_now().isoformat()
        self.payload["elapsed_seconds"] = round((utc_now() - self.started).total_seconds(), 1)
        return write_results(self.name, self.payload, Path(self.args.results_dir),
                             self.args.variant)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
              for r in body]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks the harness works, measures nothing")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                        help="where the JSON results go (default: benchmarks/results)")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder for checkpoints, Parquet and logs (default: a "
                             "temporary folder, removed at the end unless --keep-work)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions of the transactions topic")
    parser.add_argument("--variant", type=variant_name, default=None, metavar="NAME",
                        help="names a non-default workload (e.g. an alert storm): the result "
                             "goes to <benchmark>-NAME-latest.json and leaves the default "
                             "run's file alone")
    return parser


def variant_name(value: str) -> str:
    """A variant becomes part of a file name: lower-case letters, digits and dashes only."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: use lower-case letters, digits and dashes (e.g. alert-storm)")
    return value


def add_detector_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m spark_job (repeatable), e.g. "
                             "--detector-arg=--shuffle-partitions=4")


@contextlib.contextmanager
def work_dir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    if args.work_dir:
        path = Path(args.work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=f"fraudstream-bench-{name}-"))
    try:
        yield path
    finally:
        if args.keep_work:
            print(f"work folder kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the result table."""
    print(f"[{utc_now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)
