"""Crash recovery: kill -9 the detector's whole process group (Python driver, Spark's JVM, its
Python workers) five times, between and during micro-batches, restart it on the same checkpoint
each time, then drain with ``--available-now``. Afterwards:

- Parquet holds exactly the expected alerts E (computed in plain Python by the oracle), each
  once: exactly-once, because a replayed batch overwrites its own ``batch_id=N`` folder;
- the ``fraud-alerts`` topic, deduplicated by alert_id, equals E: at-least-once plus a dedup key
  (the raw number of extra copies is printed: a batch killed after publishing is published
  again when it is replayed);
- the bronze archive holds every transaction once.

Where the kills land (timing and delays from the seeded random generator):
- *during* a batch: after progress, a random delay of up to one batch's duration, while the
  checkpoint's offset log is ahead of its commit log;
- *written, not committed*: as soon as an uncommitted batch's alerts are in Parquet, i.e. after
  the Parquet sink ran and before Spark recorded the commit: the replay must replace, not add
  (the window lasts tens of milliseconds; if no batch is left in the slice to catch it in, e.g.
  when the kill before landed in the slice's last batch, the kill falls back to "between");
- *published, not committed*: as soon as every alert of an uncommitted batch has also been
  read back from the alerts topic (a tail runs beside the detector): the replay publishes
  them again, which is where Kafka's extra copies come from (if that window is never caught
  before the slice is done, the kill falls back to "between");
- *between* batches: when the detector has caught up and is idle (offset log == commit log);
  the next slice of the stream is produced only after the restart, so windows that straddle
  the kill need the state restored from the checkpoint.

The same finished checkpoint then serves two more checks (the detector's start-up dominates
the cost of these tests, so they share it): replaying a written-but-uncommitted batch (the
newest commit-log entry deleted) leaves no duplicate, and restarting with a setting the state
cannot follow (retention, buckets, partitions) is refused with a message naming it, touching
nothing. The negative
control of the replay check is in test_commit_replay.py.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.ground import Ground, chaos_seed, ground_truth
from support.pipeline import (
    DetectorRun,
    TopicTail,
    alert_rows,
    batch_folder,
    caught_up,
    dedup_by_alert_id,
    detector_env,
    drop_newest_commit,
    duplicates,
    log_heads,
    metrics_lines,
    parquet_rows,
    run_detector,
    start_detector,
    transaction_records,
)

from fraudstream import schemas
from fraudstream.broker import EmbeddedBroker
from fraudstream.testing import fresh_topics, produce, read_json, wait_for

TRANSACTIONS = 10_000
#: Slices of the stream, produced one after another (a "between" kill ends each but the last).
#: The first is the longest: the "during" and "written" kills both land in it, and the second
#: needs a batch left after the replay of the first's.
SLICES = (4_000, 3_000, 3_000)
ROWS_PER_BATCH = 1_000
#: Per kill: how to pick its moment. A slice boundary follows each "between" kill.
PLAN = ("during", "written", "between", "published", "between")
#: Generous: a restart on a loaded 2-core machine can take minutes before its first batch.
STEP_TIMEOUT = 600.0

#: The shared fixture's setup (six detector starts) counts toward whichever test runs first.
pytestmark = pytest.mark.timeout(3600)


@dataclass
class Kill:
    mode: str
    batch_planned: int
    batch_committed: int

    @property
    def during_batch(self) -> bool:
        return self.batch_planned > self.batch_committed


@dataclass
class Crashed:
    """The state after five kills and a drain, shared by this module's tests."""

    seed: int
    ground: Ground
    env: dict[str, str]
    work: Path
    kills: list[Kill] = field(default_factory=list)

    @property
    def parquet(self) -> Path:
        return self.work / "parquet"

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"

    @property
    def log(self) -> Path:
        return self.work / "detector.log"

    def published(self) -> list[dict[str, Any]]:
        return read_json(self.env["KAFKA_BOOTSTRAP_SERVERS"], self.env["ALERTS_TOPIC"])


def uncommitted_alert_ids(checkpoint: Path, parquet: Path) -> list[str] | None:
    """alert_ids an uncommitted batch has written to Parquet (None: nothing written yet)."""
    planned, committed = log_heads(checkpoint)
    if planned <= committed:
        return None
    try:
        part = batch_folder(parquet, checkpoint, schemas.ALERTS_DATASET, planned) / "part-0.parquet"
        return pq.read_table(part, columns=["alert_id"]).column("alert_id").to_pylist() or None
    except (FileNotFoundError, OSError, ValueError, pa.ArrowInvalid):
        return None  # not written yet (no epoch file yet either), or being replaced


def kill(run: DetectorRun, checkpoint: Path, mode: str) -> Kill:
    planned, committed = log_heads(checkpoint)
    run.kill_and_reap()
    return Kill(mode, planned, committed)


