"""Topic names of the external contract (docs/contract.md) and their creation specs."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ALERTS",
    "DEFAULT_TRANSACTIONS_PARTITIONS",
    "DLQ",
    "RULES",
    "TRANSACTIONS",
    "VERDICTS",
    "TopicSpec",
    "default_topic_specs",
    "rules_topic_spec",
    "valid_topic_name",
]

TRANSACTIONS = "transactions"
ALERTS = "fraud-alerts"
DLQ = "transactions-dlq"
#: Rule definitions (compacted, keyed by rule_id); one partition keeps their order.
RULES = "fraud-rules"
VERDICTS = "fraud-verdicts"

DEFAULT_TRANSACTIONS_PARTITIONS = 3

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def valid_topic_name(name: str) -> bool:
    return bool(_TOPIC_RE.match(name)) and name not in {".", ".."}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    #: Topic configs, e.g. {"cleanup.policy": "compact"}.
    config: tuple[tuple[str, str], ...] = ()


def rules_topic_spec(name: str = RULES, replication_factor: int = 1) -> TopicSpec:
    """``fraud-rules``: one partition (the order of changes is the order they apply in),
    compacted (the newest definition per rule_id is what counts)."""
    return TopicSpec(name, 1, replication_factor, (("cleanup.policy", "compact"),))


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
