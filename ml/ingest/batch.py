"""Atomic, idempotent load batches into the raw layer, with quarantine and reconciled counts.

A batch is one transaction: its audit row, every raw row and every quarantined line commit together or
not at all. Loading the same content twice (same source, same SHA-256) adds nothing the second time.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from ml.warehouse import binary_copy_chunks, copy_in, copy_statement, table_column_types

QUARANTINE_COLUMNS = ["line_no", "raw_text", "reason", "target_table"]


@dataclass
class LoadReport:
    """What a load did. ``lines_read == rows_loaded[primary_table] + rows_quarantined`` when it reconciles."""

    source: str
    source_name: str
    primary_table: str
    batch_id: int | None = None
    lines_read: int = 0
    rows_loaded: dict[str, int] = field(default_factory=dict)
    rows_quarantined: int = 0
    already_loaded_as: int | None = None

    @property
    def skipped(self) -> bool:
        return self.already_loaded_as is not None

    @property
    def reconciles(self) -> bool:
        return self.skipped or self.lines_read == self.rows_loaded.get(self.primary_table, 0) + self.rows_quarantined

    def summary(self) -> str:
        if self.skipped:
            return (
                f"{self.source} {self.source_name}: already loaded as batch {self.already_loaded_as}, "
                "0 rows added"
            )
        tables = ", ".join(f"{t} {n:,}" for t, n in self.rows_loaded.items())
        check = "reconciled" if self.reconciles else "DOES NOT RECONCILE"
        return (
            f"{self.source} {self.source_name}: batch {self.batch_id}: {self.lines_read:,} lines read = "
            f"{self.rows_loaded.get(self.primary_table, 0):,} loaded into {self.primary_table} + "
            f"{self.rows_quarantined:,} quarantined ({check}); rows: {tables}"
        )


@dataclass
class CopyPayload:
    """One COPY ready to stream: the statement and its bytes, encoded ahead of time (see :func:`encode_copy`)."""

    table: str
    columns: sql.Composed
    format: str  # binary | csv
    buffers: list  # bytes-like, sent in order
    rows: int
    count: bool = True  # add the rows to the batch's rows_loaded (the raw tables; not the planted truth)

    def statement(self, *, freeze: bool = False) -> sql.Composed:
        return copy_statement(self.table, self.columns, self.format, freeze=freeze)


# Slices handed to psycopg: large enough that the sending thread rarely needs the GIL (the producer thread
# holds it while it builds the next chunk), small enough that libpq's output buffer stays modest.
_SEND_SLICE = 4 << 20


def column_types(conn: psycopg.Connection, tables: list[str]) -> dict[str, dict[str, str]]:
    """Each table's column types (``format_type``), queried once before streaming: a query on the batch's
    connection while a COPY is in flight would wait for it, serialising the producer behind the writer."""
    return {table: table_column_types(conn, table) for table in tables}


def encode_copy(table: str, arrow: pa.Table, types: dict[str, str] | None, *, count: bool = True) -> CopyPayload:
    """The COPY of ``arrow`` into ``table`` as bytes, without touching the connection (so another thread can
    stream the previous payload meanwhile). Same formats as :func:`ml.warehouse.copy_in`: binary when
    ``types`` (the target's column types) is given and every column has an exact binary form, else CSV."""
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in arrow.column_names)
    if arrow.num_rows == 0:
        return CopyPayload(table, columns, "csv", [], 0, count)
    if types is not None:
        chunks = binary_copy_chunks(arrow, [types.get(c, "") for c in arrow.column_names])
        if chunks is not None:
            return CopyPayload(table, columns, "binary", [memoryview(c).cast("B") for c in chunks], arrow.num_rows,
                               count)
    # pyarrow's CSV writer emits garbage for a column whose chunks start with an empty one (see copy_in)
    arrow = pa.Table.from_batches([b for b in arrow.to_batches() if b.num_rows], schema=arrow.schema)
    buffer = io.BytesIO()
    pacsv.write_csv(arrow, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    return CopyPayload(table, columns, "csv", [buffer.getbuffer()], arrow.num_rows, count)


def send_copy(conn: psycopg.Connection, payload: CopyPayload, *, freeze: bool = False) -> int:
    """Stream an encoded payload: the thread doing this only waits on the socket while the server parses.
    ``freeze``: the table was truncated in this transaction (see :meth:`Batch.claim`)."""
    if payload.rows == 0:
        return 0
    with conn.cursor() as cur, cur.copy(payload.statement(freeze=freeze)) as copy:
        for view in payload.buffers:
            for start in range(0, len(view), _SEND_SLICE):
                copy.write(view[start : start + _SEND_SLICE])
    return payload.rows


class Batch:
    """Handed to a loader's fill function: the only way it writes to the warehouse."""

    def __init__(self, conn: psycopg.Connection, report: LoadReport):
        self.conn = conn
        self.report = report
        self._emptied: dict[str, bool] = {}  # table -> truncated by this batch (see claim)

    @property
    def batch_id(self) -> int:
        assert self.report.batch_id is not None
        return self.report.batch_id

    def copy(self, table: str, frame: pd.DataFrame | pa.Table, *, binary: bool = False) -> int:
        """COPY rows into a raw table, stamping them with this batch (``binary``: see ``copy_in``)."""
        if isinstance(frame, pa.Table):
            frame = frame.append_column("_batch_id", pa.array(np.full(frame.num_rows, self.batch_id, np.int64)))
        else:
            frame = frame.assign(_batch_id=self.batch_id)
        n = copy_in(self.conn, table, frame, binary=binary, freeze=len(frame) > 0 and self.claim(table))
        self.report.rows_loaded[table] = self.report.rows_loaded.get(table, 0) + n
        return n

    def encode(self, table: str, frame: pa.Table, types: dict[str, str] | None, *, stamp: bool = True) -> CopyPayload:
        """:meth:`copy` in two halves: the bytes now (any thread, no connection), :meth:`send` later.
        ``stamp``: a raw table's rows get this batch's id and count in ``rows_loaded``."""
        if stamp:
            frame = frame.append_column("_batch_id", pa.array(np.full(frame.num_rows, self.batch_id, np.int64)))
        return encode_copy(table, frame, types, count=stamp)

    def send(self, payload: CopyPayload) -> int:
        """Stream a payload from :meth:`encode` inside this batch's transaction."""
        n = send_copy(self.conn, payload, freeze=payload.rows > 0 and self.claim(payload.table))
        if payload.count:
            self.report.rows_loaded[payload.table] = self.report.rows_loaded.get(payload.table, 0) + n
        return n

    def claim(self, table: str) -> bool:
        """Whether this batch's COPYs into ``table`` may freeze their rows: on the batch's first write to a
        table, an empty one is truncated in the batch's transaction (``audit.crm_truncate_if_empty``: the rows
        are then written frozen, and without WAL at ``wal_level = minimal``). A table that holds rows, the
        usual night, or that another batch is emptying or writing, is written as before. Only asked when rows
        are about to be written: a batch that writes none to a table neither empties nor locks it."""
        if table not in self._emptied:
            self._emptied[table] = bool(self.conn.execute(
                "select audit.crm_truncate_if_empty(%s::regclass)", [table]).fetchone()[0])
        return self._emptied[table]

    def quarantine(self, rejected: pd.DataFrame) -> int:
        """Keep lines that could not be loaded, with their raw text and the reason."""
        if rejected.empty:
            return 0
        frame = rejected[QUARANTINE_COLUMNS].assign(batch_id=self.batch_id, source=self.report.source)
        n = copy_in(self.conn, "audit.quarantine", frame)
        self.report.rows_quarantined += n
        return n

    def record_truth(self, key: str, value) -> None:
        self.conn.execute(
            "insert into audit.planted_truth (batch_id, key, value) values (%s, %s, %s)",
            [self.batch_id, key, json.dumps(value)],
        )


def load_atomically(
    conn: psycopg.Connection,
    *,
    source: str,
    source_name: str,
    content_sha256: str,
    primary_table: str,
    fill: Callable[[Batch], None],
) -> LoadReport:
    """Run ``fill`` inside one transaction as a new batch; a repeat of the same content is a no-op.

    On any error the transaction is rolled back (no raw row survives), a ``failed`` audit row is written
    in its own transaction, and the error is raised again.
    """
    report = LoadReport(source=source, source_name=source_name, primary_table=primary_table)
    try:
        with conn.transaction():
            row = conn.execute(
                """
                insert into audit.load_batches (source, source_name, content_sha256, status)
                values (%s, %s, %s, 'loaded')
                on conflict (source, content_sha256) where status = 'loaded' do nothing
                returning batch_id
                """,
                [source, source_name, content_sha256],
            ).fetchone()
            if row is None:
                report.already_loaded_as = conn.execute(
                    "select batch_id from audit.load_batches "
                    "where source = %s and content_sha256 = %s and status = 'loaded'",
                    [source, content_sha256],
                ).fetchone()[0]
                return report
            report.batch_id = row[0]
            fill(Batch(conn, report))
            if not report.reconciles:
                raise AssertionError(f"load does not reconcile: {report.summary()}")
            conn.execute(
                """
                update audit.load_batches
                set finished_at = clock_timestamp(), lines_read = %s, rows_loaded = %s,
                    rows_quarantined = %s, rows_by_table = %s
                where batch_id = %s
                """,
                [
                    report.lines_read,
                    report.rows_loaded.get(primary_table, 0),
                    report.rows_quarantined,
                    json.dumps(report.rows_loaded),
                    report.batch_id,
                ],
            )
    except BaseException as err:
        _record_failure(conn, report, content_sha256, err)
        raise
    return report


def _record_failure(conn: psycopg.Connection, report: LoadReport, sha: str, err: BaseException) -> None:
    """Leave a trace of a failed load; never mask the original error."""
    if conn.closed or conn.broken:
        return
    try:
        with conn.transaction():
            conn.execute(
                """
                insert into audit.load_batches
                    (source, source_name, content_sha256, status, finished_at, error)
                values (%s, %s, %s, 'failed', clock_timestamp(), %s)
                """,
                [report.source, report.source_name, sha, f"{type(err).__name__}: {err}"[:2000]],
            )
    except psycopg.Error:
        pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
