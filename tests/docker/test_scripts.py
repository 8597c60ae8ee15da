"""setup.sh, reset.sh and docker/kafka-init.sh: lint, argument handling, safety rails, and the
exact Docker commands the scripts issue.

There is no Docker engine here, so the Docker branch of the scripts runs against a recording
stand-in for the `docker` CLI: that proves which compose commands the scripts send (project
pinned, volumes only on reset, never a prune), not that Docker runs the stack.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.commands import path_without, require_tool

from fraudstream import settings, topics

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("setup.sh", "reset.sh", "docker/kafka-init.sh")
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "run", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    "parquet_data", "spark-warehouse", "metastore_db", "benchmarks", "tests", "docs",
)


def make_sandbox(tmp_path: Path) -> Path:
    """A copy of the repository's scripts and packages, so no test touches the real run/."""
    root = tmp_path / "fraudstream"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    (root / "parquet_data").mkdir()
    (root / "parquet_data" / ".gitkeep").touch()
    return root


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without settings that would change what the scripts do."""
    prefixes = ("KAFKA_", "BROKER_", "FRAUDSTREAM_", "PRODUCER_", "JAVA_HOME", "COMPOSE_",
                "STREAMLIT_", "SETUP_", "TRAIN_", "MODELS_DIR", "PARQUET_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env or clean_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_is_clean(script: str) -> None:
    shellcheck = require_tool("shellcheck")
    result = run([shellcheck, "--shell=bash", "--severity=style", script], REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_executable_bash(script: str) -> None:
    path = REPO / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert run(["bash", "-n", script], REPO).returncode == 0


@pytest.mark.parametrize("script", ["setup.sh", "reset.sh"])
def test_scripts_never_kill_or_prune_by_name(script: str) -> None:
    text = (REPO / script).read_text()
    for forbidden in ("pkill", "killall", "prune", "docker rm", "volume rm", "docker kill"):
        assert forbidden not in text, f"{script} uses {forbidden!r}"


def test_setup_exports_only_known_setting_names() -> None:
    """Local mode hands the services the same env names as compose: every variable setup.sh
    exports is a setting some program reads (or Spark's / Streamlit's own)."""
    known = set().union(*(settings.env_names(cls) for cls in settings.ALL_SETTINGS))
    exported: set[str] = set()
    for line in (REPO / "setup.sh").read_text().splitlines():
        words = line.split()
        if words[:1] == ["export"]:
            exported |= {name for w in words[1:]
                         if re.fullmatch(r"[A-Z_][A-Z0-9_]*", name := w.split("=", 1)[0])}
    assert {"KAFKA_BOOTSTRAP_SERVERS", "BROKER_PORT", "PARQUET_DIR", "CHECKPOINT_DIR"} <= exported
    for name in exported - {"FRAUDSTREAM_UID", "FRAUDSTREAM_GID"}:  # compose build args
        assert name in known or name.startswith(("STREAMLIT_", "SPARK_", "JAVA_")), name


# --- arguments and help -------------------------------------------------------------------------


def test_setup_help_lists_modes_commands_and_variables() -> None:
    result = run(["./setup.sh", "--help"], REPO)
    assert result.returncode == 0
    for word in ("--docker", "--local", "--cluster", "status", "stop", "logs", "BROKER_PORT",
                 "FRAUDSTREAM_SERVICES", "FRAUDSTREAM_PYTHON", "python -m consumer",
                 "logs -f consumer", "train [ARGS...]", "SETUP_TRAINER=1", "SETUP_TRAINER_NICE",
                 "TRAIN_EVERY_HOURS=6", "MODELS_DIR=models"):
        assert word in result.stdout, word


@pytest.mark.parametrize("args", [["--bogus"], ["frobnicate"], ["--local", "start", "extra"]])
def test_setup_rejects_bad_arguments_with_exit_2(args: list[str]) -> None:
    result = run(["./setup.sh", *args], REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--help" in result.stderr


@pytest.mark.parametrize(("variable", "value"), [
    ("SETUP_TRAINER", "yes"), ("SETUP_TRAINER_NICE", "20"), ("SETUP_TRAINER_NICE", "-1"),
])
def test_setup_rejects_bad_trainer_variables_with_exit_2(tmp_path: Path, variable: str,
                                                          value: str) -> None:
    root = make_sandbox(tmp_path)
    env = clean_env(**{variable: value}, FRAUDSTREAM_PYTHON=sys.executable)
    result = run(["./setup.sh", "--local"], root, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{variable} must be" in result.stderr
    assert not (root / "run" / "pids").exists() or not list((root / "run" / "pids").iterdir())


def _local_services_line(root: Path, **extra: str) -> str:
    """The service list the local start announces. FRAUDSTREAM_PYTHON names no interpreter,
    so the start stops right after announcing it: nothing is installed or started."""
    env = clean_env(FRAUDSTREAM_PYTHON="/nonexistent/python", **extra)
    result = run(["./setup.sh", "--local"], root, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot import fraudstream" in result.stderr
    return next(line for line in result.stdout.splitlines() if "services:" in line)


def test_the_trainer_is_a_default_service_unless_setup_trainer_is_0(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    assert _local_services_line(root).endswith(
        "services: broker producer detector dashboard trainer)")
    assert _local_services_line(root, SETUP_TRAINER="0").endswith(
        "services: broker producer detector dashboard)")
    # SETUP_TRAINER=0 wins over a FRAUDSTREAM_SERVICES that names the trainer, and says so.
    env = clean_env(FRAUDSTREAM_PYTHON="/nonexistent/python", SETUP_TRAINER="0",
                    FRAUDSTREAM_SERVICES="trainer producer")
    result = run(["./setup.sh", "--local"], root, env)
    assert "services: producer)" in result.stdout
    assert "SETUP_TRAINER=0: the trainer is not started" in result.stdout
    env["FRAUDSTREAM_SERVICES"] = "trainer"
    result = run(["./setup.sh", "--local"], root, env)
    assert result.returncode == 2
    assert "selects only the trainer, and SETUP_TRAINER=0 leaves it out" in result.stderr


def test_setup_rejects_an_unknown_service(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    env = clean_env(FRAUDSTREAM_SERVICES="broker nonsense", FRAUDSTREAM_PYTHON=sys.executable)
    result = run(["./setup.sh", "--local"], root, env)
    assert result.returncode == 2
    assert "unknown service 'nonsense'" in result.stderr
    assert not list((root / "run" / "pids").glob("*.pid"))


def test_status_of_a_fresh_checkout_shows_everything_stopped(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    env = clean_env(BROKER_PORT="1")  # nothing listens on port 1
    result = run(["./setup.sh", "--local", "status"], root, env)
    assert result.returncode == 0, result.stderr
    for service in ("broker", "producer", "detector", "dashboard", "trainer"):
        assert any(line.split()[:2] == [service, "stopped"] for line in result.stdout.splitlines()
                   ), f"{service} not reported stopped:\n{result.stdout}"
    assert "127.0.0.1:1 is not reachable" in result.stdout
    assert "Model: none in models/ (the detector runs on rules alone; ./setup.sh train " \
           "trains one now)" in result.stdout.splitlines()


def test_status_shows_the_newest_complete_model_version(tmp_path: Path) -> None:
    """Version folders sort by name (training time); one without model.json is still being
    written (or was abandoned), and a "."-prefixed one is a temporary folder: as the detector
    sees them (fraudstream.model.model_versions / newest_model)."""
    root = make_sandbox(tmp_path)
    models = tmp_path / "elsewhere" / "models"
    for name, complete in (("20261201T000000Z", True), ("20261202T061500Z", True),
                           ("20261202T120000Z", False), (".20261203T000000Z.tmp", True)):
        (models / name).mkdir(parents=True)
        if complete:
            (models / name / "model.json").write_text("{}")
    (models / "notes.txt").write_text("not a version")
    env = clean_env(BROKER_PORT="1", MODELS_DIR=str(models))
    result = run(["./setup.sh", "--local", "status"], root, env)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Model:"))
    assert line == (f"Model: 20261202T061500Z, the newest of 3 version folder(s) in {models}/; "
                    "without model.json (being written, or abandoned): 20261202T120000Z")
    # MODELS_DIR recorded by the last start is used when the caller sets none.
    (root / "run").mkdir()
    (root / "run" / "local.env").write_text(f"BROKER_PORT=1\nMODELS_DIR={models}\n")
    result = run(["./setup.sh", "--local", "status"], root, clean_env())
    assert "Model: 20261202T061500Z" in result.stdout, result.stdout


def test_reset_help() -> None:
    result = run(["./reset.sh", "--help"], REPO)
    assert result.returncode == 0
    assert "--yes" in result.stdout and "down --volumes --remove-orphans" in result.stdout
    assert "models/" in result.stdout and "MODELS_DIR elsewhere is not touched" in result.stdout


# --- Java check --------------------------------------------------------------------------------


def _fake_java(folder: Path, version_line: str) -> None:
    folder.mkdir(exist_ok=True)
    write_executable(folder / "java", f"#!/bin/sh\necho '{version_line}' >&2\n")


@pytest.mark.parametrize("version_line", [
    'openjdk version "11.0.22" 2024-01-16',
    'java version "1.8.0_392"',
])
def test_old_java_stops_setup_with_install_instructions(tmp_path: Path, version_line: str) -> None:
    root = make_sandbox(tmp_path)
    if not (root / "spark_job" / "__main__.py").exists():
        (root / "spark_job").mkdir(exist_ok=True)
        (root / "spark_job" / "__main__.py").write_text("raise SystemExit(0)\n")
    fake = tmp_path / "fake-bin"
    _fake_java(fake, version_line)
    env = clean_env(FRAUDSTREAM_SERVICES="detector", FRAUDSTREAM_PYTHON=sys.executable,
                    PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    result = run(["./setup.sh", "--local"], root, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Java 17 or newer is required" in result.stderr
    assert "sudo apt-get install -y openjdk-17-jre-headless" in result.stderr
    assert "JAVA_HOME" in result.stderr
    assert not list((root / "run" / "pids").glob("*.pid")), "nothing may start"


def test_missing_java_stops_setup_with_install_instructions(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    if not (root / "spark_job" / "__main__.py").exists():
        (root / "spark_job").mkdir(exist_ok=True)
        (root / "spark_job" / "__main__.py").write_text("raise SystemExit(0)\n")
    env = clean_env(FRAUDSTREAM_SERVICES="detector", FRAUDSTREAM_PYTHON=sys.executable,
                    PATH=path_without(tmp_path / "path-without", "java", "docker"))
    result = run(["./setup.sh"], root, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no docker client installed: using local mode" in result.stdout
    assert "no Java runtime found" in result.stderr
    assert "openjdk-17-jre-headless" in result.stderr


# --- reset safety --------------------------------------------------------------------------------


def test_reset_refuses_to_run_outside_the_repository(tmp_path: Path) -> None:
    stranger = tmp_path / "elsewhere"
    (stranger / "run").mkdir(parents=True)
    (stranger / "parquet_data").mkdir()
    (stranger / "parquet_data" / "precious.parquet").write_text("x")
    shutil.copy(REPO / "reset.sh", stranger / "reset.sh")
    result = run(["bash", str(stranger / "reset.sh"), "--yes"], tmp_path)
    assert result.returncode == 1
    assert "not the fraudstream repository" in result.stderr
    assert (stranger / "run").is_dir()
    assert (stranger / "parquet_data" / "precious.parquet").exists()


def test_reset_without_yes_and_without_a_terminal_deletes_nothing(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    (root / "run" / "logs").mkdir(parents=True)
    (root / "parquet_data" / "alerts").mkdir()
    (root / "models" / "20261202T061500Z").mkdir(parents=True)
    result = run(["./reset.sh"], root)
    assert result.returncode == 1
    assert "pass --yes" in result.stderr
    assert "delete run/, models/ and everything in parquet_data/" in result.stdout
    assert (root / "run" / "logs").is_dir()
    assert (root / "parquet_data" / "alerts").is_dir()
    assert (root / "models" / "20261202T061500Z").is_dir()


def test_reset_deletes_models_but_not_what_a_models_symlink_points_to(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    outside = tmp_path / "kept-models" / "20261202T061500Z"
    outside.mkdir(parents=True)
    (outside / "model.json").write_text("{}")
    (root / "models").symlink_to(outside.parent)
    env = clean_env(FRAUDSTREAM_PYTHON=sys.executable,
                    PATH=path_without(tmp_path / "path-without", "docker", "docker-compose"))
    result = run(["./reset.sh", "--yes"], root, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "models").exists() and not (root / "models").is_symlink()
    assert (outside / "model.json").read_text() == "{}"
    assert "run/ and models/ removed" in result.stdout


# --- kafka-init.sh -----------------------------------------------------------------------------


def _recording_kafka_topics(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "calls.txt"
    tool = write_executable(tmp_path / "kafka-topics.sh",
                            f'#!/bin/sh\necho "$*" >> "{record}"\n')
    return tool, record


def test_kafka_init_creates_the_contract_topics(tmp_path: Path) -> None:
    tool, record = _recording_kafka_topics(tmp_path)
    env = clean_env(KAFKA_TOPICS_BIN=str(tool), KAFKA_BOOTSTRAP_SERVERS="kafka:29092")
    result = run(["bash", str(REPO / "docker" / "kafka-init.sh")], tmp_path, env)
    assert result.returncode == 0, result.stderr
    creates = [line.split() for line in record.read_text().splitlines() if "--create" in line]
    created = {args[args.index("--topic") + 1]: args for args in creates}
    assert set(created) == {topics.TRANSACTIONS, topics.ALERTS, topics.DLQ, topics.RULES,
                            topics.VERDICTS}
    rules = created.pop(topics.RULES)
    assert rules[rules.index("--partitions") + 1] == "1"
    assert rules[rules.index("--config") + 1] == "cleanup.policy=compact"
    for args in [*created.values(), rules]:
        assert "--if-not-exists" in args
        assert args[args.index("--bootstrap-server") + 1] == "kafka:29092"
    for args in created.values():
        assert args[args.index("--partitions") + 1] == str(topics.DEFAULT_TRANSACTIONS_PARTITIONS)


def test_kafka_init_honours_partitions_and_rejects_nonsense(tmp_path: Path) -> None:
    tool, record = _recording_kafka_topics(tmp_path)
    env = clean_env(KAFKA_TOPICS_BIN=str(tool), TRANSACTIONS_PARTITIONS="6")
    assert run(["bash", str(REPO / "docker" / "kafka-init.sh")], tmp_path, env).returncode == 0
    creates = [line.split() for line in record.read_text().splitlines() if "--create" in line]
    assert [a[a.index("--partitions") + 1] for a in creates] == ["6", "6", "6", "1", "6"]
    env["TRANSACTIONS_PARTITIONS"] = "zero"
    result = run(["bash", str(REPO / "docker" / "kafka-init.sh")], tmp_path, env)
    assert result.returncode == 2
    assert "TRANSACTIONS_PARTITIONS" in result.stderr


# --- Docker branch, against a recording docker CLI -----------------------------------------------

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Records every call; answers like a Docker engine whose containers are all healthy. A one-off
# `compose run` exits with FAKE_RUN_RC (default 0).
echo "docker $*" >> "$CALLS"
case "$1" in
  info) exit 0 ;;
  inspect) if [[ "${@: -1}" == cid-kafka-init ]]; then echo "exited 0"; else echo healthy; fi ;;
  compose)
    [[ "$2" == version ]] && { [[ -n "${FAKE_NO_V2:-}" ]] && exit 1; echo "v2.40.0"; exit 0; }
    if [[ " $* " == *" ps "* ]]; then echo "cid-${@: -1}"; fi
    if [[ " $* " == *" run "* ]]; then exit "${FAKE_RUN_RC:-0}"; fi ;;
esac
exit 0
"""