def kill_once(mode: str, run: DetectorRun, state: Crashed, produced: int, tail: TopicTail,
              rng: random.Random) -> Kill:
    """Wait for the moment ``mode`` asks for, then kill -9 the detector's process group."""
    checkpoint, parquet, seed = state.checkpoint, state.parquet, state.seed
    if mode == "between":
        wait_for(lambda: caught_up(checkpoint, produced), STEP_TIMEOUT,
                 f"seed {seed}: the detector to catch up with {produced} records",
                 interval=0.1, alive=run.alive)
        return kill(run, checkpoint, mode)
    # Progress first, so that every run moves the stream forward.
    _, committed_at_start = log_heads(checkpoint)
    wait_for(lambda: log_heads(checkpoint)[1] > committed_at_start, STEP_TIMEOUT,
             f"seed {seed}: a committed batch before a '{mode}' kill", alive=run.alive)
    if mode in ("published", "written"):
        wanted = mode

        def window_or_done() -> str | None:
            ids = uncommitted_alert_ids(checkpoint, parquet)
            if ids and (wanted == "written" or tail.has_all(ids)):
                return wanted
            return f"between ({wanted} window missed)" if caught_up(checkpoint, produced) \
                else None

        mode = wait_for(window_or_done, STEP_TIMEOUT,
                        f"seed {seed}: alerts {wanted} by a batch not yet committed",
                        interval=0.01, alive=run.alive)
    elif mode == "during":
        wait_for(lambda: log_heads(checkpoint)[0] > log_heads(checkpoint)[1], STEP_TIMEOUT,
                 f"seed {seed}: a batch in flight", interval=0.02, alive=run.alive)
        lines = metrics_lines(parquet)
        time.sleep(rng.uniform(0.0, lines[-1]["batch_seconds"] if lines else 2.0))
    return kill(run, checkpoint, mode)


