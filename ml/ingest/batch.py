"""Atomic, idempotent load batches into the raw layer, with quarantine and reconciled counts.

A batch is one transaction: its audit row, every raw row and every quarantined line commit together or
not at all. Loading the same content twice (same source, same SHA-256) adds nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa

from ml.warehouse import copy_in

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


class Batch:
    """Handed to a loader's fill function: the only way it writes to the warehouse."""

    def __init__(self, conn: psycopg.Connection, report: LoadReport):
        self.conn = conn
        self.report = report

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
        n = copy_in(self.conn, table, frame, binary=binary)
        self.report.rows_loaded[table] = self.report.rows_loaded.get(table, 0) + n
        return n

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
