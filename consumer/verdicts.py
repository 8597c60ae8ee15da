"""The console's verdict commands: give a verdict on an alert (``--verdict``), print an alert's
audit trail (``--verdict-history``), re-publish the verdicts topic from the database
(``--republish-verdicts``), and open the database for ``--show-verdicts``.

Each command prints what it did on standard output, or one line on standard error and exits 2
when the request is refused (unknown alert, unknown word, note too long) or 1 when the
database or the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.cli import ANALYST_ENV
from consumer.render import clean
from fraudstream.kafka import BrokerUnavailable, wait_for_broker
from fraudstream.schemas import format_timestamp
from fraudstream.settings import ConsumerSettings
from fraudstream.verdicts import (
    RecordedVerdict,
    VerdictError,
    VerdictPublisher,
    VerdictPublishError,
    VerdictStore,
    VerdictStoreError,
    check_alert_id,
    decide,
    make_verdict,
    parquet_alert_ids,
)

__all__ = [
    "AlertLookupError",
    "alert_on_topic",
    "open_store",
    "run_verdict_command",
]

PROG: Final = ConsumerSettings.PROG
EXIT_UNREACHABLE: Final = 1
EXIT_REFUSED: Final = 2


class AlertLookupError(RuntimeError):
    """The alerts topic could not be read to its end."""


def run_verdict_command(settings: ConsumerSettings, args: argparse.Namespace,
                        environ: Mapping[str, str]) -> int:
    """Run the verdict command the flags ask for; returns the exit code."""
    try:
        if args.verdict:
            return _give(settings, args, environ)
        if args.note is not None or args.analyst is not None:
            raise VerdictError("--note and --analyst go with --verdict ALERT_ID WORD")
        if args.verdict_history:
            return _history(settings, args.verdict_history)
        return _republish(settings)
    except VerdictError as exc:
        return _fail(exc, EXIT_REFUSED)
    except (VerdictStoreError, VerdictPublishError, BrokerUnavailable, AlertLookupError,
            KafkaException) as exc:
        return _fail(exc, EXIT_UNREACHABLE)


def open_store(settings: ConsumerSettings) -> VerdictStore | None:
    """The verdict database, migrated and ready, for ``--show-verdicts``; None (after one
    line on standard error) when it cannot be used."""
    try:
        store = VerdictStore(settings.verdicts_url)
        store.migrate()
    except VerdictStoreError as exc:
        _fail(exc, EXIT_UNREACHABLE)
        return None
    return store


# --- commands -----------------------------------------------------------------------------------


def _give(settings: ConsumerSettings, args: argparse.Namespace, environ: Mapping[str, str]
          ) -> int:
    alert_id, word = args.verdict
    verdict = make_verdict(alert_id, word, _analyst(args.analyst, environ), args.note or "")
    publisher = VerdictPublisher(_client_config(settings), settings.verdicts_topic,
                                 timeout=settings.connect_timeout)
    with VerdictStore(settings.verdicts_url) as store:
        store.migrate()  # an unusable database is reported before the alert is looked up
        try:
            recorded = decide(store, verdict, known=lambda wanted: _known(settings, wanted),
                              publisher=publisher)
        except VerdictPublishError as exc:
            if exc.recorded is not None:
                print(_recorded_line(exc.recorded, store), flush=True)
            raise
        finally:
            publisher.close()
        print(_recorded_line(recorded, store))
    print(f"published to {settings.verdicts_topic} (key {recorded.alert_id})")
    return 0


def _history(settings: ConsumerSettings, alert_id: str) -> int:
    alert_id = check_alert_id(alert_id)
    with VerdictStore(settings.verdicts_url) as store:
        trail = store.history(alert_id)
    if settings.json:
        for entry in trail:
            print(json.dumps({**entry.to_dict(), "id": entry.id,
                              "recorded_at": format_timestamp(entry.recorded_at)}))
        return 0
    if not trail:
        print(f"no verdict recorded for alert {alert_id}")
        return 0
    current = trail[-1]
    count = f"{len(trail)} verdict{'s' if len(trail) != 1 else ''}"
    print(f"alert {alert_id}: {count}; in force: {current.verdict} by {clean(current.analyst)}")
    for entry in trail:
        note = f"  note: {clean(entry.note)}" if entry.note else ""
        print(f"  {format_timestamp(entry.decided_at)}  {entry.verdict:<6}  by "
              f"{clean(entry.analyst)}  (#{entry.id}, recorded "
              f"{format_timestamp(entry.recorded_at)}){note}")
    return 0


def _republish(settings: ConsumerSettings) -> int:
    publisher = VerdictPublisher(_client_config(settings), settings.verdicts_topic,
                                 timeout=settings.connect_timeout)
    with VerdictStore(settings.verdicts_url) as store:
        try:
            count = publisher.republish(store)
        finally:
            publisher.close()
        print(f"re-published {count} verdict{'s' if count != 1 else ''} from "
              f"{store.display_url} to {settings.verdicts_topic}")
    return 0


# --- helpers ------------------------------------------------------------------------------------


def _recorded_line(recorded: RecordedVerdict, store: VerdictStore) -> str:
    return (f"recorded verdict #{recorded.id} on alert {recorded.alert_id}: {recorded.verdict} "
            f"by {clean(recorded.analyst)}, decided {format_timestamp(recorded.decided_at)}, "
            f"in {store.display_url}")


def _analyst(flag: str | None, environ: Mapping[str, str]) -> str:
    """--analyst, else $FRAUDSTREAM_ANALYST, else the login name."""
    for candidate in (flag, environ.get(ANALYST_ENV)):
        if candidate and candidate.strip():
            return candidate.strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (e.g. a container user without an entry)
        raise VerdictError(f"analyst: cannot tell who decides: give --analyst NAME or set "
                           f"{ANALYST_ENV}") from None


def _known(settings: ConsumerSettings, alert_id: str) -> bool:
    """In the Parquet history (cheap, no broker), else on the alerts topic."""
    try:
        if alert_id in parquet_alert_ids(settings.parquet_dir):
            return True
    except (OSError, ValueError) as exc:
        print(f"{PROG}: warning: cannot read the alerts under {settings.parquet_dir} "
              f"({_one_line(exc)}); looking on the topic only", file=sys.stderr)
    try:
        return alert_on_topic(_client_config(settings), settings.alerts_topic, alert_id,
                              settings.connect_timeout)
    except (BrokerUnavailable, KafkaException, AlertLookupError) as exc:
        raise AlertLookupError(f"cannot look alert {alert_id} up on topic "
                               f"{settings.alerts_topic!r}: {exc}") from None


def alert_on_topic(client_config: Mapping[str, Any], topic: str, alert_id: str,
                   timeout: float) -> bool:
    """Whether an alert with this id is on the alerts topic, read from the beginning to the
    end of every partition. False when the topic does not exist."""
    admin = wait_for_broker(client_config, timeout)
    info = admin.list_topics(timeout=timeout).topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        return False
    consumer = Consumer({
        **client_config,
        # Required by librdkafka for assign(); never joined, nothing committed.
        "group.id": f"fraudstream-verdict-lookup-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    needle = alert_id.encode()
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
        pending = set(info.partitions)
        progress = time.monotonic()
        while pending:
            if time.monotonic() - progress > timeout:
                raise AlertLookupError(f"no progress reading the topic for {timeout:g} s")
            for message in consumer.consume(500, timeout=0.5):
                progress = time.monotonic()
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                    elif error.fatal():
                        raise AlertLookupError(error.str())
                    continue
                value = message.value()
                if value and needle in value and _alert_id_of(value) == alert_id:
                    return True
        return False
    finally:
        consumer.close()


def _alert_id_of(value: bytes) -> str | None:
    try:
        record = json.loads(value)
    except ValueError:
        return None
    return record.get("alert_id") if isinstance(record, dict) else None


def _client_config(settings: ConsumerSettings) -> dict[str, Any]:
    """librdkafka logs through Python logging, so an unreachable broker is reported once, by
    the error line, not by a stream of connection failures."""
    return {**settings.client_config(), "logger": logging.getLogger("librdkafka")}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _fail(error: BaseException, code: int) -> int:
    print(f"{PROG}: {_one_line(error)}", file=sys.stderr, flush=True)
    return code
