"""Rules: the definitions in force on the rules topic, and changing them without a restart.

Every change is published from a widget callback. Callbacks run before the page script, so the
page drawn right after a publish already shows the new version (no second rerun), and the
outcome (the new version, or the reason it was refused) is handed to that drawing through
session state. Nothing is published that the rule core refuses: the refusal and its reason are
shown instead, the same reason the detector would log.

A definition being edited or added can be backtested first: ``dashboard.data.backtest`` runs
``python -m spark_job.backtest`` on it and the other rules in force over the last hours of the
stored history, in a subprocess kept in the session. A fragment polls it (progress, Cancel);
once it is done the results are drawn with a Publish button that publishes the backtested
definition through the same callback path as the edit form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.data import backtest as bt
from dashboard.data import resources
from dashboard.data.rules import (
    RulePublishError,
    change_rows,
    history,
    refused,
    rules_in_force,
)
from dashboard.data.views import alert_record
from dashboard.screens._charts import (
    EMPTY,
    RISK_COLUMN,
    code_span,
    evidence_table,
    metric_rows,
    show_outcome,
)
from fraudstream.rules.definition import RuleDefinition
from fraudstream.rules.kinds import KINDS, Param, RuleKind
from fraudstream.schemas import format_timestamp

context = resources.get_context()
settings = context.settings
store = resources.rules(context)

#: (level, text, place): the outcome of the last change, shown once where it was made.
_MESSAGE = "rules.message"
#: (rule_id, version) awaiting a confirmed deletion.
_CONFIRM = "rules.confirm_delete"
_TOP = "top"
_ADD = "add"
#: The session's backtest (a ``BacktestRun``): one at a time, shown where it was started.
_BACKTEST = "rules.backtest"
#: Seconds between two looks at a running backtest.
_POLL_SECONDS = 1.0


# --- callbacks ------------------------------------------------------------------------------


def _edit_key(rule_id: str, version: int, name: str) -> str:
    """Widget keys carry the version: a new version gets fresh inputs holding its values."""
    return f"rules.edit.{rule_id}.{version}.{name}"


def _add_key(kind: str, name: str) -> str:
    return f"rules.add.{kind}.{name}"


def _outcome(action: Callable[[], RuleDefinition | str], place: str) -> bool:
    """Run one publishing action and keep its outcome for the page to show; True if done."""
    try:
        result = action()
    except RulePublishError as exc:
        st.session_state[_MESSAGE] = ("error", f"Refused, nothing published: {exc.reason}",
                                      place)
        return False
    if isinstance(result, RuleDefinition):
        state = "enabled" if result.enabled else "disabled"
        text = (f"Published {result.rule_id} version {result.version} ({state}): "
                f"{result.summary()}. The detector applies it from its next micro-batch.")
    else:
        text = result
    st.session_state[_MESSAGE] = ("success", text, place)
    return True


def _publish_candidate(candidate: bt.Candidate, place: str) -> bool:
    """Publish an edited or new definition: the one path of the edit form, the add form and a
    backtest's Publish button (the store validates it as the detector will)."""
    if candidate.is_new:
        return _outcome(lambda: store.create(candidate.rule_id, candidate.kind, candidate.params,
                                             analyst=resources.analyst(),
                                             enabled=candidate.enabled), place)
    return _outcome(lambda: store.update(candidate.rule_id, base_version=candidate.base_version,
                                         analyst=resources.analyst(), params=candidate.params,
                                         enabled=candidate.enabled), place)


def _edit_candidate(rule_id: str, version: int, kind: str) -> bt.Candidate:
    """What the edit form of ``rule_id`` (based on ``version``) holds."""
    params = {p.name: st.session_state[_edit_key(rule_id, version, p.name)]
              for p in KINDS[kind].params}
    enabled = bool(st.session_state[_edit_key(rule_id, version, "enabled")])
    return bt.Candidate(rule_id, kind, params, enabled, version=version + 1,
                        base_version=version)


def _new_candidate(kind: str) -> bt.Candidate:
    """What the add form holds (a rule deleted earlier continues its version numbering)."""
    rule_id = str(st.session_state.get("rules.add.rule_id") or "").strip()
    params = {p.name: st.session_state[_add_key(kind, p.name)] for p in KINDS[kind].params}
    enabled = bool(st.session_state.get("rules.add.enabled", True))
    version = store.snapshot().ruleset.retired.get(rule_id, 0) + 1
    return bt.Candidate(rule_id, kind, params, enabled, version=version)


def _publish_edit(rule_id: str, version: int, kind: str) -> None:
    _publish_candidate(_edit_candidate(rule_id, version, kind), rule_id)


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
    _publish_candidate(_new_candidate(kind), _ADD)


def _hours_key(place: str) -> str:
    return f"rules.backtest.hours.{place}"


