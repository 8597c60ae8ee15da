"""``python -m fraudstream.rules``: the command line for people who change rules.

The rules in force live on the ``fraud-rules`` topic, so every command starts by reading the
whole topic and folding it through ``RuleSet.apply``, exactly as the detector does; what it shows
is what the detector applies. A change is built as the next ``RuleDefinition`` and checked with
``RuleSet.check`` against the detector's retention horizon *before* anything is published: a
refusal prints one line naming the rule and the reason, exits 2 and publishes nothing, so a typo
never reaches the detector (where it would only be refused and logged). After publishing, the
topic is read again to confirm the record was applied, which catches two people changing the
same rule at once (the later one is refused as a stale version).

Exit codes: 0 done (or nothing to do), 1 the broker or topic could not be reached, 2 refused or
invalid input (settings, arguments, files).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException

from fraudstream.kafka import BrokerUnavailable
from fraudstream.logs import setup_logging
from fraudstream.rules.definition import DefinitionError, RuleDefinition, definition_from_dict
from fraudstream.rules.kinds import KINDS
from fraudstream.rules.ruleset import APPLIED, DELETED, REFUSED, RuleChange, RuleSet
from fraudstream.rules.store import RuleRecord, RulesTopic, RulesTopicError
from fraudstream.schemas import RULE_CHANGES_DATASET, format_timestamp, utc_now
from fraudstream.settings import RulesSettings, build_parser, load_settings, run_entry_point
from fraudstream.storage import StoragePath

__all__ = [
    "Refusal",
    "main",
    "merge_history",
    "parse_assignments",
    "plan_file",
    "read_definitions_file",
    "read_parquet_history",
    "run",
]

PROG = RulesSettings.PROG
EXIT_UNREACHABLE = 1
EXIT_REFUSED = 2


class Refusal(Exception):
    """A request the CLI will not carry out; nothing is published."""

    def __init__(self, reason: str, rule_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule_id = rule_id

    def line(self) -> str:
        where = f" {self.rule_id}" if self.rule_id else ""
        return f"{PROG}: refused{where}: {_one_line(self.reason)}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- reading the topic -------------------------------------------------------------------------


@dataclass
class Context:
    """What every command needs: settings, the parsed arguments and the topic."""

    settings: RulesSettings
    args: argparse.Namespace
    topic: RulesTopic
    _state: tuple[RuleSet, list[tuple[RuleRecord, RuleChange]]] | None = field(default=None)

    @property
    def horizon_us(self) -> int:
        return self.settings.retention_us

    def state(self) -> tuple[RuleSet, list[tuple[RuleRecord, RuleChange]]]:
        """The rules in force and what each record did (read once per command)."""
        if self._state is None:
            self._state = self.topic.history(self.horizon_us)
        return self._state

    @property
    def ruleset(self) -> RuleSet:
        return self.state()[0]

    def flag(self, name: str) -> bool:
        return bool(getattr(self.args, name, False))


def _in_force(ruleset: RuleSet, rule_id: str) -> RuleDefinition:
    """The definition of ``rule_id`` in force; a Refusal says what happened to it otherwise."""
    current = ruleset.rules.get(rule_id)
    if current is not None:
        return current
    if rule_id in ruleset.retired:
        raise Refusal(f"no rule {rule_id!r} in force: it was deleted (last version "
                      f"{ruleset.retired[rule_id]})", rule_id)
    known = ", ".join(sorted(ruleset.rules)) or "none"
    raise Refusal(f"no rule {rule_id!r} in force (rules in force: {known})", rule_id)


# --- planning and publishing changes -----------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One record to publish: a definition, or a deletion (``definition`` None)."""

    rule_id: str
    definition: RuleDefinition | None
    previous: RuleDefinition | None

    def describe(self, verb: str, offset: int | None = None) -> str:
        """``published velocity v2 at offset 7: <summary> (was v1: <summary>)``."""
        at = f" at offset {offset}" if offset is not None else ""
        was = f" (was v{self.previous.version}: {_summary(self.previous)})" if self.previous \
            else " (new)"
        if self.definition is None:
            return f"{verb} {self.rule_id}{at}{was}"
        return (f"{verb} {self.rule_id} v{self.definition.version}{at}: "
                f"{_summary(self.definition)}{was}")


def _summary(definition: RuleDefinition) -> str:
    return definition.summary() + ("" if definition.enabled else " [disabled]")


