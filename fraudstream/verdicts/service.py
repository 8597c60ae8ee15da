"""Giving a verdict, the same way from every front end (dashboard, console): refuse an alert
that does not exist, record in the database (the source of truth), then publish.

The order matters: a verdict the broker did not take is still recorded, and re-publishing
from the database repairs the topic; a verdict published but not recorded could not be
repaired.
"""

from __future__ import annotations

from collections.abc import Callable

from fraudstream.schemas import ALERTS_DATASET
from fraudstream.storage import StoragePath
from fraudstream.verdicts.model import Verdict, VerdictError
from fraudstream.verdicts.publish import VerdictPublisher, VerdictPublishError
from fraudstream.verdicts.store import RecordedVerdict, VerdictStore

__all__ = ["REPUBLISH_COMMAND", "UnknownAlert", "decide", "parquet_alert_ids"]

#: How an operator re-publishes the topic from the database (named in error messages).
REPUBLISH_COMMAND = "python -m consumer --republish-verdicts"


class UnknownAlert(VerdictError):
    """The verdict names an alert id that no alert carries."""


def decide(store: VerdictStore, verdict: Verdict, *, known: Callable[[str], bool],
           publisher: VerdictPublisher | None) -> RecordedVerdict:
    """Record ``verdict`` and publish it; returns it as recorded.

    Raises UnknownAlert (nothing recorded) when ``known(alert_id)`` is false, VerdictError
    for an invalid verdict, VerdictStoreError when the database cannot take it, and
    VerdictPublishError, with ``recorded`` set, when it is recorded but the broker did not
    take it.
    """
    if not known(verdict.alert_id):
        raise UnknownAlert(f"alert_id: no alert {verdict.alert_id} is known (neither in the "
                           "Parquet history nor on the alerts topic); nothing was recorded")
    recorded = store.record(verdict)
    if publisher is not None:
        try:
            publisher.publish(recorded)
        except VerdictPublishError as exc:
            raise VerdictPublishError(
                f"verdict #{recorded.id} on alert {recorded.alert_id} is recorded in "
                f"{store.display_url} but was not published ({exc}); re-publish with "
                f"`{REPUBLISH_COMMAND}` once the broker is back",
                topic=exc.topic, recorded=recorded) from exc
    return recorded


def parquet_alert_ids(parquet_dir: StoragePath) -> set[str]:
    """Every alert id in ``<parquet_dir>/alerts/`` (every epoch and batch; empty if there is
    none). An unreadable file is skipped with a logged warning."""
    import pyarrow as pa  # only this function needs Arrow

    from fraudstream.datasets import read_dataset

    table = read_dataset(parquet_dir, ALERTS_DATASET,
                         pa.schema([("alert_id", pa.string())]))
    return {alert_id for alert_id in table.column("alert_id").to_pylist() if alert_id}