def _start_backtest(candidate: bt.Candidate, place: str) -> None:
    """Start a backtest of ``candidate`` (replacing this session's previous one)."""
    _discard_backtest()
    hours = float(st.session_state.get(_hours_key(place)) or bt.DEFAULT_HOURS)
    txs, _ = resources.transactions(context)
    try:
        run = bt.start_backtest(candidate, store.snapshot().ruleset, place=place, hours=hours,
                                event_times=txs["event_time"],
                                parquet_dir=settings.parquet_dir,
                                retention_seconds=settings.retention_seconds,
                                verdicts_url=settings.verdicts_url)
    except OSError as exc:
        st.session_state[_MESSAGE] = ("error", f"Cannot start the backtest: {exc}", place)
        return
    st.session_state[_BACKTEST] = run


def _backtest_edit(rule_id: str, version: int, kind: str) -> None:
    _start_backtest(_edit_candidate(rule_id, version, kind), rule_id)


def _backtest_new(kind: str) -> None:
    _start_backtest(_new_candidate(kind), _ADD)


def _cancel_backtest() -> None:
    run = st.session_state.get(_BACKTEST)
    if run is not None:
        run.cancel()


def _discard_backtest() -> None:
    run = st.session_state.pop(_BACKTEST, None)
    if run is not None:
        run.close()


def _publish_backtested() -> None:
    """Publish the definition the shown backtest ran, through the form's own path."""
    run = st.session_state.get(_BACKTEST)
    if run is not None and _publish_candidate(run.candidate, run.place):
        _discard_backtest()


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


def backtest_row(place: str, can_backtest: bool, on_click: Callable[..., None],
                 args: tuple[Any, ...]) -> None:
    """Inside a rule form: the hours of history to replay and the Backtest button."""
    hours_col, button_col, _ = st.columns([2, 1, 3], vertical_alignment="bottom")
    with hours_col:
        st.number_input("Backtest on the last … hours of history", min_value=1,
                        max_value=24 * 366, value=int(bt.DEFAULT_HOURS), step=1,
                        key=_hours_key(place),
                        help="Event time, ending at the newest stored transaction")
    with button_col:
        st.form_submit_button(
            "Backtest", key=f"rules.backtest.start.{place}", icon=":material/history:",
            disabled=not can_backtest, on_click=on_click, args=args,
            help="Replay the stored history with this definition and the other rules in force, "
                 "and compare with what the live detector raised. Nothing is published.")


def rule_editor(definition: RuleDefinition, rows: pd.DataFrame, can_publish: bool,
                can_backtest: bool) -> None:
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
        backtest_row(rule_id, can_backtest, _backtest_edit, (rule_id, version, kind.name))
    backtest_panel(rule_id, can_publish)

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


def add_rule(can_publish: bool, can_backtest: bool) -> None:
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
        backtest_row(_ADD, can_backtest, _backtest_new, (kind.name,))
    backtest_panel(_ADD, can_publish)


# --- the backtest -------------------------------------------------------------------------------


def _alerts(count: int) -> str:
    return f"{count:,} alert{'' if count == 1 else 's'}"


def _range_text(run: bt.BacktestRun) -> str:
    if run.start is None:
        return "the whole stored history"
    return (f"the last {run.hours:g} h of event time ({format_timestamp(run.start)} to "
            f"{format_timestamp(run.end)})")


@st.fragment(run_every=_POLL_SECONDS)
def backtest_progress() -> None:
    """A running backtest: its last progress line and a Cancel button, redrawn every second;
    the whole page is redrawn once it ends."""
    run = st.session_state.get(_BACKTEST)
    if run is None:
        return
    if not run.running:
        st.rerun()
    rule = run.candidate.rule_id or "the new rule"
    st.info(f"Backtesting {code_span(rule)} version {run.candidate.version} with the other "
            f"rules in force on {_range_text(run)} ({run.elapsed:.0f} s). The first step "
            "starts Spark, which takes a while.", icon=":material/hourglass_top:")
    st.text(run.progress())
    st.button("Cancel backtest", key="rules.backtest.cancel", on_click=_cancel_backtest)


def backtest_panel(place: str, can_publish: bool) -> None:
    """This session's backtest, if it was started here: progress, or its outcome."""
    run: bt.BacktestRun | None = st.session_state.get(_BACKTEST)
    if run is None or run.place != place:
        return
    status = run.status
    if status == bt.RUNNING:
        backtest_progress()
        return
    if status == bt.DONE:
        backtest_results(run, can_publish)
        return
    if status == bt.CANCELLED:
        st.info("Backtest cancelled: nothing was published.", icon=":material/cancel:")
    else:
        st.error("Backtest failed: nothing was published.", icon=":material/error:")
        st.text(run.error())
    st.button("Dismiss", key="rules.backtest.dismiss", on_click=_discard_backtest)