def _action(planned: Planned, action: str, offset: int | None = None) -> dict[str, Any]:
    return {"rule_id": planned.rule_id, "action": action, "offset": offset,
            "version": planned.definition.version if planned.definition else None,
            "previous_version": planned.previous.version if planned.previous else None,
            "definition": planned.definition.to_dict() if planned.definition else None}


def _check(ruleset: RuleSet, definition: RuleDefinition, horizon_us: int) -> None:
    try:
        ruleset.check(definition, horizon_us)
    except DefinitionError as exc:
        raise Refusal(exc.reason, definition.rule_id) from None


def _publish(ctx: Context, plans: Sequence[Planned], unchanged: Sequence[dict[str, Any]] = ()
             ) -> int:
    """Publish ``plans`` (all already validated), or print them under ``--dry-run``; then
    confirm each published record was applied when the topic is folded again."""
    as_json = ctx.flag("json")
    actions: list[dict[str, Any]] = list(unchanged)
    if not as_json:
        for item in unchanged:
            print(f"{item['rule_id']}: unchanged (v{item['version']} already says so)")
    if ctx.flag("dry_run"):
        for plan in plans:
            actions.append(_action(plan, "would delete" if plan.definition is None
                                   else "would publish"))
            if not as_json:
                value = plan.definition.to_json() if plan.definition else "null (deletes it)"
                verb = "would delete" if plan.definition is None else "would publish"
                print(f"dry run: {plan.describe(verb)}\n  {ctx.topic.topic} "
                      f"key={plan.rule_id} value={value}")
        if as_json:
            print(json.dumps(actions, indent=2))
        elif not plans:
            print("nothing to publish")
        return 0
    offsets: list[tuple[Planned, int]] = []
    for plan in plans:
        if plan.definition is None:
            offset = ctx.topic.delete(plan.rule_id)
        else:
            offset = ctx.topic.publish(plan.definition)
        offsets.append((plan, offset))
    refused = _confirm(ctx, offsets)
    for plan, offset in offsets:
        verb = "deleted" if plan.definition is None else "published"
        if offset in refused:
            actions.append({**_action(plan, "refused", offset), "reason": refused[offset]})
            print(f"{PROG}: refused {plan.rule_id}: published at offset {offset} but "
                  f"{_one_line(refused[offset])}", file=sys.stderr)
            continue
        actions.append(_action(plan, verb, offset))
        if not as_json:
            print(plan.describe(verb, offset))
    if as_json:
        print(json.dumps(actions, indent=2))
    elif not plans:
        print("nothing to publish")
    return EXIT_REFUSED if refused else 0


def _confirm(ctx: Context, published: Sequence[tuple[Planned, int]]) -> dict[int, str]:
    """Reasons, by offset, for published records the fold refused (someone else got there
    first between our read and our write)."""
    if not published:
        return {}
    _, history = ctx.topic.history(ctx.horizon_us)
    wanted = {offset for _, offset in published}
    return {change.offset: change.reason or "refused"
            for _, change in history
            if change.offset in wanted and change.status == REFUSED}


def _analyst(settings: RulesSettings) -> str:
    """Who is changing the rules: --analyst / FRAUDSTREAM_ANALYST, else the login name."""
    if settings.analyst and settings.analyst.strip():
        return settings.analyst.strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise Refusal("cannot tell who is making the change: give --analyst NAME or set "
                      "FRAUDSTREAM_ANALYST") from None


def parse_assignments(pairs: Iterable[str]) -> dict[str, int | float]:
    """``count=5 window_seconds=60`` as numbers. Types and ranges are the kind's business;
    here only the shape, so the kind's own message explains a bad value."""
    out: dict[str, int | float] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise Refusal(f"{pair!r}: expected key=value, e.g. count=5")
        if name == "enabled":
            raise Refusal("enabled is not set with `set`: use `enable RULE` or `disable RULE`")
        if name in out:
            raise Refusal(f"params.{name} given twice")
        try:
            out[name] = int(text)
        except ValueError:
            try:
                out[name] = float(text)
            except ValueError:
                raise Refusal(f"params.{name}: expected a number, got {text!r}") from None
    return out


# --- the commands ------------------------------------------------------------------------------


