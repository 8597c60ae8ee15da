"""An analyst's verdict on one alert, as the contract defines it (topic ``fraud-verdicts``)::

    {"alert_id": "9b2e61d0…", "verdict": "fraud", "note": "customer confirmed card stolen",
     "analyst": "analyst name", "decided_at": "2026-12-01T10:20:00.000Z"}

``make_verdict`` validates what a person typed (dashboard form, console flag) and returns a
``Verdict`` or raises ``VerdictError`` with a reason they can act on. The newest verdict per
alert wins; every verdict ever recorded is kept (the audit trail).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from fraudstream.schemas import format_timestamp, parse_timestamp, utc_now

__all__ = [
    "MAX_ANALYST",
    "MAX_NOTE",
    "STORE_DRIVERS",
    "VERDICTS",
    "VERDICT_FIELDS",
    "Verdict",
    "VerdictError",
    "check_alert_id",
    "check_store_url",
    "make_verdict",
    "mask_password",
    "verdict_from_dict",
]

FRAUD: Final = "fraud"
LEGIT: Final = "legit"
UNSURE: Final = "unsure"
#: The verdict words, in the order the dashboard offers them.
VERDICTS: Final = (FRAUD, LEGIT, UNSURE)
VERDICT_FIELDS: Final = ("alert_id", "verdict", "note", "analyst", "decided_at")
MAX_NOTE: Final = 2000
MAX_ANALYST: Final = 200
_ALERT_ID: Final = re.compile(r"^[0-9a-f]{32}$")
#: Databases that can keep verdicts, with their drivers (the first is the default: psycopg 3 is
#: the PostgreSQL driver installed, where SQLAlchemy would default to psycopg2).
STORE_DRIVERS: Final = {"sqlite": ("pysqlite",), "postgresql": ("psycopg",)}
_STORE_URL: Final = re.compile(r"^(?P<backend>[A-Za-z0-9]+)(?:\+(?P<driver>[A-Za-z0-9_]+))?://"
                               r"(?P<rest>.*)$", re.DOTALL)
_EXPECTED_URL: Final = ("expected sqlite:///PATH (an embedded file) or "
                        "postgresql+psycopg://USER@HOST:PORT/DATABASE")


class VerdictError(ValueError):
    """A verdict that cannot be recorded; the message says why."""


@dataclass(frozen=True)
class Verdict:
    alert_id: str
    verdict: str
    note: str
    analyst: str
    decided_at: datetime  # timezone-aware UTC

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON object."""
        return {"alert_id": self.alert_id, "verdict": self.verdict, "note": self.note,
                "analyst": self.analyst, "decided_at": format_timestamp(self.decided_at)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def check_alert_id(alert_id: str) -> str:
    """The alert id without surrounding blanks, or VerdictError: a typo is caught before any
    database or topic is asked about it."""
    alert_id = (alert_id or "").strip()
    if not _ALERT_ID.match(alert_id):
        raise VerdictError(f"alert_id: expected the 32 hex characters of an alert id, "
                           f"got {alert_id!r}")
    return alert_id


def make_verdict(alert_id: str, verdict: str, analyst: str, note: str = "",
                 decided_at: datetime | None = None) -> Verdict:
    """A validated verdict; ``decided_at`` defaults to now."""
    alert_id = check_alert_id(alert_id)
    word = (verdict or "").strip().lower()
    if word not in VERDICTS:
        raise VerdictError(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
    analyst = (analyst or "").strip()
    if not analyst:
        raise VerdictError("analyst: the name of who decided is required")
    if len(analyst) > MAX_ANALYST:
        raise VerdictError(f"analyst: longer than {MAX_ANALYST} characters")
    note = note or ""
    if len(note) > MAX_NOTE:
        raise VerdictError(f"note: {len(note)} characters, at most {MAX_NOTE} are kept")
    moment = decided_at or utc_now()
    if moment.tzinfo is None:
        raise VerdictError("decided_at: must carry a timezone")
    return Verdict(alert_id, word, note, analyst, parse_timestamp(format_timestamp(moment)))


def verdict_from_dict(data: Any) -> Verdict:
    """A verdict from its JSON object (the topic, a file)."""
    if not isinstance(data, dict):
        raise VerdictError("a verdict must be a JSON object")
    missing = [name for name in VERDICT_FIELDS if name not in data]
    if missing:
        raise VerdictError(f"missing field{'s' if len(missing) > 1 else ''}: "
                           f"{', '.join(missing)}")
    try:
        decided_at = parse_timestamp(data["decided_at"])
    except (TypeError, ValueError):
        raise VerdictError(f"decided_at: expected an ISO-8601 time with a zone, got "
                           f"{data['decided_at']!r}") from None
    return make_verdict(data["alert_id"], data["verdict"], data["analyst"],
                        data["note"] or "", decided_at)


def mask_password(url: str) -> str:
    """``url`` with the password of ``scheme://user:password@host`` replaced by ``***``."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def check_store_url(url: str) -> None:
    """Raise ValueError unless ``url`` names a database that can keep verdicts. Only the form
    is checked, without SQLAlchemy, so settings can refuse a typo at start-up cheaply; the
    store parses the URL fully when it opens it."""
    match = _STORE_URL.match(url.strip())
    if match is None:
        raise ValueError(f"not a database URL; {_EXPECTED_URL}, got {mask_password(url)!r}")
    backend, driver = match["backend"].lower(), (match["driver"] or "").lower()
    drivers = STORE_DRIVERS.get(backend)
    if drivers is None:
        raise ValueError(f"unsupported database {backend!r}; {_EXPECTED_URL}")
    if driver and driver not in drivers:
        raise ValueError(f"driver {driver!r} is not installed; use {backend}+{drivers[0]}://…")
    if backend == "sqlite":
        database = match["rest"].removeprefix("/")
        if database in ("", ":memory:") or "mode=memory" in database:
            raise ValueError("an in-memory SQLite database would lose every verdict at exit; "
                             "give a file, e.g. sqlite:///run/verdicts.db")
