"""The rule core: rule kinds, definitions, rule sets, the incremental engine and the oracle.

No Spark and no Kafka in here: the detector, the backtest, the oracle, the dashboard and the
console all use these classes, so a rule means the same thing everywhere. ``python -m
fraudstream.rules`` is the command line for people who change rules.
"""

from fraudstream.rules.definition import (
    DefinitionError,
    RuleDefinition,
    default_definitions,
    definition_from_dict,
    parse_definition,
)
from fraudstream.rules.engine import BucketState, RuleAlert, UserState, alert_record
from fraudstream.rules.kinds import KINDS, MICROS, RuleKind, SpanKind, TransactionKind, Tx, kind_of
from fraudstream.rules.ruleset import APPLIED, DELETED, REFUSED, RuleChange, RuleSet

__all__ = [
    "APPLIED",
    "DELETED",
    "KINDS",
    "MICROS",
    "REFUSED",
    "BucketState",
    "DefinitionError",
    "RuleAlert",
    "RuleChange",
    "RuleDefinition",
    "RuleKind",
    "RuleSet",
    "SpanKind",
    "TransactionKind",
    "Tx",
    "UserState",
    "alert_record",
    "default_definitions",
    "definition_from_dict",
    "kind_of",
    "parse_definition",
]
