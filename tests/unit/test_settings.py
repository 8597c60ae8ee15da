"""fraudstream.settings: precedence (defaults < YAML < env < flags), validation errors that name
the key the user wrote, YAML problems, and the librdkafka config handed to every client."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fraudstream import topics
from fraudstream.settings import (
    ALL_SETTINGS,
    CONFIG_ENV,
    BrokerSettings,
    ConsumerSettings,
    DashboardSettings,
    DetectorSettings,
    KafkaSettings,
    ProducerSettings,
    RulesSettings,
    SettingsError,
    env_names,
    load_settings,
    run_entry_point,
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fraudstream.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(cls: type, argv: list[str] | None = None, environ: dict[str, str] | None = None
             ) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(cls, argv or [], environ or {})
    return info.value


# --- defaults and precedence -------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    settings, _ = load_settings(ProducerSettings, [], {})
    assert settings.bootstrap_servers == "localhost:9092"
    assert settings.transactions_topic == topics.TRANSACTIONS
    assert settings.rate is None and settings.count is None and settings.seed is None
    assert (settings.users, settings.rate_min, settings.rate_max) == (5000, 10.0, 100.0)
    consumer, _ = load_settings(ConsumerSettings, [], {})
    assert consumer.alerts_topic == topics.ALERTS
    assert (consumer.color, consumer.from_beginning, consumer.json) == ("auto", False, False)


def test_precedence_defaults_then_yaml_then_env_then_flags(tmp_path: Path) -> None:
    config = write(tmp_path, """
kafka:
  bootstrap_servers: yaml-host:9092
producer:
  users: 10
  seed: 1
  fraud_ratio: 0.5
