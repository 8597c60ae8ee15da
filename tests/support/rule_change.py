"""A stream in two phases with a rule change between them, and the alerts it must raise.

Phase 1 runs under the four default rules. Between the phases ``velocity`` goes from "more than
3 in 60 s" to "more than 5 in 60 s" (version 2) and ``velocity_10m`` ("more than 10 in 600 s",
a second rule of the same kind) is added. Phase 2 holds generated traffic plus hand-made users
that only the new rules tell apart: a burst of 5 in 50 s (an alert under version 1, none under
version 2), a burst of 7 in 60 s (an alert under version 2), and a slow run of 12 payments 45 s
apart (only ``velocity_10m``), one of whose members was paid in phase 1, so the widened rule
must see the past the state kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fraudstream import schemas
from fraudstream.rules import RuleDefinition, default_definitions
from fraudstream.rules.oracle import expected_alerts_piecewise
from producer.generator import TransactionGenerator

RATE = 10.0


@dataclass(frozen=True)
class RuleChangeStream:
    phase1: list[dict[str, Any]]
    phase2: list[dict[str, Any]]
    before: list[RuleDefinition]
    changes: list[RuleDefinition]

    @property
    def after(self) -> list[RuleDefinition]:
        changed = {d.rule_id: d for d in self.before} | {d.rule_id: d for d in self.changes}
        return list(changed.values())

    def expected(self) -> dict[str, dict[str, Any]]:
        alerts = expected_alerts_piecewise([(self.phase1, self.before),
                                            (self.phase2, self.after)])
        return {a["alert_id"]: a for a in alerts}


def _tx(tx_id: str, user: str, moment: datetime, amount: float = 25.0) -> dict[str, Any]:
    return {"transaction_id": tx_id, "user_id": user, "amount": amount, "currency": "EUR",
            "timestamp": schemas.format_timestamp(moment), "location": "Lyon",
            "payment_method": "card", "merchant_id": "m001", "device_ip": "203.0.113.5",
            "is_fraud": True, "fraud_pattern": None}


def rule_change_stream(seed: int, per_phase: int = 1500) -> RuleChangeStream:
    generator = TransactionGenerator(users=600, fraud_ratio=0.05, seed=seed)
    span = timedelta(seconds=per_phase / RATE)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1) - 2 * span
    phase1 = generator.generate(per_phase, start=start, rate=RATE)
    middle = start + span
    phase2 = list(generator.generate(per_phase, start=middle, rate=RATE))
    slow_start = middle - timedelta(seconds=40)
    phase1 = [*phase1, _tx("slow-00", "u-slow", slow_start)]
    phase2 += [_tx(f"slow-{i:02d}", "u-slow", slow_start + timedelta(seconds=45 * i))
               for i in range(1, 12)]
    burst = middle + timedelta(seconds=100)
    phase2 += [_tx(f"five-{i}", "u-five", burst + timedelta(seconds=12 * i)) for i in range(5)]
    phase2 += [_tx(f"seven-{i}", "u-seven", burst + timedelta(seconds=10 * i)) for i in range(7)]
    phase1.sort(key=lambda t: t["timestamp"])
    phase2.sort(key=lambda t: t["timestamp"])
    before = default_definitions()
    velocity = next(d for d in before if d.rule_id == schemas.VELOCITY)
    stricter = velocity.changed(version=2, updated_by="test analyst",
                                params={"count": 5, "window_seconds": 60})
    wide = velocity.changed(version=1, updated_by="test analyst", rule_id="velocity_10m",
                            params={"count": 10, "window_seconds": 600})
    return RuleChangeStream(list(phase1), phase2, before, [stricter, wide])
