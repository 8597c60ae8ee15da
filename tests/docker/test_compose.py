"""docker-compose.yml without a Docker engine: compose itself validates the file, and the parsed
YAML is checked against the project's contracts (topic names, settings env names, entry points).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.commands import require_tool

from fraudstream import settings, topics

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"

DEFAULT_SERVICES = {"kafka", "kafka-init", "producer", "spark_job", "consumer", "dashboard",
                    "kafdrop"}
CLUSTER_SERVICES = {"spark-master", "spark-worker-1", "spark-worker-2", "spark_job_cluster"}
TRAINER_SERVICES = {"trainer"}
#: Services running our Python images, and the settings class whose env names they may use.
PYTHON_SERVICES: dict[str, type[settings.BaseSettings]] = {
    "producer": settings.ProducerSettings,
    "spark_job": settings.DetectorSettings,
    "spark_job_cluster": settings.DetectorSettings,
    "consumer": settings.ConsumerSettings,
    "dashboard": settings.DashboardSettings,
    "spark-master": settings.DetectorSettings,
    "spark-worker-1": settings.DetectorSettings,
    "spark-worker-2": settings.DetectorSettings,
    "trainer": settings.TrainSettings,
}
#: Where the model versions live in every container that reads or writes them.
MODELS_MOUNT = "/var/lib/fraudstream/models"
#: Services that read the model versions (read-only), and the one that writes them.
MODEL_READERS = {"spark_job", "spark_job_cluster", "dashboard", "spark-worker-1",
                 "spark-worker-2"}
MODEL_WRITER = "trainer"
#: Environment read by something other than our settings classes.
ALLOWED_PREFIXES = ("STREAMLIT_", "SPARK_", "JAVA_", "PYSPARK_")
ALLOWED_NAMES = {"LOG_LEVEL"}  # read by fraudstream/logs.py
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|API_?KEY", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def interpolate(value: Any) -> str:
    """What compose substitutes when no variable is set: ``${X:-default}`` -> ``default``."""
    return _VARIABLE.sub(lambda m: m.group("default") or "", str(value))


def raw_env(service: str) -> dict[str, str]:
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in raw_env(service).items()}


def command(service: str) -> list[str]:
    cmd = services()[service].get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]


def compose_env() -> dict[str, str]:
    """The environment without user overrides of the variables the file interpolates."""
    names = {m.group("name") for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())}
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}


def mounts(service: str) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for volume in services()[service].get("volumes", []):
        source, target, *mode = str(volume).split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


# --- compose accepts the file ----------------------------------------------------------------


PROFILES = {"default": [], "cluster": ["--profile", "cluster"],
            "trainer": ["--profile", "trainer"],
            "all": ["--profile", "cluster", "--profile", "trainer"]}


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_docker_compose_config_accepts_the_file(profile: list[str]) -> None:
    binary = require_tool("docker-compose")
    result = subprocess.run(
        [binary, "-p", "fraudstream", "-f", str(COMPOSE_FILE), *profile, "config"],
        capture_output=True, text=True, timeout=60, env=compose_env(), check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    expected = set(DEFAULT_SERVICES)
    if "cluster" in profile:
        expected |= CLUSTER_SERVICES
    if "trainer" in profile:
        expected |= TRAINER_SERVICES
        trainer = resolved["services"]["trainer"]
        assert trainer["environment"]["TRAIN_EVERY_HOURS"] == "6"
        assert trainer["environment"]["MODELS_DIR"] == MODELS_MOUNT
        assert trainer["command"] == ["python", "-m", "spark_job.train"]
        assert trainer["profiles"] == ["trainer"]
    assert expected <= set(resolved["services"])
    # compose resolved the anchors and defaults to what the services expect
    assert resolved["services"]["producer"]["environment"]["TRANSACTIONS_TOPIC"] == \
        topics.TRANSACTIONS
    assert resolved["services"]["dashboard"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == \
        "kafka:29092"


def test_docker_compose_v2_accepts_the_file_when_present() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True,
                           check=False) if shutil.which("docker") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("the docker compose v2 plugin is not installed (v1 is checked above)")
    for profile in PROFILES.values():
        result = subprocess.run(
            ["docker", "compose", "-p", "fraudstream", "-f", str(COMPOSE_FILE), *profile,
             "config", "-q"], capture_output=True, text=True, timeout=60, env=compose_env(),
            check=False)
        assert result.returncode == 0, result.stderr


# --- structure ------------------------------------------------------------------------------------


def test_service_set_and_profiles() -> None:
    default = {name for name, svc in services().items() if not svc.get("profiles")}
    cluster = {name for name, svc in services().items() if "cluster" in svc.get("profiles", [])}
    trainer = {name for name, svc in services().items() if "trainer" in svc.get("profiles", [])}
    assert default == DEFAULT_SERVICES
    assert cluster == CLUSTER_SERVICES
    assert trainer == TRAINER_SERVICES
    assert services()["trainer"]["profiles"] == ["trainer"]


def test_no_zookeeper_anywhere() -> None:
    assert "zookeeper" not in COMPOSE_FILE.read_text().lower()


def test_kafka_is_a_single_node_kraft_broker_and_controller() -> None:
    kafka = services()["kafka"]
    e = env("kafka")
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    assert set(e["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = e["KAFKA_NODE_ID"]
    listeners = dict(item.split("://", 1) for item in e["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in e["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["INTERNAL"] == "kafka:29092"
    assert advertised["EXTERNAL"] == "localhost:9092"
    controller = e["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller not in advertised
    voter_id, voter_address = e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == node_id
    assert voter_address.rsplit(":", 1)[1] == listeners[controller].rsplit(":", 1)[1]
    assert e["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    protocol_map = e["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    protocols = dict(item.split(":") for item in protocol_map.split(","))
    assert set(protocols) == set(listeners)
    assert e["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "kafka-init owns topic creation"
    # A data volume at the log dir, declared at top level (named, not anonymous).
    data_dir = e["KAFKA_LOG_DIRS"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kafka["volumes"]}
    assert mounts[data_dir] in compose()["volumes"]


def test_images_are_pinned() -> None:
    for name, svc in services().items():
        image = svc.get("image")
        if "build" in svc:
            assert image and image.endswith(":local"), f"{name}: tag built images as :local"
            continue
        assert image, f"{name} has neither build nor image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image!r} is not pinned"
    assert services()["kafdrop"]["image"].startswith("obsidiandynamics/kafdrop:4.")
    assert services()["kafka-init"]["image"] == services()["kafka"]["image"]


def _healthcheck(service: str) -> list[str]:
    test = services()[service]["healthcheck"]["test"]
    return shlex.split(test) if isinstance(test, str) else list(test)


def test_healthchecks() -> None:
    kafka = " ".join(_healthcheck("kafka"))
    assert re.search(r"/opt/kafka/bin/kafka-(broker-api-versions|topics)\.sh", kafka)
    assert "kafka:29092" in kafka
    for service, url in (("dashboard", "http://127.0.0.1:8501/_stcore/health"),
                         ("spark-master", "http://127.0.0.1:8080")):
        test = _healthcheck(service)
        assert test[:3] == ["CMD", "python", "-c"], service
        assert url in test[3]
        compile(test[3], f"{service}-healthcheck", "exec")  # the one-liner is valid Python


def test_published_ports_are_localhost_only() -> None:
    expected = {"kafka": 9092, "dashboard": 8501, "kafdrop": 9000, "spark-master": 8080,
                "spark_job_cluster": 4041}
    published: dict[str, set[int]] = {}
    for name, svc in services().items():
        for port in svc.get("ports", []):
            host_ip, host_port, _container = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine"
            published.setdefault(name, set()).add(int(host_port))
    for name, port in expected.items():
        assert port in published.get(name, set()), f"{name} does not publish {port}"
    assert env("dashboard")["STREAMLIT_SERVER_ADDRESS"] == "0.0.0.0"
    assert env("dashboard")["STREAMLIT_SERVER_PORT"] == "8501"
    assert env("kafdrop")["KAFKA_BROKERCONNECT"] == "kafka:29092"


def test_startup_order_and_restart_policies() -> None:
    svcs = services()
    assert svcs["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert svcs["kafdrop"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("producer", "spark_job", "consumer", "dashboard", "spark_job_cluster"):
        assert svcs[name]["depends_on"]["kafka-init"]["condition"] == \
            "service_completed_successfully", name
    assert svcs["spark_job_cluster"]["depends_on"]["spark-master"]["condition"] == \
        "service_healthy"
    assert svcs["kafka-init"]["restart"] == "on-failure"
    for name, svc in svcs.items():
        if name != "kafka-init":
            assert svc.get("restart") == "unless-stopped", name


def test_kafka_init_creates_the_contract_topics() -> None:
    init = services()["kafka-init"]
    e = env("kafka-init")
    assert e["TRANSACTIONS_TOPIC"] == topics.TRANSACTIONS
    assert e["ALERTS_TOPIC"] == topics.ALERTS
    assert e["DLQ_TOPIC"] == topics.DLQ
    assert e["RULES_TOPIC"] == topics.RULES
    assert e["VERDICTS_TOPIC"] == topics.VERDICTS
    assert e["TRANSACTIONS_PARTITIONS"] == str(topics.DEFAULT_TRANSACTIONS_PARTITIONS)
    assert e["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"
    script_mount = next(v for v in init["volumes"] if "kafka-init.sh" in v)
    source, target = script_mount.split(":")[:2]
    assert (REPO / source).is_file()
    assert target in init["entrypoint"]
    script = (REPO / source).read_text()
    assert "--if-not-exists" in script
    for name in (topics.TRANSACTIONS, topics.ALERTS, topics.DLQ, topics.RULES, topics.VERDICTS):
        assert name in script, f"{name} is not the script's default"
    assert "cleanup.policy=compact" in script, "the rules topic is compacted"


def test_service_env_names_are_settings_of_that_program() -> None:
    for service, cls in PYTHON_SERVICES.items():
        known = settings.env_names(cls)
        for name in env(service):
            assert name in known or name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES), \
                f"{service}: {name} is not a setting of {cls.__name__}"
        # The master never talks to Kafka; the trainer (TrainSettings) reads Parquet only.
        if issubclass(cls, settings.KafkaSettings) and service != "spark-master":
            assert env(service)["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092", service
        else:
            assert "KAFKA_BOOTSTRAP_SERVERS" not in env(service) or service == "spark-master"
    assert "LOG_LEVEL" in (REPO / "fraudstream" / "logs.py").read_text()
    # Topic variables default to the contract's names.
    for service in PYTHON_SERVICES:
        e = env(service)
        assert e.get("TRANSACTIONS_TOPIC", topics.TRANSACTIONS) == topics.TRANSACTIONS
        assert e.get("ALERTS_TOPIC", topics.ALERTS) == topics.ALERTS
        assert e.get("DLQ_TOPIC", topics.DLQ) == topics.DLQ
        assert e.get("RULES_TOPIC", topics.RULES) == topics.RULES
        assert e.get("VERDICTS_TOPIC", topics.VERDICTS) == topics.VERDICTS


def test_no_literal_secrets() -> None:
    secret_envs = {
        f.metadata["env"]
        for cls in settings.ALL_SETTINGS for f in dataclasses.fields(cls)
        if f.metadata.get("secret") and f.metadata.get("env")
    }
    for name in services():
        for key, value in raw_env(name).items():
            if key in secret_envs or SECRET_NAME.search(key):
                assert value == "" or re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", value), \
                    f"{name}: {key} holds a literal value"
        assert "env_file" not in services()[name]


def test_detector_storage_and_cluster_wiring() -> None:
    svcs = services()
    named_volumes = set(compose()["volumes"])
    for name in ("spark_job", "spark_job_cluster", "spark-worker-1", "spark-worker-2"):
        mounts = dict(v.split(":")[:2][::-1] for v in svcs[name]["volumes"])
        checkpoint = env("spark_job")["CHECKPOINT_DIR"]
        assert mounts[env("spark_job")["PARQUET_DIR"]] == "./parquet_data", name
        assert mounts[checkpoint] in named_volumes, f"{name}: checkpoint not on a named volume"
    assert env("spark_job_cluster")["CHECKPOINT_DIR"] == env("spark_job")["CHECKPOINT_DIR"]
    assert env("spark_job_cluster")["SPARK_MASTER"] == "spark://spark-master:7077"
    assert env("spark_job")["SPARK_MASTER"].startswith("local[")
    master = command("spark-master")
    assert master[:2] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    assert master[master.index("--port") + 1] == "7077"
    for worker in ("spark-worker-1", "spark-worker-2"):
        cmd = command(worker)
        assert cmd[:3] == ["spark-class", "org.apache.spark.deploy.worker.Worker",
                           "spark://spark-master:7077"]
    # Executors call back to the driver by name: it must be a valid hostname (no "_").
    driver = svcs["spark_job_cluster"]
    submit_args = env("spark_job_cluster")["PYSPARK_SUBMIT_ARGS"]
    assert f"spark.driver.host={driver['hostname']}" in submit_args
    assert "_" not in driver["hostname"]
    assert driver["hostname"] in driver["networks"]["default"]["aliases"]
    assert submit_args.endswith("pyspark-shell")


def test_trainer_service() -> None:
    """python -m spark_job.train on the detector's image, on a schedule, with no Kafka, no
    ports and a lower CPU weight than the detector."""
    svcs = services()
    trainer = svcs["trainer"]
    assert command("trainer") == ["python", "-m", "spark_job.train"]
    assert trainer["image"] == svcs["spark_job"]["image"]
    assert trainer["build"] == svcs["spark_job"]["build"]
    assert trainer["build"]["target"] == "spark"
    assert trainer["restart"] == "unless-stopped"
    assert trainer.get("init") is True
    assert "ports" not in trainer and "depends_on" not in trainer
    assert int(trainer["cpu_shares"]) < 1024, "the detector must win the CPU on 2 cores"
    e, raw = env("trainer"), raw_env("trainer")
    # `unless-stopped` restarts after every exit: the service must train on a schedule (> 0),
    # not once (0), or Docker would retrain in a loop.
    assert raw["TRAIN_EVERY_HOURS"] == "${TRAIN_EVERY_HOURS:-6}"
    assert float(e["TRAIN_EVERY_HOURS"]) > 0
    assert e["PARQUET_DIR"] == env("spark_job")["PARQUET_DIR"]
    assert e["MODELS_DIR"] == MODELS_MOUNT
    assert e["SPARK_MASTER"].startswith("local[")
    assert mounts("trainer")[e["PARQUET_DIR"]] == ("./parquet_data", "ro")


def test_trainer_env_defaults_are_the_settings_defaults() -> None:
    """Every ``NAME: ${NAME:-default}`` of the trainer repeats TrainSettings' default (so the
    file and ``python -m spark_job.train --help`` agree), except the schedule: the service
    trains every 6 h where the program's default is once."""
    fields = {f.metadata["env"]: f.name for f in dataclasses.fields(settings.TrainSettings)
              if f.metadata.get("env")}
    defaults = settings.TrainSettings()
    assert defaults.every_hours == 0
    checked = set()
    for name, value in raw_env("trainer").items():
        match = _VARIABLE.fullmatch(value)
        if not match or match.group("name") != name or name not in fields \
                or name == "TRAIN_EVERY_HOURS":
            continue
        loaded, _ = settings.load_settings(settings.TrainSettings, [],
                                           {name: match.group("default")})
        assert getattr(loaded, fields[name]) == getattr(defaults, fields[name]), name
        checked.add(name)
    assert {"TRAIN_ALGORITHM", "TRAIN_HOLDOUT_FRACTION", "TRAIN_MIN_TRANSACTIONS",
            "TRAIN_SEED"} <= checked