""")
    env = {"PRODUCER_USERS": "20", "PRODUCER_SEED": "2", CONFIG_ENV: config}
    flags = ["--users", "30"]

    only_yaml, _ = load_settings(ProducerSettings, [], {CONFIG_ENV: config})
    assert (only_yaml.users, only_yaml.seed, only_yaml.fraud_ratio) == (10, 1, 0.5)
    assert only_yaml.bootstrap_servers == "yaml-host:9092"
    assert only_yaml.rate_max == 100.0  # untouched keys keep their default

    yaml_env, _ = load_settings(ProducerSettings, [], env)
    assert (yaml_env.users, yaml_env.seed, yaml_env.fraud_ratio) == (20, 2, 0.5)

    everything, _ = load_settings(ProducerSettings, flags, env)
    assert (everything.users, everything.seed, everything.fraud_ratio) == (30, 2, 0.5)


def test_config_flag_wins_over_config_env(tmp_path: Path) -> None:
    from_env = write(tmp_path, "producer:\n  users: 11\n")
    from_flag = tmp_path / "other.yaml"
    from_flag.write_text("producer:\n  users: 12\n", encoding="utf-8")
    settings, _ = load_settings(ProducerSettings, ["--config", str(from_flag)],
                                {CONFIG_ENV: from_env})
    assert settings.users == 12


def test_env_strings_are_converted_to_field_types() -> None:
    settings, _ = load_settings(ConsumerSettings, [], {
        "CONSUMER_FROM_BEGINNING": "yes", "CONSUMER_MAX_ALERTS": "7",
        "CONSUMER_IDLE_TIMEOUT": "2.5", "CONSUMER_JSON": "off",
    })
    assert settings.from_beginning is True and settings.json is False
    assert settings.max_alerts == 7 and settings.idle_timeout == 2.5


def test_boolean_flags_can_negate_env() -> None:
    settings, _ = load_settings(ConsumerSettings, ["--no-from-beginning"],
                                {"CONSUMER_FROM_BEGINNING": "true"})
    assert settings.from_beginning is False


def test_consumer_rule_filter_takes_any_rule_id() -> None:
    settings, _ = load_settings(ConsumerSettings, ["--rule", "velocity_10m"], {})
    assert settings.rule == "velocity_10m"
    settings, _ = load_settings(ConsumerSettings, [], {"CONSUMER_RULE": "high_value"})
    assert settings.rule == "high_value"


def test_empty_env_value_clears_an_optional_setting(tmp_path: Path) -> None:
    config = write(tmp_path, "producer:\n  seed: 5\n")
    settings, _ = load_settings(ProducerSettings, [], {CONFIG_ENV: config, "PRODUCER_SEED": ""})
    assert settings.seed is None


def test_paths_expand_the_home_directory() -> None:
    settings, _ = load_settings(ProducerSettings, ["--from-file", "~/x.jsonl"], {})
    assert settings.from_file == Path("~/x.jsonl").expanduser()


def test_settings_are_frozen() -> None:
    settings, _ = load_settings(ProducerSettings, [], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.users = 3  # type: ignore[misc]


# --- validation names the key ------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "argv", "environ", "key", "words"), [
    (ProducerSettings, ["--rate", "abc"], {}, "--rate", "expected"),
    (ProducerSettings, [], {"PRODUCER_RATE": "fast"}, "PRODUCER_RATE", "expected"),
    (ProducerSettings, ["--users", "0"], {}, "--users", "must be >= 1"),
    (ProducerSettings, ["--users", "1.5"], {}, "--users", "expected"),
    (ProducerSettings, ["--fraud-ratio", "2"], {}, "PRODUCER_FRAUD_RATIO", "must be <= 1"),
    (ProducerSettings, ["--rate", "-1"], {}, "--rate", "must be >= 0"),
    (ProducerSettings, ["--rate", "nan"], {}, "--rate", "finite"),
    (ProducerSettings, ["--rate-min", "50", "--rate-max", "20"], {}, "--rate-min",
     "must not exceed rate_max"),
    (ProducerSettings, [], {"KAFKA_BOOTSTRAP_SERVERS": "nohost"}, "KAFKA_BOOTSTRAP_SERVERS",
     "host:port"),
    (ProducerSettings, [], {"KAFKA_BOOTSTRAP_SERVERS": "a:1,b:99999"}, "KAFKA_BOOTSTRAP_SERVERS",
     "b:99999"),
    (ProducerSettings, [], {"KAFKA_BOOTSTRAP_SERVERS": " "}, "KAFKA_BOOTSTRAP_SERVERS",
     "must not be empty"),
    (ProducerSettings, ["--transactions-topic", "bad topic!"], {}, "TRANSACTIONS_TOPIC",
     "not a valid Kafka topic name"),
    (ConsumerSettings, ["--color", "purple"], {}, "--color", "auto, always, never"),
    (ConsumerSettings, [], {"CONSUMER_FROM_BEGINNING": "maybe"}, "CONSUMER_FROM_BEGINNING",
     "true/false"),
    (DetectorSettings, [], {"STARTING_OFFSETS": "middle"}, "STARTING_OFFSETS", "earliest"),
    (DetectorSettings, [], {"ON_BROKER_RESET": "ignore"}, "ON_BROKER_RESET", "fail, new-epoch"),
    (DetectorSettings, ["--on-broker-reset", "reset"], {}, "--on-broker-reset", "new-epoch"),
    (DetectorSettings, [], {"KAFKA_SOURCE": "spark-kafka"}, "KAFKA_SOURCE",
     "must be one of python"),
    (BrokerSettings, ["--port", "70000"], {}, "--port", "must be <= 65535"),
])
def test_invalid_values_name_the_key(cls: type, argv: list[str], environ: dict[str, str],
                                     key: str, words: str) -> None:
    error = error_of(cls, argv, environ)
    assert key in error.key
    assert words in error.message
    assert key in str(error)


def test_range_errors_list_every_name_of_the_setting() -> None:
    error = error_of(ProducerSettings, [], {"PRODUCER_USERS": "0"})
    assert error.key == "PRODUCER_USERS / producer.users / --users"


def test_sasl_requires_a_mechanism() -> None:
    error = error_of(ProducerSettings, [], {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert "KAFKA_SASL_MECHANISM" in error.key
    assert "SASL_SSL" in error.message
    settings, _ = load_settings(ProducerSettings, [], {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    })
    assert settings.sasl_mechanism == "SCRAM-SHA-512"


def test_unknown_security_protocol_is_rejected() -> None:
    error = error_of(ConsumerSettings, ["--security-protocol", "TLS"])
    assert "--security-protocol" in error.key and "SASL_SSL" in error.message


# --- YAML problems -----------------------------------------------------------------------------


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path, "producer: [unclosed\n")
    error = error_of(ProducerSettings, ["--config", config])
    assert CONFIG_ENV in error.key and "--config" in error.key
    assert "not valid YAML" in error.message and config in error.message


def test_yaml_must_hold_a_mapping(tmp_path: Path) -> None:
    error = error_of(ProducerSettings, [], {CONFIG_ENV: write(tmp_path, "- a\n- b\n")})
    assert "must hold a mapping" in error.message


def test_missing_config_file(tmp_path: Path) -> None:
    error = error_of(ProducerSettings, ["--config", str(tmp_path / "absent.yaml")])
    assert "cannot read" in error.message and "absent.yaml" in error.message


def test_empty_yaml_is_all_defaults(tmp_path: Path) -> None:
    settings, _ = load_settings(ProducerSettings, ["--config", write(tmp_path, "")], {})
    assert settings == load_settings(ProducerSettings, [], {})[0]


def test_unknown_key_is_named_with_its_section(tmp_path: Path) -> None:
    error = error_of(ProducerSettings, ["--config", write(tmp_path, "producer:\n  userz: 3\n")])
    assert error.key == "producer.userz" and "unknown setting" in error.message
    error = error_of(ConsumerSettings, ["--config", write(tmp_path, "kafka:\n  bootstrap: x\n")])
    assert error.key == "kafka.bootstrap"


def test_unknown_section_is_named(tmp_path: Path) -> None:
    error = error_of(ProducerSettings, ["--config", write(tmp_path, "prodcuer:\n  users: 3\n")])
    assert error.key == "prodcuer" and "unknown section" in error.message


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    error = error_of(ProducerSettings, ["--config", write(tmp_path, "producer: 3\n")])
    assert error.key == "producer"


def test_other_programs_sections_are_ignored(tmp_path: Path) -> None:
    config = write(tmp_path, """
