"""The chaos tier's reproducible seed and seeded ground-truth stream.

(Not a tests/chaos/conftest.py: a second module named ``conftest`` would replace the root one in
``sys.modules``.)

Every random choice of a chaos test (the stream, where the detector is killed, how long a pause
lasts) comes from ``chaos_seed()``. It is printed at the start of each test and repeated in every
assertion message; set ``FRAUDSTREAM_CHAOS_SEED`` to replay a failing run exactly (the machine's
speed still decides which batch a kill lands in, so the kill points are reproduced in kind, not
to the row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fraudstream.rules.oracle import expected_alerts
from producer.generator import TransactionGenerator, users_needed

SEED_ENV = "FRAUDSTREAM_CHAOS_SEED"
DEFAULT_SEED = 20261122

#: 20 tx/s of simulated event time with a 5 % episode ratio: 10k transactions span ~8 minutes,
#: long enough for complete paypal_micro episodes (up to 240 s), and give dozens of alerts per
#: rule.
STREAM_RATE = 20.0
FRAUD_RATIO = 0.05


def chaos_seed() -> int:
    """The seed of this run: ``FRAUDSTREAM_CHAOS_SEED`` or a fixed default; printed."""
    seed = int(os.environ.get(SEED_ENV, DEFAULT_SEED))
    print(f"\nchaos seed: {seed} (replay with {SEED_ENV}={seed})")
    return seed


@dataclass(frozen=True)
class Ground:
    """A generated stream and the alerts the rules must produce on it (set E)."""

    transactions: list[dict[str, Any]]
    expected: dict[str, dict[str, Any]]  # alert_id -> oracle alert


def ground_truth(seed: int, count: int) -> Ground:
    """``count`` seeded transactions on a simulated clock that ended an hour ago (nothing is
    in the future, nothing is late) and their expected alerts."""
    generator = TransactionGenerator(users=users_needed(STREAM_RATE, FRAUD_RATIO) + 500,
                                     fraud_ratio=FRAUD_RATIO, seed=seed)
    span = timedelta(seconds=count / STREAM_RATE)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1) - span
    transactions = generator.generate(count, start=start, rate=STREAM_RATE)
    expected = {a["alert_id"]: a for a in expected_alerts(transactions)}
    return Ground([dict(t) for t in transactions], expected)
