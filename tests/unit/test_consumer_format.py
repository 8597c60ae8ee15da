"""The console consumer's pure parts: parsing, filtering, deduplication, line and totals format,
colour decision."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from consumer.render import (
    RESET,
    MalformedAlert,
    SeenIds,
    clean,
    format_alert,
    format_totals,
    format_warning,
    json_line,
    matches,
    parse_alert,
    rule_colour,
    use_color,
)
from fraudstream.rules.kinds import KINDS, ansi_colour
from fraudstream.schemas import (
    ALERT_FIELDS,
    HIGH_VALUE,
    MULTI_LOCATION,
    PAYPAL_MICRO,
    RULES,
    VELOCITY,
    alert_id,
)

ANSI = re.compile(r"\033\[[0-9;]*m")


def make_alert(rule: str = VELOCITY, user: str = "u0042", **overrides: Any) -> dict[str, Any]:
    ids = [f"{user}-{rule}-{i}" for i in range(4)]
    alert = {
        "alert_id": alert_id(rule, user, ids), "rule": rule, "rule_version": 1, "user_id": user,
        "window_start": "2026-11-22T10:15:02.000Z", "window_end": "2026-11-22T10:15:41.000Z",
        "transaction_count": 4, "total_amount": 311.2, "locations": ["Lyon"],
        "transaction_ids": ids, "reason": "4 transactions within 60 s (limit 3)",
        "detected_at": "2026-11-22T10:15:42.310Z", "risk_score": None, "score_reasons": None,
    }
    alert.update(overrides)
    return alert


def test_a_scored_alert_shows_its_risk_score() -> None:
    alert = make_alert(risk_score=0.934, score_reasons=["transactions in 1 min 6 (+0.31)"])
    line = format_alert(parse_alert(json.dumps(alert)), color=False)
    assert "risk 0.93" in line
    assert "risk" not in format_alert(make_alert(), color=False)
    with pytest.raises(MalformedAlert, match="risk_score"):
        parse_alert(json.dumps(make_alert(risk_score="high")))


def test_parse_accepts_a_contract_alert() -> None:
    alert = make_alert()
    assert tuple(alert) == ALERT_FIELDS
    assert parse_alert(json.dumps(alert).encode()) == alert
    assert parse_alert(json.dumps(alert)) == alert


@pytest.mark.parametrize(("raw", "words"), [
    (None, "empty record"),
    (b"", "not JSON"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object but list"),
    (b'"text"', "not a JSON object but str"),
    (json.dumps({k: v for k, v in make_alert().items() if k != "rule"}).encode(),
     "missing field 'rule'"),
    (json.dumps(make_alert(total_amount="12")).encode(), "'total_amount' has the wrong type"),
    (json.dumps(make_alert(total_amount=True)).encode(), "'total_amount' has the wrong type"),
    (json.dumps(make_alert(transaction_count=4.0)).encode(), "'transaction_count'"),
    (json.dumps(make_alert(user_id=42)).encode(), "'user_id' has the wrong type"),
    (json.dumps(make_alert(rule_version="2")).encode(), "'rule_version' has the wrong type"),
    (json.dumps(make_alert(rule_version=True)).encode(), "'rule_version' has the wrong type"),
])
def test_parse_rejects_malformed_records(raw: bytes | None, words: str) -> None:
    with pytest.raises(MalformedAlert, match=re.escape(words)):
        parse_alert(raw)


def test_line_holds_time_rule_version_user_amount_count_and_reason() -> None:
    line = format_alert(make_alert(total_amount=1234.5, rule_version=2), color=False)
    assert line == ("2026-11-22T10:15:42.310Z  velocity v2         user u0042     amount    1234.50"
                    "    4 tx  4 transactions within 60 s (limit 3)")
    assert "\033" not in line


def test_an_alert_without_a_version_is_still_shown() -> None:
    alert = make_alert()
    del alert["rule_version"]  # written before rules were versioned
    parsed = parse_alert(json.dumps(alert))
    line = format_alert(parsed, color=False)
    assert line.startswith("2026-11-22T10:15:42.310Z  velocity            user u0042 ")
    assert "velocity" in format_alert(make_alert(rule_version=None), color=False)


def test_integer_amount_is_shown_with_cents() -> None:
    assert "amount      12.00" in format_alert(make_alert(total_amount=12), color=False)


def test_colour_marks_each_default_rule_in_its_kinds_colour_and_resets() -> None:
    lines = {rule: format_alert(make_alert(rule), color=True) for rule in RULES}
    assert len({rule_colour(rule) for rule in RULES}) == len(RULES)
    for rule, line in lines.items():
        assert rule_colour(rule) == f"\033[{KINDS[rule].ansi}m"
        assert rule_colour(rule) in line
        assert line.count(RESET) >= 2
        assert ANSI.sub("", line) == format_alert(make_alert(rule), color=False)


@pytest.mark.parametrize("rule", ["velocity_10m", "brand_new", "night.high-value"])
def test_any_rule_id_gets_a_stable_kind_colour_and_its_version(rule: str) -> None:
    line = format_alert(make_alert(rule, rule_version=3), color=True)
    code = ansi_colour(rule)
    assert code in {kind.ansi for kind in KINDS.values()}
    assert code == ansi_colour(rule), "the same id always gets the same colour"
    assert f"\033[{code}m" in line
    assert f"{rule} v3" in ANSI.sub("", line)


def test_control_characters_from_the_topic_are_neutralised() -> None:
    line = format_alert(make_alert(user_id="u1\033[2J", reason="two\nlines"), color=False)
    assert "\033" not in line and "\n" not in line
    assert "u1?[2J" in line and "two?lines" in line
    assert clean("tab\there") == "tab?here"


def test_filters() -> None:
    alert = make_alert(HIGH_VALUE, "u7")
    assert matches(alert, None, None)
    assert matches(alert, HIGH_VALUE, None) and matches(alert, None, "u7")
    assert matches(alert, HIGH_VALUE, "u7")
    assert not matches(alert, VELOCITY, None)
    assert not matches(alert, None, "u8")
    assert not matches(alert, HIGH_VALUE, "u8")


def test_seen_ids_skip_duplicates_and_stay_bounded() -> None:
    seen = SeenIds(capacity=3)
    assert [seen.add(i) for i in ("a", "b", "a", "c")] == [True, True, False, True]
    assert seen.add("d")  # evicts the least recently seen: "b" ("a" was refreshed)
    assert len(seen) == 3 and "b" not in seen and "a" in seen
    assert seen.add("b")
    with pytest.raises(ValueError):
        SeenIds(capacity=0)


def test_totals_list_every_rule() -> None:
    text = format_totals({VELOCITY: 2, PAYPAL_MICRO: 1}, duplicates=1, malformed=3, color=False)
    assert text == ("alerts shown: 3 (high_value=0 velocity=2 multi_location=0 paypal_micro=1); "
                    "duplicates skipped: 1; malformed: 3")
    coloured = format_totals({MULTI_LOCATION: 1, "new_rule": 2}, duplicates=0, malformed=0,
                             color=True)
    assert rule_colour(MULTI_LOCATION) in coloured
    assert rule_colour("new_rule") + "new_rule=2" in coloured
    assert "new_rule=2" in ANSI.sub("", coloured)
    assert ANSI.sub("", coloured).startswith("alerts shown: 3 ")


def test_json_line_keeps_the_raw_record_on_one_line() -> None:
    alert = make_alert()
    compact = json.dumps(alert, separators=(",", ":")).encode()
    assert json_line(compact + b"\n", alert) == compact.decode()
    pretty = json.dumps(alert, indent=2).encode()
    line = json_line(pretty, parse_alert(pretty))
    assert "\n" not in line and json.loads(line) == alert


def test_warning_line() -> None:
    assert format_warning("bad\x1b", color=False) == "warning: bad?"
    assert format_warning("x", color=True).startswith("\033[")


@pytest.mark.parametrize(("setting", "isatty", "environ", "expected"), [
    ("always", False, {}, True),
    ("never", True, {}, False),
    ("auto", True, {}, True),
    ("auto", False, {}, False),
    ("auto", True, {"NO_COLOR": "1"}, False),
    ("auto", True, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
    ("always", True, {"NO_COLOR": "1"}, True),
])
def test_colour_decision(setting: str, isatty: bool, environ: dict[str, str],
                         expected: bool) -> None:
    assert use_color(setting, isatty=isatty, environ=environ) is expected
