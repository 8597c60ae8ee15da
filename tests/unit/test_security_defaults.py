"""Security defaults: local services listen on the loopback interface only, Kafka security
settings reach every client unchanged, no credential is committed, and reset.sh deletes only
the project's own generated state.

Nothing here has authentication of its own (no broker ACLs, no dashboard login), so binding to
127.0.0.1 is what keeps a developer's machine from serving its transactions to the network.
The Docker files are checked in tests/docker (ports published on 127.0.0.1 only, no literal
secrets in docker-compose.yml, the exact compose commands reset.sh issues).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from support.commands import path_without

from fraudstream.broker import EmbeddedBroker
from fraudstream.settings import (
    ALL_SETTINGS,
    BrokerSettings,
    ConsumerSettings,
    DashboardSettings,
    DetectorSettings,
    KafkaSettings,
    ProducerSettings,
    SettingsError,
    build_parser,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


# --- bind addresses -----------------------------------------------------------------------------


def test_embedded_broker_binds_loopback_by_default() -> None:
    assert BrokerSettings().host == LOOPBACK
    assert inspect.signature(EmbeddedBroker).parameters["host"].default == LOOPBACK
    settings, _ = load_settings(BrokerSettings, [], {})
    assert settings.host == LOOPBACK


def test_setup_sh_pins_the_broker_and_the_dashboard_to_loopback() -> None:
    script = (REPO / "setup.sh").read_text()
    assert re.search(r"^readonly BROKER_HOST=127\.0\.0\.1$", script, re.M), \
        "the local broker's address must be fixed, not taken from the environment"
    assert "export BROKER_HOST" in script
    assert 'STREAMLIT_SERVER_ADDRESS="${STREAMLIT_SERVER_ADDRESS:-127.0.0.1}"' in script
    assert "0.0.0.0" not in script


def test_dashboard_config_beside_the_app_binds_loopback() -> None:
    config = tomllib.loads((REPO / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == LOOPBACK
    assert config["browser"]["gatherUsageStats"] is False


def test_streamlit_resolves_the_dashboard_address_to_loopback() -> None:
    """Streamlit's own resolution (global, project, then script-level config) for the app that
    ``python -m dashboard`` runs, from a working directory without a .streamlit folder and with
    no STREAMLIT_* variable set."""
    code = (
        "import sys\n"
        "from streamlit import config\n"
        "config._main_script_path = sys.argv[1]\n"
        "config.get_config_options(force_reparse=True)\n"
        "print(config.get_option('server.address'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env["HOME"] = str(REPO / "nonexistent-home")  # no ~/.streamlit/config.toml
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "dashboard" / "app.py")],
                            cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LOOPBACK


# --- Kafka security settings reach every client ---------------------------------------------------

SECRET = "pw-" + uuid.uuid4().hex  # made up at run time: no literal password in the repository
SECURITY_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "broker.example:9093",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "fraudstream",
    "KAFKA_SASL_PASSWORD": SECRET,
    "KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca.pem",
    "KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/ssl/certs/client.pem",
    "KAFKA_SSL_KEY_LOCATION": "/etc/ssl/private/client.key",
    "KAFKA_SSL_KEY_PASSWORD": SECRET + "-key",
}
EXPECTED_CLIENT_KEYS = {
    "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "fraudstream", "sasl.password": SECRET,
    "ssl.ca.location": "/etc/ssl/certs/ca.pem",
    "ssl.certificate.location": "/etc/ssl/certs/client.pem",
    "ssl.key.location": "/etc/ssl/private/client.key", "ssl.key.password": SECRET + "-key",
}
KAFKA_PROGRAMS = (ProducerSettings, DetectorSettings, ConsumerSettings, DashboardSettings)


@pytest.mark.parametrize("cls", KAFKA_PROGRAMS, ids=lambda c: c.__name__)
def test_sasl_and_ssl_settings_pass_through_to_librdkafka(cls: type[KafkaSettings]) -> None:
    settings, _ = load_settings(cls, [], SECURITY_ENV)
    config = settings.client_config()
    for key, value in EXPECTED_CLIENT_KEYS.items():
        assert config.get(key) == value, key
    redacted = settings.redacted()
    assert SECRET not in str(redacted), "secrets must be masked in logged settings"
    assert redacted["sasl_password"] == "***"


def test_every_client_the_services_build_gets_the_security_settings() -> None:
    from producer.app import producer_config
    from spark_job.app import source_options

    producer, _ = load_settings(ProducerSettings, [], SECURITY_ENV)
    config = producer_config(producer)
    assert {k: config[k] for k in EXPECTED_CLIENT_KEYS} == EXPECTED_CLIENT_KEYS

    detector, _ = load_settings(DetectorSettings, [], SECURITY_ENV)
    options = source_options(detector)  # the Spark source hands kafka.* to librdkafka
    assert {k: options[f"kafka.{k}"] for k in EXPECTED_CLIENT_KEYS} == EXPECTED_CLIENT_KEYS


def test_security_settings_are_valid_librdkafka_properties() -> None:
    """librdkafka refuses unknown properties at construction; no connection is made."""
    from confluent_kafka import Producer

    settings, _ = load_settings(DetectorSettings, [], {
        k: v for k, v in SECURITY_ENV.items() if not k.startswith("KAFKA_SSL_")})
    Producer(settings.client_config()).flush(0)


def test_yaml_client_overrides_reach_the_client(tmp_path: Path) -> None:
    path = tmp_path / "fraudstream.yaml"
    path.write_text("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n"
                    "  client_overrides:\n    sasl.oauthbearer.method: oidc\n")
    settings, _ = load_settings(DetectorSettings, ["--config", str(path)], {})
    assert settings.client_config()["sasl.oauthbearer.method"] == "oidc"
    assert settings.client_config()["sasl.mechanism"] == "OAUTHBEARER"


def test_sasl_without_a_mechanism_is_refused_naming_the_key() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(ConsumerSettings, [], {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert "KAFKA_SASL_MECHANISM" in error.value.key


@pytest.mark.parametrize("cls", ALL_SETTINGS, ids=lambda c: c.__name__)
def test_passwords_have_no_command_line_flag(cls: type) -> None:
    """A flag would put the secret in `ps` output and shell history: environment or YAML only."""
    help_text = build_parser(cls).format_help()
    for flag in ("--sasl-password", "--ssl-key-password", "--sasl-username"):
        assert flag not in help_text


def test_the_configuration_page_documents_the_security_settings() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    for name in SECURITY_ENV:
        if name != "KAFKA_BOOTSTRAP_SERVERS":
            assert name in page, f"docs/configuration.md does not document {name}"


# --- no credentials in the repository ------------------------------------------------------------

#: Assignments of a literal to a password/secret/token-like name, in code, YAML, env or TOML.
SECRET_ASSIGNMENT = re.compile(
    r"""(?ix)
    \b[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*\b
    ["']?\s*(?:=|:)\s*
    (?P<value>"[^"\n]{4,}"|'[^'\n]{4,}'|[^\s"'#,)\]}]{6,})
    """)
#: Values that are references or declarations, not secrets.
HARMLESS_VALUE = re.compile(
    r"""(?ix)^["']?(?:
        \$\{?[A-Za-z_][A-Za-z0-9_]*\}?   # ${ENV} / $ENV
      | \*+ | <[^>]*> | x{3,} | changeme | example\S* | none | null | true | false
      | str | bool | int | float | setting\(.* | os\.environ.* | settings\.\S+ | self\.\S+
      | record\S* | value\S* | f["'].* | KafkaError\S* | SECRET\S* | \w+\[\S* | \w+\(.*
      | [a-z_]+\.[a-z_.]+                # attribute access / dotted librdkafka property name
    )["']?$""")
PRIVATE_KEY = re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----")
CLOUD_KEY = re.compile(r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|xox[baprs]-[\w-]{10,})\b")


def repository_text_files() -> list[Path]:
    """Tracked files plus new files git would add (not ignored), without binary ones."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    files = []
    for name in sorted(set(listed.stdout.splitlines())):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        if b"\0" in path.read_bytes()[:8192]:
            continue
        files.append(path)
    return files


def test_no_credentials_in_the_repository() -> None:
    """Keys and tokens anywhere; password-like assignments everywhere except tests/, whose
    fixtures need made-up values (e.g. a fake SASL password to check that it is masked)."""
    files = repository_text_files()
    assert len(files) > 50, "the scan must see the repository"
    findings = []
    for path in files:
        text = path.read_text(errors="replace")
        is_test = path.relative_to(REPO).parts[0] == "tests"
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_KEY.search(line) or CLOUD_KEY.search(line):
                findings.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
            for match in [] if is_test else SECRET_ASSIGNMENT.finditer(line):
                if not HARMLESS_VALUE.match(match.group("value")):
                    findings.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not findings, "possible credentials:\n" + "\n".join(findings)


def test_the_credential_scan_catches_planted_secrets() -> None:
    """The scan above must be able to fail: each of these would be reported."""
    planted = [
        'KAFKA_SASL_PASSWORD="hunter2hunter2"',
        "  sasl_password: s3cr3t-value",
        "api_key = 'abcd1234efgh'",
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "-----BEGIN " + "PRIVATE KEY-----",
    ]
    for line in planted:
        hit = bool(PRIVATE_KEY.search(line) or CLOUD_KEY.search(line)) or any(
            not HARMLESS_VALUE.match(m.group("value")) for m in SECRET_ASSIGNMENT.finditer(line))
        assert hit, line
    for harmless in ('KAFKA_SASL_PASSWORD: ${KAFKA_SASL_PASSWORD}', "sasl_password: None",
                     '"sasl.password": self.sasl_password'):
        assert all(HARMLESS_VALUE.match(m.group("value"))
                   for m in SECRET_ASSIGNMENT.finditer(harmless)), harmless


# --- reset.sh touches only the project's own files and processes ----------------------------------

COPY_IGNORE = shutil.ignore_patterns(
    ".git", "run", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
    "parquet_data", "spark-warehouse", "metastore_db", "benchmarks", "tests", "docs",
)


def test_reset_deletes_only_generated_state_and_kills_no_stranger(tmp_path: Path) -> None:
    """A sandbox copy of the repository with traps: symlinks out of run/ and parquet_data/, a
    PID file naming a process that is not ours, files beside the checkout."""
    root = tmp_path / "fraudstream"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE)
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "precious.parquet").write_text("not yours")
    (outside / "run-target").mkdir()
    (outside / "run-target" / "keep.txt").write_text("not yours")
    (tmp_path / "sibling.txt").write_text("beside the checkout")
    (root / "notes.txt").write_text("mine")

    (root / "parquet_data" / "alerts" / "batch_id=0").mkdir(parents=True)
    (root / "parquet_data" / "alerts" / "batch_id=0" / "part-0.parquet").write_bytes(b"PAR1")
    (root / "parquet_data" / ".gitkeep").touch()
    (root / "parquet_data" / "linked").symlink_to(outside / "data")
    (root / "run" / "checkpoint").mkdir(parents=True)
    (root / "run" / "linked").symlink_to(outside / "run-target")
    (root / "run" / "pids").mkdir()
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        for service in ("broker", "producer", "detector", "dashboard"):
            (root / "run" / "pids" / f"{service}.pid").write_text(f"{stranger.pid}\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KAFKA_", "BROKER_", "FRAUDSTREAM_", "STREAMLIT_"))}
        env["FRAUDSTREAM_PYTHON"] = sys.executable
        # Without any docker client reset.sh takes its local branch (the Docker branch is
        # covered in tests/docker/test_scripts.py).
        env["PATH"] = path_without(tmp_path / "bin", prefix="docker")
        result = subprocess.run(["./reset.sh", "--yes"], cwd=root, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        # A signal sent before reset.sh returned would end the process within this bound.
        with pytest.raises(subprocess.TimeoutExpired):
            stranger.wait(timeout=1.0)
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait(10)

    assert not (root / "run").exists()
    assert sorted(p.name for p in (root / "parquet_data").iterdir()) == [".gitkeep"]
    assert (outside / "data" / "precious.parquet").read_text() == "not yours"
    assert (outside / "run-target" / "keep.txt").read_text() == "not yours"
    assert (tmp_path / "sibling.txt").exists() and (root / "notes.txt").read_text() == "mine"
    for kept in ("setup.sh", "reset.sh", "pyproject.toml", "fraudstream", "docker-compose.yml"):
        assert (root / kept).exists(), kept


def test_reset_deletes_nothing_but_run_parquet_data_and_models() -> None:
    """Every deleting command in reset.sh names run/, parquet_data/ or models/ (read, not run)."""
    script = (REPO / "reset.sh").read_text()
    code = [line.split("#", 1)[0] for line in script.splitlines()]
    deleting = [line.strip() for line in code if re.search(r"\b(rm|rmdir|unlink|find)\b", line)
                and not line.strip().startswith(("echo", "printf", "die"))]
    assert deleting, "reset.sh must delete something"
    for line in deleting:
        assert re.search(r"(?:^|\s)(?:--\s+)?(run|parquet_data|models)\b", line), line
    assert not re.search(r"\b(pkill|killall)\b|prune|volume rm|\brm -rf /|\$HOME|~/", script)