kafka:
  bootstrap_servers: shared:9092
detector:
  velocity_count: 5
consumer:
  color: never
""")
    producer, _ = load_settings(ProducerSettings, ["--config", config], {})
    detector, _ = load_settings(DetectorSettings, ["--config", config], {})
    consumer, _ = load_settings(ConsumerSettings, ["--config", config], {})
    assert producer.bootstrap_servers == detector.bootstrap_servers == "shared:9092"
    assert detector.velocity_count == 5 and consumer.color == "never"


def test_yaml_values_are_validated_and_named(tmp_path: Path) -> None:
    error = error_of(ProducerSettings,
                     ["--config", write(tmp_path, "producer:\n  users: many\n")])
    assert error.key == "producer.users"
    error = error_of(ProducerSettings,
                     ["--config", write(tmp_path, "producer:\n  count: true\n")])
    assert error.key == "producer.count"


def test_yaml_only_settings_reject_flags_and_scalars(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_settings(ProducerSettings, ["--client-overrides", "x"], {})
    error = error_of(ProducerSettings,
                     ["--config", write(tmp_path, "kafka:\n  client_overrides: 3\n")])
    assert error.key == "kafka.client_overrides" and "mapping" in error.message


# --- the librdkafka config ---------------------------------------------------------------------


def test_client_config_passes_security_keys_through(tmp_path: Path) -> None:
    config = write(tmp_path, """
kafka:
  ssl_ca_location: /etc/ca.pem
  client_overrides:
    sasl.oauthbearer.config: "scope=x"
    socket.keepalive.enable: true
