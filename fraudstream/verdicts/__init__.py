"""Analysts' verdicts on alerts: the contract (``model``), the database that keeps them and
their audit trail (``store``), the ``fraud-verdicts`` topic (``publish``), and the one way of
giving a verdict that every front end uses (``service``).

The contract's names are imported at once; the database and Kafka parts (SQLAlchemy,
librdkafka) on first use, so programs that only validate a verdict or a setting start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fraudstream.verdicts.model import (
    MAX_ANALYST,
    MAX_NOTE,
    STORE_DRIVERS,
    VERDICT_FIELDS,
    VERDICTS,
    Verdict,
    VerdictError,
    check_alert_id,
    check_store_url,
    make_verdict,
    mask_password,
    verdict_from_dict,
)

if TYPE_CHECKING:
    from fraudstream.verdicts.publish import VerdictPublisher, VerdictPublishError
    from fraudstream.verdicts.service import (
        REPUBLISH_COMMAND,
        UnknownAlert,
        decide,
        parquet_alert_ids,
    )
    from fraudstream.verdicts.store import (
        SCHEMA_VERSION,
        RecordedVerdict,
        VerdictStore,
        VerdictStoreError,
        store_url_for_display,
    )

__all__ = [
    "MAX_ANALYST",
    "MAX_NOTE",
    "REPUBLISH_COMMAND",
    "SCHEMA_VERSION",
    "STORE_DRIVERS",
    "VERDICTS",
    "VERDICT_FIELDS",
    "RecordedVerdict",
    "UnknownAlert",
    "Verdict",
    "VerdictError",
    "VerdictPublishError",
    "VerdictPublisher",
    "VerdictStore",
    "VerdictStoreError",
    "check_alert_id",
    "check_store_url",
    "decide",
    "make_verdict",
    "mask_password",
    "parquet_alert_ids",
    "store_url_for_display",
    "verdict_from_dict",
]

#: Where each name that needs SQLAlchemy or librdkafka lives.
_LAZY = {
    "SCHEMA_VERSION": "store", "RecordedVerdict": "store", "VerdictStore": "store",
    "VerdictStoreError": "store", "store_url_for_display": "store",
    "VerdictPublishError": "publish", "VerdictPublisher": "publish",
    "REPUBLISH_COMMAND": "service", "UnknownAlert": "service", "decide": "service",
    "parquet_alert_ids": "service",
}


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