def test_models_volume_is_shared_read_only_except_by_the_trainer() -> None:
    assert "models" in compose()["volumes"]
    for name in MODEL_READERS | {MODEL_WRITER}:
        assert mounts(name).get(MODELS_MOUNT, ("", ""))[0] == "models", \
            f"{name}: the models volume is not mounted at {MODELS_MOUNT}"
    for name in MODEL_READERS:
        assert mounts(name)[MODELS_MOUNT][1] == "ro", f"{name} may not write models"
    assert mounts(MODEL_WRITER)[MODELS_MOUNT][1] == "rw"
    # Every program that reads MODELS_DIR gets the mount's path.
    for name in ("spark_job", "spark_job_cluster", "dashboard", "trainer"):
        assert env(name)["MODELS_DIR"] == MODELS_MOUNT, name
    for cls in (settings.DetectorSettings, settings.DashboardSettings, settings.TrainSettings):
        assert "MODELS_DIR" in settings.env_names(cls), cls.__name__


def test_verdicts_database_is_shared_by_consumer_dashboard_and_trainer() -> None:
    """The default VERDICTS_URL is a SQLite file under run/ of the working directory (/app in
    both images): one named volume there gives the console, the review queue and the trainer's
    labels the same database (VERDICTS_URL may be a secret, so the file sets none)."""
    from dockerfile_parse import DockerfileParser

    assert settings.VERDICTS_URL_DEFAULT == "sqlite:///run/verdicts.db"
    parser = DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))
    workdirs = {i["value"] for i in parser.structure if i["instruction"] == "WORKDIR"}
    assert "/app" in workdirs
    assert "verdicts" in compose()["volumes"]
    for name in ("consumer", "dashboard", "trainer"):
        assert mounts(name)["/app/run"] == ("verdicts", "rw"), name
        assert "VERDICTS_URL" not in env(name), name


