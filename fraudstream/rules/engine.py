"""The incremental rule engine: one user's state, and the state of a bucket of users.

Semantics (docs/contract.md): every windowed rule counts one user's transactions, in event
time, over *any* span of its window — inclusive, so four transactions whose first and last are
exactly 60 s apart fire ``velocity`` (count 3, 60 s). The condition is evaluated over the span
that ends at each transaction.

Episodes: for a windowed rule the condition C(t) ("the span ending at t holds") is true on a
union of intervals of event time. Each maximal interval is one episode and yields exactly one
alert, emitted when the transaction that first makes C true is processed; its evidence is the
span ending at that transaction. A burst that keeps going extends its episode; a new burst
after C lapsed opens a new episode and gets a new alert::

    velocity (count 3, 60 s), one user:
    event time  0    10   20   30   40 ......... 200  210  220  230
    tx          a    b    c    d    e            f    g    h    i
    C(t)                       ^ holds from d until c+60 s, extended by e to d+60 s = 90 s
                               one episode, one alert (a, b, c, d)
                                                             ^ new episode at i: alert (f..i)

Episodes belong to a rule *version* (``rule_id#version``): a changed definition closes the
rule's open episodes, and the next qualifying transaction opens a new one under the new
version.

Memory: each user keeps the transactions of the last ``horizon`` of event time (the retention
horizon, at least as long as any window), so a rule added or widened while running sees the
recent past. Everything older than the watermark minus the horizon is pruned.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fraudstream import schemas
from fraudstream.rules.definition import RuleDefinition
from fraudstream.rules.kinds import MICROS, SpanKind, TransactionKind, Tx
from fraudstream.rules.ruleset import RuleChange, RuleSet

if TYPE_CHECKING:
    from fraudstream.model import Scorer

__all__ = ["BucketState", "RuleAlert", "UserState", "alert_record", "us_to_datetime"]


class RuleAlert(NamedTuple):
    rule: str  # rule_id
    version: int
    user_id: str
    evidence: tuple[Tx, ...]
    trigger: Tx  # the transaction that made the rule true
    reason: str
    #: The model's fraud probability of ``trigger`` and why; None without a model.
    risk_score: float | None = None
    score_reasons: tuple[str, ...] | None = None


@dataclass
class UserState:
    """One user's recent transactions, sorted by (event time, id), and the episodes already
    alerted, as [start, end] event-time intervals per ``rule_id#version``."""

    buffer: list[Tx] = field(default_factory=list)
    episodes: dict[str, list[list[int]]] = field(default_factory=dict)

    def add(self, arrivals: Iterable[Tx]) -> tuple[list[Tx], int]:
        """Insert arrivals; return (the new ones, sorted; duplicates ignored). A transaction id
        already held is a resend and is not counted twice."""
        seen = {tx.transaction_id for tx in self.buffer}
        fresh: list[Tx] = []
        duplicates = 0
        for tx in sorted(arrivals):
            if tx.transaction_id in seen:
                duplicates += 1
                continue
            seen.add(tx.transaction_id)
            fresh.append(tx)
            insort(self.buffer, tx)
        return fresh, duplicates

    def evaluate(self, user_id: str, earliest_new_us: int, rules: Sequence[RuleDefinition]
                 ) -> list[RuleAlert]:
        """Alerts of the windowed ``rules`` for spans ending at or after ``earliest_new_us``
        (an arrival at time t changes only spans that end at or after t)."""
        times = [tx.event_us for tx in self.buffer]
        alerts: list[RuleAlert] = []
        for rule in rules:
            kind = rule.impl
            assert isinstance(kind, SpanKind)
            span = rule.window_us
            params = rule.params
            # Spans ending at or after earliest_new reach back no further than this.
            recent = self.buffer[bisect_left(times, earliest_new_us - span):]
            counted = recent if kind.counts_every else [
                tx for tx in recent if kind.counts(tx, params)]
            if not counted or not kind.could_hold(counted, params):
                continue
            alerts.extend(self._scan(user_id, rule, kind, counted, earliest_new_us))
        return alerts

    def _scan(self, user_id: str, rule: RuleDefinition, kind: SpanKind, counted: list[Tx],
              earliest_new_us: int) -> list[RuleAlert]:
        """Two pointers over the spans ending at each counted transaction from the first new
        one: ``start`` only moves forward as the end does."""
        params = rule.params
        span = rule.window_us
        aux = kind.span_filter(counted, params)
        times = [tx.event_us for tx in counted]
        count = len(counted)
        episodes = self.episodes.setdefault(rule.episode_key, [])
        alerts: list[RuleAlert] = []
        first = bisect_left(times, earliest_new_us)
        start = bisect_left(times, times[first] - span) if first < count else 0
        for end_index in range(first, count):
            end_us = times[end_index]
            while times[start] < end_us - span:
                start += 1
            # Ties: every transaction at the same instant belongs to the span ending there.
            stop = end_index + 1
            while stop < count and times[stop] == end_us:
                stop += 1
            if not kind.may_hold(aux, start, stop, params):
                continue
            window = counted[start:stop]
            holds_until = kind.holds_until(window, params)
            if holds_until is None:
                continue
            for episode in episodes:
                if end_us <= episode[1] and holds_until >= episode[0]:
                    episode[0] = min(episode[0], end_us)
                    episode[1] = max(episode[1], holds_until)
                    break
            else:
                episodes.append([end_us, holds_until])
                episodes.sort()
                evidence = tuple(window)
                alerts.append(RuleAlert(rule.rule_id, rule.version, user_id, evidence,
                                        counted[end_index], kind.describe(evidence, params)))
        if not episodes:
            del self.episodes[rule.episode_key]
        return alerts

    def prune(self, watermark_us: int, horizon_us: int, live_episodes: frozenset[str]) -> None:
        """Keep the transactions of the last ``horizon_us`` before the watermark, and the
        episodes of rule versions still in force that can still be extended."""
        if self.buffer and self.buffer[0].event_us < watermark_us - horizon_us:
            keep_from = bisect_left([tx.event_us for tx in self.buffer],
                                    watermark_us - horizon_us)
            del self.buffer[:keep_from]
        for key in list(self.episodes):
            episodes = [e for e in self.episodes[key] if e[1] >= watermark_us]
            if episodes and key in live_episodes:
                self.episodes[key] = episodes
            else:
                del self.episodes[key]

    @property
    def empty(self) -> bool:
        return not self.buffer and not self.episodes

    def retain_until(self, horizon_us: int) -> int:
        """A watermark beyond this leaves the user's state empty after pruning."""
        until = [end for episodes in self.episodes.values() for _, end in episodes]
        if self.buffer:
            until.append(self.buffer[-1].event_us + horizon_us)
        return max(until, default=0)

    # Spark keeps the state as JSON text: compact, and readable when debugging a checkpoint.
    def to_json(self) -> str:
        return json.dumps({"b": [list(tx) for tx in self.buffer], "e": self.episodes},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> UserState:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(buffer=[Tx(*row) for row in data["b"]], episodes=data["e"])


#: Parsed rule sets by their JSON text: every bucket holds the same one, and it rarely changes.
_RULESETS: dict[str, RuleSet] = {}


def _ruleset_from_text(text: str) -> RuleSet:
    ruleset = _RULESETS.get(text)
    if ruleset is None:
        if len(_RULESETS) > 64:
            _RULESETS.clear()
        ruleset = _RULESETS[text] = RuleSet.from_json(json.loads(text))
    return ruleset


@dataclass
class BucketState:
    """The rules in force and the state of every user in one hash bucket of user_id.

    The detector's stateful operator is keyed by bucket rather than by user: its per-key cost
    (a pandas frame and a state round trip per key and batch) would otherwise dominate, as one
    batch touches thousands of users. Rule semantics stay per user (``UserState``).

    A batch touches few of a bucket's users, so each user's state is kept as its own JSON text
    (``stored``) next to the event time until which it can matter, and parsed into ``users``
    only when the batch has transactions for that user: the cost of a batch follows the batch,
    not the whole state. Untouched users are dropped unparsed once the watermark passes their
    retention; their older transactions are pruned when they are next touched.
    """

    ruleset: RuleSet = field(default_factory=RuleSet)
    users: dict[str, UserState] = field(default_factory=dict)
    #: user_id -> [retain_until_us, UserState JSON] for users not parsed in this batch.
    stored: dict[str, list[Any]] = field(default_factory=dict)

    def get(self, user_id: str) -> UserState | None:
        """The user's state, parsed on first use; None if the bucket holds nothing for them."""
        user = self.users.get(user_id)
        if user is None and user_id in self.stored:
            user = self.users[user_id] = UserState.from_json(self.stored.pop(user_id)[1])
        return user

    def apply_rules(self, records: Iterable[tuple[bytes | str | None, bytes | str | None,
                                                  int | None]],
                    horizon_us: int) -> list[RuleChange]:
        """Apply ``fraud-rules`` records (key, value, offset) in order."""
        changes = []
        for key, value, offset in records:
            self.ruleset, change = self.ruleset.apply(key, value, horizon_us, offset)
            changes.append(change)
        return changes

    def process(self, arrivals: Mapping[str, list[Tx]],
                late: Mapping[str, list[Tx]] | None = None,
                scorer: Scorer | None = None) -> tuple[list[RuleAlert], int]:
        """Feed each user's on-time arrivals to the rules; return (alerts, duplicates ignored).

        Per-transaction rules fire for arrivals and for ``late`` transactions (behind the
        watermark, kept out of the windowed rules) alike, once per transaction id the user's
        state still holds: a resend in a later batch is the same evidence and must not alert
        twice.

        With a ``scorer`` (a loaded model), every alert carries the score of its trigger,
        computed from the trigger's features over the user's buffer (``fraudstream.features``),
        and the reasons for it. Only triggers are scored, unless a rule in force reads the score
        of every transaction (``ml_score``): features cost far more than the rules, and most
        transactions raise no alert.
        """
        windowed = self.ruleset.windowed
        single = self.ruleset.per_transaction
        duplicates = 0
        fresh_by_user: list[tuple[str, UserState, list[Tx]]] = []
        for user_id, txs in arrivals.items():
            user = self.get(user_id)
            if user is None:
                user = self.users[user_id] = UserState()
            fresh, dup = user.add(txs)
            duplicates += dup
            if fresh:
                fresh_by_user.append((user_id, user, fresh))
        late_by_user: list[tuple[str, UserState | None, list[Tx]]] = []
        for user_id, txs in (late or {}).items():
            user = self.get(user_id)
            held = {tx.transaction_id for tx in user.buffer} if user else set()
            unique: list[Tx] = []
            for tx in sorted(txs):
                if tx.transaction_id not in held:
                    held.add(tx.transaction_id)
                    unique.append(tx)
            if unique:
                late_by_user.append((user_id, user, unique))
        scores = _Scores(scorer)
        if any(rule.impl.reads_scores for rule in single):
            scores.add([*fresh_by_user, *late_by_user])
        alerts: list[RuleAlert] = []
        for user_id, user, fresh in fresh_by_user:
            alerts.extend(_per_transaction_alerts(user_id, fresh, single, scores))
            if windowed:
                alerts.extend(user.evaluate(user_id, fresh[0].event_us, windowed))
        for user_id, _, unique in late_by_user:
            alerts.extend(_per_transaction_alerts(user_id, unique, single, scores))
        if scores.scorer is not None:
            # Triggers not scored yet: all of them unless a rule reads every score, and those
            # of earlier batches (a transaction that arrived before, but is later in event
            # time than, this batch's first can trigger a windowed alert now).
            missing: dict[str, dict[str, Tx]] = defaultdict(dict)
            for alert in alerts:
                if alert.trigger.transaction_id not in scores.values:
                    missing[alert.user_id][alert.trigger.transaction_id] = alert.trigger
            scores.add([(user_id, self.get(user_id), list(txs.values()))
                        for user_id, txs in missing.items()])
        return scores.attach(alerts), duplicates

    def prune(self, watermark_us: int, horizon_us: int) -> None:
        """Drop what no transaction at or after ``watermark_us`` can reach: pruned in parsed
        users, whole users among the stored ones."""
        live = self.ruleset.episode_keys
        for user_id in list(self.users):
            user = self.users[user_id]
            user.prune(watermark_us, horizon_us, live)
            if user.empty:
                del self.users[user_id]
        self.stored = {user_id: entry for user_id, entry in self.stored.items()
                       if entry[0] >= watermark_us}

    @property
    def empty(self) -> bool:
        return not self.users and not self.stored and not len(self.ruleset)

    def to_json(self, horizon_us: int) -> str:
        entries = dict(self.stored)
        for user_id, user in self.users.items():
            entries[user_id] = [user.retain_until(horizon_us), user.to_json()]
        rules = json.dumps(self.ruleset.to_json(), separators=(",", ":"), sort_keys=True)
        return json.dumps({"r": rules, "u": entries}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> BucketState:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(ruleset=_ruleset_from_text(data["r"]), stored=data["u"])


class _Scores:
    """The model's scores of one bucket's batch — of every new transaction when a rule reads
    them all, else of the alert triggers only — and their feature rows, for the reasons. Each
    ``add`` scores its rows as one matrix: the trees are walked for all rows at once."""

    def __init__(self, scorer: Scorer | None) -> None:
        self.scorer = scorer
        #: The feature matrices scored so far, and where each transaction's row is in them
        #: stacked (only alerts' rows are ever read back, for their reasons).
        self.matrices: list[np.ndarray] = []
        self.row_of: dict[str, int] = {}
        self.values: dict[str, float] = {}

    def add(self, users: Sequence[tuple[str, UserState | None, list[Tx]]]) -> None:
        """Score each user's ``txs`` against the user's buffer."""
        if self.scorer is None or not users:
            return
        # Imported here: the feature module builds on the rule core's Tx.
        from fraudstream.features import batch_features

        groups = [(user.buffer if user is not None else [], txs) for _, user, txs in users]
        matrix = batch_features(groups)
        if not len(matrix):
            return
        ids = [tx.transaction_id for _, txs in groups for tx in txs]
        offset = sum(len(scored) for scored in self.matrices)
        self.matrices.append(matrix)
        self.row_of.update(zip(ids, range(offset, offset + len(ids)), strict=True))
        self.values.update(zip(ids, self.scorer.score(matrix).tolist(), strict=True))

    def get(self, tx: Tx) -> float | None:
        return self.values.get(tx.transaction_id)

    def attach(self, alerts: list[RuleAlert]) -> list[RuleAlert]:
        """``alerts`` with their trigger's score and reasons (explained together)."""
        if self.scorer is None or not alerts:
            return alerts
        rows = np.concatenate(self.matrices)[
            [self.row_of[alert.trigger.transaction_id] for alert in alerts]]
        reasons = self.scorer.explain_many(rows)
        return [alert._replace(risk_score=self.values[alert.trigger.transaction_id],
                               score_reasons=tuple(why))
                for alert, why in zip(alerts, reasons, strict=True)]


def _per_transaction_alerts(user_id: str, txs: Sequence[Tx], rules: Sequence[RuleDefinition],
                            scores: _Scores) -> list[RuleAlert]:
    alerts = []
    for tx in txs:
        score = scores.get(tx)
        for rule in rules:
            kind = rule.impl
            assert isinstance(kind, TransactionKind)
            if kind.fires(tx, rule.params, score):
                alerts.append(RuleAlert(rule.rule_id, rule.version, user_id, (tx,), tx,
                                        kind.reason(tx, rule.params, score)))
    return alerts


# --- alert records ------------------------------------------------------------------------------


def us_to_datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / MICROS, tz=UTC)


def alert_record(alert: RuleAlert, detected_at: datetime) -> dict[str, Any]:
    """The contract's alert as a dict with datetime values (format them for JSON at the
    edge)."""
    evidence = alert.evidence
    ids = [tx.transaction_id for tx in evidence]
    return {
        "alert_id": schemas.alert_id(alert.rule, alert.user_id, ids),
        "rule": alert.rule,
        "rule_version": alert.version,
        "user_id": alert.user_id,
        "window_start": us_to_datetime(min(tx.event_us for tx in evidence)),
        "window_end": us_to_datetime(max(tx.event_us for tx in evidence)),
        "transaction_count": len(evidence),
        "total_amount": round(sum(tx.amount for tx in evidence), 2),
        "locations": sorted({tx.location for tx in evidence}),
        "transaction_ids": ids,
        "reason": alert.reason,
        "detected_at": detected_at,
        "risk_score": alert.risk_score,
        "score_reasons": list(alert.score_reasons) if alert.score_reasons is not None else None,
    }
