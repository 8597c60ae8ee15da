"""Topic names of the external contract (../shared/SPEC.md) and their creation specs."""

from __future__ import annotations

import re
from dataclasses import dataclass

TRANSACTIONS = "transactions"
ALERTS = "fraud-alerts"
DLQ = "transactions-dlq"

DEFAULT_TRANSACTIONS_PARTITIONS = 3

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def valid_topic_name(name: str) -> bool:
    return bool(_TOPIC_RE.match(name)) and name not in {".", ".."}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1


def default_topic_specs(
    transactions_partitions: int = DEFAULT_TRANSACTIONS_PARTITIONS,
    *,
    transactions: str = TRANSACTIONS,
    alerts: str = ALERTS,
    dlq: str = DLQ,
    replication_factor: int = 1,
) -> list[TopicSpec]:
    """The three topics of the pipeline. Alerts and the DLQ are keyed like transactions, so they
    get the same partition count."""
    return [
        TopicSpec(transactions, transactions_partitions, replication_factor),
        TopicSpec(alerts, transactions_partitions, replication_factor),
        TopicSpec(dlq, transactions_partitions, replication_factor),
    ]