def test_named_volume_mount_points_exist_in_the_image_owned_by_the_app_user() -> None:
    """A fresh named volume takes the owner of the folder it is first mounted on; a folder the
    image lacks would be created root-owned and unwritable for the unprivileged user."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))
    runs: dict[str, str] = {}
    stage = ""
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stage = item["value"].split()[-1]
        elif item["instruction"] == "RUN":
            runs[stage] = runs.get(stage, "") + "\n" + item["value"]
    named = set(compose()["volumes"])
    for name, svc in services().items():
        build = svc.get("build")
        if not build:
            continue
        text = runs[build["target"]]
        made = {w for line in re.findall(r"mkdir -p ([^&]+)", text) for w in line.split()
                if w.startswith("/")}
        owned = {w for line in re.findall(r"chown -R fraudstream: ([^&]+)", text)
                 for w in line.split() if w.startswith("/")}
        for target, (source, _mode) in mounts(name).items():
            if source not in named:
                continue
            assert target in made, f"{name}: {target} is not created in the {build['target']} image"
            assert any(target == o or target.startswith(o.rstrip("/") + "/") for o in owned), \
                f"{name}: {target} is not owned by the app user in the {build['target']} image"


def test_build_targets_exist_in_the_dockerfile() -> None:
    from dockerfile_parse import DockerfileParser

    for name, svc in services().items():
        build = svc.get("build")
        if not build:
            continue
        dockerfile = REPO / build["context"] / build["dockerfile"]
        parser = DockerfileParser(path=str(dockerfile))
        stages = {
            i["value"].split()[-1] for i in parser.structure
            if i["instruction"] == "FROM" and " AS " in i["value"].upper()
        }
        assert build["target"] in stages, f"{name}: no stage {build['target']!r}"
        assert set(build.get("args", {})) <= {"APP_UID", "APP_GID", "PYTHON_IMAGE"}


# --- every command is a real entry point ----------------------------------------------------------

MODULE_COMMANDS = sorted({
    command(name)[2] for name in services()
    if command(name)[:2] == ["python", "-m"]
})


def test_every_python_service_command_is_python_dash_m() -> None:
    for name in PYTHON_SERVICES:
        cmd = command(name)
        assert cmd[:2] in (["python", "-m"], ["spark-class", cmd[1]]), f"{name}: {cmd}"
    assert set(MODULE_COMMANDS) == {"producer", "spark_job", "consumer", "dashboard",
                                    "spark_job.train"}


def module_source(module: str) -> Path:
    """The file ``python -m module`` runs."""
    path = REPO / module.replace(".", "/")
    return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("module", MODULE_COMMANDS)
def test_service_module_answers_help(module: str) -> None:
    source = module_source(module)
    if not source.is_file():
        pytest.skip(f"{source.relative_to(REPO)} does not exist yet (the module is written "
                    "separately)")
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage" in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("service", ["spark-master", "spark-worker-1"])
def test_spark_standalone_commands_exist_in_pyspark(service: str) -> None:
    """The cluster profile launches Spark's own daemons through pyspark's spark-class; the
    class exists in the installed Spark and accepts every flag the compose file passes."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    assert spark_class.is_file()
    cmd = command(service)
    result = subprocess.run([str(spark_class), cmd[1], "--help"], capture_output=True,
                            text=True, timeout=120, check=False)
    usage = result.stdout + result.stderr
    assert "Usage:" in usage, usage
    for flag in (arg for arg in cmd[2:] if arg.startswith("--")):
        assert flag in usage, f"{service}: {flag} is not an option of {cmd[1]}"
