"""Rules: the definitions in force on the rules topic, and changing them without a restart.

Every change is published from a widget callback. Callbacks run before the page script, so the
page drawn right after a publish already shows the new version (no second rerun), and the
outcome (the new version, or the reason it was refused) is handed to that drawing through
session state. Nothing is published that the rule core refuses: the refusal and its reason are
shown instead, the same reason the detector would log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.data import resources
from dashboard.data.rules import (
    RulePublishError,
    change_rows,
    history,
    refused,
    rules_in_force,
)
from dashboard.screens._charts import code_span, show_outcome
from fraudstream.rules.definition import RuleDefinition
from fraudstream.rules.kinds import KINDS, Param, RuleKind

context = resources.get_context()
settings = context.settings
store = resources.rules(context)

#: (level, text, place): the outcome of the last change, shown once where it was made.
_MESSAGE = "rules.message"
#: (rule_id, version) awaiting a confirmed deletion.
_CONFIRM = "rules.confirm_delete"
_TOP = "top"
_ADD = "add"


# --- callbacks ------------------------------------------------------------------------------


def _edit_key(rule_id: str, version: int, name: str) -> str:
    """Widget keys carry the version: a new version gets fresh inputs holding its values."""
    return f"rules.edit.{rule_id}.{version}.{name}"


def _add_key(kind: str, name: str) -> str:
    return f"rules.add.{kind}.{name}"


def _outcome(action: Callable[[], RuleDefinition | str], place: str) -> None:
    """Run one publishing action and keep its outcome for the page to show."""
    try:
        result = action()
    except RulePublishError as exc:
        st.session_state[_MESSAGE] = ("error", f"Refused, nothing published: {exc.reason}",
                                      place)
        return
    if isinstance(result, RuleDefinition):
        state = "enabled" if result.enabled else "disabled"
        text = (f"Published {result.rule_id} version {result.version} ({state}): "
                f"{result.summary()}. The detector applies it from its next micro-batch.")
    else:
        text = result
    st.session_state[_MESSAGE] = ("success", text, place)


def _publish_edit(rule_id: str, version: int, kind: str) -> None:
    params = {p.name: st.session_state[_edit_key(rule_id, version, p.name)]
              for p in KINDS[kind].params}
    enabled = bool(st.session_state[_edit_key(rule_id, version, "enabled")])
    _outcome(lambda: store.update(rule_id, base_version=version, analyst=resources.analyst(),
                                  params=params, enabled=enabled), rule_id)


def _set_enabled(rule_id: str, version: int, enabled: bool) -> None:
    _outcome(lambda: store.update(rule_id, base_version=version, analyst=resources.analyst(),
                                  enabled=enabled), rule_id)


def _ask_delete(rule_id: str, version: int) -> None:
    st.session_state[_CONFIRM] = (rule_id, version)


def _cancel_delete() -> None:
    st.session_state.pop(_CONFIRM, None)


def _delete(rule_id: str, version: int) -> None:
    st.session_state.pop(_CONFIRM, None)

    def run() -> str:
        offset = store.delete(rule_id, base_version=version)
        return (f"Deleted {rule_id} (was version {version}; tombstone at offset {offset}). "
                "The detector stops applying it from its next micro-batch.")

    _outcome(run, _TOP)


def _publish_new(kind: str) -> None:
    rule_id = str(st.session_state.get("rules.add.rule_id") or "")
    params = {p.name: st.session_state[_add_key(kind, p.name)] for p in KINDS[kind].params}
    enabled = bool(st.session_state.get("rules.add.enabled", True))
    _outcome(lambda: store.create(rule_id, kind, params, analyst=resources.analyst(),
                                  enabled=enabled), _ADD)


def _refresh() -> None:
    store.snapshot(refresh=True)


# --- drawing --------------------------------------------------------------------------------


def show_message(place: str) -> None:
    show_outcome(_MESSAGE, place)


def param_input(param: Param, value: Any, key: str, disabled: bool = False) -> None:
    """A number input for one parameter. No bounds on the widget: the rule core checks them and
    says why a value is refused, the same way for the page, the CLI and the detector."""
    if param.type is int:
        st.number_input(param.name, value=int(value), step=1, key=key, help=param.help,
                        disabled=disabled)
    else:
        st.number_input(param.name, value=float(value), step=1.0, key=key, help=param.help,
                        disabled=disabled)


def rule_editor(definition: RuleDefinition, rows: pd.DataFrame, can_publish: bool) -> None:
    rule_id, version = definition.rule_id, definition.version
    kind: RuleKind = definition.impl
    show_message(rule_id)
    st.caption(f"Kind {kind.name}: {kind.title}. Version {version} by {definition.updated_by} "
               f"at {definition.updated_at}.")
    with st.form(key=f"rules.edit.{rule_id}.{version}"):
        columns = st.columns(len(kind.params) + 1)
        for column, param in zip(columns, kind.params, strict=False):
            with column:
                param_input(param, definition.params[param.name],
                            _edit_key(rule_id, version, param.name))
        with columns[-1]:
            st.toggle("enabled", value=definition.enabled,
                      key=_edit_key(rule_id, version, "enabled"))
        st.form_submit_button(f"Publish version {version + 1}", type="primary",
                              key=f"rules.publish.{rule_id}", disabled=not can_publish,
                              on_click=_publish_edit, args=(rule_id, version, kind.name))

    toggle_col, delete_col, _ = st.columns([1, 1, 4])
    with toggle_col:
        label = "Disable" if definition.enabled else "Enable"
        st.button(label, key=f"rules.toggle.{rule_id}", disabled=not can_publish,
                  help=f"Publish version {version + 1} {label.lower()}d, params unchanged",
                  on_click=_set_enabled, args=(rule_id, version, not definition.enabled))
    with delete_col:
        st.button("Delete…", key=f"rules.delete.{rule_id}", disabled=not can_publish,
                  on_click=_ask_delete, args=(rule_id, version))
    if st.session_state.get(_CONFIRM) == (rule_id, version):
        st.warning(f"Delete rule {code_span(rule_id)} (version {version})? The detector stops "
                   "applying it and closes its open episodes; its history is kept, and adding "
                   "it again continues its version numbering.", icon=":material/delete:")
        yes_col, no_col, _ = st.columns([1, 1, 4])
        yes_col.button(f"Delete {rule_id}", key=f"rules.delete.confirm.{rule_id}",
                       type="primary", disabled=not can_publish, on_click=_delete,
                       args=(rule_id, version))
        no_col.button("Cancel", key=f"rules.delete.cancel.{rule_id}", on_click=_cancel_delete)

    st.text("History (newest first)")
    st.dataframe(history(rows, rule_id), hide_index=True, key=f"rules.history.{rule_id}",
                 column_config=_HISTORY_CONFIG)


def add_rule(can_publish: bool) -> None:
    show_message(_ADD)
    kind_name = st.selectbox("Kind", list(KINDS), key="rules.add.kind",
                             format_func=lambda name: f"{name}: {KINDS[name].title}")
    kind = KINDS[kind_name]
    with st.form(key="rules.add"):
        st.text_input("rule_id", key="rules.add.rule_id", placeholder=f"e.g. {kind.name}_strict",
                      help="1-64 letters, digits, '_', '.' or '-'; several rules may share a kind")
        columns = st.columns(len(kind.params) + 1)
        for column, param in zip(columns, kind.params, strict=False):
            with column:
                param_input(param, kind.defaults[param.name], _add_key(kind.name, param.name))
        with columns[-1]:
            st.toggle("enabled", value=True, key="rules.add.enabled")
        st.form_submit_button("Publish new rule", type="primary", key="rules.add.submit",
                              disabled=not can_publish, on_click=_publish_new,
                              args=(kind.name,))


_HISTORY_CONFIG = {
    "offset": st.column_config.NumberColumn("offset", format="%d"),
    "updated_by": st.column_config.TextColumn("who"),
    "updated_at": st.column_config.TextColumn("when"),
    "old_params": st.column_config.TextColumn("old params"),
    "new_params": st.column_config.TextColumn("new params"),
    "seen_in": st.column_config.TextColumn("seen in"),
}

st.title("Rules")
st.caption(
    f"The rules in force are the newest definition per rule_id on the topic "
    f"{code_span(store.topic_name)}, folded exactly as the detector folds it. A published "
    f"change applies from the detector's next micro-batch, without a restart. Windows may not "
    f"exceed the retention horizon of {settings.retention_seconds:g} s (RETENTION_SECONDS)."
)
st.button("Refresh", key="rules.refresh", on_click=_refresh,
          help="Re-read the rules topic now (it is re-read at most every "
               f"{settings.refresh_seconds:g} s otherwise)")

snapshot = store.snapshot()
analyst = resources.analyst()
rows = change_rows(snapshot.changes, store.detector_log())
in_force = snapshot.ruleset.rules

pending = st.session_state.get(_MESSAGE)
if pending is not None and pending[2] not in {*in_force, _ADD}:
    # The rule it concerns is gone (deleted, maybe by someone else): show it here.
    st.session_state[_MESSAGE] = (*pending[:2], _TOP)
show_message(_TOP)
if snapshot.error is not None:
    st.error(f"Cannot read the rules topic {code_span(store.topic_name)} at "
             f"{code_span(settings.bootstrap_servers)}"
             + ("; showing the last read." if snapshot.read_at else "."),
             icon=":material/cloud_off:")
    st.text(snapshot.error)
if not analyst:
    st.info("Enter your name as Analyst in the sidebar to publish changes: every change "
            "records who made it.", icon=":material/badge:")
can_publish = bool(analyst) and snapshot.error is None

st.subheader("Rules in force")
if in_force:
    st.dataframe(rules_in_force(snapshot.ruleset), hide_index=True, key="rules.table",
                 column_config={"updated_by": st.column_config.TextColumn("updated by"),
                                "updated_at": st.column_config.TextColumn("updated at")})
elif snapshot.error is None:
    st.info("No rules on the topic. The detector publishes the four default rules as version "
            "1 when it starts with an empty topic; or add one below.")

for rule_id, definition in sorted(in_force.items()):
    parts = [rule_id, f"v{definition.version}"]
    if definition.kind != rule_id:
        parts.append(f"kind {definition.kind}")
    if not definition.enabled:
        parts.append("disabled")
    label = " · ".join(parts)
    expanded = pending is not None and pending[2] == rule_id
    with st.expander(label, expanded=expanded, key=f"rules.rule.{rule_id}"):
        rule_editor(definition, rows, can_publish)

st.subheader("Add a rule")
add_rule(can_publish)

st.subheader("Refused definitions")
refusals = refused(rows)
if refusals.empty:
    st.text("None: every record on the topic and in the detector's log was applied.")
else:
    st.caption("Records that changed nothing: the previous version stayed in force. From the "
               "topic (as folded here) and from the detector's log (Parquet rule_changes), "
               "which keeps what compaction removed from the topic.")
    st.dataframe(refusals, hide_index=True, key="rules.refused", column_config={
        "offset": st.column_config.NumberColumn("offset", format="%d"),
        "version": st.column_config.NumberColumn("version", format="%d"),
        "raw": st.column_config.TextColumn("record"),
        "seen_in": st.column_config.TextColumn("seen in"),
    })

with st.expander("Every change, all rules (including deleted ones)", key="rules.all"):
    st.dataframe(rows.drop(columns=["raw"]), hide_index=True, key="rules.changes")
