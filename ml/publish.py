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
else can see it; the metadata columns are filled by column defaults, so COPY sends only the frame), its
primary key is built in one sort, and then, in the same transaction, it is ATTACHed as the history's
partition for that date and ``ml.published_tables`` is pointed at the date. Commit makes both visible at
once. Rows are written exactly once, which is why publish runs near raw COPY speed.

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
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
from psycopg import sql

from ml.config import Settings
from ml.errors import CrmError
from ml.warehouse import connect, copy_in

SCHEMA = "ml"
HISTORY_SUFFIX = "_history"
METADATA_COLUMNS = ("model_name", "model_version", "mlflow_run_id", "as_of", "scored_at")
# Row-varying columns that differ between two otherwise identical runs: excluded from content checksums.
RUN_COLUMNS = ("model_version", "mlflow_run_id", "scored_at")
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
def _pg_type(arrow_type: pa.DataType, column: str) -> str:
    """The PostgreSQL column type for an Arrow type (as pandas converts it)."""
    t = arrow_type
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


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise PublishError(f"the frame cannot be converted for COPY: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# DDL for our own tables
# ---------------------------------------------------------------------------------------------------------
def _ident(table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(table))


def _partition_name(table: str, as_of: dt.date) -> str:
    return f"{table}{HISTORY_SUFFIX}_{as_of:%Y%m%d}"


def _relkind(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute(
        "select c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s",
        [SCHEMA, name],
    ).fetchone()
    return row[0] if row else None


def _existing_columns(conn: psycopg.Connection, table: str) -> dict[str, str] | None:
    rows = conn.execute(
        """
        select a.attname, format_type(a.atttypid, a.atttypmod)
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped
        order by a.attnum
        """,
        [SCHEMA, table],
    ).fetchall()
    return {name: typ for name, typ in rows} if rows else None


_METADATA_TYPES = {
    "model_name": "text not null",
    "model_version": "text",
    "mlflow_run_id": "text not null",
    "as_of": "date not null",
    "scored_at": "timestamptz not null",
}
# format_type() spellings of the types _pg_type returns, for comparing with an existing table.
_CANONICAL = {"timestamptz": "timestamp with time zone", "timestamp": "timestamp without time zone"}


def _bootstrap(conn: psycopg.Connection) -> None:
    """The pointer table shared by all published tables (created once, under a global lock, because two
    first publishes of different tables could otherwise race on CREATE)."""
    if _relkind(conn, "published_tables") is not None:
        return
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
        ).format(_ident("published_tables"))
    )


