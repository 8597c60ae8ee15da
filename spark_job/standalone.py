"""A Spark standalone cluster from the installed pyspark: a master and workers as plain processes.

The pyspark wheel carries Spark's launcher (``bin/spark-class``) and every jar a standalone
master and worker need, so a real cluster runs without Docker or a Spark download::

    python -m spark_job.standalone master                   # spark://127.0.0.1:7077, UI on :8080
    python -m spark_job.standalone worker                   # one per process; 1 core, 1g each
    python -m spark_job.standalone status                   # alive workers, as the master sees
    SPARK_MASTER=spark://127.0.0.1:7077 python -m spark_job # the detector, on the cluster

``./setup.sh --local --cluster`` starts exactly this: a master, two workers and the detector
joined to them, each supervised. What changes against ``local[2]``: the driver (the detector's
own process: sources' planning, foreachBatch and the sinks) and each executor are separate JVMs,
the executors' Python workers run the data source and the state step, and shuffle data and
state store files move between processes. The checkpoint must be on storage every executor
reads (one host here, so any local path).

When a worker dies, its executor exits with it (it watches its worker) and the driver reruns the
lost tasks on the executors left: a stateful task reloads its state from the checkpoint, so the
alerts stay exactly those of one run (``tests/integration/test_standalone_cluster.py``).

Each program runs Spark's launcher as its child and passes SIGTERM/SIGINT on, so a supervisor that
stops ``python -m spark_job.standalone`` stops the JVM cleanly; both are in one process group.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fraudstream.broker import free_port
from fraudstream.logs import setup_logging
from fraudstream.settings import ClusterSettings, load_settings, run_entry_point
from fraudstream.testing import child_env, end_group, start_process, wait_for

__all__ = [
    "MASTER_CLASS",
    "WORKER_CLASS",
    "StandaloneCluster",
    "alive_workers",
    "driver_api",
    "launch_env",
    "main",
    "master_command",
    "spark_home",
    "worker_command",
]

log = logging.getLogger(__name__)

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
ROLES = ("master", "worker", "status")


def spark_home() -> Path:
    """The pyspark package folder: Spark's ``bin/``, ``jars/`` and ``conf`` defaults live there."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise RuntimeError("pyspark is not installed in this Python (pip install -e .)")
    return Path(spec.origin).parent


def master_command(settings: ClusterSettings) -> list[str]:
    return [str(spark_home() / "bin" / "spark-class"), MASTER_CLASS,
            "--host", settings.host, "--port", str(settings.master_port),
            "--webui-port", str(settings.master_webui_port)]


def worker_command(settings: ClusterSettings) -> list[str]:
    return [str(spark_home() / "bin" / "spark-class"), WORKER_CLASS, settings.master_url,
            "--host", settings.host, "--port", str(settings.worker_port),
            "--cores", str(settings.worker_cores),
            "--memory", settings.worker_memory.strip(),
            "--webui-port", str(settings.worker_webui_port),
            "--work-dir", str(settings.work_dir.resolve())]


