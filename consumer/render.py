"""Pure pieces of the console consumer: parse, filter, deduplicate and format alerts.

Kept free of Kafka and terminals so every rule of the output is unit-testable.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from fraudstream.rules.kinds import KINDS, ansi_colour
from fraudstream.schemas import RULES

__all__ = [
    "RESET",
    "MalformedAlert",
    "SeenIds",
    "clean",
    "format_alert",
    "format_totals",
    "format_verdict_tag",
    "format_warning",
    "json_line",
    "matches",
    "parse_alert",
    "rule_colour",
    "use_color",
]

RESET: Final = "\033[0m"
BOLD: Final = "\033[1m"
DIM: Final = "\033[2m"
YELLOW_WARNING: Final = "\033[33m"
#: Width of the rule column: a kind's name and a version (``multi_location v12``); longer
#: rule ids widen their own line only.
RULE_WIDTH: Final = max(len(name) for name in KINDS) + len(" v12")

#: Fields the console needs, with the JSON types each accepts (bool is never a number).
DISPLAY_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "alert_id": (str,),
    "rule": (str,),
    "user_id": (str,),
    "detected_at": (str,),
    "total_amount": (int, float),
    "transaction_count": (int,),
    "reason": (str,),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class MalformedAlert(ValueError):
    """A record on the alerts topic that is not an alert the console can show."""


def parse_alert(raw: bytes | str | None) -> dict[str, Any]:
    """Decode one alert record; MalformedAlert says what is wrong with it."""
    if raw is None:
        raise MalformedAlert("empty record")
    try:
        alert = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedAlert(f"not JSON ({exc})") from None
    if not isinstance(alert, dict):
        raise MalformedAlert(f"not a JSON object but {type(alert).__name__}")
    for name, types in DISPLAY_FIELDS.items():
        if name not in alert:
            raise MalformedAlert(f"missing field {name!r}")
        value = alert[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise MalformedAlert(f"field {name!r} has the wrong type ({type(value).__name__})")
    version = alert.get("rule_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise MalformedAlert("field 'rule_version' has the wrong type "
                             f"({type(version).__name__})")
    score = alert.get("risk_score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
        raise MalformedAlert(f"field 'risk_score' has the wrong type ({type(score).__name__})")
    return alert


def matches(alert: Mapping[str, Any], rule: str | None, user: str | None) -> bool:
    """The --rule / --user filters (None: no filter)."""
    return (rule is None or alert["rule"] == rule) and (user is None or alert["user_id"] == user)


def clean(text: object) -> str:
    """Text from the topic with control characters neutralised, so a record cannot drive the
    terminal (escape sequences) or break the one-alert-per-line layout."""
    return _CONTROL.sub("?", str(text))


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{RESET}" if color and code else text


def rule_colour(rule_id: str) -> str:
    """The escape sequence of a rule's colour (shared with the dashboard through the rule
    kinds): a default rule in its kind's colour, any other rule id in a stable one."""
    return f"\033[{ansi_colour(rule_id)}m"


def rule_label(alert: Mapping[str, Any]) -> str:
    """The rule id, and its version when the alert carries one (``velocity v2``); alerts
    written before rules were versioned have none."""
    rule = clean(alert["rule"])
    version = alert.get("rule_version")
    return rule if version is None else f"{rule} v{version}"


def format_alert(alert: Mapping[str, Any], *, color: bool) -> str:
    """One readable line: detected time, rule and version, user, total amount, transaction
    count, the model's risk score when there is one, reason."""
    when = _paint(clean(alert["detected_at"]), DIM, color)
    label = _paint(f"{rule_label(alert):<{RULE_WIDTH}}", BOLD + rule_colour(alert["rule"]),
                   color)
    count = alert["transaction_count"]
    score = alert.get("risk_score")
    risk = f"risk {float(score):.2f}  " if score is not None else ""
    return (f"{when}  {label}  user {clean(alert['user_id']):<8}  "
            f"amount {float(alert['total_amount']):>10.2f}  {count:>3} tx  {risk}"
            f"{clean(alert['reason'])}")


def json_line(raw: bytes, alert: Mapping[str, Any]) -> str:
    """--json output: the record as received, unless it spans several lines (pretty-printed
    JSON), which is re-encoded so every alert stays on one line for line-based readers."""
    text = raw.decode("utf-8").strip()
    if "\n" in text or "\r" in text:
        return json.dumps(alert)
    return text


#: Colour of each verdict word on the console.
VERDICT_COLOURS: Final = {"fraud": "\033[31m", "legit": "\033[32m", "unsure": "\033[33m"}


def format_verdict_tag(verdict: str, analyst: str, *, color: bool) -> str:
    """The current verdict appended to an alert's line (``--show-verdicts``): the word and who
    gave it, e.g. ``[fraud by alice]``."""
    word = _paint(clean(verdict), BOLD + VERDICT_COLOURS.get(verdict, ""), color)
    return f"[{word} by {clean(analyst)}]"


def format_warning(text: str, *, color: bool) -> str:
    return _paint(f"warning: {clean(text)}", YELLOW_WARNING, color)


def format_totals(per_rule: Mapping[str, int], *, duplicates: int, malformed: int,
                  color: bool) -> str:
    """The exit summary: alerts shown per rule id (the default rules listed even at 0, then
    every other rule id seen)."""
    names = [*RULES, *sorted(set(per_rule) - set(RULES))]
    parts = [_paint(f"{clean(name)}={per_rule.get(name, 0)}", rule_colour(name), color)
             for name in names]
    total = sum(per_rule.values())
    return (f"alerts shown: {total} ({' '.join(parts)}); duplicates skipped: {duplicates}; "
            f"malformed: {malformed}")


def use_color(setting: str, *, isatty: bool, environ: Mapping[str, str]) -> bool:
    """--color always/never, or auto: a terminal and no non-empty NO_COLOR
    (https://no-color.org)."""
    if setting == "always":
        return True
    if setting == "never":
        return False
    return isatty and not environ.get("NO_COLOR")


class SeenIds:
    """Bounded memory of alert ids: a replayed alert is skipped, the oldest ids are forgotten
    once ``capacity`` is reached."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, alert_id: str) -> bool:
        """Remember ``alert_id``; False if it was already seen (a duplicate)."""
        if alert_id in self._ids:
            self._ids.move_to_end(alert_id)
            return False
        self._ids[alert_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, alert_id: object) -> bool:
        return alert_id in self._ids