@pytest.fixture(scope="module")
def crashed(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Crashed:
    seed = chaos_seed()
    rng = random.Random(seed)
    ground = ground_truth(seed, TRANSACTIONS)
    per_rule = {rule: sum(a["rule"] == rule for a in ground.expected.values())
                for rule in schemas.RULES}
    assert min(per_rule.values()) >= 20, f"seed {seed}: too few alerts of some rule: {per_rule}"
    topics_env = fresh_topics(broker.bootstrap_servers, "crash", rules=True).env()
    work = tmp_path_factory.mktemp("crash")
    state = Crashed(seed, ground, detector_env(
        topics_env, work, MAX_ROWS_PER_BATCH=str(ROWS_PER_BATCH), CONSOLE_ALERTS="false"), work)
    bootstrap, topic = broker.bootstrap_servers, topics_env["TRANSACTIONS_TOPIC"]

    records = transaction_records(ground.transactions)
    bounds = [sum(SLICES[:i]) for i in range(len(SLICES) + 1)]
    assert bounds[-1] == TRANSACTIONS
    produced = len(produce(bootstrap, topic, records[: bounds[1]]))
    next_slice = 1
    tail = TopicTail(bootstrap, topics_env["ALERTS_TOPIC"], "alert_id")
    try:
        for mode in PLAN:
            run = start_detector(state.env, state.log)
            try:
                state.kills.append(kill_once(mode, run, state, produced, tail, rng))
            finally:
                if run.alive():
                    run.kill_and_reap()
            if mode == "between":
                produced += len(produce(bootstrap, topic,
                                        records[bounds[next_slice]: bounds[next_slice + 1]]))
                next_slice += 1
    finally:
        tail.close()
    assert produced == TRANSACTIONS

    code, output = run_detector(state.env, state.log, "--available-now",
                                timeout=STEP_TIMEOUT * 2)
    assert code == 0, f"seed {seed}: final drain failed:\n{output[-4000:]}"
    return state


# --- the kills ---------------------------------------------------------------------------------


def test_five_kill_9_lose_and_duplicate_no_alert_in_parquet(crashed: Crashed) -> None:
    seed, expected, kills = crashed.seed, crashed.ground.expected, crashed.kills
    alerts = alert_rows(crashed.parquet)
    ids = [a["alert_id"] for a in alerts]
    parquet_duplicates = duplicates(ids)
    lost, extra = set(expected) - set(ids), set(ids) - set(expected)
    published, kafka_extra_copies = dedup_by_alert_id(crashed.published())
    during = sum(k.during_batch for k in kills)
    per_rule = {rule: sum(a["rule"] == rule for a in expected.values()) for rule in schemas.RULES}
    where = [(k.mode, k.batch_planned, k.batch_committed) for k in kills]
    print(f"crash recovery, seed {seed}: {len(kills)} kills survived ({during} during a batch, "
          f"{len(kills) - during} between batches; (mode, planned, committed): {where}); "
          f"expected alerts {len(expected)} {per_rule}; Parquet rows {len(alerts)}, lost "
          f"{len(lost)}, extra {len(extra)}, duplicate rows "
          f"{sum(n - 1 for n in parquet_duplicates.values())}; Kafka raw "
          f"{len(published) + kafka_extra_copies}, extra copies before dedup "
          f"{kafka_extra_copies}")

    assert len(kills) == len(PLAN)
    assert during >= 1 and len(kills) - during >= 1, \
        f"seed {seed}: kills must land both during and between batches: {kills}"
    assert not parquet_duplicates, f"seed {seed}: duplicate alert rows in Parquet: " \
        f"{len(parquet_duplicates)} ids, e.g. {list(parquet_duplicates.items())[:3]}"
    assert not lost, f"seed {seed}: {len(lost)} expected alerts lost, e.g. " \
        f"{[(expected[i]['rule'], expected[i]['user_id']) for i in sorted(lost)[:5]]}"
    assert not extra, f"seed {seed}: {len(extra)} unexpected alerts, e.g. " \
        f"{[(a['rule'], a['user_id']) for a in alerts if a['alert_id'] in extra][:5]}"


def test_kafka_alerts_after_dedup_by_alert_id_equal_the_oracle(crashed: Crashed) -> None:
    published, _ = dedup_by_alert_id(crashed.published())
    expected = set(crashed.ground.expected)
    assert set(published) == expected, f"seed {crashed.seed}: Kafka alerts after dedup differ " \
        f"from E: missing {len(expected - set(published))}, extra {len(set(published) - expected)}"


def test_bronze_holds_every_transaction_once(crashed: Crashed) -> None:
    positions = [(r["partition"], r["offset"])
                 for r in parquet_rows(crashed.parquet / schemas.TRANSACTIONS_DATASET)]
    assert len(positions) == TRANSACTIONS and not duplicates(positions), \
        f"seed {crashed.seed}: bronze holds {len(positions)} rows for {TRANSACTIONS} transactions"


# --- written but not committed: replay of the newest batch -------------------------------------


def test_replaying_a_written_but_uncommitted_batch_leaves_no_duplicate_rows(
        crashed: Crashed) -> None:
    seed, parquet = crashed.seed, crashed.parquet
    replayed = drop_newest_commit(crashed.checkpoint)
    assert batch_folder(parquet, crashed.checkpoint, schemas.ALERTS_DATASET, replayed).is_dir(), \
        f"seed {seed}: the replayed batch must hold alerts, or the test proves nothing"
    runs_before = sum(line["batch_id"] == replayed for line in metrics_lines(parquet))

    code, output = run_detector(crashed.env, crashed.log, "--available-now")
    assert code == 0, output[-4000:]
    runs_after = sum(line["batch_id"] == replayed for line in metrics_lines(parquet))
    assert runs_after == runs_before + 1, f"seed {seed}: batch {replayed} was not replayed"
    assert log_heads(crashed.checkpoint)[1] >= replayed
    ids = [a["alert_id"] for a in alert_rows(parquet)]
    assert duplicates(ids) == {}, f"seed {seed}: the replay left duplicate alert rows"
    assert set(ids) == set(crashed.ground.expected), f"seed {seed}"


# --- an incompatible restart is refused --------------------------------------------------------

#: (environment change, flags, the name the refusal must contain)
INCOMPATIBLE_CHANGES: list[tuple[dict[str, str], tuple[str, ...], str]] = [
    ({"RETENTION_SECONDS": "900"}, (), "retention_seconds"),
    ({}, ("--state-buckets", "8"), "state_buckets"),
    ({"SHUFFLE_PARTITIONS": "4"}, (), "shuffle_partitions"),
]


def tree_digest(root: Path) -> str:
    """Names and contents of every file under ``root``: proves nothing was written."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_changed_stateful_settings_on_the_checkpoint_are_refused_naming_them(
        crashed: Crashed) -> None:
    """Spark would otherwise load state laid out or retained for other settings and use it
    silently (rule thresholds are data in the state and may change).
    ``tests/unit/test_checkpoint_contract.py`` covers the comparison; this is the CLI path on
    a checkpoint the detector really wrote: exit 2, one line naming the setting, nothing
    written."""
    before = (tree_digest(crashed.checkpoint), tree_digest(crashed.parquet))
    for extra_env, flags, name in INCOMPATIBLE_CHANGES:
        code, output = run_detector({**crashed.env, **extra_env}, crashed.log, "--available-now",
                                    *flags, timeout=300)
        assert code == 2, f"{name}: exit {code}, expected a refusal:\n{output[-3000:]}"
        refusal = [line for line in output.splitlines() if "invalid setting" in line]
        assert refusal, f"{name}: no one-line refusal in:\n{output[-3000:]}"
        assert name in refusal[-1] and "CHECKPOINT_DIR" in refusal[-1], refusal[-1]
        assert "Traceback" not in output
        assert (tree_digest(crashed.checkpoint), tree_digest(crashed.parquet)) == before, \
            f"{name}: a refused start changed the checkpoint or the outputs"
