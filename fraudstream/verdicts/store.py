"""The verdict database: the source of truth for analysts' verdicts, and their audit trail.

Every verdict ever given is one row of an append-only table; nothing is updated or deleted, so
"who changed what, when" is simply the table in order. The verdict in force on an alert is the
row with the newest ``decided_at`` (ties: the later row), the same rule the topic's readers
apply.

An embedded SQLite file by default (``sqlite:///run/verdicts.db``, created on first use), a
PostgreSQL server by URL (``postgresql+psycopg://user@host:5432/db``); both through SQLAlchemy
Core. The schema is created and upgraded by numbered migrations recorded in a version table,
applied on first use. Each write is one transaction: a failure (database unreachable, locked
past the timeout, read-only) raises ``VerdictStoreError`` and leaves what was stored intact.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.types import TypeDecorator

from fraudstream.schemas import utc_now
from fraudstream.verdicts.model import (
    MAX_ANALYST,
    MAX_NOTE,
    STORE_DRIVERS,
    VERDICTS,
    Verdict,
    check_store_url,
    make_verdict,
    mask_password,
)

__all__ = [
    "SCHEMA_VERSION",
    "RecordedVerdict",
    "VerdictStore",
    "VerdictStoreError",
    "sqlite_file",
    "store_url_for_display",
]

#: The setting that points the programs at another database, named in every error message.
URL_SETTING: Final = "VERDICTS_URL"
#: ``alert_id IN (...)`` lists are cut to this size: SQLite caps the bound parameters of one
#: statement.
_CHUNK: Final = 500
#: Execution option asking the SQLite ``begin`` hook for a write transaction.
_WRITE: Final = "fraudstream_write"
#: PostgreSQL advisory lock held while migrating, so concurrent first uses migrate once.
_MIGRATION_LOCK: Final = zlib.crc32(b"fraudstream.verdicts.migrate")


class VerdictStoreError(RuntimeError):
    """The verdict database cannot be used right now (unreachable, locked past the timeout, not
    writable, too new). The message names the database and what to do; nothing stored before
    is lost."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class RecordedVerdict(Verdict):
    """A verdict as stored: its row id (the order of recording) and when it was recorded."""

    id: int
    recorded_at: datetime  # timezone-aware UTC


# --- URLs ---------------------------------------------------------------------------------------


