"""Small helpers over confluent-kafka shared by the services: reachability, topic creation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.topics import TopicSpec

__all__ = [
    "BrokerUnavailable",
    "ensure_topics",
    "wait_for_broker",
]

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not answer within the allowed time."""


def wait_for_broker(client_config: Mapping[str, str], timeout: float) -> AdminClient:
    """Return an AdminClient once the cluster answers a metadata request, or raise
    BrokerUnavailable naming the address after ``timeout`` seconds."""
    admin = AdminClient(dict(client_config))
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return admin
        except KafkaException as exc:
            last_error = exc
            time.sleep(0.2)
    raise BrokerUnavailable(
        f"Kafka at {client_config.get('bootstrap.servers')} did not answer within {timeout:.0f} s"
        + (f" ({last_error})" if last_error else "")
    )


def ensure_topics(
    admin: AdminClient, specs: Iterable[TopicSpec], timeout: float = 15.0
) -> list[str]:
    """Create missing topics; existing ones are left as they are. Returns the names created."""
    specs = list(specs)
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if not missing:
        return created
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                  config=dict(s.config))
         for s in missing],
        request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            created.append(name)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created


def partition_count(admin: AdminClient, topic: str, timeout: float = 10.0) -> int:
    metadata = admin.list_topics(topic=topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        raise KafkaException(info.error if info else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    return len(info.partitions)