FAKE_COMPOSE_V1 = r"""#!/usr/bin/env bash
echo "docker-compose $*" >> "$CALLS"
if [[ " $* " == *" ps "* ]]; then echo "cid-${@: -1}"; fi
if [[ " $* " == *" run "* ]]; then exit "${FAKE_RUN_RC:-0}"; fi
exit 0
"""


@pytest.fixture(params=["v2", "v1"])
def docker_sandbox(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> tuple[Path, dict[str, str], Path, str]:
    root = make_sandbox(tmp_path)
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    calls = tmp_path / "docker-calls.txt"
    write_executable(fake / "docker", FAKE_DOCKER)
    write_executable(fake / "docker-compose", FAKE_COMPOSE_V1)
    env = clean_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls),
                    FRAUDSTREAM_HEALTH_TIMEOUT="20")
    compose = "docker compose"
    if request.param == "v1":
        env["FAKE_NO_V2"] = "1"
        compose = "docker-compose"
    return root, env, calls, compose


def _calls(calls: Path, compose: str) -> list[str]:
    return [line for line in calls.read_text().splitlines() if line.startswith(compose + " ")]


def test_docker_mode_builds_and_starts_the_pinned_project(
        docker_sandbox: tuple[Path, dict[str, str], Path, str]) -> None:
    root, env, calls, compose = docker_sandbox
    result = run(["./setup.sh"], root, env)
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = f"{compose} -p fraudstream -f {root}/docker-compose.yml"
    # The trainer (profile `trainer`) is part of the default start, like in local mode.
    assert f"{prefix} --profile trainer up -d --build" in _calls(calls, compose)
    for text in ("http://localhost:8501", "http://localhost:9000", "logs -f consumer",
                 "Trainer                 every 6 h into the volume 'models'",
                 "Train now:      ./setup.sh train"):
        assert text in result.stdout
    assert (root / "run" / "mode").read_text().strip() == "docker"

    result = run(["./setup.sh", "status"], root, env)
    assert result.returncode == 0, result.stderr
    assert f"{prefix} --profile cluster --profile trainer ps" in _calls(calls, compose)

    result = run(["./setup.sh", "stop"], root, env)
    assert result.returncode == 0, result.stderr
    downs = [c for c in _calls(calls, compose) if " down" in c]
    assert downs == [f"{prefix} --profile cluster --profile trainer down"], \
        "stop takes down every profile's containers and keeps the volumes"


