"""Publish model outputs back to the warehouse (schema ``ml``): one function for every output table.

``publish(settings_or_conn, "customer_segments", frame, as_of=..., run_id=..., model_name=...,
model_version=..., key_columns=["customer_id"])`` writes

* ``ml.customer_segments_history``  every ``as_of`` ever published, append-only, LIST-partitioned by
  ``as_of`` (one partition per date); publishing the same ``as_of`` again replaces that date's rows,
  never duplicates them;
* ``ml.published_tables``            one row per published table: the ``as_of`` that is current, its run
  id, model, row count and time;
* ``ml.customer_segments``           a view: the history rows of the current ``as_of``. Readers (and
  grants, and dbt sources) use this name; it is never dropped or renamed.

Every row carries ``model_name``, ``model_version``, ``mlflow_run_id``, ``as_of`` and ``scored_at``.

How the swap works, and why
---------------------------
A new ``as_of`` (the nightly case) is COPYed into a fresh standalone table (the staging table: nobody
else can see it; COPY sends only the frame), the run's metadata columns are added to it afterwards as
catalog-only constant defaults (they are the same on every row, so they are not written into the rows),
and then, in the same transaction, it is ATTACHed as the history's partition for that date and
``ml.published_tables`` is pointed at the date. Commit makes both visible at once. Rows are written
exactly once and no wider than the frame, and the fixed work per publish is a handful of round trips
(statements whose answers are not needed go in pipelines), which is why publish runs near raw COPY
speed (``bench/bench_publish.py``). Keys are checked unique and non-null before anything is written;
a unique index on them is optional (``index_keys``), because building it costs more than half of what
the COPY itself costs.

A rerun of an ``as_of`` that is already published deletes and re-inserts that partition's rows (plain
MVCC, no DDL), after COPYing the frame into a temporary staging table.

The alternatives we rejected:

* ``ALTER TABLE ... RENAME`` of a freshly built table: takes ACCESS EXCLUSIVE, and a reader that resolved
  the old table's OID before the swap and then waited on the lock fails with "could not open relation
  with OID ..." once the old table is dropped. Grants and dependent views must be re-created every time.
* ``TRUNCATE`` + INSERT: keeps the OID, but TRUNCATE is documented as not MVCC-safe: a REPEATABLE READ
  reader whose snapshot predates the commit sees an *empty* table afterwards (the concurrency test
  catches exactly this when TRUNCATE is swapped in).
* ``DELETE`` + INSERT of the whole current table every night: safe, but writes every row three times
  (staging, current, history) plus dead tuples: 17 % of raw COPY speed in ``bench/bench_publish.py``.

Why readers never error and never see a mix or a half-written table:

* Nothing a reader can have looked up is ever dropped or renamed (view, history parent and existing
  partitions keep their OIDs), so "could not open relation with OID" cannot happen.
* ATTACH runs under an explicit ACCESS EXCLUSIVE lock on the history parent, held only for the attach
  and the pointer update at the end of the transaction (the COPY happens before). ATTACH alone takes
  just SHARE UPDATE EXCLUSIVE, which would let a READ COMMITTED statement plan with the old partition
  list and then execute with a snapshot that already sees the new pointer: an empty result. With the
  lock, a statement that reaches the table during the swap waits, then plans and runs after the commit.
* The view reads the pointer and the rows with the same snapshot. A REPEATABLE READ snapshot taken
  before the swap still sees the old pointer and the old partition's rows, which are never deleted on
  the nightly path: the complete old table. A rerun's DELETE + INSERT is ordinary MVCC.
* Grants given on ``ml.<table>`` survive every publish: the view is only replaced (``CREATE OR REPLACE``,
  same OID, same grants) when the frame brings new columns.

The cost of the choice: a reader can wait for the few milliseconds of the attach, and a reader
transaction that has held the history open for a long time makes the publisher wait (up to
``lock_timeout``) before the swap.

Overlapping publishers (a manual run during the nightly run) are serialised by a transaction-scoped
PostgreSQL advisory lock per table: the second waits up to ``lock_timeout`` seconds, then fails with a
:class:`PublishLockTimeout` naming the table. A publisher killed half-way (even by SIGKILL) leaves an
open transaction that PostgreSQL rolls back when the connection drops: the previous contents stay.

A backfill (an ``as_of`` older than the current one) adds its history partition and leaves the pointer,
hence ``ml.<table>``, alone.

If ``publish`` is given a connection that is already inside a transaction, it runs in a savepoint of
that transaction: several tables can then be published atomically together by the caller.

Carrying rows forward (the incremental night)
---------------------------------------------
``carry=CarryForward(from_as_of, key_column, except_table)`` publishes the frame *plus* every row of an
earlier as_of whose ``key_column`` value is neither in the frame nor listed in ``except_table`` (a table on
the same connection, typically a temporary one the caller filled with set-based SQL: e.g. customers who are
gone). So the rows of customers whose inputs did not change are copied server-side (``insert ... select``
from the earlier partition), never through Python. The exclusions are anti-joins against small tables (the
frame, the exceptions), not a semi-join against the large carried set: measured on 1M rows, deduplicating
and hashing 990k carried keys cost more than inserting the rows. Carried rows are written before the
metadata columns are added, so they get tonight's run metadata like the frame's rows (the run that
*published* them); what scored them is the caller's business (e.g. columns ``scored_as_of`` /
``scored_run_id`` in the frame, carried along).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
from psycopg import sql

from ml.config import Settings
from ml.errors import CrmError
from ml.warehouse import connect, copy_in, qualified

SCHEMA = "ml"
HISTORY_SUFFIX = "_history"
METADATA_COLUMNS = ("model_name", "model_version", "mlflow_run_id", "as_of", "scored_at")
# Row-varying columns that differ between two otherwise identical runs: excluded from content checksums.
RUN_COLUMNS = ("model_version", "mlflow_run_id", "scored_at", "scored_run_id")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
# PostgreSQL truncates identifiers at 63 bytes; history partitions add "_history_YYYYMMDD".
_MAX_TABLE_NAME = 63 - len(HISTORY_SUFFIX) - len("_20240630")
DEFAULT_LOCK_TIMEOUT_S = 60.0


class PublishError(CrmError):
    """A publish was refused: bad table name, bad frame, incompatible existing table."""


class PublishLockTimeout(PublishError):
    """Another publish of the same table holds the lock for longer than the timeout."""


@dataclass(frozen=True)
class PublishReport:
    """What one publish did."""

    table: str  # "ml.<table>"
    history_table: str  # "ml.<table>_history"
    as_of: dt.date
    rows: int
    run_id: str
    model_name: str
    model_version: str | None
    replaced_current: bool  # False for a backfill older than the current table's as_of
    current_as_of: dt.date | None  # the as_of the current table holds after this publish
    history_rows_replaced: int  # rows of the same as_of that this publish replaced in the history
    scored_at: dt.datetime
    seconds: float
    rows_carried: int = 0  # of ``rows``, how many were carried forward from an earlier as_of (``carry``)


@dataclass(frozen=True)
class CarryForward:
    """Rows of an earlier publish to take over unchanged: those of ``from_as_of`` whose ``key_column`` value
    is not in the frame, nor in ``except_table`` (``table`` or ``schema.table`` with a ``key_column`` column,
    visible on the publishing connection; None: no exceptions)."""

    from_as_of: dt.date
    key_column: str
    except_table: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def validate_identifier(name: str, what: str = "table name") -> str:
    """Accept only lower-case SQL identifiers (``^[a-z_][a-z0-9_]*$``); anything else is refused."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise PublishError(
            f"invalid {what} {name!r}: use lower-case letters, digits and underscores, starting with a "
            "letter or underscore (e.g. 'customer_segments')"
        )
    return name