def cmd_list(ctx: Context) -> int:
    ruleset, history = ctx.state()
    rules = [d for _, d in sorted(ruleset.rules.items())]
    if ctx.flag("json"):
        print(json.dumps([{**d.to_dict(), "summary": d.summary()} for d in rules], indent=2))
        return 0
    if not rules:
        print(f"no rules on {ctx.topic.topic} (the detector publishes the default rules when it "
              "starts on an empty topic)")
    else:
        rows = [("RULE", "KIND", "VERSION", "ENABLED", "FIRES WHEN", "UPDATED BY", "UPDATED AT")]
        rows += [(d.rule_id, d.kind, f"v{d.version}", "yes" if d.enabled else "no", d.summary(),
                  d.updated_by, d.updated_at) for d in rules]
        print(_table(rows))
    newest: dict[str, RuleChange] = {}
    for _, change in history:
        if change.rule_id is not None:
            newest[change.rule_id] = change
    for rule_id, change in sorted(newest.items()):
        if change.status == REFUSED:
            print(f"note: the newest record for {rule_id} (offset {change.offset}) was refused: "
                  f"{_one_line(change.reason or '')}; see `history {rule_id}`", file=sys.stderr)
    return 0


def cmd_show(ctx: Context) -> int:
    definition = _in_force(ctx.ruleset, ctx.args.rule)
    print(json.dumps(definition.to_dict(), indent=2))
    return 0


def cmd_set(ctx: Context) -> int:
    rule_id: str = ctx.args.rule
    try:
        params = parse_assignments(ctx.args.params)
    except Refusal as exc:
        raise Refusal(exc.reason, rule_id) from None
    kind: str | None = ctx.args.kind
    ruleset = ctx.ruleset
    current = ruleset.rules.get(rule_id)
    author = _analyst(ctx.settings)
    try:
        if current is None:
            if kind is None:
                try:
                    _in_force(ruleset, rule_id)
                except Refusal as exc:
                    raise Refusal(f"{exc.reason}; to create it, give --kind "
                                  f"({', '.join(KINDS)}) and every parameter", rule_id) from None
            version = ruleset.retired.get(rule_id, 0) + 1
            definition = definition_from_dict({
                "rule_id": rule_id, "kind": kind, "version": version, "enabled": True,
                "params": params, "updated_at": format_timestamp(utc_now()),
                "updated_by": author})
        else:
            if kind is not None and kind != current.kind:
                raise Refusal(f"{rule_id} is a {current.kind} rule and a rule's kind does not "
                              f"change: delete it first, or create a new rule_id", rule_id)
            merged = {**current.params, **params}
            if merged == dict(current.params):
                return _publish(ctx, [], [_action(Planned(rule_id, current, current),
                                                  "unchanged")])
            definition = current.changed(version=current.version + 1, updated_by=author,
                                         params=merged)
    except DefinitionError as exc:
        raise Refusal(exc.reason, rule_id) from None
    _check(ruleset, definition, ctx.horizon_us)
    return _publish(ctx, [Planned(rule_id, definition, current)])


def _switch(enabled: bool) -> Callable[[Context], int]:
    def command(ctx: Context) -> int:
        rule_id: str = ctx.args.rule
        current = _in_force(ctx.ruleset, rule_id)
        if current.enabled == enabled:
            return _publish(ctx, [], [_action(Planned(rule_id, current, current), "unchanged")])
        try:
            definition = current.changed(version=current.version + 1,
                                         updated_by=_analyst(ctx.settings), enabled=enabled)
        except DefinitionError as exc:
            raise Refusal(exc.reason, rule_id) from None
        _check(ctx.ruleset, definition, ctx.horizon_us)
        return _publish(ctx, [Planned(rule_id, definition, current)])

    return command


def cmd_delete(ctx: Context) -> int:
    rule_id: str = ctx.args.rule
    current = _in_force(ctx.ruleset, rule_id)
    _, change = ctx.ruleset.apply(rule_id, None, ctx.horizon_us)
    if change.status != DELETED:
        raise Refusal(change.reason or "cannot delete", rule_id)
    return _publish(ctx, [Planned(rule_id, None, current)])