def _ensure_history(
    conn: psycopg.Connection, table: str, columns: dict[str, str], key_columns: list[str]
) -> dict[str, str]:
    """Create ``ml.<table>_history`` (partitioned by as_of) or add the frame's new columns to it.

    New columns are added as nullable (a catalog-only change); a column whose type changed is refused
    rather than silently cast. Returns the history's columns and types in order.
    """
    history = table + HISTORY_SUFFIX
    existing = _existing_columns(conn, history)
    if existing is None:
        body = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns.items()]
        body += [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in _METADATA_TYPES.items()]
        body.append(sql.SQL("primary key ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, ["as_of", *key_columns]))))
        conn.execute(sql.SQL("create table {} ({}) partition by list (as_of)").format(
            _ident(history), sql.SQL(", ").join(body)))
        return _existing_columns(conn, history)
    if _relkind(conn, history) != "p" or any(c not in existing for c in METADATA_COLUMNS):
        raise PublishError(
            f"ml.{history} exists but was not created by this version of publish; drop or rename it "
            f"(and ml.{table}) and publish again"
        )
    added = False
    for column, pg_type in columns.items():
        have = existing.get(column)
        if have is None:
            conn.execute(sql.SQL("alter table {} add column {} {}").format(
                _ident(history), sql.Identifier(column), sql.SQL(pg_type)))
            added = True
        elif have != _CANONICAL.get(pg_type, pg_type):
            raise PublishError(
                f"column {column!r} of ml.{table} is {have} but the frame has {pg_type}; "
                "cast the frame's column, or drop the table if the change is intended"
            )
    return _existing_columns(conn, history) if added else existing


def _ensure_view(conn: psycopg.Connection, table: str, history_columns: dict[str, str]) -> None:
    """``ml.<table>`` = the history rows of the current as_of; replaced only when columns were added."""
    kind = _relkind(conn, table)
    if kind not in (None, "v"):
        raise PublishError(
            f"ml.{table} exists as a table, not as the view publish maintains; drop or rename it "
            "and publish again"
        )
    if kind == "v" and list(_existing_columns(conn, table) or {}) == list(history_columns):
        return
    conn.execute(
        sql.SQL(
            "create or replace view {view} as select {cols} from {history} h "
            "where h.as_of = (select p.as_of from {pointer} p where p.table_name = {name})"
        ).format(
            view=_ident(table),
            cols=sql.SQL(", ").join(sql.SQL("h.{}").format(sql.Identifier(c)) for c in history_columns),
            history=_ident(table + HISTORY_SUFFIX),
            pointer=_ident("published_tables"),
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


def _take_lock(conn: psycopg.Connection, table: str, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the table's publish lock (held until our transaction ends).

    ``lock_timeout`` covers advisory locks as well (they are heavyweight locks), so the server does the
    waiting; we only translate the timeout into a message that names the table and the holder. The
    setting stays for the rest of the transaction, so every later lock wait is bounded too.
    """
    key = _lock_key(table)
    conn.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{max(int(timeout_s * 1000), 1)}ms")))
    try:
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", [key])
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
) -> PublishReport:
    """Publish ``frame`` as ``ml.<table>`` (unless it is a backfill) and as ``as_of``'s rows of the history.

    ``key_columns`` identify a row (they become the primary key, with ``as_of`` in the history); they must
    be non-null and unique. ``scored_at`` defaults to the transaction's time. Returns a
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
    version = None if model_version is None else str(model_version)

    arrow = _to_arrow(frame)
    columns = {name: _pg_type(arrow.schema.field(name).type, name) for name in arrow.column_names}

    if isinstance(settings_or_conn, Settings):
        with connect(settings_or_conn) as conn:
            report = _publish(conn, table, arrow, columns, key_columns, as_of, run_id, model_name, version,
                              lock_timeout, scored_at)
            conn.commit()
    elif isinstance(settings_or_conn, psycopg.Connection):
        report = _publish(settings_or_conn, table, arrow, columns, key_columns, as_of, run_id, model_name,
                          version, lock_timeout, scored_at)
    else:
        raise PublishError(f"publish needs Settings or a psycopg connection, got {type(settings_or_conn).__name__}")
    return _with_seconds(report, time.perf_counter() - started)


def _with_seconds(report: PublishReport, seconds: float) -> PublishReport:
    from dataclasses import replace

    return replace(report, seconds=seconds)


def _publish(
    conn: psycopg.Connection,
    table: str,
    arrow: pa.Table,
    columns: dict[str, str],
    key_columns: list[str],
    as_of: dt.date,
    run_id: str,
    model_name: str,
    version: str | None,
    lock_timeout: float,
    scored_at: dt.datetime | None,
) -> PublishReport:
    try:
        return _publish_locked(conn, table, arrow, columns, key_columns, as_of, run_id, model_name, version,
                               lock_timeout, scored_at)
    except psycopg.errors.LockNotAvailable as err:
        raise PublishLockTimeout(
            f"publishing ml.{table} waited more than {lock_timeout:g}s for a lock ({_first_line(err)}); "
            "nothing was published, retry later"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _publish_locked(
    conn: psycopg.Connection,
    table: str,
    arrow: pa.Table,
    columns: dict[str, str],
    key_columns: list[str],
    as_of: dt.date,
    run_id: str,
    model_name: str,
    version: str | None,
    lock_timeout: float,
    scored_at: dt.datetime | None,
) -> PublishReport:
    history = table + HISTORY_SUFFIX
    partition = _partition_name(table, as_of)
    with conn.transaction():
        _take_lock(conn, table, lock_timeout)
        _bootstrap(conn)
        history_columns = _ensure_history(conn, table, columns, key_columns)
        _ensure_view(conn, table, history_columns)
        scored = scored_at or conn.execute("select now()").fetchone()[0]
        meta = {"model_name": model_name, "model_version": version, "mlflow_run_id": run_id,
                "as_of": as_of, "scored_at": scored}

        if _relkind(conn, partition) is None:
            rows = _write_new_partition(conn, table, partition, arrow, history_columns, key_columns, meta,
                                        lock_timeout)
            replaced = 0
        else:
            rows, replaced = _rewrite_partition(conn, table, partition, arrow, columns, meta)

        current = conn.execute(
            sql.SQL("select as_of from {} where table_name = %s for update").format(_ident("published_tables")),
            [table],
        ).fetchone()
        current = current[0] if current else None
        replace_current = current is None or as_of >= current
        if replace_current:
            conn.execute(
                sql.SQL(
                    """
                    insert into {} (table_name, as_of, model_name, model_version, mlflow_run_id, n_rows,
                                    scored_at, published_at)
                    values (%s, %s, %s, %s, %s, %s, %s, clock_timestamp())
                    on conflict (table_name) do update set
                        as_of = excluded.as_of, model_name = excluded.model_name,
                        model_version = excluded.model_version, mlflow_run_id = excluded.mlflow_run_id,
                        n_rows = excluded.n_rows, scored_at = excluded.scored_at,
                        published_at = excluded.published_at
                    """
                ).format(_ident("published_tables")),
                [table, as_of, model_name, version, run_id, rows, scored],
            )
            current = as_of
    return PublishReport(
        table=f"{SCHEMA}.{table}",
        history_table=f"{SCHEMA}.{history}",
        as_of=as_of,
        rows=rows,
        run_id=run_id,
        model_name=model_name,
        model_version=version,
        replaced_current=replace_current,
        current_as_of=current,
        history_rows_replaced=replaced,
        scored_at=scored,
        seconds=0.0,
    )


def _write_new_partition(
    conn: psycopg.Connection,
    table: str,
    partition: str,
    arrow: pa.Table,
    history_columns: dict[str, str],
    key_columns: list[str],
    meta: dict[str, Any],
    lock_timeout: float,
) -> int:
    """A new as_of: COPY into a fresh table, index it, then attach it (the only step readers can notice)."""
    definitions = []
    for column, pg_type in history_columns.items():
        if column in meta:
            # Defaults fill the metadata during COPY, so the wire carries only the frame's columns.
            not_null = "" if column == "model_version" else " not null"
            definitions.append(sql.SQL("{} {}{} default {}").format(
                sql.Identifier(column), sql.SQL(pg_type), sql.SQL(not_null), sql.Literal(meta[column])))
        else:
            not_null = " not null" if column in key_columns else ""
            definitions.append(sql.SQL("{} {}{}").format(sql.Identifier(column), sql.SQL(pg_type), sql.SQL(not_null)))
    # The CHECK lets ATTACH skip scanning the rows to prove they belong to the partition.
    definitions.append(sql.SQL("constraint {} check (as_of = {})").format(
        sql.Identifier(f"{partition}_as_of"), sql.Literal(meta["as_of"])))
    conn.execute(sql.SQL("create table {} ({})").format(_ident(partition), sql.SQL(", ").join(definitions)))
    rows = copy_in(conn, f"{SCHEMA}.{partition}", arrow)
    conn.execute(sql.SQL("alter table {} add primary key ({}), {}").format(
        _ident(partition),
        sql.SQL(", ").join(map(sql.Identifier, ["as_of", *key_columns])),
        sql.SQL(", ").join(sql.SQL("alter column {} drop default").format(sql.Identifier(c)) for c in meta),
    ))
    conn.execute(sql.SQL("analyze {}").format(_ident(partition)))
    # See the module docstring: the explicit ACCESS EXCLUSIVE makes statements that reach the history
    # during the swap wait and re-plan after the commit, instead of planning with the old partition list.
    try:
        with conn.transaction():
            conn.execute(sql.SQL("lock table {} in access exclusive mode").format(_ident(table + HISTORY_SUFFIX)))
    except psycopg.errors.LockNotAvailable:
        raise PublishLockTimeout(
            f"could not swap in ml.{table} within {lock_timeout:g}s: a reader transaction has kept "
            f"ml.{table}{HISTORY_SUFFIX} open that long; nothing was published, retry later"
        ) from None
    conn.execute(sql.SQL("alter table {} attach partition {} for values in ({})").format(
        _ident(table + HISTORY_SUFFIX), _ident(partition), sql.Literal(meta["as_of"])))
    return rows


def _rewrite_partition(
    conn: psycopg.Connection,
    table: str,
    partition: str,
    arrow: pa.Table,
    frame_columns: dict[str, str],
    meta: dict[str, Any],
) -> tuple[int, int]:
    """A rerun of a published as_of: replace that partition's rows with DELETE + INSERT (plain MVCC, so
    readers keep the old rows until commit whatever their isolation level). Returns (rows, replaced)."""
    columns = arrow.column_names
    stage = f"_publish_stage_{table}"
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(stage)))
    conn.execute(sql.SQL("create temp table {} ({}) on commit drop").format(
        sql.Identifier(stage),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in frame_columns.items()),
    ))
    rows = copy_in(conn, stage, arrow)
    replaced = conn.execute(sql.SQL("delete from {}").format(_ident(partition))).rowcount
    names = [*columns, *meta]
    conn.execute(
        sql.SQL("insert into {} ({}) select {}, {} from {}").format(
            _ident(partition),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() for _ in meta),
            sql.Identifier(stage),
        ),
        list(meta.values()),
    )
    conn.execute(sql.SQL("analyze {}").format(_ident(partition)))
    return rows, replaced


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
    if _relkind(conn, "published_tables") is None:
        return None
    row = conn.execute(sql.SQL("select as_of from {} where table_name = %s").format(_ident("published_tables")),
                       [name]).fetchone()
    return row[0] if row else None


__all__: list[Any] = [
    "METADATA_COLUMNS",
    "PublishError",
    "PublishLockTimeout",
    "PublishReport",
    "content_checksum",
    "current_as_of",
    "publish",
    "validate_identifier",
]
