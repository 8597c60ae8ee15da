"""What a verdict may be (the contract's ``fraud-verdicts`` value), what a verdict database URL
may be, and how the console shows a verdict."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from consumer.render import format_verdict_tag
from fraudstream.schemas import alert_id
from fraudstream.settings import ConsumerSettings, DashboardSettings, SettingsError, load_settings
from fraudstream.verdicts.model import (
    MAX_ANALYST,
    MAX_NOTE,
    VERDICT_FIELDS,
    VERDICTS,
    VerdictError,
    check_alert_id,
    check_store_url,
    make_verdict,
    mask_password,
    verdict_from_dict,
)

ALERT = alert_id("velocity", "u0042", ["t1", "t2", "t3", "t4"])
WHEN = datetime(2026, 12, 1, 10, 20, 0, 123456, tzinfo=UTC)


def test_a_valid_verdict_is_normalised() -> None:
    verdict = make_verdict(f"  {ALERT} ", " FRAUD ", "  alice ", "card stolen", WHEN)
    assert verdict.alert_id == ALERT
    assert verdict.verdict == "fraud"
    assert verdict.analyst == "alice"
    assert verdict.note == "card stolen"
    # The contract's times have millisecond precision: what is kept is what is published.
    assert verdict.decided_at == datetime(2026, 12, 1, 10, 20, 0, 123000, tzinfo=UTC)


def test_every_word_of_the_contract_is_accepted() -> None:
    assert VERDICTS == ("fraud", "legit", "unsure")
    assert [make_verdict(ALERT, word, "a").verdict for word in VERDICTS] == list(VERDICTS)


def test_decided_at_defaults_to_now_in_utc() -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    verdict = make_verdict(ALERT, "legit", "bob")
    assert before <= verdict.decided_at <= datetime.now(UTC)
    assert verdict.decided_at.utcoffset() == timedelta(0)


def test_a_time_in_another_zone_is_kept_as_the_same_instant_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    verdict = make_verdict(ALERT, "legit", "bob", decided_at=datetime(2026, 12, 1, 11, 20,
                                                                       tzinfo=paris))
    assert verdict.decided_at == datetime(2026, 12, 1, 10, 20, tzinfo=UTC)
    assert verdict.to_dict()["decided_at"] == "2026-12-01T10:20:00.000Z"


@pytest.mark.parametrize(("args", "field"), [
    (("", "fraud", "a"), "alert_id"),
    (("9b2e61d0", "fraud", "a"), "alert_id"),
    ((ALERT.upper(), "fraud", "a"), "alert_id"),
    ((ALERT[:-1] + "g", "fraud", "a"), "alert_id"),
    ((ALERT + "0", "fraud", "a"), "alert_id"),
    ((ALERT, "fraudulent", "a"), "verdict"),
    ((ALERT, "", "a"), "verdict"),
    ((ALERT, "fraud", ""), "analyst"),
    ((ALERT, "fraud", "   "), "analyst"),
    ((ALERT, "fraud", "x" * (MAX_ANALYST + 1)), "analyst"),
])
def test_invalid_fields_are_refused_naming_the_field(args: tuple[str, str, str], field: str
                                                     ) -> None:
    with pytest.raises(VerdictError) as info:
        make_verdict(*args)
    assert str(info.value).startswith(f"{field}:")


def test_the_note_may_be_as_long_as_the_limit_but_not_longer() -> None:
    assert len(make_verdict(ALERT, "unsure", "a", "n" * MAX_NOTE).note) == MAX_NOTE
    with pytest.raises(VerdictError, match=f"note: {MAX_NOTE + 1} characters, at most "
                                           f"{MAX_NOTE}"):
        make_verdict(ALERT, "unsure", "a", "n" * (MAX_NOTE + 1))


def test_an_analyst_name_at_the_limit_is_accepted() -> None:
    assert make_verdict(ALERT, "legit", "x" * MAX_ANALYST).analyst == "x" * MAX_ANALYST


def test_a_time_without_zone_is_refused() -> None:
    with pytest.raises(VerdictError, match="decided_at"):
        make_verdict(ALERT, "fraud", "a", decided_at=datetime(2026, 12, 1, 10, 20))  # noqa: DTZ001


def test_check_alert_id_strips_and_refuses() -> None:
    assert check_alert_id(f"\t{ALERT}\n") == ALERT
    with pytest.raises(VerdictError, match="32 hex characters"):
        check_alert_id("not-an-id")


def test_the_json_is_the_contract_object() -> None:
    verdict = make_verdict(ALERT, "fraud", "analyst name", "customer confirmed card stolen",
                           WHEN)
    data = json.loads(verdict.to_json())
    assert tuple(data) == VERDICT_FIELDS
    assert data == {"alert_id": ALERT, "verdict": "fraud",
                    "note": "customer confirmed card stolen", "analyst": "analyst name",
                    "decided_at": "2026-12-01T10:20:00.123Z"}
    assert verdict_from_dict(data) == verdict


@pytest.mark.parametrize(("data", "message"), [
    ([], "must be a JSON object"),
    ({"alert_id": ALERT, "verdict": "fraud"}, "missing fields: note, analyst, decided_at"),
    ({"alert_id": ALERT, "verdict": "fraud", "note": "", "analyst": "a",
      "decided_at": "yesterday"}, "decided_at: expected an ISO-8601 time"),
    ({"alert_id": ALERT, "verdict": "fraud", "note": "", "analyst": "a",
      "decided_at": "2026-12-01T10:20:00"}, "decided_at"),
    ({"alert_id": ALERT, "verdict": "maybe", "note": None, "analyst": "a",
      "decided_at": "2026-12-01T10:20:00Z"}, "verdict: expected one of fraud, legit, unsure"),
])
def test_verdict_from_dict_refuses(data: Any, message: str) -> None:
    with pytest.raises(VerdictError, match=message):
        verdict_from_dict(data)


def test_a_null_note_from_json_is_an_empty_note() -> None:
    verdict = verdict_from_dict({"alert_id": ALERT, "verdict": "legit", "note": None,
                                 "analyst": "a", "decided_at": "2026-12-01T10:20:00Z"})
    assert verdict.note == ""


# --- database URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "sqlite:///run/verdicts.db",
    "sqlite:////var/lib/fraudstream/verdicts.db",
    "sqlite+pysqlite:///verdicts.db",
    "postgresql://fraud@db:5432/fraud",
    "postgresql+psycopg://fraud:secret@127.0.0.1:5432/fraud",
])
def test_database_urls_that_can_keep_verdicts(url: str) -> None:
    check_store_url(url)


@pytest.mark.parametrize(("url", "message"), [
    ("run/verdicts.db", "not a database URL"),
    ("mysql://user@host/db", "unsupported database 'mysql'"),
    ("postgresql+psycopg2://user@host/db", "driver 'psycopg2' is not installed"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
])
def test_database_urls_that_cannot(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_store_url(url)


def test_a_password_never_appears_in_a_refusal() -> None:
    assert mask_password("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(ValueError) as info:
        check_store_url("postgres ql://u:hunter2@h/db")
    assert "hunter2" not in str(info.value)


def test_the_verdict_database_is_a_setting_with_an_embedded_default() -> None:
    for cls in (ConsumerSettings, DashboardSettings):
        settings, _ = load_settings(cls, [], {})
        assert settings.verdicts_url == "sqlite:///run/verdicts.db"
        settings, _ = load_settings(cls, [], {"VERDICTS_URL": "postgresql://f@db/fraud"})
        assert settings.verdicts_url == "postgresql://f@db/fraud"
        assert settings.redacted()["verdicts_url"] == "***"  # it may hold a password


@pytest.mark.parametrize("cls", [ConsumerSettings, DashboardSettings])
def test_an_invalid_verdict_database_stops_start_up_naming_the_key(
        cls: type[ConsumerSettings | DashboardSettings]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(cls, [], {"VERDICTS_URL": "mysql://user@host/db"})
    assert info.value.key.startswith("VERDICTS_URL")
    assert "unsupported database 'mysql'" in info.value.message


# --- the console -------------------------------------------------------------------------------


def test_the_console_shows_the_word_and_the_analyst() -> None:
    assert format_verdict_tag("fraud", "alice", color=False) == "[fraud by alice]"
    coloured = format_verdict_tag("legit", "bob", color=True)
    assert "\033[32m" in coloured and "bob" in coloured
    # A name cannot drive the terminal.
    assert format_verdict_tag("unsure", "eve\033[2J", color=False) == "[unsure by eve?[2J]"
