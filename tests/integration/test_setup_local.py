"""setup.sh / reset.sh in local mode, for real: embedded broker and producer as background
processes of a temporary copy of the repository (never the developer's run/ folder), on a free
port, with a PATH that has no docker client at all.

FRAUDSTREAM_PYTHON makes setup.sh use this interpreter instead of creating .venv, and
FRAUDSTREAM_SERVICES="broker producer" keeps Spark and Streamlit out, so the module stays fast.
The tests run in file order and share one started pipeline; the tests of a service that keeps
crashing use a second sandbox with the producer only, and the model trainer's tests a third one
with the trainer alone, on an empty Parquet history (so the real `python -m spark_job.train`
refuses every round after reading it, without starting Spark).

Every service runs under setup.sh's supervisor (`setup.sh __supervise SERVICE PYTHON`), which
leads the service's process group and restarts it when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from support.commands import path_without

from fraudstream import datasets, schemas, topics
from fraudstream.broker import free_port

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("broker", "producer")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "run", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    "parquet_data", "spark-warehouse", "metastore_db", "benchmarks", "tests", "docs",
)

pytestmark = pytest.mark.timeout(300)


class Sandbox:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env

    def run(self, script: str, *args: str, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([f"./{script}", *args], cwd=self.root, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def pid(self, service: str) -> int | None:
        path = self.root / "run" / "pids" / f"{service}.pid"
        return int(path.read_text().split()[0]) if path.exists() else None

    def supervisor(self, service: str) -> int | None:
        path = self.root / "run" / "pids" / f"{service}.supervisor.pid"
        return int(path.read_text().split()[0]) if path.exists() else None

    def log(self, service: str) -> str:
        return (self.root / "run" / "logs" / f"{service}.log").read_text()

    def status_line(self, service: str) -> str:
        result = self.run("setup.sh", "status")
        assert result.returncode == 0, result.stdout + result.stderr
        return next(line for line in result.stdout.splitlines()
                    if line.split()[:1] == [service])

    def wait_for_status(self, service: str, word: str, timeout: float = 30) -> str:
        """The service's status line once its state is ``word`` (running, crashed ...)."""
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.status_line(service)
            if line.split()[1] == word:
                return line
            time.sleep(0.3)
        raise AssertionError(f"{service} is not {word} after {timeout} s: {line}")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.env['BROKER_PORT']}"


def alive(pid: int) -> bool:
    """Running and not a zombie (a reparented service may not be reaped in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def supervisors_of(root: Path) -> list[int]:
    """Live supervisors (`bash <root>/setup.sh __supervise ...`) of the sandbox at ``root``."""
    found = []
    marker = f"{root}/setup.sh".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if marker in args and b"__supervise" in args and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(entry.name))
    return children


def processes_running_module(module: str, cwd: Path) -> list[int]:
    """Live `python -m <module>` processes whose working directory is ``cwd``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            here = Path(os.readlink(entry / "cwd"))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if b"-m" in args and module.encode() in args and here == cwd and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        remaining = [p for p in pids if alive(p)]
        if not remaining:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def make_sandbox(base: Path, services: tuple[str, ...], **extra: str) -> Sandbox:
    missing = [m for m in ("producer",) if not (REPO / m / "__main__.py").is_file()]
    if missing:
        pytest.skip(f"{missing[0]}/__main__.py does not exist yet (written separately); "
                    "setup.sh needs it to start the producer")
    root = (base / "fraudstream").resolve()
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    (root / "parquet_data").mkdir()
    (root / "parquet_data" / ".gitkeep").touch()
    drop = ("KAFKA_", "BROKER_", "FRAUDSTREAM_", "PRODUCER_", "PARQUET_DIR", "CHECKPOINT_DIR",
            "SETUP_", "ON_BROKER_RESET", "MODELS_DIR", "TRAIN_", "VERDICTS_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({
        "PATH": path_without(base / "bin", prefix="docker"),
        "FRAUDSTREAM_PYTHON": sys.executable,
        "FRAUDSTREAM_SERVICES": " ".join(services),
        "BROKER_PORT": str(free_port()),
        "PRODUCER_RATE": "20",
        "PRODUCER_SEED": "7",
        "FRAUDSTREAM_STOP_TIMEOUT": "15",
        **extra,
    })
    return Sandbox(root, env)