def backtest_results(run: bt.BacktestRun, can_publish: bool) -> None:
    result = run.result()
    report = result.report
    candidate = run.candidate
    row = result.rule(candidate.rule_id) or {}
    st.success(f"Backtest of {code_span(candidate.describe())} with the other rules in force: "
               f"{report['transactions']:,} transactions ({report['labelled_transactions']:,} "
               f"labelled) in {run.elapsed:.0f} s.", icon=":material/history:")
    st.caption(f"Replayed {_range_text(run)} with the live detector's rule code; compared with "
               f"the {_alerts(report['live_alerts'])} the live detector raised on the same "
               "transactions. Precision and recall are measured against the producer's labels "
               "(as on the Detection quality page); analyst precision against verdicts.")
    live_alerts = row.get("live_alerts", 0)
    metric_rows({
        "Alerts": f"{row.get('alerts', 0):,}",
        "Live alerts": f"{live_alerts:,}",
        "Added": f"+{row.get('added', 0):,}",
        "Removed": f"-{row.get('removed', 0):,}",
        "Precision": bt.ratio_text(row.get("precision")),
        "Live precision": bt.ratio_text(row.get("live_precision")),
        "Recall": bt.ratio_text(row.get("recall")),
        "Live recall": bt.ratio_text(row.get("live_recall")),
    }, per_row=4)
    if row.get("removed_confirmed_fraud"):
        st.warning(f"{row['removed_confirmed_fraud']:,} of the removed alerts were confirmed "
                   "fraud by an analyst: this change would lose them.", icon=":material/warning:")
    st.text("Every rule (the candidate's row is the one that changed)")
    st.dataframe(bt.rule_table(report), hide_index=True, key="rules.backtest.rules",
                 column_config={
                     "live_alerts": st.column_config.NumberColumn("live alerts"),
                     "live_precision": st.column_config.TextColumn("live precision"),
                     "live_recall": st.column_config.TextColumn("live recall"),
                     "analyst_precision": st.column_config.TextColumn(
                         "analyst precision", help="fraud / (fraud + legit) verdicts on the "
                                                   "backtest's alerts"),
                     "live_analyst_precision": st.column_config.TextColumn(
                         "live analyst precision"),
                 })

    history_alerts, _ = resources.alert_history(context)
    changes = bt.changed_alerts(result, history_alerts, candidate.rule_id, run.start, run.end)
    added = int((changes["change"] == "added").sum())
    st.text(f"Alerts of {candidate.rule_id} that change: {added:,} added (only the backtest "
            f"raises them), {len(changes) - added:,} removed (only the live detector raised "
            "them)")
    if not changes.empty:
        st.dataframe(changes.drop(columns=["transaction_ids", "score_reasons"]),
                     hide_index=True, key="rules.backtest.changes", placeholder=EMPTY,
                     column_config={
                         "rule_version": st.column_config.NumberColumn("version", format="%d"),
                         "risk_score": RISK_COLUMN,
                         "window_start": st.column_config.DatetimeColumn(
                             "window start", format="iso8601"),
                         "window_end": st.column_config.DatetimeColumn(
                             "window end", format="iso8601"),
                         "total_amount": st.column_config.NumberColumn("total", format="%.2f"),
                         "detected_at": st.column_config.DatetimeColumn(
                             "detected at", format="iso8601"),
                     })
        picked = st.selectbox("Evidence of", list(changes.index), index=None,
                              key=f"rules.backtest.alert.{run.folder.name}",
                              format_func=lambda i: bt.change_label(changes.loc[i]),
                              placeholder="Choose an added or removed alert to see its evidence")
        if picked is not None:
            record = alert_record(changes.loc[picked])
            left, right = st.columns([2, 3])
            with left:
                st.json(record)
            with right:
                evidence_table(resources.transactions(context)[0], record,
                               key="rules.backtest.evidence")

    publish_col, discard_col, _ = st.columns([2, 1, 3])
    with publish_col:
        st.button(f"Publish {candidate.rule_id} version {candidate.version}", type="primary",
                  key="rules.backtest.publish", disabled=not can_publish,
                  on_click=_publish_backtested,
                  help="Publish the backtested definition, validated as every change is")
    with discard_col:
        st.button("Discard backtest", key="rules.backtest.dismiss", on_click=_discard_backtest)


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
can_backtest = snapshot.error is None
backtest_run = st.session_state.get(_BACKTEST)

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
    expanded = (pending is not None and pending[2] == rule_id) or \
        (backtest_run is not None and backtest_run.place == rule_id)
    with st.expander(label, expanded=expanded, key=f"rules.rule.{rule_id}"):
        rule_editor(definition, rows, can_publish, can_backtest)

st.subheader("Add a rule")
add_rule(can_publish, can_backtest)

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