def launch_env(settings: ClusterSettings, base: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """The environment of a master or worker JVM: this pyspark as SPARK_HOME, the cluster's
    address for every socket, this interpreter for the executors' Python workers."""
    env = dict(os.environ if base is None else base)
    env.update({
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": settings.host,
        "SPARK_DAEMON_MEMORY": settings.daemon_memory.strip(),
        "PYSPARK_PYTHON": env.get("PYSPARK_PYTHON", sys.executable),
    })
    return env


def alive_workers(master_webui: str, timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """The workers the master counts as alive (its ``/json/`` state), or None when the master
    does not answer."""
    state = _get_json(f"{master_webui.rstrip('/')}/json/", timeout)
    if state is None:
        return None
    return [worker for worker in state.get("workers", []) if worker.get("state") == "ALIVE"]


def _get_json(url: str, timeout: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.load(reply)
    except (OSError, urllib.error.URLError, ValueError):
        return None


def driver_api(driver_ui: str, app_id: str, path: str) -> Any:
    """One answer of the driver's REST API (``/api/v1/applications/APP/PATH``), None when the
    driver does not answer."""
    return _get_json(f"{driver_ui.rstrip('/')}/api/v1/applications/{app_id}/{path}", timeout=1.0)


class StandaloneCluster:
    """A master and ``workers`` workers on this host, each in its own process group, for tests
    and benchmarks: ``with StandaloneCluster(work, workers=2) as cluster: ... cluster.url``.

    Ports are free ones picked at start, so several clusters (and a ``./setup.sh --cluster``
    one) can share a host. ``kill_worker(i)`` is a node loss: SIGKILL to the worker's whole
    process group, its executor JVM and Python workers included."""

    def __init__(self, work: Path, workers: int = 2, *, cores: int = 1, memory: str = "1g",
                 host: str = "127.0.0.1", ready_timeout: float = 120.0) -> None:
        self.work = work
        self.settings = ClusterSettings(
            host=host, master_port=free_port(host), master_webui_port=free_port(host),
            worker_cores=cores, worker_memory=memory, work_dir=work / "spark-work")
        self.worker_count = workers
        self.ready_timeout = ready_timeout
        self.master: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_ports: list[int] = []

    @property
    def url(self) -> str:
        return self.settings.master_url

    @property
    def webui(self) -> str:
        return f"http://{self.settings.host}:{self.settings.master_webui_port}"

    def log_path(self, name: str) -> Path:
        return self.work / f"spark-{name}.log"

    def _start(self, role: str, name: str, *flags: str) -> subprocess.Popen[bytes]:
        settings = self.settings
        flags = (f"--host={settings.host}", f"--master-port={settings.master_port}",
                 f"--master-webui-port={settings.master_webui_port}",
                 f"--worker-cores={settings.worker_cores}",
                 f"--worker-memory={settings.worker_memory}", f"--work-dir={settings.work_dir}",
                 *flags)
        return start_process([sys.executable, "-m", "spark_job.standalone", role, *flags],
                             self.log_path(name), child_env())

    def start(self) -> StandaloneCluster:
        self.master = self._start("master", "master")
        for number in range(1, self.worker_count + 1):
            port = free_port(self.settings.host)
            self.worker_ports.append(port)
            self.workers.append(self._start("worker", f"worker-{number}", f"--worker-port={port}"))
        self.wait_for_workers(self.worker_count)
        return self

    def wait_for_workers(self, count: int) -> None:
        """Until the master counts ``count`` alive workers."""
        wait_for(lambda: len(alive_workers(self.webui) or []) == count, self.ready_timeout,
                 f"{count} alive workers at {self.webui}",
                 alive=lambda: self.master is not None and self.master.poll() is None)

    def worker_of_executor(self, app_id: str, executor_id: str) -> int | None:
        """Index of the worker that runs executor ``executor_id`` of ``app_id`` (each worker's
        own ``/json/`` lists its executors; its id ends in its port)."""
        for worker in alive_workers(self.webui) or []:
            state = _get_json(f"{worker['webuiaddress']}/json/") or {}
            for executor in state.get("executors", []):
                if executor.get("appid") == app_id and str(executor.get("id")) == executor_id:
                    port = int(str(worker["id"]).rsplit("-", 1)[-1])
                    return self.worker_ports.index(port) if port in self.worker_ports else None
        return None

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` (0-based) with its executor: a lost node."""
        worker = self.workers[index]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)

    def stop(self) -> None:
        for process in [*self.workers, *([self.master] if self.master else [])]:
            end_group(process.pid, grace=10)
            if process.poll() is None:
                process.wait(10)

    def __enter__(self) -> StandaloneCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _add_role(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=ROLES,
                        help="master or worker: run that process of the cluster in the "
                             "foreground; status: say whether the master answers and how many "
                             "workers it counts alive")


def run_jvm(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run Spark's launcher as this process's child until it ends; SIGTERM/SIGINT are passed
    on (the JVM shuts down cleanly), so a supervisor stopping us stops Spark. 0 after a
    requested stop."""
    child = subprocess.Popen(list(command), env=dict(env))
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    return 0 if stopping else code


def status(settings: ClusterSettings) -> int:
    workers = alive_workers(f"http://{settings.host}:{settings.master_webui_port}")
    if workers is None:
        print(f"Spark master {settings.master_url}: not answering (UI port "
              f"{settings.master_webui_port})")
        return 1
    cores = sum(int(worker.get("cores", 0)) for worker in workers)
    print(f"Spark master {settings.master_url}: {len(workers)} alive worker(s), {cores} core(s) "
          f"(UI http://{settings.host}:{settings.master_webui_port})")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m spark_job.standalone master|worker|status``."""

    def run() -> int:
        settings, namespace = load_settings(
            ClusterSettings, sys.argv[1:] if argv is None else argv, extra_args=_add_role)
        if namespace.role == "status":
            return status(settings)
        setup_logging("standalone")
        if namespace.role == "master":
            command = master_command(settings)
        else:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
            command = worker_command(settings)
        log.info("%s of %s: %s", namespace.role, settings.master_url, " ".join(command))
        return run_jvm(command, launch_env(settings))

    run_entry_point(ClusterSettings.PROG, run)


if __name__ == "__main__":
    main()