def test_docker_mode_without_the_trainer(
        docker_sandbox: tuple[Path, dict[str, str], Path, str]) -> None:
    root, env, calls, compose = docker_sandbox
    result = run(["./setup.sh", "--docker"], root, {**env, "SETUP_TRAINER": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    ups = [c for c in _calls(calls, compose) if " up " in f"{c} "]
    assert ups == [f"{compose} -p fraudstream -f {root}/docker-compose.yml up -d --build"]
    assert "Trainer                 off (SETUP_TRAINER=0)" in result.stdout


@pytest.mark.parametrize("hours", ["0", "0.0", "six"])
def test_docker_trainer_service_refuses_a_schedule_of_0(
        docker_sandbox: tuple[Path, dict[str, str], Path, str], hours: str) -> None:
    """`restart: unless-stopped` restarts the trainer after every exit: TRAIN_EVERY_HOURS=0
    (train once, exit) would retrain in a loop, so the Docker start refuses it."""
    root, env, calls, compose = docker_sandbox
    result = run(["./setup.sh", "--docker"], root, {**env, "TRAIN_EVERY_HOURS": hours})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "TRAIN_EVERY_HOURS must be a number of hours > 0" in result.stderr
    assert not [c for c in _calls(calls, compose) if " up " in f"{c} "]


@pytest.mark.parametrize("rc", [0, 2])
def test_docker_train_runs_one_training_in_a_one_off_trainer_container(
        docker_sandbox: tuple[Path, dict[str, str], Path, str], rc: int) -> None:
    root, env, calls, compose = docker_sandbox
    result = run(["./setup.sh", "--docker", "train", "--algorithm", "gbt"], root,
                 {**env, "FAKE_RUN_RC": str(rc)})
    assert result.returncode == rc, result.stdout + result.stderr
    runs = [c for c in _calls(calls, compose) if " run " in c]
    assert runs == [f"{compose} -p fraudstream -f {root}/docker-compose.yml --profile trainer "
                    "run --rm -e TRAIN_EVERY_HOURS=0 -T trainer python -m spark_job.train "
                    "--algorithm gbt"]
    expected = "training finished (exit code 0)" if rc == 0 else "training refused (exit code 2)"
    assert expected in result.stdout


def test_docker_cluster_profile_replaces_the_local_detector(
        docker_sandbox: tuple[Path, dict[str, str], Path, str]) -> None:
    root, env, calls, compose = docker_sandbox
    result = run(["./setup.sh", "--docker", "--cluster"], root, env)
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = f"{compose} -p fraudstream -f {root}/docker-compose.yml"
    assert f"{prefix} --profile cluster --profile trainer up -d --build --scale spark_job=0" \
        in _calls(calls, compose)
    assert "http://localhost:8080" in result.stdout


def test_reset_takes_down_only_this_project_with_its_volumes(
        docker_sandbox: tuple[Path, dict[str, str], Path, str]) -> None:
    root, env, calls, compose = docker_sandbox
    (root / "run" / "checkpoint").mkdir(parents=True)
    (root / "parquet_data" / "alerts").mkdir()
    (root / "models" / "20261202T061500Z").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    result = run(["./reset.sh", "--yes"], root, env)
    assert result.returncode == 0, result.stdout + result.stderr
    issued = calls.read_text().splitlines()
    assert f"{compose} -p fraudstream -f {root}/docker-compose.yml --profile cluster " \
           "--profile trainer down --volumes --remove-orphans" in issued
    assert not (root / "models").exists()
    for call in issued:
        assert "prune" not in call and " rm " not in f"{call} " and "volume rm" not in call
        if " down" in call:
            assert "-p fraudstream" in call
    assert not (root / "run").exists()
    assert [p.name for p in (root / "parquet_data").iterdir()] == [".gitkeep"]
    assert (root / "notes.txt").read_text() == "mine"


def test_forced_docker_mode_without_an_engine_fails_clearly(tmp_path: Path) -> None:
    root = make_sandbox(tmp_path)
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    write_executable(fake / "docker", "#!/bin/sh\nexit 1\n")
    env = clean_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    result = run(["./setup.sh", "--docker"], root, env)
    assert result.returncode == 1
    assert "docker info" in result.stderr and "--local" in result.stderr