def read_definitions_file(path: str) -> list[Mapping[str, Any]]:
    """The definitions in a JSON or YAML file (``-``: standard input): a list, or one."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise Refusal(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Refusal(f"cannot read {path}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise Refusal(f"{path} is neither JSON nor YAML: {problem}{where}") from None
    if data is None:
        raise Refusal(f"{path} holds no definitions")
    items = data if isinstance(data, list) else [data]
    for number, item in enumerate(items, 1):
        if not isinstance(item, Mapping):
            raise Refusal(f"{path}: definition {number} is not an object")
    return items


def plan_file(ruleset: RuleSet, items: Sequence[Mapping[str, Any]], author: str,
              horizon_us: int, source: str) -> tuple[list[Planned], list[dict[str, Any]],
                                                     list[Refusal]]:
    """What applying ``items`` would publish, what is already in force, and every refusal.

    In a file ``version`` is optional (the next version is used); when given it must be the
    next version, so a file exported before someone else's change cannot silently undo it.
    ``enabled`` defaults to true; ``updated_at`` / ``updated_by`` are the publisher's.
    """
    plans: list[Planned] = []
    unchanged: list[dict[str, Any]] = []
    refusals: list[Refusal] = []
    seen: set[str] = set()
    stamp = format_timestamp(utc_now())
    for number, item in enumerate(items, 1):
        rule_id = item.get("rule_id")
        if not isinstance(rule_id, str) or not rule_id:
            refusals.append(Refusal(f"{source}: definition {number} has no rule_id"))
            continue
        if rule_id in seen:
            refusals.append(Refusal(f"{source} defines it more than once", rule_id))
            continue
        seen.add(rule_id)
        current = ruleset.rules.get(rule_id)
        last = current.version if current else ruleset.retired.get(rule_id, 0)
        given = item.get("version")
        data = {"enabled": True, **item, "version": last + 1 if given is None else given,
                "updated_at": stamp, "updated_by": author}
        try:
            definition = definition_from_dict(data)
        except DefinitionError as exc:
            refusals.append(Refusal(exc.reason, rule_id))
            continue
        if current is not None and (current.kind, current.enabled, dict(current.params)) == (
                definition.kind, definition.enabled, dict(definition.params)):
            unchanged.append(_action(Planned(rule_id, current, current), "unchanged"))
            continue
        if given is not None and given != last + 1:
            if current is not None:
                state = f"version {last} is in force"
            elif last:
                state = f"version {last} was the last before it was deleted"
            else:
                state = "it is a new rule"
            refusals.append(Refusal(f"version {given} in {source}, but {state}: write version "
                                    f"{last + 1}, or leave version out", rule_id))
            continue
        try:
            _check(ruleset, definition, horizon_us)
        except Refusal as exc:
            refusals.append(exc)
            continue
        plans.append(Planned(rule_id, definition, current))
    return plans, unchanged, refusals


def cmd_apply(ctx: Context) -> int:
    items = read_definitions_file(ctx.args.file)
    source = "standard input" if ctx.args.file == "-" else ctx.args.file
    plans, unchanged, refusals = plan_file(ctx.ruleset, items, _analyst(ctx.settings),
                                           ctx.horizon_us, source)
    if refusals:
        for refusal in refusals:
            print(refusal.line(), file=sys.stderr)
        print(f"{PROG}: nothing published ({len(refusals)} of {len(items)} definitions "
              "refused)", file=sys.stderr)
        return EXIT_REFUSED
    return _publish(ctx, plans, unchanged)


def cmd_export(ctx: Context) -> int:
    print(json.dumps([d.to_dict() for _, d in sorted(ctx.ruleset.rules.items())], indent=2))
    return 0


# --- history -----------------------------------------------------------------------------------


def _utc_from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def read_parquet_history(parquet_dir: StoragePath) -> list[dict[str, Any]]:
    """Rows of the detector's ``rule_changes`` dataset, every epoch in order (empty when there is
    none). It is the durable history: the topic is compacted, so old versions survive only here."""
    folder = parquet_dir / RULE_CHANGES_DATASET
    try:
        from fraudstream.datasets import RULE_CHANGES_SCHEMA, read_dataset  # needs Arrow

        table = read_dataset(parquet_dir, RULE_CHANGES_DATASET, RULE_CHANGES_SCHEMA)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        print(f"{PROG}: warning: cannot read {folder}, showing the topic only: "
              f"{_one_line(str(exc))}", file=sys.stderr)
        return []
    return table.to_pylist()


def merge_history(topic_rows: Iterable[dict[str, Any]], parquet_rows: Iterable[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """One history from the topic and the Parquet dataset, each record once, oldest first.

    A record read by both is identified by its offset and status; the version and update
    time join the key because a broker without durable storage restarts offsets at 0, and two
    different records must not be taken for one.
    """
    def key(row: Mapping[str, Any]) -> tuple[Any, ...]:
        return row["offset"], row["status"], row["version"], row["updated_at"]

    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in parquet_rows:
        merged.setdefault(key(row), {**row, "published_at": None})
    for row in topic_rows:
        found = merged.get(key(row))
        if found is None:
            merged[key(row)] = {**row, "applied_at": None}
        else:
            found["published_at"] = row["published_at"]

    def when(row: Mapping[str, Any]) -> tuple[datetime, int]:
        moment = row["published_at"] or row["applied_at"] or datetime.min.replace(tzinfo=UTC)
        return moment, row["offset"] if row["offset"] is not None else -1

    return sorted(merged.values(), key=when)


def _params(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_row(row: Mapping[str, Any], was_enabled: bool | None) -> str:
    """What one record changed, in words: ``count 3 -> 5``, ``disabled``, ``created: ...``."""
    status = row["status"]
    if status == DELETED:
        return f"deleted (was v{row['previous_version']})" if row["previous_version"] \
            else "deleted"
    parts: list[str] = []
    new, old = _params(row["params"]), _params(row["previous_params"])
    if row["params"] is not None:
        if row["previous_params"] is None:
            listed = ", ".join(f"{k}={_number(v)}" for k, v in new.items())
            parts.append(f"created: {listed}")
            if row["enabled"] is False:
                parts.append("disabled")
        else:
            parts += [f"{k} {_number(old.get(k, '-'))} -> {_number(v)}"
                      for k, v in new.items() if old.get(k) != v]
            if was_enabled is not None and row["enabled"] != was_enabled:
                parts.append("enabled" if row["enabled"] else "disabled")
            if not parts:
                parts.append("no change" if was_enabled is not None else
                             ("enabled" if row["enabled"] else "disabled"))
    if status == REFUSED:
        parts.append(f"REFUSED: {_one_line(row['reason'] or '')}")
    return "; ".join(parts)


def cmd_history(ctx: Context) -> int:
    rule_id: str | None = ctx.args.rule
    _, history = ctx.state()
    topic_rows = [{**change.to_record(), "published_at": _utc_from_us(record.timestamp_ms * 1000)}
                  for record, change in history]
    rows = merge_history(topic_rows, read_parquet_history(ctx.settings.parquet_dir))
    if rule_id is not None:
        rows = [row for row in rows if row["rule_id"] == rule_id]
    if ctx.flag("json"):
        print(json.dumps([{k: format_timestamp(v) if isinstance(v, datetime) else v
                           for k, v in row.items()} for row in rows], indent=2))
        return 0
    if not rows:
        print(f"no records for {rule_id!r}" if rule_id else "no records")
        return 0
    table = [("WHEN", "OFFSET", "RULE", "VERSION", "STATUS", "BY", "CHANGE")]
    enabled: dict[str, bool] = {}
    for row in rows:
        # When it reached the topic (or the detector), not the author's own updated_at: that
        # is whatever the publisher wrote, and would not read in order.
        moment = _stamp(row["published_at"] or row["applied_at"])
        name = row["rule_id"] or "?"
        change = describe_row(row, enabled.get(name))
        if row["status"] == APPLIED:
            enabled[name] = bool(row["enabled"])
        elif row["status"] == DELETED:
            enabled.pop(name, None)
        version = f"v{row['version']}" if row["version"] is not None else "-"
        offset = str(row["offset"]) if row["offset"] is not None else "-"
        table.append((moment, offset, name, version, row["status"], row["updated_by"] or "-",
                      change))
    print(_table(table))
    return 0


def _stamp(moment: datetime | None) -> str:
    return format_timestamp(moment) if moment else "-"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                                row[-1]]).rstrip() for row in rows)


# --- arguments ---------------------------------------------------------------------------------

_KINDS_HELP = "; ".join(f"{name}: {', '.join(p.name for p in kind.params)}"
                        for name, kind in KINDS.items())

_EXAMPLES = """\
examples:
  python -m fraudstream.rules list
  python -m fraudstream.rules set velocity count=5 --analyst alice
  python -m fraudstream.rules set velocity_10m --kind velocity count=10 window_seconds=600
  python -m fraudstream.rules disable paypal_micro
  python -m fraudstream.rules history velocity
  python -m fraudstream.rules export > rules.json && python -m fraudstream.rules apply rules.json

