"""Rule kinds: what a kind of rule looks at, over which span of event time, and when it fires.

One class per kind, in the manner of quix-streams' window aggregations: each class owns its
parameters (names, types, ranges, defaults), which transactions it counts, its condition over a
span, how long a span keeps holding, its reason text and its colours. Nothing outside this
module knows what a kind does; the detector, the oracle, the backtest, the dashboard and the
console ask the ``KINDS`` registry. Adding a kind is one class here plus its tests.

Two families:

``TransactionKind``
    Looks at one transaction at a time (``high_value``). Needs no window, so it also fires for
    transactions that arrive behind the watermark.

``SpanKind``
    Counts one user's transactions over *any* span of ``window_seconds`` of event time, not
    only spans that line up with window boundaries. The condition is evaluated over the span
    that ends at each transaction, inclusive at both ends::

        velocity, count 3, window 60 s          t=0   t=10  t=20  t=30  t=50
        transactions of one user:                a     b     c     d     e
        span ending at d  = [-30 s, 30 s]:       a  b  c  d       -> 4 > 3: holds
        span ending at e  = [-10 s, 50 s]:       a  b  c  d  e    -> 5 > 3: holds
        the condition holds from 30 s until b leaves at 70 s: one episode, one alert
        (evidence a..d); a payment at 75 s would find only c, d and itself: quiet again

    ``holds_until`` answers "if nothing else arrives, until which instant does the condition
    keep holding?", which is what merges overlapping spans into one episode (see
    ``fraudstream.rules.engine``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final, NamedTuple

from fraudstream.schemas import PAYPAL

__all__ = [
    "KINDS",
    "MICROS",
    "HighValue",
    "MlScore",
    "MultiLocation",
    "Param",
    "ParamError",
    "PaypalMicro",
    "RuleKind",
    "SpanKind",
    "TransactionKind",
    "Tx",
    "Velocity",
    "ansi_colour",
    "hex_colour",
    "kind_of",
]

MICROS: Final = 1_000_000

Params = Mapping[str, Any]


class Tx(NamedTuple):
    """The fields the rules read. Ordered by (event time, id) so ties sort deterministically."""

    event_us: int
    transaction_id: str
    amount: float
    location: str
    payment_method: str
    kafka_us: int  # Kafka record timestamp: when the event reached the broker (for latency)
    # Read by the model's features only. Defaults keep a state written before they were kept
    # readable (its transactions then count as seen on no device and at no merchant).
    merchant_id: str = ""
    device_ip: str = ""


class ParamError(ValueError):
    """A parameter of a rule definition is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Param:
    """One parameter of a kind: a finite number in a range."""

    name: str
    type: type[int] | type[float]
    minimum: float
    help: str
    #: True: the value must be strictly above ``minimum`` (a zero window means nothing).
    exclusive_minimum: bool = False
    maximum: float = 1e12

    def parse(self, value: Any) -> int | float:
        where = f"params.{self.name}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(f"{where}: expected a number, got {_json_type(value)}")
        if not math.isfinite(value):
            raise ParamError(f"{where}: must be a finite number, got {value}")
        if self.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise ParamError(f"{where}: expected a whole number, got {value}")
            value = int(value)
        else:
            value = float(value)
        too_low = value <= self.minimum if self.exclusive_minimum else value < self.minimum
        if too_low:
            bound = ">" if self.exclusive_minimum else ">="
            raise ParamError(f"{where}: must be {bound} {self.minimum:g}, got {value:g}")
        if value > self.maximum:
            raise ParamError(f"{where}: must be <= {self.maximum:g}, got {value:g}")
        return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _seconds(us: int) -> str:
    return f"{us / MICROS:g}"


class RuleKind:
    """What every kind declares. Subclasses set the class attributes and the family methods."""

    #: The ``kind`` of a definition.
    name: ClassVar[str]
    #: One line for people: what a rule of this kind looks for.
    title: ClassVar[str]
    #: Dashboard colour (hex) and console colour (ANSI SGR code).
    colour: ClassVar[str]
    ansi: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    #: The parameters of the default rule of this kind (rule_id = kind name).
    defaults: ClassVar[Mapping[str, int | float]]
    #: Whether an empty rules topic gets a rule of this kind (as version 1).
    published_by_default: ClassVar[bool] = True
    #: Whether quality figures judge the kind against every labelled fraud rather than the
    #: generator's scenarios named after it (a model looks for fraud of any kind).
    judged_against_any_fraud: ClassVar[bool] = False
    #: Whether the kind reads the model's score of every transaction (then every transaction
    #: is scored; otherwise only the transactions that trigger an alert are).
    reads_scores: ClassVar[bool] = False

    def validate(self, raw: Any) -> dict[str, int | float]:
        """Typed params from a definition's ``params`` object; raises ParamError."""
        if not isinstance(raw, Mapping):
            raise ParamError(f"params: expected an object, got {_json_type(raw)}")
        known = {p.name for p in self.params}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ParamError(f"params: {', '.join(unknown)} not a parameter of {self.name} "
                             f"(it takes {', '.join(sorted(known))})")
        missing = [p.name for p in self.params if p.name not in raw]
        if missing:
            raise ParamError(f"params: {', '.join(missing)} missing (kind {self.name})")
        return {p.name: p.parse(raw[p.name]) for p in self.params}

    def window_us(self, params: Params) -> int:
        """How far back in event time a rule of this kind looks (0: the transaction alone)."""
        return 0

    def summary(self, params: Params) -> str:
        """The rule in words, e.g. ``more than 3 transactions within 60 s``."""
        raise NotImplementedError