def store_url_for_display(url: str | URL) -> str:
    """The URL with any password replaced by ``***``: safe for messages, logs and pages."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError, TypeError):
        return mask_password(str(url))
    if parsed.password is None and isinstance(url, str):
        return url  # as the user wrote it (rendering would escape e.g. the ':' of file: URIs)
    return parsed.render_as_string(hide_password=True)


def _parse_url(url: str | URL) -> URL:
    """The URL with the installed driver filled in, or ValueError saying what is accepted."""
    text = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
    check_store_url(text)
    try:
        parsed = make_url(text)
    except (sa_exc.ArgumentError, ValueError, TypeError) as exc:
        raise ValueError(f"not a database URL ({exc})") from None
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name() if "+" in parsed.drivername else STORE_DRIVERS[backend][0]
    return parsed.set(drivername=f"{backend}+{driver}")


def _sqlite_file(url: URL) -> Path:
    """The file of a SQLite URL, also in URI form (``sqlite:///file:PATH?mode=ro&uri=true``)."""
    database = url.database or ""
    if url.query.get("uri") and database.startswith("file:"):
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(database)


def sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite://`` store URL opens (readers check it exists before opening it, so
    that looking creates no empty database); None for a server database. ``url`` must be valid
    (``check_store_url``)."""
    parsed = make_url(url.strip())
    return _sqlite_file(parsed) if parsed.get_backend_name() == "sqlite" else None


# --- schema -------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend. SQLite has no zones, so UTC is stored
    naive (its text sorts in time order) and given its zone back when read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("a stored time must carry a timezone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect
                             ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_ID_TYPE: Final = BigInteger().with_variant(Integer(), "sqlite")


def _verdicts_table(metadata: MetaData) -> Table:
    """The audit table as migration 1 creates it. Kept as its own definition so that a later
    migration altering the table never changes what migration 1 does on an empty database."""
    verdict = Column("verdict", String(16), nullable=False)
    note = Column("note", Text, nullable=False)
    analyst = Column("analyst", String(MAX_ANALYST), nullable=False)
    return Table(
        "verdicts", metadata,
        Column("id", _ID_TYPE, primary_key=True, autoincrement=True),
        Column("alert_id", String(32), nullable=False),
        verdict, note, analyst,
        Column("decided_at", UTCDateTime(), nullable=False),
        Column("recorded_at", UTCDateTime(), nullable=False),
        CheckConstraint(verdict.in_(VERDICTS), name="verdicts_verdict_word"),
        CheckConstraint(func.length(note) <= MAX_NOTE, name="verdicts_note_length"),
        CheckConstraint(func.length(analyst) > 0, name="verdicts_analyst_given"),
        Index("verdicts_by_alert", "alert_id", "decided_at", "id"),
        # Ids never reused: "ties by id" must mean "recorded later".
        sqlite_autoincrement=True,
    )


_METADATA: Final = MetaData()
#: The schema version table: one row per applied migration.
SCHEMA_TABLE: Final = Table(
    "verdicts_schema_version", _METADATA,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", UTCDateTime(), nullable=False),
)
#: The audit table at the current schema version (what the queries use).
VERDICTS_TABLE: Final = _verdicts_table(_METADATA)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_verdicts(conn: Connection) -> None:
    _verdicts_table(MetaData()).create(conn)


#: Every migration in order; version N is ``MIGRATIONS[N - 1]``. Append, never edit.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "audit table of verdicts", _create_verdicts),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# --- the store ----------------------------------------------------------------------------------


class VerdictStore:
    """Record verdicts and read the ones in force and their history.

    Safe to share between threads; one store per process and database is enough. The schema
    is migrated on first use (or by calling ``migrate``).
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.display_url = store_url_for_display(url)
        self.timeout = timeout
        try:
            parsed = _parse_url(url)
        except ValueError as exc:
            raise VerdictStoreError(f"verdict database {self.display_url}: {exc} "
                                    f"(set {URL_SETTING})", url=self.display_url) from None
        self.backend = parsed.get_backend_name()
        self._ready = False
        self._migrate_lock = threading.Lock()
        if self.backend == "sqlite":
            self._prepare_sqlite_folder(parsed)
            self.engine = create_engine(parsed, connect_args={
                "timeout": timeout,  # the busy timeout: how long a locked database is waited for
                "check_same_thread": False,  # connections move between threads via the pool
            })
            _transactional_sqlite(self.engine)
        else:
            self.engine = create_engine(parsed, pool_pre_ping=True, connect_args={
                "connect_timeout": max(1, math.ceil(timeout)),
                "options": f"-c lock_timeout={max(1, round(timeout * 1000))}",
            })

    def _prepare_sqlite_folder(self, url: URL) -> None:
        folder = _sqlite_file(url).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VerdictStoreError(
                f"verdict database {self.display_url}: cannot create the folder {folder} "
                f"({exc.strerror or exc}); choose a writable place with {URL_SETTING}",
                url=self.display_url) from None

    def __enter__(self) -> VerdictStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    # --- schema -----------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply the pending migrations; returns the schema version. Checking needs only a
        read, so a database already up to date may be read-only."""
        with self._migrate_lock:
            with self._errors("read its schema version", write=False), self._transaction(
                    write=False) as conn:
                current = self._version(conn)
            if current < SCHEMA_VERSION:
                with self._errors("create or upgrade its schema", write=True), \
                        self._transaction(write=True) as conn:
                    if self.backend == "postgresql":
                        conn.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                    SCHEMA_TABLE.create(conn, checkfirst=True)
                    current = self._version(conn)  # again: another process may have migrated
                    for migration in MIGRATIONS[current:]:
                        migration.apply(conn)
                        conn.execute(insert(SCHEMA_TABLE).values(
                            version=migration.version, description=migration.description,
                            applied_at=utc_now()))
                    current = max(current, SCHEMA_VERSION)
            if current > SCHEMA_VERSION:
                raise VerdictStoreError(
                    f"verdict database {self.display_url} has schema version {current}, newer "
                    f"than this program knows ({SCHEMA_VERSION}); upgrade fraudstream",
                    url=self.display_url)
            self._ready = True
            return current

    @staticmethod
    def _version(conn: Connection) -> int:
        if not inspect(conn).has_table(SCHEMA_TABLE.name):
            return 0
        return int(conn.execute(select(func.max(SCHEMA_TABLE.c.version))).scalar() or 0)

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.migrate()

    # --- writing and reading ----------------------------------------------------------------

    def record(self, verdict: Verdict) -> RecordedVerdict:
        """Append one verdict to the audit trail; returns it with its id and recording time.

        Validated again here (a ``Verdict`` can be built without ``make_verdict``), so nothing
        the contract refuses reaches the database.
        """
        checked = make_verdict(verdict.alert_id, verdict.verdict, verdict.analyst, verdict.note,
                               verdict.decided_at)
        self._ensure_ready()
        table = VERDICTS_TABLE
        values = {**_fields(checked), "recorded_at": utc_now()}
        with self._errors("record the verdict", write=True), \
                self._transaction(write=True) as conn:
            row = conn.execute(insert(table).values(**values)
                               .returning(table.c.id, table.c.recorded_at)).one()
        return RecordedVerdict(**_fields(checked), id=int(row.id), recorded_at=row.recorded_at)

    def latest(self, alert_ids: Iterable[str] | None = None) -> dict[str, RecordedVerdict]:
        """The verdict in force per alert (newest ``decided_at``, ties: the later row), for the
        given alerts (those without a verdict are absent) or for every alert."""
        self._ensure_ready()
        table = VERDICTS_TABLE
        if alert_ids is None:
            chunks: list[list[str] | None] = [None]
        else:
            wanted = sorted(set(alert_ids))
            chunks = [wanted[i:i + _CHUNK] for i in range(0, len(wanted), _CHUNK)]
        found: dict[str, RecordedVerdict] = {}
        with self._errors("read the verdicts", write=False), \
                self._transaction(write=False) as conn:
            for chunk in chunks:
                rank = func.row_number().over(
                    partition_by=table.c.alert_id,
                    order_by=(table.c.decided_at.desc(), table.c.id.desc())).label("rank")
                ranked = select(*table.c, rank)
                if chunk is not None:
                    ranked = ranked.where(table.c.alert_id.in_(chunk))
                inner = ranked.subquery()
                rows = conn.execute(select(*(inner.c[c.name] for c in table.c))
                                    .where(inner.c.rank == 1))
                found.update((row.alert_id, _recorded(row)) for row in rows)
        return found

    def history(self, alert_id: str | None = None) -> list[RecordedVerdict]:
        """The audit trail, of one alert or of all, oldest first (by ``decided_at``, then
        recording order): the last entry per alert is the verdict in force."""
        self._ensure_ready()
        table = VERDICTS_TABLE
        query = select(table).order_by(table.c.decided_at, table.c.id)
        if alert_id is not None:
            query = query.where(table.c.alert_id == alert_id)
        with self._errors("read the verdict history", write=False), \
                self._transaction(write=False) as conn:
            return [_recorded(row) for row in conn.execute(query)]

    def count(self) -> int:
        """How many verdicts were ever recorded (every change counts)."""
        self._ensure_ready()
        with self._errors("count the verdicts", write=False), \
                self._transaction(write=False) as conn:
            return int(conn.execute(select(func.count()).select_from(VERDICTS_TABLE)).scalar()
                       or 0)

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _errors(self, action: str, *, write: bool) -> Iterator[None]:
        """Turn driver errors into one VerdictStoreError naming the database and the way out."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            reason, advice = self._explain(exc)
            kept = " Nothing was changed." if write else ""
            raise VerdictStoreError(
                f"verdict database {self.display_url}: cannot {action}: {reason}; {advice}."
                f"{kept}", url=self.display_url) from exc
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise VerdictStoreError(
                f"verdict database {self.display_url}: cannot {action}: {_first_line(exc)}",
                url=self.display_url) from exc

    def _explain(self, exc: sa_exc.DBAPIError) -> tuple[str, str]:
        """(what went wrong, what to do) for the usual failures of both backends."""
        original = exc.orig
        text = _first_line(original if original is not None else exc)
        lowered = text.lower()
        sqlstate = getattr(original, "sqlstate", None)
        if "database is locked" in lowered or "table is locked" in lowered or (
                sqlstate == "55P03"):
            return (f"locked by another writer for more than {self.timeout:g} s",
                    "try again when the other writer has finished")
        if "readonly" in lowered or "read-only" in lowered or sqlstate in ("25006", "42501"):
            return (f"not writable ({text})",
                    f"check its permissions, or point {URL_SETTING} at a writable database")
        if self.backend == "sqlite" and "unable to open" in lowered:
            return (f"cannot open the file ({text})",
                    f"check that its folder exists and is writable, or set {URL_SETTING}")
        if self.backend == "postgresql" and isinstance(exc, sa_exc.OperationalError) and (
                sqlstate is None or sqlstate.startswith("08") or sqlstate.startswith("28")
                or sqlstate == "3D000"):
            return (f"unreachable ({text})",
                    f"check that the server is running and that {URL_SETTING} (host, port, "
                    "user, database) is right")
        return text, f"check the database and {URL_SETTING}"


def _transactional_sqlite(engine: Engine) -> None:
    """Make SQLite transactions real: Python's driver otherwise runs DDL outside any
    transaction (a half-applied migration could be left behind) and starts write
    transactions lazily (a read that turns into a write may fail at once instead of waiting
    for the busy timeout). Writes take the write lock when they begin (``BEGIN IMMEDIATE``),
    waiting up to the busy timeout. SQLAlchemy has no construct for these statements."""

    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _fields(verdict: Verdict) -> dict[str, Any]:
    return {f.name: getattr(verdict, f.name) for f in dataclasses.fields(Verdict)}


def _recorded(row: Any) -> RecordedVerdict:
    return RecordedVerdict(alert_id=row.alert_id, verdict=row.verdict, note=row.note,
                           analyst=row.analyst, decided_at=row.decided_at, id=int(row.id),
                           recorded_at=row.recorded_at)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
