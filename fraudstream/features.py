"""Model features of one transaction, from its user's recent transactions.

One function, ``batch_features`` (``user_features`` for one user), used everywhere a feature
is computed: by the detector inside its per-user state step (the user's buffer is right there),
by training (replaying each user's stored history through the same buffers) and by the
backtest (which runs the detector's own step). The three therefore cannot disagree about what
a feature means.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import fsum
from typing import Final

import numpy as np

from fraudstream.rules.kinds import MICROS, Tx
from fraudstream.schemas import PAYMENT_METHODS, PAYPAL

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "FEATURE_SET",
    "HISTORY_SECONDS",
    "Feature",
    "batch_features",
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


def user_features(buffer: Sequence[Tx], txs: Sequence[Tx]) -> np.ndarray:
    """The feature rows (``FEATURE_NAMES`` order) of ``txs``, each judged against the user's
    transactions in ``buffer`` (sorted by (event time, id), as the engine keeps them; ``txs``
    may or may not be in it)."""
    return batch_features([(buffer, txs)])


def batch_features(groups: Iterable[tuple[Sequence[Tx], Sequence[Tx]]]) -> np.ndarray:
    """``user_features`` of many users at once, one ``(buffer, txs)`` pair per user, as one
    matrix with the rows in the order of the pairs (the detector scores a bucket's batch with
    one call, and the model walks all its rows together).

    Each buffer is read once into columns; a transaction's windows are then index ranges of
    them (bisect on the times), so a row costs a few slices rather than a pass over Tx objects.
    A matrix formulation (histories padded into rows, windows as masks) was measured and was no
    faster: gathering the fields into arrays costs what this costs, and it adds ~0.3 ms per
    call, which a live batch of a few transactions per bucket pays in full."""
    rows = []
    for buffer, txs in groups:
        if not txs:
            continue
        columns = _Columns(buffer)
        for tx in txs:
            # Strictly before tx in (event time, id), whatever its other fields.
            end = bisect_left(buffer, (tx.event_us, tx.transaction_id))
            start = bisect_left(columns.times, tx.event_us - _HISTORY_US, 0, end)
            rows.append(_row(tx, columns, start, end))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))


class _Columns:
    """One user's buffer, field by field (one transposition in C: ``zip(*buffer)``; every
    row is a Tx, so the lengths agree)."""

    __slots__ = ("amounts", "devices", "locations", "merchants", "micro", "times")

    def __init__(self, buffer: Sequence[Tx]) -> None:
        (self.times, _, self.amounts, self.locations, methods, _, self.merchants,
         self.devices) = zip(*buffer, strict=False) if buffer else ((),) * len(Tx._fields)
        #: 1 where the buffer's transaction is a PayPal micro-payment.
        self.micro = [method == PAYPAL and paid < MICRO_AMOUNT
                      for method, paid in zip(methods, self.amounts, strict=True)]


def _row(tx: Tx, columns: _Columns, start: int, end: int) -> list[float]:
    """The features of ``tx`` whose history is ``buffer[start:end]``: a handful of bisects,
    slices and C-level reductions, no loop over the history in Python. A window's sum is the
    history's exactly rounded sum (``fsum``: the same float in whatever order the values come)
    plus the transaction's amount."""
    t = tx.event_us
    amount = float(tx.amount)
    times, amounts, locations = columns.times, columns.amounts, columns.locations
    from_5m = bisect_left(times, t - 300 * MICROS, start, end)
    from_1m = bisect_left(times, t - 60 * MICROS, from_5m, end)
    location = tx.location
    micro = (tx.payment_method == PAYPAL and amount < MICRO_AMOUNT) + \
        sum(columns.micro[from_5m:end])
    known = end > start
    history = amounts[start:end]
    typical = _median(history) if known else 0.0
    return [
        amount,
        amount / typical if typical > 0 else 1.0,
        float(end - from_1m + 1), float(end - from_5m + 1), float(end - start + 1),
        fsum(amounts[from_1m:end]) + amount,
        fsum(amounts[from_5m:end]) + amount,
        fsum(history) + amount,
        float(len({location, *locations[from_5m:end]})),
        float(len({location, *locations[start:end]})),
        float(micro),
        (t - times[end - 1]) / MICROS if known else float(HISTORY_SECONDS),
        1.0 if known and location not in locations[start:end] else 0.0,
        1.0 if known and tx.device_ip not in columns.devices[start:end] else 0.0,
        1.0 if known and tx.merchant_id not in columns.merchants[start:end] else 0.0,
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