class TransactionKind(RuleKind):
    """A kind that judges each transaction on its own. ``score`` is the model's fraud
    probability of the transaction (None when no model is loaded)."""

    def fires(self, tx: Tx, params: Params, score: float | None = None) -> bool:
        raise NotImplementedError

    def reason(self, tx: Tx, params: Params, score: float | None = None) -> str:
        raise NotImplementedError


class SpanKind(RuleKind):
    """A kind that counts the transactions of one user over any span of ``window_seconds``."""

    #: Whether ``counts`` is true of every transaction (the engine then skips the filter).
    counts_every: ClassVar[bool] = True

    def window_us(self, params: Params) -> int:
        return round(params["window_seconds"] * MICROS)

    def counts(self, tx: Tx, params: Params) -> bool:
        """Whether ``tx`` is one of the transactions this rule counts."""
        return True

    def holds(self, span: Sequence[Tx], params: Params) -> bool:
        """The condition over the counted transactions of one span (the oracle's definition)."""
        raise NotImplementedError

    def holds_until(self, span: Sequence[Tx], params: Params) -> int | None:
        """If the condition holds over ``span`` (the span ending at its last element), the
        event time until which it keeps holding with no further transactions; else None."""
        raise NotImplementedError

    def could_hold(self, counted: Sequence[Tx], params: Params) -> bool:
        """A cheap necessary condition over all of a user's counted transactions: False means
        no span of them can hold, and the per-span scan is skipped."""
        return True

    def span_filter(self, counted: Sequence[Tx], params: Params) -> Any:
        """Precomputed help for ``may_hold`` over ``counted`` (None if the kind needs none)."""
        return None

    def may_hold(self, aux: Any, start: int, stop: int, params: Params) -> bool:
        """Cheap necessary condition for ``counted[start:stop]``; False skips the span."""
        return True

    def describe(self, evidence: Sequence[Tx], params: Params) -> str:
        """The alert's reason text for the evidence of a new episode."""
        raise NotImplementedError


class HighValue(TransactionKind):
    name = "high_value"
    title = "one transaction above an amount"
    colour = "#d62728"
    ansi = "31"  # red
    params = (Param("amount", float, 0, "fires when a transaction's amount is above this"),)
    defaults = MappingProxyType({"amount": 3500.0})

    def fires(self, tx: Tx, params: Params, score: float | None = None) -> bool:
        return tx.amount > params["amount"]

    def reason(self, tx: Tx, params: Params, score: float | None = None) -> str:
        return f"amount {tx.amount:.2f} above {params['amount']:g}"

    def summary(self, params: Params) -> str:
        return f"one transaction above {params['amount']:g}"


class MlScore(TransactionKind):
    """The model's fraud probability of one transaction is at or above ``threshold``.

    Never fires while no model is loaded (the detector then says it runs on rules alone), and
    is not among the rules an empty rules topic gets: a team turns it on once a model exists
    (``python -m fraudstream.rules set ml_score --kind ml_score threshold=0.9``)."""

    name = "ml_score"
    title = "the model's fraud probability at or above a threshold"
    colour = "#2ca02c"
    ansi = "32"  # green
    params = (Param("threshold", float, 0, "fires when the model's fraud probability is at "
                    "least this", exclusive_minimum=True, maximum=1.0),)
    defaults = MappingProxyType({"threshold": 0.9})
    published_by_default = False
    judged_against_any_fraud = True
    reads_scores = True

    def fires(self, tx: Tx, params: Params, score: float | None = None) -> bool:
        return score is not None and score >= params["threshold"]

    def reason(self, tx: Tx, params: Params, score: float | None = None) -> str:
        return f"risk score {score or 0:.2f} at or above {params['threshold']:g}"

    def summary(self, params: Params) -> str:
        return f"the model's fraud probability at or above {params['threshold']:g}"


_WINDOW = Param("window_seconds", float, 0, "span of event time, seconds",
                exclusive_minimum=True)


class _CountKind(SpanKind):
    """More than ``count`` counted transactions within the span."""

    noun: ClassVar[str]

    def holds(self, span: Sequence[Tx], params: Params) -> bool:
        return len(span) > params["count"]

    def holds_until(self, span: Sequence[Tx], params: Params) -> int | None:
        limit = params["count"]
        if len(span) <= limit:
            return None
        # It holds until the (limit+1)-th newest member leaves the span.
        return span[-(limit + 1)].event_us + self.window_us(params)

    def could_hold(self, counted: Sequence[Tx], params: Params) -> bool:
        return len(counted) > params["count"]

    def may_hold(self, aux: Any, start: int, stop: int, params: Params) -> bool:
        return stop - start > params["count"]

    def describe(self, evidence: Sequence[Tx], params: Params) -> str:
        return (f"{len(evidence)} {self.noun} within {_seconds(self.window_us(params))} s "
                f"(limit {params['count']})")


