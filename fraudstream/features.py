"""Model features of one transaction, from its user's recent transactions.

One function, ``user_features``, used everywhere a feature is computed: by the detector inside
its per-user state step (the user's buffer is right there), by training (replaying each user's
stored history through the same buffers) and by the backtest (which runs the detector's own
step). The three therefore cannot disagree about what a feature means.

What a transaction's features see: the same user's transactions *strictly before it* in
(event time, id) order and at most ``HISTORY_SECONDS`` older, plus the transaction itself::

    one user, features of e (history 600 s)       t=0   90    400   580   620
                                                   a     b     c     d     e
    history of e = [20 s, 620 s) -> b, c, d (a is older than 600 s)
    count_1m  = transactions in [560 s, 620 s], e included -> d, e = 2
    new_location = 1 if e's location is none of b, c, d's

The detector keeps each user's transactions for the retention horizon (``RETENTION_SECONDS``,
at least 600 s), so every on-time transaction finds its whole history in state. A transaction
that arrives out of order, after a later one of its user was already scored, did not count in
that later one's features live, while a replay over the stored history counts it: the only way
live and training features differ, and rare in practice (the watermark bounds it).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fraudstream.rules.kinds import MICROS, Tx
from fraudstream.schemas import PAYMENT_METHODS, PAYPAL

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "FEATURE_SET",
    "HISTORY_SECONDS",
    "Feature",
    "describe",
    "user_features",
]

#: Bumped whenever a feature is added, removed or changes meaning: a model trained on another
#: feature set is refused (its inputs would be misread).
FEATURE_SET: Final = "fraudstream-features/1"
#: How far back a transaction's features look. The detector's retention horizon is at least
#: this long (``RETENTION_SECONDS`` >= 600 s).
HISTORY_SECONDS: Final = 600
#: Amount under which a PayPal payment counts as a micro-payment (the default rule's).
MICRO_AMOUNT: Final = 50.0


@dataclass(frozen=True)
class Feature:
    """One model input: its column name and how a person reads a value of it."""

    name: str
    label: str
    #: Format of a value in a reason, e.g. ``"{:.0f}"``; flags are shown as words.
    unit: str = "{:g}"
    flag: bool = False
    #: A flag's words when it is off (default: "not " + label).
    off: str = ""

    def show(self, value: float) -> str:
        if self.flag:
            return self.label if value >= 0.5 else (self.off or f"not {self.label}")
        return f"{self.label} {self.unit.format(value)}"


_WINDOWS: Final = ((60, "1m", "1 min"), (300, "5m", "5 min"), (600, "10m", "10 min"))

FEATURES: Final[tuple[Feature, ...]] = (
    Feature("amount", "amount", "{:,.2f}"),
    Feature("amount_vs_median", "amount / user's median", "{:.1f}x"),
    *(Feature(f"count_{tag}", f"transactions in {words}", "{:.0f}") for _, tag, words in _WINDOWS),
    *(Feature(f"amount_{tag}", f"spent in {words}", "{:,.2f}") for _, tag, words in _WINDOWS),
    Feature("locations_5m", "locations in 5 min", "{:.0f}"),
    Feature("locations_10m", "locations in 10 min", "{:.0f}"),
    Feature("paypal_micro_5m", f"PayPal payments under {MICRO_AMOUNT:g} in 5 min", "{:.0f}"),
    Feature("seconds_since_previous", "seconds since the user's previous payment", "{:.0f}"),
    # "New" within the history the features see (the last 10 min), not the user's lifetime.
    Feature("new_location", "a location the user did not use in the last 10 min", flag=True,
            off="a location the user used in the last 10 min"),
    Feature("new_device", "a device the user did not use in the last 10 min", flag=True,
            off="a device the user used in the last 10 min"),
    Feature("new_merchant", "a merchant the user did not pay in the last 10 min", flag=True,
            off="a merchant the user paid in the last 10 min"),
    Feature("hour_of_day", "hour of day (UTC)", "{:.0f}"),
    *(Feature(f"method_{method.lower()}", f"paid by {method}", flag=True)
      for method in PAYMENT_METHODS),
)
FEATURE_NAMES: Final = tuple(feature.name for feature in FEATURES)
_BY_NAME: Final = {feature.name: feature for feature in FEATURES}
_HISTORY_US: Final = HISTORY_SECONDS * MICROS


def user_features(buffer: Sequence[Tx], txs: Sequence[Tx]) -> list[list[float]]:
    """The feature rows (``FEATURE_NAMES`` order) of ``txs``, each judged against the user's
    transactions in ``buffer`` (sorted by (event time, id), as the engine keeps them; ``txs``
    may or may not be in it)."""
    times = [tx.event_us for tx in buffer]
    rows = []
    for tx in txs:
        # Strictly before tx in (event time, id), whatever its other fields.
        end = bisect_left(buffer, (tx.event_us, tx.transaction_id))
        start = bisect_left(times, tx.event_us - _HISTORY_US, 0, end)
        rows.append(_row(tx, buffer[start:end]))
    return rows


def _row(tx: Tx, history: Sequence[Tx]) -> list[float]:
    """One pass over the history (this runs for every transaction the detector scores)."""
    t = tx.event_us
    amount = float(tx.amount)
    since_1m, since_5m = t - 60 * MICROS, t - 300 * MICROS
    count_1m = count_5m = count_10m = 1
    sum_1m = sum_5m = sum_10m = amount
    location = tx.location
    places_5m = {location}
    places_10m = {location}
    micro = 1 if tx.payment_method == PAYPAL and amount < MICRO_AMOUNT else 0
    seen_location = seen_device = seen_merchant = False
    amounts = []
    for h in history:
        paid = h.amount
        amounts.append(paid)
        count_10m += 1
        sum_10m += paid
        places_10m.add(h.location)
        seen_location = seen_location or h.location == location
        seen_device = seen_device or h.device_ip == tx.device_ip
        seen_merchant = seen_merchant or h.merchant_id == tx.merchant_id
        if h.event_us >= since_5m:
            count_5m += 1
            sum_5m += paid
            places_5m.add(h.location)
            if h.payment_method == PAYPAL and paid < MICRO_AMOUNT:
                micro += 1
            if h.event_us >= since_1m:
                count_1m += 1
                sum_1m += paid
    typical = _median(amounts) if amounts else 0.0
    known = bool(history)
    return [
        amount,
        amount / typical if typical > 0 else 1.0,
        float(count_1m), float(count_5m), float(count_10m),
        sum_1m, sum_5m, sum_10m,
        float(len(places_5m)),
        float(len(places_10m)),
        float(micro),
        (t - history[-1].event_us) / MICROS if known else float(HISTORY_SECONDS),
        1.0 if known and not seen_location else 0.0,
        1.0 if known and not seen_device else 0.0,
        1.0 if known and not seen_merchant else 0.0,
        float((t // _HOUR_US) % 24),  # UTC hour of day
        *_METHOD_FLAGS.get(tx.payment_method, _NO_METHOD),
    ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


_HOUR_US: Final = 3600 * MICROS
_METHOD_FLAGS: Final = {method: tuple(1.0 if other == method else 0.0
                                      for other in PAYMENT_METHODS)
                        for method in PAYMENT_METHODS}
_NO_METHOD: Final = (0.0,) * len(PAYMENT_METHODS)


def describe(name: str, value: float) -> str:
    """A feature's value in words, e.g. ``transactions in 1 min 5``."""
    return _BY_NAME[name].show(value)