def _validate_table(table: str) -> str:
    if isinstance(table, str) and table.startswith(f"{SCHEMA}."):
        table = table[len(SCHEMA) + 1 :]
    validate_identifier(table)
    if len(table) > _MAX_TABLE_NAME:
        raise PublishError(f"table name {table!r} is longer than {_MAX_TABLE_NAME} characters")
    if table.endswith(HISTORY_SUFFIX):
        raise PublishError(f"table name {table!r} must not end in {HISTORY_SUFFIX!r}: that suffix is the history")
    return table


def _validate_frame(frame: pd.DataFrame, key_columns: list[str], allow_empty: bool) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise PublishError(f"publish needs a pandas DataFrame, got {type(frame).__name__}")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise PublishError(f"the frame has duplicate column names: {dupes}")
    for column in frame.columns:
        if not isinstance(column, str):
            raise PublishError(f"column names must be strings, got {column!r}")
        validate_identifier(column, "column name")
    reserved = sorted(set(columns) & set(METADATA_COLUMNS))
    if reserved:
        raise PublishError(
            f"the frame already has column(s) {reserved}: publish adds {list(METADATA_COLUMNS)} itself; "
            "rename or drop them"
        )
    if not key_columns:
        raise PublishError("key_columns must name at least one column that identifies a row")
    missing = [k for k in key_columns if k not in frame.columns]
    if missing:
        raise PublishError(f"key column(s) {missing} are not in the frame (columns: {columns})")
    if frame.empty:
        if not allow_empty:
            raise PublishError(
                "refusing to publish an empty frame (it would empty the published table); "
                "pass allow_empty=True if an empty result is correct"
            )
        return
    # Unique, non-null keys are checked here, on every path, whether or not the history has a primary
    # key (see ``index_keys``): a hash of the keys costs ~0.08 s CPU per 1M rows, a unique index build
    # on the server several times that.
    keys = frame[key_columns]
    null_keys = int(keys.isna().any(axis=1).sum())
    if null_keys:
        raise PublishError(f"{null_keys} row(s) have a null in key columns {key_columns}")
    duplicated = keys.duplicated(keep=False)
    if duplicated.any():
        example = keys[duplicated].head(3).to_dict("records")
        raise PublishError(
            f"{int(duplicated.sum())} row(s) share a key {key_columns} with another row, e.g. {example}"
        )


