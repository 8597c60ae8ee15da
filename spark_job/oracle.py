"""A plain-Python reference for the rules: brute force over a complete list of transactions.

Deliberately written apart from ``spark_job.rules`` (no incremental state, no pruning, no
pointers): for every user and rule it evaluates the span ending at every transaction by a full
scan, builds the episodes as maximal unions of the intervals where the condition holds, and
yields one alert per episode. Tests and benchmarks compare the detector's output with it.
It agrees with the streaming job whenever no event arrives later than the watermark and late
(out-of-order) events arrive before an alert they would have changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from fraudstream import schemas
from spark_job.rules import MICROS, RuleConfig

Row = Mapping[str, Any]


def _event_us(record: Row) -> int:
    value = record["timestamp"]
    moment = schemas.parse_timestamp(value) if isinstance(value, str) else value
    # Integer arithmetic: float seconds would misplace exact span boundaries.
    return (moment.toordinal() * 86_400 + moment.hour * 3600 + moment.minute * 60
            + moment.second) * MICROS + moment.microsecond


def _condition(rule: str, window: list[tuple[int, str, Row]], config: RuleConfig) -> bool:
    if rule == schemas.MULTI_LOCATION:
        return len({r["location"] for _, _, r in window}) >= config.multi_location_count
    limit = config.velocity_count if rule == schemas.VELOCITY else config.paypal_micro_count
    return len(window) > limit


def _holds_until(rule: str, window: list[tuple[int, str, Row]], config: RuleConfig) -> int:
    """Last instant at which the condition still holds if nothing else arrives (brute force)."""
    span = config.window_us(rule)
    t = window[-1][0]
    # The condition can only stop holding when a member leaves the span: try each exit time.
    exits = sorted({member[0] + span for member in window if member[0] + span >= t})
    last_true = t
    for exit_time in exits:
        remaining = [m for m in window if m[0] >= exit_time - span]
        if _condition(rule, remaining, config):
            last_true = exit_time
        else:
            break
    return last_true


def expected_alerts(transactions: Iterable[Row], config: RuleConfig | None = None
                    ) -> list[dict[str, Any]]:
    """Alerts (rule, user_id, alert_id, transaction_ids, window bounds) the rules must emit.

    Transactions are SPEC dicts (``timestamp`` as ISO string or aware datetime). A repeated
    transaction_id counts once.
    """
    config = config or RuleConfig()
    by_user: dict[str, dict[str, tuple[int, str, Row]]] = defaultdict(dict)
    for record in transactions:
        bucket = by_user[record["user_id"]]
        bucket.setdefault(record["transaction_id"],
                          (_event_us(record), record["transaction_id"], record))
    alerts: list[dict[str, Any]] = []
    for user_id, unique in sorted(by_user.items()):
        events = sorted(unique.values(), key=lambda item: (item[0], item[1]))
        for t, tx_id, record in events:
            if float(record["amount"]) > config.high_value_amount:
                alerts.append(_alert(schemas.HIGH_VALUE, user_id, [(t, tx_id, record)]))
        for rule in schemas.STATEFUL_RULES:
            span = config.window_us(rule)
            members = events
            if rule == schemas.PAYPAL_MICRO:
                members = [e for e in events if e[2]["payment_method"] == schemas.PAYPAL
                           and float(e[2]["amount"]) < config.paypal_micro_amount]
            episode_end: int | None = None
            for t, _, _ in members:
                window = [m for m in members if t - span <= m[0] <= t]
                if not _condition(rule, window, config):
                    continue
                holds_until = _holds_until(rule, window, config)
                if episode_end is not None and t <= episode_end:
                    episode_end = max(episode_end, holds_until)
                    continue
                episode_end = holds_until
                alerts.append(_alert(rule, user_id, window))
    return alerts


def _alert(rule: str, user_id: str, window: list[tuple[int, str, Row]]) -> dict[str, Any]:
    ids = [tx_id for _, tx_id, _ in window]
    return {
        "alert_id": schemas.alert_id(rule, user_id, ids),
        "rule": rule,
        "user_id": user_id,
        "transaction_ids": ids,
        "window_start_us": window[0][0],
        "window_end_us": window[-1][0],
    }


def alert_ids_by_rule(alerts: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {rule: set() for rule in schemas.RULES}
    for alert in alerts:
        out[alert["rule"]].add(alert["alert_id"])
    return out