def kill_leftovers(box: Sandbox, services: tuple[str, ...]) -> None:
    """Last resort if stop itself was broken: the groups our PID files name, nothing else."""
    for service in services:
        for pid in (box.supervisor(service), box.pid(service)):
            if pid and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = make_sandbox(tmp_path_factory.mktemp("setup-local"), SERVICES)
    first = box.run("setup.sh")
    box.first_start = first  # type: ignore[attr-defined]
    try:
        yield box
    finally:
        box.run("setup.sh", "stop", timeout=60)
        kill_leftovers(box, SERVICES)


def test_start_picks_local_mode_without_docker_and_starts_each_service_in_its_own_group(
        sandbox: Sandbox) -> None:
    first = sandbox.first_start  # type: ignore[attr-defined]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no docker client installed: using local mode" in first.stdout
    assert "no virtualenv" in first.stdout
    assert f"KAFKA_BOOTSTRAP_SERVERS={sandbox.bootstrap} {sys.executable} -m consumer" \
        in first.stdout
    groups = set()
    for service in SERVICES:
        pid, supervisor = sandbox.pid(service), sandbox.supervisor(service)
        assert pid is not None and alive(pid), f"{service} is not running"
        assert supervisor is not None and alive(supervisor), f"{service} has no supervisor"
        # The supervisor leads a process group (and session) of its own, the service is in it.
        assert os.getpgid(supervisor) == supervisor == os.getsid(supervisor)
        assert os.getpgid(pid) == supervisor, f"{service} is not in its supervisor's group"
        groups.add(supervisor)
        assert (sandbox.root / "run" / "logs" / f"{service}.log").is_file()
    assert len(groups) == len(SERVICES) and os.getpgid(0) not in groups
    assert sandbox.pid("detector") is None and sandbox.pid("dashboard") is None


def test_status_reports_running_services_and_a_reachable_broker(sandbox: Sandbox) -> None:
    result = sandbox.run("setup.sh", "status")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    for service in SERVICES:
        assert f"running (pid {sandbox.pid(service)}, up " in lines[service], result.stdout
    assert lines["detector"].split()[1] == "stopped"
    assert f"Broker {sandbox.bootstrap} is reachable" in result.stdout


def test_running_setup_again_starts_no_duplicates(sandbox: Sandbox) -> None:
    before = {s: sandbox.pid(s) for s in SERVICES}
    again = sandbox.run("setup.sh", "--local")
    assert again.returncode == 0, again.stdout + again.stderr
    for service in SERVICES:
        assert f"{service} is already running (pid {before[service]})" in again.stdout
    assert {s: sandbox.pid(s) for s in SERVICES} == before
    assert processes_running_module("producer", sandbox.root) == [before["producer"]]
    assert processes_running_module("fraudstream.broker", sandbox.root) == [before["broker"]]