# ---------------------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------------------
def pg_type(arrow_type: pa.DataType, column: str) -> str:
    """The PostgreSQL column type publish gives an Arrow type (as pandas converts it)."""
    t = arrow_type
    if pa.types.is_dictionary(t):  # a pandas Categorical: stored as its values
        return pg_type(t.value_type, column)
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return "text"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_duration(t):
        return "interval"
    raise PublishError(
        f"column {column!r} has type {t}, which publish cannot store; convert it to numbers, text, "
        "dates or timestamps first (e.g. join lists into a text column)"
    )


def to_arrow(frame: pd.DataFrame) -> pa.Table:
    """The frame as the Arrow table publish COPYs (one conversion, shared by typing and COPY)."""
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise PublishError(f"the frame cannot be converted for COPY: {err}") from None


def column_types(arrow: pa.Table) -> dict[str, str]:
    """Column name -> PostgreSQL type, in the frame's order: what publish stores for this frame."""
    return {name: pg_type(arrow.schema.field(name).type, name) for name in arrow.column_names}


# ---------------------------------------------------------------------------------------------------------
# Catalog: one round trip for everything publish needs to know
# ---------------------------------------------------------------------------------------------------------
def _ident(table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(table))


def _partition_name(table: str, as_of: dt.date) -> str:
    return f"{table}{HISTORY_SUFFIX}_{as_of:%Y%m%d}"


@dataclass(frozen=True)
class _Relation:
    kind: str  # pg_class.relkind: r table, p partitioned table, v view
    columns: dict[str, str]  # name -> format_type() spelling, in column order
    primary_key: tuple[str, ...]  # column names in index order; () without one


def _catalog(conn: psycopg.Connection, names: list[str]) -> dict[str, _Relation]:
    """Kind, columns and primary-key columns of the named relations of schema ``ml`` that exist.

    One query instead of one per question: each round trip costs milliseconds on a loaded server, and
    publish is dominated by its fixed per-table cost at nightly sizes (bench bound 5).
    """
    rows = conn.execute(
        """
        select c.relname, c.relkind,
               coalesce(array_agg(a.attname::text order by a.attnum) filter (where a.attnum is not null), '{}'),
               coalesce(array_agg(format_type(a.atttypid, a.atttypmod) order by a.attnum)
                        filter (where a.attnum is not null), '{}'),
               coalesce((select array_agg(k.attname::text order by u.ord)
                         from pg_index i
                         cross join lateral unnest(i.indkey::int2[]) with ordinality u(attnum, ord)
                         join pg_attribute k on k.attrelid = i.indrelid and k.attnum = u.attnum
                         where i.indrelid = c.oid and i.indisprimary), '{}')
        from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
        where n.nspname = %s and c.relname = any(%s)
        group by c.oid, c.relname, c.relkind
        """,
        [SCHEMA, names],
    ).fetchall()
    return {name: _Relation(kind, dict(zip(cols, types, strict=True)), tuple(pk))
            for name, kind, cols, types, pk in rows}


def _existing_columns(conn: psycopg.Connection, table: str) -> dict[str, str] | None:
    found = _catalog(conn, [table]).get(table)
    return found.columns if found and found.columns else None


# ---------------------------------------------------------------------------------------------------------
# DDL for our own tables
# ---------------------------------------------------------------------------------------------------------
_METADATA_TYPES = {
    "model_name": "text",
    "model_version": "text",
    "mlflow_run_id": "text",
    "as_of": "date",
    "scored_at": "timestamp with time zone",
}
_METADATA_NULLABLE = {"model_version"}
# format_type() spellings of the types pg_type returns, for comparing with an existing table.
_CANONICAL = {"timestamptz": "timestamp with time zone", "timestamp": "timestamp without time zone"}
POINTER_TABLE = "published_tables"


def _bootstrap(conn: psycopg.Connection) -> None:
    """The pointer table shared by all published tables (created once, under a global lock, because two
    first publishes of different tables could otherwise race on CREATE)."""
    conn.execute("select pg_advisory_xact_lock(%s)", [_lock_key("*bootstrap*")])
    conn.execute(
        sql.SQL(
            """
            create table if not exists {} (
                table_name text primary key,
                as_of date not null,
                model_name text not null,
                model_version text,
                mlflow_run_id text not null,
                n_rows bigint not null,
                scored_at timestamptz not null,
                published_at timestamptz not null default now()
            )
            """
        ).format(_ident(POINTER_TABLE))
    )


