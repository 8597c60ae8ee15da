"""A plain-Python reference for the rules: brute force over complete lists of transactions.

Deliberately written apart from ``fraudstream.rules.engine`` (no incremental state, no pruning,
no pointers): for every user and rule it evaluates the span ending at every transaction by a
full scan with the kind's own condition (``SpanKind.holds``), builds the episodes as maximal
unions of the intervals where the condition holds, and yields one alert per episode. Tests,
benchmarks and the backtest's checks compare the detector's output with it.

Rules may change between *phases* (``expected_alerts_piecewise``): the rules of phase k judge
the transactions of phase k, and their spans reach back into earlier phases' transactions, as
the live detector's retention horizon lets them. It agrees with the streaming job whenever no
event arrives later than the watermark, late (out-of-order) events arrive before an alert they
would have changed, and each phase's events are not older than the previous phase's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fraudstream import schemas
from fraudstream.rules.definition import RuleDefinition, default_definitions
from fraudstream.rules.kinds import MICROS, SpanKind, TransactionKind, Tx
from fraudstream.rules.ruleset import RuleSet

__all__ = ["as_tx", "event_us", "expected_alerts", "expected_alerts_piecewise"]

Row = Mapping[str, Any]
Rules = RuleSet | Iterable[RuleDefinition] | None


def event_us(record: Row) -> int:
    """Event time of a transaction record in epoch microseconds (integer arithmetic: float
    seconds would misplace exact span boundaries)."""
    value = record["timestamp"]
    moment = schemas.parse_timestamp(value) if isinstance(value, str) else value
    return (moment.toordinal() * 86_400 + moment.hour * 3600 + moment.minute * 60
            + moment.second) * MICROS + moment.microsecond


def as_tx(record: Row) -> Tx:
    """The rule core's view of a contract transaction record."""
    return Tx(event_us(record), record["transaction_id"], float(record["amount"]),
              record["location"], record["payment_method"], 0,
              record.get("merchant_id", ""), record.get("device_ip", ""))


def _ruleset(rules: Rules) -> RuleSet:
    if rules is None:
        return RuleSet.of(default_definitions())
    return rules if isinstance(rules, RuleSet) else RuleSet.of(rules)


def _holds_until(kind: SpanKind, rule: RuleDefinition, window: list[Tx]) -> int:
    """Last instant at which the condition still holds if nothing else arrives (brute force)."""
    span = rule.window_us
    t = window[-1].event_us
    # The condition can only stop holding when a member leaves the span: try each exit time.
    exits = sorted({m.event_us + span for m in window if m.event_us + span >= t})
    last_true = t
    for exit_time in exits:
        remaining = [m for m in window if m.event_us >= exit_time - span]
        if kind.holds(remaining, rule.params):
            last_true = exit_time
        else:
            break
    return last_true


def expected_alerts(transactions: Iterable[Row], rules: Rules = None,
                    scores: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Alerts (rule, rule_version, user_id, alert_id, transaction_ids, window bounds) that
    ``rules`` (default: the four default rules) must raise over ``transactions`` (contract
    dicts, ``timestamp`` as ISO text or aware datetime). A repeated transaction_id counts
    once. ``scores`` (transaction_id -> the model's fraud probability) is what ``ml_score``
    rules judge; without it they never fire, as in a detector with no model."""
    return expected_alerts_piecewise([(transactions, rules)], scores)


def expected_alerts_piecewise(phases: Sequence[tuple[Iterable[Row], Rules]],
                              scores: Mapping[str, float] | None = None
                              ) -> list[dict[str, Any]]:
    """Alerts when the rules change between phases (see the module docstring)."""
    scores = scores or {}
    held: dict[str, dict[str, Tx]] = defaultdict(dict)
    episode_end: dict[tuple[str, str], int] = {}
    alerts: list[dict[str, Any]] = []
    for transactions, rules in phases:
        ruleset = _ruleset(rules)
        new: dict[str, list[Tx]] = defaultdict(list)
        for record in transactions:
            tx = as_tx(record)
            user = held[record["user_id"]]
            if tx.transaction_id not in user:
                user[tx.transaction_id] = tx
                new[record["user_id"]].append(tx)
        for user_id in sorted(new):
            arrivals = sorted(new[user_id])
            events = sorted(held[user_id].values())
            for rule in ruleset.per_transaction:
                kind = rule.impl
                assert isinstance(kind, TransactionKind)
                alerts += [_alert(rule, user_id, [tx]) for tx in arrivals
                           if kind.fires(tx, rule.params, scores.get(tx.transaction_id))]
            fresh = {tx.transaction_id for tx in arrivals}
            for rule in ruleset.windowed:
                kind = rule.impl
                assert isinstance(kind, SpanKind)
                span = rule.window_us
                counted = [tx for tx in events if kind.counts(tx, rule.params)]
                key = (user_id, rule.episode_key)
                for tx in counted:
                    if tx.transaction_id not in fresh:
                        continue
                    t = tx.event_us
                    window = [m for m in counted if t - span <= m.event_us <= t]
                    if not kind.holds(window, rule.params):
                        continue
                    holds_until = _holds_until(kind, rule, window)
                    end = episode_end.get(key)
                    if end is not None and t <= end:
                        episode_end[key] = max(end, holds_until)
                        continue
                    episode_end[key] = holds_until
                    alerts.append(_alert(rule, user_id, window))
    return alerts


def _alert(rule: RuleDefinition, user_id: str, window: list[Tx]) -> dict[str, Any]:
    ids = [tx.transaction_id for tx in window]
    return {
        "alert_id": schemas.alert_id(rule.rule_id, user_id, ids),
        "rule": rule.rule_id,
        "rule_version": rule.version,
        "user_id": user_id,
        "transaction_ids": ids,
        "window_start_us": window[0].event_us,
        "window_end_us": window[-1].event_us,
    }