class Velocity(_CountKind):
    name = "velocity"
    title = "too many transactions in a short span"
    colour = "#ff7f0e"
    ansi = "33"  # yellow
    noun = "transactions"
    params = (Param("count", int, 1, "fires above this many transactions"), _WINDOW)
    defaults = MappingProxyType({"count": 3, "window_seconds": 60.0})

    def summary(self, params: Params) -> str:
        return (f"more than {params['count']} transactions within "
                f"{params['window_seconds']:g} s")


class PaypalMicro(_CountKind):
    name = "paypal_micro"
    title = "many small PayPal payments in a span"
    colour = "#9467bd"
    ansi = "36"  # cyan
    params = (Param("count", int, 1, "fires above this many small PayPal payments"),
              Param("amount", float, 0, "a payment counts when its amount is below this",
                    exclusive_minimum=True),
              _WINDOW)
    defaults = MappingProxyType({"count": 3, "amount": 50.0, "window_seconds": 240.0})
    counts_every = False

    def counts(self, tx: Tx, params: Params) -> bool:
        return tx.payment_method == PAYPAL and tx.amount < params["amount"]

    def describe(self, evidence: Sequence[Tx], params: Params) -> str:
        return (f"{len(evidence)} PayPal payments under {params['amount']:g} within "
                f"{_seconds(self.window_us(params))} s (limit {params['count']})")

    def summary(self, params: Params) -> str:
        return (f"more than {params['count']} PayPal payments under {params['amount']:g} "
                f"within {params['window_seconds']:g} s")


class MultiLocation(SpanKind):
    name = "multi_location"
    title = "payments from several places in a short span"
    colour = "#1f77b4"
    ansi = "35"  # magenta
    params = (Param("count", int, 2, "fires at this many distinct locations"), _WINDOW)
    defaults = MappingProxyType({"count": 2, "window_seconds": 120.0})

    def holds(self, span: Sequence[Tx], params: Params) -> bool:
        return len({tx.location for tx in span}) >= params["count"]

    def holds_until(self, span: Sequence[Tx], params: Params) -> int | None:
        latest: dict[str, int] = {}
        for tx in span:
            latest[tx.location] = max(latest.get(tx.location, tx.event_us), tx.event_us)
        need = params["count"]
        if len(latest) < need:
            return None
        # It holds until the need-th most recent location's last visit leaves the span.
        return sorted(latest.values(), reverse=True)[need - 1] + self.window_us(params)

    def could_hold(self, counted: Sequence[Tx], params: Params) -> bool:
        return len({tx.location for tx in counted}) >= params["count"]

    def span_filter(self, counted: Sequence[Tx], params: Params) -> list[int] | None:
        """For each index k, the largest j < k whose location differs from counted[k]'s
        (-1 if none): a span [start, k] holds two locations exactly when that index is
        >= start. Only used for the common count of 2."""
        if params["count"] != 2:
            return None
        out: list[int] = []
        last_change = -1
        for index, tx in enumerate(counted):
            if index and tx.location != counted[index - 1].location:
                last_change = index - 1
            out.append(last_change)
        return out

    def may_hold(self, aux: Any, start: int, stop: int, params: Params) -> bool:
        return aux is None or aux[stop - 1] >= start

    def describe(self, evidence: Sequence[Tx], params: Params) -> str:
        places = sorted({tx.location for tx in evidence})
        return (f"{len(places)} locations within {_seconds(self.window_us(params))} s"
                f" (fires at {params['count']}): {', '.join(places)}")

    def summary(self, params: Params) -> str:
        return f"{params['count']} or more locations within {params['window_seconds']:g} s"


#: Every kind by name, in display order.
KINDS: Final[Mapping[str, RuleKind]] = {
    kind.name: kind for kind in (HighValue(), Velocity(), MultiLocation(), PaypalMicro(),
                                 MlScore())
}


def kind_of(name: str) -> RuleKind:
    """The kind called ``name``; KeyError names the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown kind {name!r} (known: {', '.join(KINDS)})") from None


def _colour_kind(rule_id: str) -> RuleKind:
    """The kind whose colours a rule is shown in: the kind of that name (a default rule), else
    one picked by a stable hash of the id (the same in every process, unlike ``hash``)."""
    kind = KINDS.get(rule_id)
    if kind is not None:
        return kind
    palette = list(KINDS.values())
    return palette[zlib.crc32(rule_id.encode("utf-8", "replace")) % len(palette)]


def ansi_colour(rule_id: str) -> str:
    """The console colour (ANSI SGR code, e.g. ``"33"``) of alerts of ``rule_id``."""
    return _colour_kind(rule_id).ansi


def hex_colour(rule_id: str) -> str:
    """The dashboard colour (hex, e.g. ``"#ff7f0e"``) of alerts of ``rule_id``; the same
    kind's colour as ``ansi_colour``, so the console and the dashboard agree."""
    return _colour_kind(rule_id).colour