Connection settings (--bootstrap-servers, --rules-topic, ...) may be given before or after the
command. Exit codes: 0 done, 1 broker unreachable, 2 refused (nothing published)."""


def _add_commands(parser: argparse.ArgumentParser) -> None:
    """The subcommands. Each accepts the settings flags too, so they work after the command."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(parser.description or "", 95)
    parser.epilog = f"{_EXAMPLES}\n\n{textwrap.fill(parser.epilog or '', 95)}"
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[Context], int], summary: str, *,
                json_flag: bool = True, changes: bool = False, rule: str | None = None
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=summary, parents=[build_parser(RulesSettings)],
            conflict_handler="resolve", argument_default=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        if rule is not None:
            sub.add_argument("rule", metavar="RULE", help=rule)
        if json_flag:
            sub.add_argument("--json", action="store_true", default=False,
                             help="machine-readable JSON output")
        if changes:
            sub.add_argument("--dry-run", action="store_true", default=False,
                             help="validate and print what would be published; publish nothing")
        return sub

    command("list", cmd_list, "List the rules in force (enabled or not).")
    command("show", cmd_show, "Print the JSON definition of one rule in force.",
            json_flag=False, rule="rule_id")
    set_parser = command(
        "set", cmd_set, "Change parameters of a rule, or create a rule with --kind (then every "
        "parameter of the kind is required). Use enable/disable to switch a rule.",
        changes=True, rule="rule_id")
    set_parser.add_argument("params", nargs="+", metavar="KEY=VALUE",
                            help=f"parameters as numbers; by kind: {_KINDS_HELP}")
    set_parser.add_argument("--kind", default=None, metavar="KIND",
                            help=f"create the rule with this kind ({', '.join(KINDS)})")
    command("enable", _switch(True), "Enable a rule.", changes=True, rule="rule_id")
    command("disable", _switch(False), "Disable a rule (kept, not applied).", changes=True,
            rule="rule_id")
    command("delete", cmd_delete, "Delete a rule (publishes a tombstone).", changes=True,
            rule="rule_id")
    history = command("history", cmd_history,
                      "Who changed a rule, when, old -> new parameters, and refused records "
                      "with their reasons (the topic merged with <parquet_dir>/rule_changes/).")
    history.add_argument("rule", metavar="RULE", nargs="?", default=None,
                         help="rule_id (default: every rule)")
    apply = command(
        "apply", cmd_apply, "Publish the definitions in a JSON or YAML file (a list, or one) "
        "whose content differs from what is in force. `version` is optional; when given it "
        "must be the next version. Refuses the whole file if any definition is refused.",
        changes=True)
    apply.add_argument("file", metavar="FILE", help="JSON or YAML file; - for standard input")
    command("export", cmd_export, "Print the rules in force as a JSON list (input for `apply`).",
            json_flag=False)