def _ensure_history(conn: psycopg.Connection, job: _Job, existing: _Relation | None
                    ) -> tuple[dict[str, str], tuple[str, ...]]:
    """Create ``ml.<table>_history`` (partitioned by as_of) or add the frame's new columns to it.

    New columns are added as nullable (a catalog-only change); a column whose type changed is refused
    rather than silently cast. Returns the history's columns and types in order, and its primary key
    (empty without one). Key columns are NOT NULL.

    With ``index_keys`` the primary key of a new history is (keys..., as_of), as_of last: within a partition as_of is one
    value, so leading with it makes every comparison of the index build fall through to the keys and
    defeats the sort's abbreviated keys (1.5 s against 0.8 s for 1M text keys). Histories created by
    earlier versions keep (as_of, keys...): a partition's index must match its parent's.
    """
    table, columns, history = job.table, job.columns, job.history
    if existing is None:
        primary_key = (*job.key_columns, "as_of") if job.index_keys else ()
        body = [sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t),
                                          sql.SQL(" not null" if c in job.key_columns else ""))
                for c, t in columns.items()]
        body += [sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t),
                                           sql.SQL("" if c in _METADATA_NULLABLE else " not null"))
                 for c, t in _METADATA_TYPES.items()]
        if primary_key:
            body.append(sql.SQL("primary key ({})").format(sql.SQL(", ").join(map(sql.Identifier, primary_key))))
        conn.execute(sql.SQL("create table {} ({}) partition by list (as_of)").format(
            _ident(history), sql.SQL(", ").join(body)))
        return {**columns, **_METADATA_TYPES}, primary_key
    if existing.kind != "p" or any(c not in existing.columns for c in METADATA_COLUMNS):
        raise PublishError(
            f"ml.{history} exists but was not created by this version of publish; drop or rename it "
            f"(and ml.{table}) and publish again"
        )
    history_columns = dict(existing.columns)
    for column, column_type in columns.items():
        have = history_columns.get(column)
        if have is None:
            conn.execute(sql.SQL("alter table {} add column {} {}").format(
                _ident(history), sql.Identifier(column), sql.SQL(column_type)))
            history_columns[column] = column_type
        elif have != _CANONICAL.get(column_type, column_type):
            raise PublishError(
                f"column {column!r} of ml.{table} is {have} but the frame has {column_type}; "
                "cast the frame's column, or drop the table if the change is intended"
            )
    return history_columns, existing.primary_key


def _ensure_view(conn: psycopg.Connection, table: str, history_columns: dict[str, str],
                 existing: _Relation | None) -> None:
    """``ml.<table>`` = the history rows of the current as_of; replaced only when columns were added."""
    if existing is not None and existing.kind != "v":
        raise PublishError(
            f"ml.{table} exists as a table, not as the view publish maintains; drop or rename it "
            "and publish again"
        )
    if existing is not None and list(existing.columns) == list(history_columns):
        return
    conn.execute(
        sql.SQL(
            "create or replace view {view} as select {cols} from {history} h "
            "where h.as_of = (select p.as_of from {pointer} p where p.table_name = {name})"
        ).format(
            view=_ident(table),
            cols=sql.SQL(", ").join(sql.SQL("h.{}").format(sql.Identifier(c)) for c in history_columns),
            history=_ident(table + HISTORY_SUFFIX),
            pointer=_ident(POINTER_TABLE),
            name=sql.Literal(table),
        )
    )
    conn.execute(sql.SQL("comment on view {} is {}").format(
        _ident(table),
        sql.Literal(f"Current contents of ml.{table}: the rows of {table}{HISTORY_SUFFIX} for the as_of "
                    "in ml.published_tables. Maintained by ml.publish."),
    ))


