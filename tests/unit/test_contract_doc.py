"""docs/contract.md names the same topics, fields, reason codes, kinds and payment methods as the
code that implements them: the contract page cannot drift from the software."""

from __future__ import annotations

import re

from fraudstream import schemas, topics
from fraudstream.rules.kinds import KINDS
from fraudstream.testing import REPO_ROOT
from fraudstream.verdicts import VERDICT_FIELDS, VERDICTS

TEXT = (REPO_ROOT / "docs" / "contract.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", TEXT, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def names_after(text: str, lead: str) -> list[str]:
    """The backticked names in the sentence that starts with ``lead`` (up to its full stop)."""
    start = text.index(lead) + len(lead)
    sentence = re.split(r"\.(?:\s|$)", text[start:], maxsplit=1)[0]
    return re.findall(r"`([^`]+)`", sentence)


def table_column(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def test_topics() -> None:
    assert table_column(section("Topics")) == [
        topics.TRANSACTIONS, topics.ALERTS, topics.DLQ, topics.RULES, topics.VERDICTS]


def test_transaction_fields() -> None:
    text = section("Transaction")
    assert names_after(text, "Required: ") == list(schemas.REQUIRED_FIELDS)
    assert names_after(text, "Optional: ") == list(schemas.OPTIONAL_FIELDS)
    assert names_after(text, "is one of ") == list(schemas.PAYMENT_METHODS)


def test_bad_input_codes_and_dlq_fields() -> None:
    text = section("Bad input")
    assert names_after(text, "one code per class:\n") == list(schemas.REASON_CODES)
    assert [n.split()[0] for n in names_after(text, "The DLQ record: ")] == \
        list(schemas.DLQ_FIELDS)


def test_rule_kinds() -> None:
    assert table_column(section("Rules")) == list(KINDS)


def test_alert_and_verdict_fields() -> None:
    assert names_after(section("Alert"), "Fields: ") == list(schemas.ALERT_FIELDS)
    verdict = section("Verdict")
    assert names_after(verdict, "Fields: ") == list(VERDICT_FIELDS)
    assert names_after(verdict, "is one of ") == list(VERDICTS)


def test_parquet_datasets() -> None:
    text = section("Parquet")
    for folder in (schemas.ALERTS_DATASET, schemas.TRANSACTIONS_DATASET, schemas.DLQ_DATASET,
                   schemas.RULE_CHANGES_DATASET, schemas.METRICS_FOLDER):
        assert f"`{folder}/`" in text