# --- entry point -------------------------------------------------------------------------------


def _client_config(settings: RulesSettings) -> dict[str, Any]:
    """librdkafka logs through Python logging (quiet unless LOG_LEVEL asks), so an unreachable
    broker is reported once, by the error message, not by a stream of connect failures."""
    return {**settings.client_config(), "logger": logging.getLogger("librdkafka")}


def run(settings: RulesSettings, args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code."""
    topic = RulesTopic(_client_config(settings), settings.rules_topic, timeout=settings.timeout)
    ctx = Context(settings, args, topic)
    try:
        return int(args.handler(ctx))
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error of ours, and nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Refusal as exc:
        print(exc.line(), file=sys.stderr)
        return EXIT_REFUSED
    except (BrokerUnavailable, RulesTopicError, KafkaException) as exc:
        print(f"{PROG}: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_UNREACHABLE


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: settings errors exit 2 through ``run_entry_point`` like every
    other program of the project."""

    def entry() -> int:
        settings, args = load_settings(RulesSettings, argv, extra_args=_add_commands)
        # Quiet by default: what goes wrong is reported as one line; LOG_LEVEL=INFO shows more.
        setup_logging("rules", level=os.environ.get("LOG_LEVEL", "CRITICAL"))
        return run(settings, args)

    run_entry_point(PROG, entry)