# ---------------------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------------------
def _lock_key(table: str) -> int:
    """A stable signed 64-bit advisory-lock key per published table."""
    digest = hashlib.blake2b(f"crm.publish:{SCHEMA}.{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _take_lock(conn: psycopg.Connection, table: str, timeout_s: float) -> dt.datetime:
    """Wait up to ``timeout_s`` for the table's publish lock (held until our transaction ends); returns
    the transaction's ``now()``.

    ``lock_timeout`` covers advisory locks as well (they are heavyweight locks), so the server does the
    waiting; we only translate the timeout into a message that names the table and the holder. The
    setting stays for the rest of the transaction, so every later lock wait is bounded too. The
    statements go in one pipeline (one round trip); the savepoint keeps the connection usable for
    asking who holds the lock.
    """
    key = _lock_key(table)
    try:
        with conn.pipeline():
            conn.execute(sql.SQL("set local lock_timeout = {}").format(
                sql.Literal(f"{max(int(timeout_s * 1000), 1)}ms")))
            with conn.transaction():
                locked = conn.execute("select now() from (select pg_advisory_xact_lock(%s)) l", [key])
        return locked.fetchone()[0]
    except psycopg.errors.LockNotAvailable:
        holder = conn.execute(
            """
            select l.pid, a.xact_start
            from pg_locks l left join pg_stat_activity a on a.pid = l.pid
            where l.locktype = 'advisory' and l.granted
              and ((l.classid::bigint << 32) | l.objid::bigint) = %s
            """,
            [key],
        ).fetchone()
        who = f" (held by backend pid {holder[0]}, since {holder[1]})" if holder else ""
        raise PublishLockTimeout(
            f"another publish of ml.{table} is running{who}; waited {timeout_s:g}s for it. "
            "Retry when it has finished (two runs must not publish the same table at once)"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------------------
def publish(
    settings_or_conn: Settings | psycopg.Connection,
    table: str,
    frame: pd.DataFrame,
    *,
    as_of: dt.date,
    run_id: str,
    model_name: str,
    model_version: str | int | None,
    key_columns: list[str],
    allow_empty: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    scored_at: dt.datetime | None = None,
    index_keys: bool = False,
    carry: CarryForward | None = None,
) -> PublishReport:
    """Publish ``frame`` as ``ml.<table>`` (unless it is a backfill) and as ``as_of``'s rows of the history.

    ``key_columns`` identify a row; they must be non-null (NOT NULL in the tables) and unique (checked
    here before anything is written). ``index_keys=True`` on a table's first publish also makes
    (keys, as_of) the history's primary key: uniqueness enforced by the database and index lookups by
    key, for a unique-index build on every publish (~0.6x the COPY's own cost, so publish then runs at
    about half of raw COPY speed instead of near it); a history keeps the choice it was created with.
    ``scored_at`` defaults to the transaction's time. ``carry`` adds the listed rows of an earlier as_of
    (see "Carrying rows forward" above; needs a connection, since its keys table lives there). Returns a
    :class:`PublishReport`. Raises :class:`PublishError` for bad input and :class:`PublishLockTimeout`
    when another publish of the same table does not finish within ``lock_timeout`` seconds.
    """
    started = time.perf_counter()
    table = _validate_table(table)
    key_columns = list(key_columns or [])
    _validate_frame(frame, key_columns, allow_empty)
    if isinstance(as_of, dt.datetime) or not isinstance(as_of, dt.date):
        raise PublishError(f"as_of must be a datetime.date, got {as_of!r}")
    if not isinstance(run_id, str) or not run_id.strip():
        raise PublishError("run_id must be the MLflow run id of the run that produced the frame")
    if not isinstance(model_name, str) or not model_name.strip():
        raise PublishError("model_name must be a non-empty string")
    if carry is not None:
        _validate_carry(carry, frame, settings_or_conn)
    arrow = to_arrow(frame)
    job = _Job(table=table, arrow=arrow, columns=column_types(arrow), key_columns=key_columns, as_of=as_of,
               run_id=run_id, model_name=model_name, version=None if model_version is None else str(model_version),
               lock_timeout=lock_timeout, scored_at=scored_at, index_keys=index_keys,
               carry=carry)
    if isinstance(settings_or_conn, Settings):
        with connect(settings_or_conn) as conn:
            report = _publish(conn, job)
            conn.commit()
    elif isinstance(settings_or_conn, psycopg.Connection):
        report = _publish(settings_or_conn, job)
    else:
        raise PublishError(f"publish needs Settings or a psycopg connection, got {type(settings_or_conn).__name__}")
    return replace(report, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class _Job:
    """One publish's validated inputs."""

    table: str
    arrow: pa.Table
    columns: dict[str, str]  # the frame's columns and their PostgreSQL types
    key_columns: list[str]
    as_of: dt.date
    run_id: str
    model_name: str
    version: str | None
    lock_timeout: float
    scored_at: dt.datetime | None
    index_keys: bool
    carry: CarryForward | None = None

    @property
    def history(self) -> str:
        return self.table + HISTORY_SUFFIX

    @property
    def partition(self) -> str:
        return _partition_name(self.table, self.as_of)


def _publish(conn: psycopg.Connection, job: _Job) -> PublishReport:
    try:
        return _publish_locked(conn, job)
    except psycopg.errors.LockNotAvailable as err:
        raise PublishLockTimeout(
            f"publishing ml.{job.table} waited more than {job.lock_timeout:g}s for a lock ({_first_line(err)}); "
            "nothing was published, retry later"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _publish_locked(conn: psycopg.Connection, job: _Job) -> PublishReport:
    """One transaction (or savepoint): lock, catalog, DDL if the table is new, rows, pointer.

    Round trips are what a small publish costs, so the statements whose answers are not needed before
    the next one go in pipelines: the nightly path is about six round trips whatever the table.
    """
    with conn.transaction():
        now = _take_lock(conn, job.table, job.lock_timeout)
        catalog = _catalog(conn, [POINTER_TABLE, job.history, job.table, job.partition])
        if POINTER_TABLE not in catalog:
            _bootstrap(conn)
        history_columns, primary_key = _ensure_history(conn, job, catalog.get(job.history))
        _ensure_view(conn, job.table, history_columns, catalog.get(job.table))
        scored = job.scored_at or now
        meta = {"model_name": job.model_name, "model_version": job.version, "mlflow_run_id": job.run_id,
                "as_of": job.as_of, "scored_at": scored}
        carried = 0
        if job.carry is not None:
            _check_carry(conn, job, catalog.get(job.history))
        if job.partition in catalog:
            replaced, carried, pointer = _rewrite_partition(conn, job, meta)
        else:
            carried, pointer = _write_new_partition(conn, job, history_columns, primary_key, meta)
            replaced = 0
        updated = pointer.fetchone()
        current = updated[0] if updated else conn.execute(
            sql.SQL("select as_of from {} where table_name = %s").format(_ident(POINTER_TABLE)), [job.table]
        ).fetchone()[0]
    return PublishReport(
        table=f"{SCHEMA}.{job.table}",
        history_table=f"{SCHEMA}.{job.history}",
        as_of=job.as_of,
        rows=job.arrow.num_rows + carried,
        run_id=job.run_id,
        model_name=job.model_name,
        model_version=job.version,
        replaced_current=updated is not None,
        current_as_of=current,
        history_rows_replaced=replaced,
        scored_at=scored,
        seconds=0.0,
        rows_carried=carried,
    )


def _point_to(conn: psycopg.Connection, job: _Job, scored: dt.datetime, n_rows: int) -> psycopg.Cursor:
    """Point ``ml.published_tables`` at this as_of unless the current one is newer (a backfill).

    Returns the cursor of the upsert: one row (the as_of) when the pointer moved, none for a backfill.
    """
    return conn.execute(
        sql.SQL(
            """
            insert into {t} (table_name, as_of, model_name, model_version, mlflow_run_id, n_rows,
                             scored_at, published_at)
            values (%s, %s, %s, %s, %s, %s, %s, clock_timestamp())
            on conflict (table_name) do update set
                as_of = excluded.as_of, model_name = excluded.model_name,
                model_version = excluded.model_version, mlflow_run_id = excluded.mlflow_run_id,
                n_rows = excluded.n_rows, scored_at = excluded.scored_at,
                published_at = excluded.published_at
            where {t}.as_of <= excluded.as_of
            returning as_of
            """
        ).format(t=_ident(POINTER_TABLE)),
        [job.table, job.as_of, job.model_name, job.version, job.run_id, n_rows, scored],
    )


def _copy_into_new_table(conn: psycopg.Connection, name: str, definitions: list[sql.Composable],
                         arrow: pa.Table, *, temporary: bool = False) -> None:
    """Create a table nobody else can see yet and COPY the frame into it (both publish paths stage the frame so).

    ``name`` is ``schema.table`` or, for a temporary table, a bare name."""
    create = sql.SQL("create temp table {} ({}) on commit drop" if temporary else "create table {} ({})")
    conn.execute(create.format(qualified(name), sql.SQL(", ").join(definitions)))
    copy_in(conn, name, arrow)


def _write_new_partition(conn: psycopg.Connection, job: _Job, history_columns: dict[str, str],
                         primary_key: tuple[str, ...], meta: dict[str, Any]) -> tuple[int, psycopg.Cursor]:
    """A new as_of: COPY into a fresh table, index it, then attach it (the only step readers can notice).

    Returns (rows carried forward, the pointer update's cursor). What keeps this near the speed of a plain COPY:

    * The run's metadata (model, version, run id, scored_at) is the same on every row, so it is not
      written into the rows at all: those columns are added *after* the COPY with a constant default,
      which PostgreSQL records once in the catalog (a "fast default", no table rewrite) and returns for
      every row written before; the defaults are then dropped. The rows are exactly as wide as a plain
      COPY of the frame plus the 4-byte ``as_of`` (for 100k-row frames about half of each row's bytes).
    * ``as_of`` is written (from a column default: the wire carries only the frame) because the CHECK on
      it lets ATTACH skip scanning the rows to prove they belong to the partition. Creating the table as a
      partition instead would lock the history against readers for the whole COPY.
    * No ANALYZE: the primary-key build records the row and page counts the planner sizes the partition
      by, and autovacuum gathers column statistics of a freshly filled table within
      ``autovacuum_naptime``; an ANALYZE here was a third of a small publish.
    * Everything after the COPY goes to the server in one pipeline (one round trip).
    """
    definitions = []
    for column, column_type in history_columns.items():
        if column == "as_of":
            definitions.append(sql.SQL("as_of {} not null default {}").format(sql.SQL(column_type),
                                                                              sql.Literal(job.as_of)))
        elif column not in meta:
            not_null = " not null" if column in primary_key or column in job.key_columns else ""
            definitions.append(sql.SQL("{} {}{}").format(sql.Identifier(column), sql.SQL(column_type),
                                                         sql.SQL(not_null)))
    definitions.append(sql.SQL("constraint {} check (as_of = {})").format(
        sql.Identifier(f"{job.partition}_as_of"), sql.Literal(job.as_of)))
    _copy_into_new_table(conn, f"{SCHEMA}.{job.partition}", definitions, job.arrow)
    # carried rows go in before the metadata columns exist, so they get tonight's run metadata for free
    carried = _carry_rows(conn, job, _ident(job.partition))
    run_columns = [c for c in history_columns if c in meta and c != "as_of"]
    changes = [sql.SQL("add column {} {}{} default {}").format(
        sql.Identifier(c), sql.SQL(history_columns[c]),
        sql.SQL("" if c in _METADATA_NULLABLE else " not null"), sql.Literal(meta[c])) for c in run_columns]
    changes.append(sql.SQL("alter column as_of drop default"))
    if primary_key:
        changes.append(sql.SQL("add primary key ({})").format(sql.SQL(", ").join(map(sql.Identifier, primary_key))))
    # a column's default can only be dropped by a later statement than the one that adds it
    drop_defaults = [sql.SQL("alter column {} drop default").format(sql.Identifier(c)) for c in run_columns]
    try:
        with conn.pipeline():
            conn.execute(sql.SQL("alter table {} {}").format(_ident(job.partition), sql.SQL(", ").join(changes)))
            if drop_defaults:
                conn.execute(sql.SQL("alter table {} {}").format(_ident(job.partition),
                                                                 sql.SQL(", ").join(drop_defaults)))
            # See the module docstring: the explicit ACCESS EXCLUSIVE makes statements that reach the
            # history during the swap wait and re-plan after the commit, instead of planning with the old
            # partition list.
            conn.execute(sql.SQL("lock table {} in access exclusive mode").format(_ident(job.history)))
            conn.execute(sql.SQL("alter table {} attach partition {} for values in ({})").format(
                _ident(job.history), _ident(job.partition), sql.Literal(job.as_of)))
            return carried, _point_to(conn, job, meta["scored_at"], job.arrow.num_rows + carried)
    except psycopg.errors.LockNotAvailable:
        raise PublishLockTimeout(
            f"could not swap in ml.{job.table} within {job.lock_timeout:g}s: a reader transaction has kept "
            f"ml.{job.history} open that long; nothing was published, retry later"
        ) from None


def _rewrite_partition(conn: psycopg.Connection, job: _Job, meta: dict[str, Any]) -> tuple[int, int, psycopg.Cursor]:
    """A rerun of a published as_of: replace that partition's rows with DELETE + INSERT (plain MVCC, so
    readers keep the old rows until commit whatever their isolation level).

    The frame is staged in a temporary table (no WAL) and inserted with the metadata as parameters.
    COPYing straight into the partition with the metadata as constant CSV columns measured slower
    (300k rows: 0.9 s client + 0.8 s server CPU against 0.2 s + 0.6 s), the text timestamps being
    written and parsed on every row; setting defaults on the partition instead would lock readers out.
    Carried rows are added to the staging table first (read before the DELETE, so a rerun can carry from
    the very partition it replaces). Returns (rows replaced, rows carried, the pointer update's cursor)."""
    columns = job.arrow.column_names
    stage = f"_publish_stage_{job.table}"
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(stage)))
    _copy_into_new_table(conn, stage, [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
                                       for c, t in job.columns.items()], job.arrow, temporary=True)
    carried = _carry_rows(conn, job, sql.Identifier(stage))
    names = [*columns, *meta]
    with conn.pipeline():
        deleted = conn.execute(sql.SQL("delete from {}").format(_ident(job.partition)))
        conn.execute(
            sql.SQL("insert into {} ({}) select {}, {} from {}").format(
                _ident(job.partition),
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() for _ in meta),
                sql.Identifier(stage),
            ),
            list(meta.values()),
        )
        pointer = _point_to(conn, job, meta["scored_at"], job.arrow.num_rows + carried)
    return deleted.rowcount, carried, pointer


def _validate_carry(carry: CarryForward, frame: pd.DataFrame, target: Any) -> None:
    if not isinstance(carry, CarryForward):
        raise PublishError(f"carry must be a CarryForward, got {type(carry).__name__}")
    if isinstance(carry.from_as_of, dt.datetime) or not isinstance(carry.from_as_of, dt.date):
        raise PublishError(f"carry.from_as_of must be a datetime.date, got {carry.from_as_of!r}")
    if carry.except_table is not None:
        for part in str(carry.except_table).split("."):
            validate_identifier(part, "carry except table")
        if not isinstance(target, psycopg.Connection):
            raise PublishError("publish with carry.except_table needs the connection that holds that table, "
                               "not Settings")
    validate_identifier(carry.key_column, "carry key column")
    if carry.key_column not in frame.columns:
        raise PublishError(f"carry key column {carry.key_column!r} is not a column of the frame")


def _check_carry(conn: psycopg.Connection, job: _Job, history: _Relation | None) -> None:
    """The earlier as_of was published (carrying from nothing would silently publish only the frame)."""
    carry = job.carry
    if history is None or not conn.execute(
            sql.SQL("select exists (select 1 from {} where as_of = %s)").format(_ident(job.history)),
            [carry.from_as_of]).fetchone()[0]:
        raise PublishError(f"cannot carry rows of ml.{job.table} from as_of {carry.from_as_of}: nothing was "
                           "published for that date")


def _carry_rows(conn: psycopg.Connection, job: _Job, target: sql.Composable) -> int:
    """Copy the carried rows of ``job.carry.from_as_of`` (the frame's columns) into ``target``, server-side.

    ``target`` holds exactly the frame's rows at this point, so the anti-join against it keeps a key from
    being both re-scored and carried (the statement does not see the rows it inserts itself)."""
    if job.carry is None:
        return 0
    carry, columns = job.carry, sql.SQL(", ").join(map(sql.Identifier, job.arrow.column_names))
    key = sql.Identifier(carry.key_column)
    excluded = sql.SQL("")
    if carry.except_table is not None:
        excluded = sql.SQL(" and not exists (select 1 from {} e where e.{} = h.{})").format(
            qualified(carry.except_table), key, key)
    cur = conn.execute(
        sql.SQL("insert into {target} ({cols}) select {hcols} from {history} h where h.as_of = %s "
                "and not exists (select 1 from {target} f where f.{key} = h.{key}){excluded}").format(
            target=target, cols=columns, history=_ident(job.history), key=key, excluded=excluded,
            hcols=sql.SQL(", ").join(sql.SQL("h.{}").format(sql.Identifier(c)) for c in job.arrow.column_names)),
        [carry.from_as_of])
    return cur.rowcount


# ---------------------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------------------
def content_checksum(
    conn: psycopg.Connection, table: str, *, exclude: tuple[str, ...] = RUN_COLUMNS, as_of: dt.date | None = None
) -> str:
    """md5 of a published table's ordered contents, without the columns that differ between reruns.

    Used to prove that reruns of the same ``as_of`` publish identical tables. ``table`` is ``<name>`` or
    ``<name>_history`` in schema ``ml``; ``as_of`` restricts to one date.
    """
    name = table[len(SCHEMA) + 1 :] if table.startswith(f"{SCHEMA}.") else table
    validate_identifier(name)
    existing = _existing_columns(conn, name)
    if existing is None:
        raise PublishError(f"ml.{name} does not exist")
    kept = [c for c in existing if c not in exclude]
    row = sql.SQL("row({})::text").format(sql.SQL(", ").join(sql.Identifier(c) for c in kept))
    where = sql.SQL("where as_of = {}").format(sql.Literal(as_of)) if as_of is not None else sql.SQL("")
    query = sql.SQL("select md5(coalesce(string_agg(r, E'\\n' order by r collate \"C\"), '')) "
                    "from (select {} as r from {} {}) t").format(row, _ident(name), where)
    return conn.execute(query).fetchone()[0]


def current_as_of(conn: psycopg.Connection, table: str) -> dt.date | None:
    """The ``as_of`` that ``ml.<table>`` shows (None before the first publish)."""
    name = _validate_table(table)
    if POINTER_TABLE not in _catalog(conn, [POINTER_TABLE]):
        return None
    row = conn.execute(sql.SQL("select as_of from {} where table_name = %s").format(_ident("published_tables")),
                       [name]).fetchone()
    return row[0] if row else None


__all__: list[Any] = [
    "METADATA_COLUMNS",
    "column_types",
    "pg_type",
    "to_arrow",
    "PublishError",
    "PublishLockTimeout",
    "PublishReport",
    "CarryForward",
    "content_checksum",
    "current_as_of",
    "publish",
    "validate_identifier",
]