def test_setup_trainer_0_leaves_the_trainer_out(sandbox: Sandbox) -> None:
    env = {**sandbox.env, "FRAUDSTREAM_SERVICES": "broker producer trainer", "SETUP_TRAINER": "0"}
    result = subprocess.run(["./setup.sh", "--local"], cwd=sandbox.root, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "services: broker producer)" in result.stdout
    assert "SETUP_TRAINER=0: the trainer is not started" in result.stdout
    assert "broker is already running" in result.stdout
    assert sandbox.pid("trainer") is None and sandbox.supervisor("trainer") is None
    assert processes_running_module("spark_job.train", sandbox.root) == []
    line = sandbox.status_line("trainer")
    assert line.split()[1] == "stopped", line
    if (sandbox.root / "spark_job" / "train.py").is_file():
        assert "off (SETUP_TRAINER=0)" in result.stdout
        assert "stopped (SETUP_TRAINER=0; ./setup.sh train trains on demand)" in line, line


def test_transactions_reach_the_broker(sandbox: Sandbox) -> None:
    consumer = Consumer({"bootstrap.servers": sandbox.bootstrap, "group.id": "setup-test",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topics.TRANSACTIONS, timeout=10)
        partitions = metadata.topics[topics.TRANSACTIONS].partitions
        consumer.assign([TopicPartition(topics.TRANSACTIONS, p, OFFSET_BEGINNING)
                         for p in partitions])
        deadline = time.monotonic() + 30
        record = None
        while record is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                record = message
    finally:
        consumer.close()
    assert record is not None, "no transaction arrived within 30 s"
    value = json.loads(record.value())
    assert set(schemas.REQUIRED_FIELDS) <= set(value)
    assert record.key().decode() == value["user_id"]


def test_logs_command_prints_the_service_log(sandbox: Sandbox) -> None:
    result = sandbox.run("setup.sh", "logs", "broker", "--no-follow")
    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{sandbox.env['BROKER_PORT']}" in result.stdout


def test_a_service_killed_with_sigkill_is_restarted_by_its_supervisor(sandbox: Sandbox) -> None:
    old, supervisor = sandbox.pid("producer"), sandbox.supervisor("producer")
    assert old is not None and supervisor is not None
    os.kill(old, signal.SIGKILL)
    assert wait_until_gone([old]) == []
    line = sandbox.wait_for_status("producer", "running", timeout=20)
    new = sandbox.pid("producer")
    assert new is not None and new != old and alive(new)
    assert f"running (pid {new}, up " in line and "restarts: 1" in line, line
    assert sandbox.supervisor("producer") == supervisor and os.getpgid(new) == supervisor
    assert "setup.sh: producer exited with code 137; restart 1 of 5 in 1 s" \
        in sandbox.log("producer")
    assert processes_running_module("producer", sandbox.root) == [new]


def test_a_restarted_broker_ends_its_old_tansu_and_serves_the_topics_again(
        sandbox: Sandbox) -> None:
    """SIGKILL leaves tansu (its own session) running on the port: the supervisor ends it, so
    the new broker can listen there, with its topics created afresh."""
    old = sandbox.pid("broker")
    assert old is not None
    tansu = [p for p in processes_children(old) if alive(p)]
    assert tansu, "the broker runs no child process"
    os.kill(old, signal.SIGKILL)
    sandbox.wait_for_status("broker", "running", timeout=30)
    new = sandbox.pid("broker")
    assert new is not None and new != old
    assert wait_until_gone(tansu, timeout=10) == []
    log = sandbox.log("broker")
    assert "setup.sh: broker exited with code 137; restart 1 of 5 in 1 s" in log
    assert "setup.sh: ending what broker left running" in log
    consumer = Consumer({"bootstrap.servers": sandbox.bootstrap, "group.id": "setup-test"})
    try:
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while time.monotonic() < deadline and topics.TRANSACTIONS not in names:
            names = set(consumer.list_topics(timeout=5).topics)
            time.sleep(0.2)
    finally:
        consumer.close()
    assert {topics.TRANSACTIONS, topics.ALERTS, topics.DLQ} <= names


def test_killing_a_whole_group_shows_as_crashed_and_setup_starts_it_again(
        sandbox: Sandbox) -> None:
    old, supervisor = sandbox.pid("producer"), sandbox.supervisor("producer")
    assert old is not None and supervisor is not None
    os.killpg(supervisor, signal.SIGKILL)  # the supervisor too: nobody restarts it
    assert wait_until_gone([old, supervisor]) == []
    producer_line = sandbox.status_line("producer")
    assert "crashed" in producer_line, producer_line
    restarted = sandbox.run("setup.sh", "--local")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    new = sandbox.pid("producer")
    assert new is not None and new != old and alive(new)
    assert "broker is already running" in restarted.stdout


def test_stop_ends_every_process_group(sandbox: Sandbox) -> None:
    pids = [sandbox.pid(s) for s in SERVICES] + [sandbox.supervisor(s) for s in SERVICES]
    assert all(pids)
    exits = {s: sandbox.log(s).count("exited with code") for s in SERVICES}
    result = sandbox.run("setup.sh", "stop", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until_gone([p for p in pids if p]) == []
    assert not list((sandbox.root / "run" / "pids").iterdir())
    assert processes_running_module("fraudstream.broker", sandbox.root) == []
    assert processes_running_module("producer", sandbox.root) == []
    assert supervisors_of(sandbox.root) == []
    time.sleep(1.5)  # a supervisor that (wrongly) restarted would have logged by now
    assert {s: sandbox.log(s).count("exited with code") for s in SERVICES} == exits
    assert processes_running_module("producer", sandbox.root) == []
    status = sandbox.run("setup.sh", "status")
    assert f"Broker {sandbox.bootstrap} is not reachable" in status.stdout


def test_reset_stops_services_and_deletes_only_generated_state(sandbox: Sandbox) -> None:
    started = sandbox.run("setup.sh", "--local")
    assert started.returncode == 0, started.stdout + started.stderr
    pids = [sandbox.pid(s) for s in SERVICES]
    (sandbox.root / "run" / "checkpoint" / "offsets").mkdir(parents=True)
    alerts = sandbox.root / "parquet_data" / "alerts"
    alerts.mkdir()
    (alerts / "part-0.parquet").write_bytes(b"PAR1")
    (sandbox.root / "parquet_data" / "_metrics.jsonl").write_text("{}\n")
    version = sandbox.root / "models" / "20261202T061500Z"
    version.mkdir(parents=True)
    (version / "model.json").write_text("{}")
    mine = sandbox.root / "my-notes.txt"
    mine.write_text("keep me")

    result = sandbox.run("reset.sh", "--yes", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until_gone([p for p in pids if p]) == []
    assert not (sandbox.root / "run").exists()
    assert not (sandbox.root / "models").exists()
    assert sorted(p.name for p in (sandbox.root / "parquet_data").iterdir()) == [".gitkeep"]
    assert mine.read_text() == "keep me"
    assert (sandbox.root / "setup.sh").is_file() and (sandbox.root / "fraudstream").is_dir()


# --- a service that keeps crashing (a second sandbox: the producer alone, no broker) ------------


@pytest.fixture(scope="module")
def crashing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """PRODUCER_RATE_MIN=0 is refused by the producer's settings (exit 2) before it connects
    anywhere, so the producer crashes at once on every start."""
    box = make_sandbox(tmp_path_factory.mktemp("setup-crashing"), ("producer",),
                       PRODUCER_RATE_MIN="0", SETUP_RESTART_LIMIT="2")
    try:
        yield box
    finally:
        box.run("setup.sh", "stop", timeout=60)
        kill_leftovers(box, ("producer",))


def test_a_service_that_keeps_crashing_is_crashed_after_the_restart_limit(
        crashing: Sandbox) -> None:
    started = crashing.run("setup.sh", "--local")
    assert started.returncode == 1, started.stdout + started.stderr
    assert "producer exited right after starting" in started.stderr
    assert "invalid setting PRODUCER_RATE_MIN" in started.stderr
    line = crashing.wait_for_status("producer", "crashed", timeout=30)
    assert "exited with code 2 after 2 restarts in a row" in line, line
    status = crashing.run("setup.sh", "status").stdout
    assert "gave up after 2 restarts in a row (SETUP_RESTART_LIMIT=2): crashed" in status
    log = crashing.log("producer")
    assert log.count("invalid setting PRODUCER_RATE_MIN") == 3  # the start and 2 restarts
    assert "setup.sh: producer exited with code 2; restart 1 of 2 in 1 s" in log
    assert "setup.sh: producer exited with code 2; restart 2 of 2 in 2 s" in log
    assert wait_until_gone(supervisors_of(crashing.root), timeout=5) == []

    result = crashing.run("setup.sh", "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((crashing.root / "run" / "pids").iterdir())
    assert processes_running_module("producer", crashing.root) == []
    assert supervisors_of(crashing.root) == []
    assert crashing.status_line("producer").split()[1] == "stopped"


def test_stop_during_the_pause_before_a_restart_is_fast_and_restarts_nothing(
        crashing: Sandbox) -> None:
    env = {**crashing.env, "SETUP_RESTART_LIMIT": "5"}
    started = subprocess.run(["./setup.sh", "--local"], cwd=crashing.root, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60, check=False)
    assert started.returncode == 1, started.stdout + started.stderr
    # By now (3 s after the start) the supervisor waits 2 or 4 s before the next restart.
    assert crashing.status_line("producer").split()[1] in ("restarting", "running")
    supervisor = crashing.supervisor("producer")
    assert supervisor is not None and alive(supervisor)
    begun = time.monotonic()
    result = crashing.run("setup.sh", "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - begun < 5, "stop waited for the restart pause"
    assert wait_until_gone([supervisor]) == []
    starts = crashing.log("producer").count("starting producer")
    time.sleep(4.5)  # longer than the pause the supervisor was in
    assert crashing.log("producer").count("starting producer") == starts
    assert processes_running_module("producer", crashing.root) == []
    assert supervisors_of(crashing.root) == []


# --- the model trainer (a third sandbox: the trainer alone; it needs no broker) -----------------

TRAINER = ("trainer",)


def nice_of(pid: int) -> int:
    """The niceness of a process (field 19 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # fields[0] is field 3 (state)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_for_log(box: Sandbox, service: str, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        log = box.log(service)
        if text in log:
            return log
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in the {service} log after {timeout} s:\n{log[-3000:]}")


@pytest.fixture(scope="module")
def trainer_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The real trainer on the sandbox's empty parquet_data/ (the default PARQUET_DIR) and
    models/ (the default MODELS_DIR), on the default schedule (TRAIN_EVERY_HOURS=6)."""
    if not (REPO / "spark_job" / "train.py").is_file():
        pytest.skip("spark_job/train.py does not exist yet (written separately)")
    box = make_sandbox(tmp_path_factory.mktemp("setup-trainer"), TRAINER)
    try:
        yield box
    finally:
        box.run("setup.sh", "stop", timeout=60)
        kill_leftovers(box, TRAINER)


def test_the_trainer_is_supervised_niced_and_idle_between_rounds(trainer_box: Sandbox) -> None:
    started = trainer_box.run("setup.sh", "--local")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started trainer" in started.stdout
    assert "model versions in models/, every 6 h" in started.stdout
    pid, supervisor = trainer_box.pid("trainer"), trainer_box.supervisor("trainer")
    assert pid is not None and alive(pid) and supervisor is not None and alive(supervisor)
    assert os.getpgid(supervisor) == supervisor == os.getsid(supervisor)
    assert os.getpgid(pid) == supervisor
    assert nice_of(pid) == 10, "the trainer runs at SETUP_TRAINER_NICE=10"
    assert processes_running_module("spark_job.train", trainer_box.root) == [pid]
    # The first round reads the (empty) history, saves nothing and waits for the next one.
    log = wait_for_log(trainer_box, "trainer", "saved no model")
    assert "starting trainer (nice -n 10 " in log and " -m spark_job.train)" in log
    time.sleep(1)
    before = cpu_ticks(pid)
    time.sleep(3)
    assert cpu_ticks(pid) - before <= 5, "the trainer burns CPU between rounds"
    assert trainer_box.pid("trainer") == pid and alive(pid)

    status = trainer_box.run("setup.sh", "status")
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.split()[:1] == ["trainer"])
    assert f"running (pid {pid}, up " in line, status.stdout
    assert "Model: none in models/ (the detector runs on rules alone; ./setup.sh train " \
           "trains one now)" in status.stdout.splitlines()


def test_status_shows_the_newest_model_version(trainer_box: Sandbox) -> None:
    models = trainer_box.root / "models"
    for name in ("20261202T061500Z", "20261202T120000Z"):
        (models / name).mkdir(parents=True)
        (models / name / "model.json").write_text("{}")
    (models / ".20261202T180000Z.tmp").mkdir()  # a version being written: not a version yet
    try:
        status = trainer_box.run("setup.sh", "status").stdout
        assert "Model: 20261202T120000Z, the newest of 2 version folder(s) in models/" \
            in status.splitlines(), status
    finally:
        shutil.rmtree(models)


def test_setup_train_trains_once_in_the_foreground_with_its_exit_code(
        trainer_box: Sandbox) -> None:
    """The empty history makes the real trainer refuse: exit code 2, reported as such."""
    result = trainer_box.run("setup.sh", "train", timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "training once now: python -m spark_job.train (PARQUET_DIR=parquet_data, " \
           "MODELS_DIR=models, nice 10)" in result.stdout
    assert f"the trainer service (pid {trainer_box.pid('trainer')}) keeps its own schedule" \
        in result.stdout
    assert "python -m spark_job.train: " in out, "the trainer's own progress is shown"
    assert "python -m spark_job.train exited with code 2 after " in result.stdout
    assert "training refused (exit code 2): nothing was saved" in result.stdout
    assert "Model: none in models/" in result.stdout
    assert not (trainer_box.root / "models").exists() or \
        not list((trainer_box.root / "models").iterdir())


def test_stop_ends_the_trainer_without_a_restart(trainer_box: Sandbox) -> None:
    pid, supervisor = trainer_box.pid("trainer"), trainer_box.supervisor("trainer")
    assert pid and supervisor
    result = trainer_box.run("setup.sh", "stop", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until_gone([pid, supervisor]) == []
    assert processes_running_module("spark_job.train", trainer_box.root) == []
    assert trainer_box.log("trainer").count("starting trainer") == 1
    assert trainer_box.status_line("trainer").split()[1] == "stopped"


def test_a_one_off_trainer_that_refuses_is_not_restarted(trainer_box: Sandbox) -> None:
    """TRAIN_EVERY_HOURS=0: train once and exit. Exit code 2 (here: no history) is an answer,
    not a crash: retrying in 1, 2, 4 ... s would give the same answer, with a JVM each time."""
    starts = trainer_box.log("trainer").count("starting trainer")
    env = {**trainer_box.env, "TRAIN_EVERY_HOURS": "0"}
    started = subprocess.run(["./setup.sh", "--local"], cwd=trainer_box.root, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=120, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    line = trainer_box.wait_for_status("trainer", "exited", timeout=120)
    assert "exited (code 2, not restarted)" in line, line
    status = trainer_box.run("setup.sh", "status").stdout
    assert "setup.sh: trainer exited with code 2 (refused, see above); not restarted" in status
    assert wait_until_gone(supervisors_of(trainer_box.root), timeout=10) == []
    time.sleep(2.5)  # longer than the first two restart pauses
    assert trainer_box.log("trainer").count("starting trainer") == starts + 1
    assert "restart 1 of" not in trainer_box.log("trainer")
    assert processes_running_module("spark_job.train", trainer_box.root) == []
    result = trainer_box.run("setup.sh", "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((trainer_box.root / "run" / "pids").iterdir())


# --- stop and start with the detector: the memory-only broker comes back empty -------------------

PIPELINE = ("broker", "producer", "detector")


def parquet_alert_ids(box: Sandbox) -> set[str]:
    table = datasets.read_dataset(box.root / "parquet_data", schemas.ALERTS_DATASET,
                                  pa.schema([("alert_id", pa.string())]))
    return set(table.column("alert_id").to_pylist())


def epochs_of(box: Sandbox) -> set[str]:
    folder = box.root / "parquet_data" / schemas.TRANSACTIONS_DATASET
    return {p.name for p in folder.glob("epoch=*")} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = make_sandbox(tmp_path_factory.mktemp("setup-pipeline"), PIPELINE,
                       PRODUCER_RATE="40", PRODUCER_FRAUD_RATIO="0.2",
                       FRAUDSTREAM_STOP_TIMEOUT="30")
    try:
        yield box
    finally:
        box.run("setup.sh", "stop", timeout=120)
        kill_leftovers(box, PIPELINE)


@pytest.mark.timeout(900)
def test_stop_and_start_gives_alerts_again_and_keeps_every_earlier_alert(
        pipeline: Sandbox) -> None:
    """The broker loses every topic on stop; the detector's checkpoint does not. The second
    start must begin a new epoch on its own (ON_BROKER_RESET=new-epoch in local mode) and raise
    alerts again, with every alert of the first run still in Parquet."""
    started = pipeline.run("setup.sh", "--local", timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = time.monotonic() + 300
    while not parquet_alert_ids(pipeline) and time.monotonic() < deadline:
        time.sleep(2)
    first = parquet_alert_ids(pipeline)
    assert first, "no alert in Parquet 300 s after the first start:\n" + pipeline.log("detector")
    assert len(epochs_of(pipeline)) == 1
    status = pipeline.run("setup.sh", "status").stdout
    assert "detector: epoch " in status, status

    stopped = pipeline.run("setup.sh", "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    first = parquet_alert_ids(pipeline)  # including what the last batch wrote

    begun = time.monotonic()
    started = pipeline.run("setup.sh", "--local", timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = begun + 300
    while not parquet_alert_ids(pipeline) - first and time.monotonic() < deadline:
        time.sleep(1)
    waited = time.monotonic() - begun
    after = parquet_alert_ids(pipeline)
    print(f"\nstop/start: first new alert in Parquet {waited:.0f} s after ./setup.sh "
          f"({len(first)} alerts of the first run kept)")
    log = pipeline.log("detector")
    assert after - first, "no new alert 300 s after the restart:\n" + log[-4000:]
    assert first <= after, f"{len(first - after)} alerts of the first run are gone"
    assert "BROKER RESET" in log
    assert len(epochs_of(pipeline)) == 2
    archived = pipeline.root / "run" / "checkpoint" / "archived"
    assert len(list(archived.glob("epoch=*"))) == 1


# --- --local --cluster: a Spark standalone master and two workers under the detector -----------

CLUSTER_PIPELINE = ("broker", "producer", "detector")
CLUSTER_SERVICES = ("spark-master", "spark-worker-1", "spark-worker-2")


def processes_under(root: Path) -> list[int]:
    """Live processes whose working directory is ``root`` or below it (the JVMs included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            here = Path(os.readlink(entry / "cwd"))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if (here == root or root in here.parents) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(600)
def test_cluster_option_runs_the_detector_on_a_standalone_master_and_two_workers(
        tmp_path: Path) -> None:
    master_port, ui_port = free_port(), free_port()
    box = make_sandbox(tmp_path, CLUSTER_PIPELINE, PRODUCER_RATE="40",
                       PRODUCER_FRAUD_RATIO="0.2", FRAUDSTREAM_STOP_TIMEOUT="30",
                       SPARK_MASTER_PORT=str(master_port), SPARK_MASTER_WEBUI_PORT=str(ui_port))
    try:
        started = box.run("setup.sh", "--local", "--cluster", timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        master = f"spark://127.0.0.1:{master_port}"
        assert f"waiting for the Spark master {master} to count 2 alive workers" \
            in started.stdout
        for service in CLUSTER_SERVICES:
            assert box.pid(service) and alive(box.pid(service)), started.stdout
        deadline = time.monotonic() + 300
        while not parquet_alert_ids(box) and time.monotonic() < deadline:
            time.sleep(2)
        log = box.log("detector")
        assert parquet_alert_ids(box), "no alert 300 s after the start:\n" + log[-4000:]
        assert "Spark UI of the detector: " in log and f" on {master})" in log, log[-4000:]
        status = box.run("setup.sh", "status")
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
        for service in CLUSTER_SERVICES:
            assert f"running (pid {box.pid(service)}, up " in lines[service], status.stdout
        assert f"Spark master {master}: 2 alive worker(s), 2 core(s)" in status.stdout
        # The executors are the workers' children, in the sandbox's run/spark-work/.
        assert any((box.root / "run" / "spark-work").glob("app-*/*/stderr"))

        stopped = box.run("setup.sh", "stop", timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert wait_until_gone(processes_under(box.root)) == [], "processes left after stop"
        status = box.run("setup.sh", "status")
        for service in CLUSTER_SERVICES:
            assert box.status_line(service).split()[1] == "stopped", status.stdout
    finally:
        box.run("setup.sh", "stop", timeout=120)
        kill_leftovers(box, CLUSTER_PIPELINE + CLUSTER_SERVICES)
