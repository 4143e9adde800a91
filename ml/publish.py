"""Publish model outputs back to the warehouse (schema ``ml``): one function for every output table.

``publish(settings_or_conn, "customer_segments", frame, as_of=..., run_id=..., model_name=...,
model_version=..., key_columns=["customer_id"])`` writes

* ``ml.customer_segments``          the current contents (the newest ``as_of`` published), and
* ``ml.customer_segments_history``  every ``as_of`` ever published, append-only; publishing the same
  ``as_of`` again replaces that ``as_of``'s rows, never duplicates them;

each row carrying ``model_name``, ``model_version``, ``mlflow_run_id``, ``as_of`` and ``scored_at``.

How the swap works, and why it is DELETE + INSERT in one transaction
---------------------------------------------------------------------
The frame is first COPYed into a temporary staging table (no WAL, invisible to everyone else). Then, in
the same transaction, the target's old rows are deleted and the staged rows inserted; commit makes the
change visible all at once. We compared the three usual swaps:

* ``ALTER TABLE ... RENAME`` of a freshly built table: takes ACCESS EXCLUSIVE, and a reader that resolved
  the old table's OID before the swap and then waited on the lock fails with "could not open relation
  with OID ..." once the old table is dropped. Grants, comments and dependent views must be re-created
  on every publish. Rejected: readers can error.
* ``TRUNCATE`` + INSERT: keeps the OID, but TRUNCATE takes ACCESS EXCLUSIVE (readers queue behind the
  publish) and is documented as not MVCC-safe: a REPEATABLE READ / SERIALIZABLE reader whose snapshot
  predates the commit sees an *empty* table afterwards. Rejected: a reader can see a wrong result.
* ``DELETE`` + INSERT (chosen): ordinary MVCC row versions. Readers take no lock that conflicts with
  ours, never wait, never see the relation change identity (same OID, same grants), and every
  statement sees either all old rows or all new rows, whatever its isolation level. The price is dead
  tuples, which autovacuum reclaims; we ANALYZE after the swap so plans stay good.

Overlapping publishers (a manual run during the nightly run) are serialised by a transaction-scoped
PostgreSQL advisory lock per table: the second waits up to ``lock_timeout`` seconds, then fails with a
:class:`PublishLockTimeout` naming the table. A publisher killed half-way (even by SIGKILL) leaves an
open transaction that PostgreSQL rolls back when the connection drops: the previous contents stay.

A backfill (an ``as_of`` older than the one in the current table) writes its history rows and leaves the
current table alone.

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
# PostgreSQL truncates identifiers at 63 bytes; the history table adds 8 characters.
_MAX_TABLE_NAME = 63 - len(HISTORY_SUFFIX)
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


def _ensure_table(
    conn: psycopg.Connection, table: str, columns: dict[str, str], key_columns: list[str], *, history: bool
) -> None:
    """Create ``ml.<table>`` (or its history) for these columns, or add new columns to an existing one.

    New columns are added as nullable (a metadata-only change); a column whose type changed is refused
    rather than silently cast.
    """
    existing = _existing_columns(conn, table)
    if existing is None:
        body = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns.items()]
        body += [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in _METADATA_TYPES.items()]
        key = (["as_of"] if history else []) + key_columns
        body.append(sql.SQL("primary key ({})").format(sql.SQL(", ").join(map(sql.Identifier, key))))
        conn.execute(sql.SQL("create table {} ({})").format(_ident(table), sql.SQL(", ").join(body)))
        return
    missing_meta = [c for c in METADATA_COLUMNS if c not in existing]
    if missing_meta:
        raise PublishError(
            f"ml.{table} exists but was not created by publish (no {missing_meta} columns); "
            "drop or rename it"
        )
    for column, pg_type in columns.items():
        have = existing.get(column)
        if have is None:
            conn.execute(
                sql.SQL("alter table {} add column {} {}").format(
                    _ident(table), sql.Identifier(column), sql.SQL(pg_type)
                )
            )
        elif have != _CANONICAL.get(pg_type, pg_type):
            raise PublishError(
                f"column {column!r} of ml.{table} is {have} but the frame has {pg_type}; "
                "cast the frame's column, or drop the table if the change is intended"
            )


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
    waiting; we only translate the timeout into a message that names the table and the holder.
    """
    key = _lock_key(table)
    conn.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{max(int(timeout_s * 1000), 1)}ms")))
    try:
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", [key])
    except psycopg.errors.LockNotAvailable:
        holder = conn.execute(
            """
            select l.pid, a.application_name, a.xact_start
            from pg_locks l left join pg_stat_activity a on a.pid = l.pid
            where l.locktype = 'advisory' and l.granted
              and ((l.classid::bigint << 32) | l.objid::bigint) = %s
            """,
            [key],
        ).fetchone()
        who = f" (held by backend pid {holder[0]}, since {holder[2]})" if holder else ""
        raise PublishLockTimeout(
            f"another publish of ml.{table} is running{who}; waited {timeout_s:g}s for it. "
            "Retry when it has finished (two runs must not publish the same table at once)"
        ) from None
    conn.execute("set local lock_timeout = default")


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
    history = table + HISTORY_SUFFIX
    with conn.transaction():
        _take_lock(conn, table, lock_timeout)
        _ensure_table(conn, table, columns, key_columns, history=False)
        _ensure_table(conn, history, columns, key_columns, history=True)

        # Stage: COPY into a temporary table (no WAL; dropped at commit or when the session dies).
        stage = f"_publish_stage_{table}"
        conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(stage)))
        stage_cols = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns.items()
        )
        conn.execute(sql.SQL("create temp table {} ({}) on commit drop").format(sql.Identifier(stage), stage_cols))
        rows = copy_in(conn, stage, arrow)

        scored = scored_at or conn.execute("select now()").fetchone()[0]
        meta = [model_name, version, run_id, as_of, scored]
        names = sql.SQL(", ").join(sql.Identifier(c) for c in [*columns, *METADATA_COLUMNS])
        select = sql.SQL("select {}, %s, %s, %s, %s, %s from {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns), sql.Identifier(stage)
        )

        replaced = conn.execute(
            sql.SQL("delete from {} where as_of = %s").format(_ident(history)), [as_of]
        ).rowcount
        conn.execute(sql.SQL("insert into {} ({}) ").format(_ident(history), names) + select, meta)

        current = conn.execute(sql.SQL("select max(as_of) from {}").format(_ident(table))).fetchone()[0]
        replace_current = current is None or as_of >= current
        if replace_current:
            conn.execute(sql.SQL("delete from {}").format(_ident(table)))
            conn.execute(sql.SQL("insert into {} ({}) ").format(_ident(table), names) + select, meta)
            current = as_of
        conn.execute(sql.SQL("analyze {}").format(_ident(table)))
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
    """The ``as_of`` held by ``ml.<table>`` (None when the table is empty or absent)."""
    name = _validate_table(table)
    if _existing_columns(conn, name) is None:
        return None
    return conn.execute(sql.SQL("select max(as_of) from {}").format(_ident(name))).fetchone()[0]


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