""")
    settings, _ = load_settings(ConsumerSettings, ["--config", config], {
        "KAFKA_BOOTSTRAP_SERVERS": "b1:9093,b2:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "alice",
        "KAFKA_SASL_PASSWORD": "s3cret",
    })
    assert settings.client_config() == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "alice",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "sasl.oauthbearer.config": "scope=x",
        "socket.keepalive.enable": "True",
    }


def test_plaintext_client_config_has_no_empty_security_keys() -> None:
    settings, _ = load_settings(KafkaSettings, [], {"KAFKA_BOOTSTRAP_SERVERS": "h:1"})
    assert settings.client_config() == {"bootstrap.servers": "h:1",
                                        "security.protocol": "PLAINTEXT"}


def test_secrets_are_redacted_for_logs() -> None:
    settings, _ = load_settings(ProducerSettings, [], {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_SSL_KEY_PASSWORD": "k3y",
    })
    redacted = settings.redacted()
    assert redacted["sasl_password"] == "***" and redacted["ssl_key_password"] == "***"
    assert "hunter2" not in repr(redacted) and "k3y" not in repr(redacted)
    assert redacted["sasl_mechanism"] == "PLAIN"


def test_every_program_reads_the_bootstrap_env_and_has_distinct_env_names() -> None:
    for cls in ALL_SETTINGS:
        names = env_names(cls)
        if issubclass(cls, KafkaSettings):
            assert "KAFKA_BOOTSTRAP_SERVERS" in names
    for cls in (ProducerSettings, ConsumerSettings, DetectorSettings, DashboardSettings):
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("env")]
        assert len({f.metadata["env"] for f in fields}) == len(fields), cls


# --- entry points -------------------------------------------------------------------------------


def test_entry_point_turns_settings_errors_into_exit_2(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    def main() -> int:
        load_settings(ProducerSettings, ["--rate", "abc"], {})
        return 0

    with pytest.raises(SystemExit) as info:
        run_entry_point("python -m producer", main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m producer: invalid setting --rate:")
    assert err.count("\n") == 1


def test_entry_point_passes_the_exit_code_through() -> None:
    with pytest.raises(SystemExit) as info:
        run_entry_point("prog", lambda: 1)
    assert info.value.code == 1
    with pytest.raises(SystemExit) as info:
        run_entry_point("prog", lambda: 0)
    assert info.value.code == 0


def test_driver_memory_takes_a_jvm_size_and_names_the_key_otherwise() -> None:
    assert DetectorSettings(driver_memory="1536m").driver_memory == "1536m"
    with pytest.raises(SettingsError, match=r"driver[_-]memory|SPARK_DRIVER_MEMORY") as caught:
        DetectorSettings(driver_memory="lots")
    assert "1g" in str(caught.value)


def test_on_broker_reset_defaults_to_fail_and_takes_new_epoch(tmp_path: Path) -> None:
    assert load_settings(DetectorSettings, [], {})[0].on_broker_reset == "fail"
    settings, _ = load_settings(DetectorSettings, [], {"ON_BROKER_RESET": "new-epoch"})
    assert settings.on_broker_reset == "new-epoch"
    config = write(tmp_path, "detector:\n  on_broker_reset: new-epoch\n")
    assert load_settings(DetectorSettings, ["--config", config], {})[0].on_broker_reset == (
        "new-epoch")
    assert "ON_BROKER_RESET" in env_names(DetectorSettings)


def test_kafka_source_still_accepts_python() -> None:
    settings, _ = load_settings(DetectorSettings, [], {"KAFKA_SOURCE": "python"})
    assert settings.source == "python"


# --- storage paths -----------------------------------------------------------------------------

STORAGE_PATHS = [
    (DetectorSettings, "PARQUET_DIR"), (DetectorSettings, "CHECKPOINT_DIR"),
    (ConsumerSettings, "PARQUET_DIR"), (DashboardSettings, "PARQUET_DIR"),
    (RulesSettings, "PARQUET_DIR"),
]


@pytest.mark.parametrize(("cls", "env"), STORAGE_PATHS)
@pytest.mark.parametrize("url", ["s3a://bucket/fraudstream/x", "hdfs:///fraudstream/x",
                                 "gs://bucket/x", "file:///tmp/x"])
def test_storage_urls_are_refused_naming_the_key(cls: type, env: str, url: str) -> None:
    error = error_of(cls, [], {env: url})
    assert env in error.key
    scheme = url.split(":", 1)[0]
    assert f"{scheme}://" in error.message
    assert "only local (or mounted network) paths" in error.message


@pytest.mark.parametrize("cls", [DetectorSettings, ConsumerSettings, DashboardSettings,
                                 RulesSettings])
def test_the_parquet_root_may_be_an_s3_url(cls: type) -> None:
    settings, _ = load_settings(cls, [], {"PARQUET_DIR": "s3://bucket/fraud/"})
    assert str(settings.parquet_dir) == "s3://bucket/fraud"
    assert str(settings.parquet_dir / "alerts") == "s3://bucket/fraud/alerts"
    if hasattr(settings, "resolved_metrics_file"):  # an object cannot be appended to
        assert settings.resolved_metrics_file == Path("run/metrics/detector.jsonl")


def test_the_checkpoint_cannot_be_on_s3_and_says_why() -> None:
    error = error_of(DetectorSettings, [], {"CHECKPOINT_DIR": "s3://bucket/checkpoint"})
    assert "CHECKPOINT_DIR" in error.key and "hadoop-aws" in error.message
    error = error_of(DetectorSettings, [], {"PARQUET_DIR": "s3://"})
    assert "PARQUET_DIR" in error.key and "bucket" in error.message


@pytest.mark.parametrize(("cls", "env"), STORAGE_PATHS)
def test_storage_urls_are_refused_from_flags_and_yaml(tmp_path: Path, cls: type, env: str
                                                      ) -> None:
    name = env.lower()
    error = error_of(cls, ["--" + name.replace("_", "-"), "s3a://bucket/x"])
    assert "--" + name.replace("_", "-") in error.key
    config = write(tmp_path, f"{cls.SECTION}:\n  {name}: hdfs:///x\n")
    error = error_of(cls, ["--config", config])
    assert f"{cls.SECTION}.{name}" in error.key and "hdfs://" in error.message


@pytest.mark.parametrize("path", ["/mnt/nfs/fraudstream", "run/checkpoint", "~/data",
                                  "/data/a:b/c", "C:/data"])
def test_local_and_mounted_paths_are_accepted(path: str) -> None:
    settings, _ = load_settings(DetectorSettings, [], {"PARQUET_DIR": path,
                                                       "CHECKPOINT_DIR": path})
    assert settings.parquet_dir == settings.checkpoint_dir == Path(path).expanduser()
    for cls in (ConsumerSettings, DashboardSettings, RulesSettings):
        assert load_settings(cls, [], {"PARQUET_DIR": path})[0].parquet_dir == (
            Path(path).expanduser())
