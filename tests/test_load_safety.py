"""Loads are safe: idempotent, atomic, bad lines quarantined exactly, and user errors are one clear line."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ml.config import PROJECT_ROOT
from ml.errors import CrmError, WarehouseUnavailable
from ml.ingest.online_retail import load_online_retail
from ml.warehouse import connect, table_counts

UCI_FILE = PROJECT_ROOT.parent / "shared" / "data" / "online_retail.csv.gz"
UCI_HEADER = b"InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
RAW_TABLES = ["raw.customers", "raw.products", "raw.orders", "raw.order_lines"]

GOOD_TAIL = b"6,2010-12-01 08:26:00,2.55,17850,United Kingdom"
# (line, what the quarantine reason must say). Each is broken in exactly one way.
INJECTED = [
    (b"536999,22111,TOO FEW FIELDS,6,2010-12-01 08:26:00,2.55,17850", "wrong number of fields: 7 (expected 8)"),
    (b"536999,22111,TOO,MANY,6,2010-12-01 08:26:00,2.55,17850,United Kingdom",
     "wrong number of fields: 9 (expected 8)"),
    (b"536999,22111,TEXT IN QUANTITY,six,2010-12-01 08:26:00,2.55,17850,United Kingdom",
     "quantity 'six' is not a number"),
    (b"536999,22111,HALF A MUG,1.5,2010-12-01 08:26:00,2.55,17850,United Kingdom",
     "quantity '1.5' is not a whole number"),
    (b"536999,22111,BAD DATE,6,2010-13-45 08:26:00,2.55,17850,United Kingdom",
     "invoice date '2010-13-45 08:26:00' is not a date"),
    (b"536999,22111,BAD PRICE,6,2010-12-01 08:26:00,two pounds,17850,United Kingdom",
     "unit price 'two pounds' is not a number"),
    (b',22111,NO INVOICE,' + GOOD_TAIL, "empty invoice number"),
    (b'536999,,NO STOCK CODE,' + GOOD_TAIL, "empty stock code"),
    (b'536999,22111,"BROKEN QUOTE,' + GOOD_TAIL, "broken quotes"),
    (b'536999,22111,"CLOSED" TOO EARLY,' + GOOD_TAIL, "broken quotes"),
    (b"536999,22111,CAF\xc9 AU LAIT MUG (LATIN-1 BYTE)," + GOOD_TAIL, "invalid UTF-8 bytes"),
]
# Lines that look odd but are valid and must load.
ODD_BUT_GOOD = [
    b'536999,TEST1,12" RULER,' + GOOD_TAIL,  # a quote inside an unquoted field, as spreadsheets write
    b'536999,TEST2,"MUG, ""BEST DAD""",' + GOOD_TAIL,  # quoted field with comma and doubled quotes
    b"536999,TEST3,CAF\xc3\x89 AU LAIT MUG," + GOOD_TAIL,  # real UTF-8: the file is UTF-8
]


def garbage_file(tmp_path: Path, n_lines: int = 2000) -> tuple[Path, dict[int, str], int]:
    """A slice of the real file with bad lines injected at known places.

    Returns (path, {line_no: expected reason}, number of data lines). Every injected bad line is followed
    by a good one, so a bad line that swallowed its neighbour would show up as a missing good line.
    """
    with gzip.open(UCI_FILE, "rb") as handle:
        real = [next(handle).rstrip(b"\n") for _ in range(n_lines + 1)][1:]
    lines = list(real)
    for k, good in enumerate(ODD_BUT_GOOD):
        lines.insert(50 + 7 * k, good)
    expected: dict[int, str] = {}
    for k, (bad, _) in enumerate(INJECTED):
        lines.insert(100 + 150 * k, bad)
    for bad, reason in INJECTED:
        expected[lines.index(bad) + 2] = reason  # header is line 1
    path = tmp_path / "online_retail_garbage.csv"
    path.write_bytes(UCI_HEADER + b"\n" + b"\n".join(lines) + b"\n")
    return path, expected, len(lines)


def raw_counts(settings) -> dict[str, int]:
    with connect(settings) as conn:
        return table_counts(conn)


def test_garbage_lines_are_quarantined_exactly(warehouse, tmp_path):
    path, expected, n_lines = garbage_file(tmp_path)
    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        quarantined = conn.execute(
            "select line_no, raw_text, reason, target_table, source, batch_id from audit.quarantine order by line_no"
        ).fetchall()
        loaded_products = {r[0] for r in conn.execute("select product_id from raw.order_lines")}
        names = {r[0] for r in conn.execute("select product_name from raw.products")}

    assert report.lines_read == n_lines == 2000 + len(ODD_BUT_GOOD) + len(INJECTED)
    assert report.rows_quarantined == len(INJECTED)
    assert report.rows_loaded["raw.order_lines"] == n_lines - len(INJECTED)
    assert report.reconciles and "reconciled" in report.summary()

    assert [q[0] for q in quarantined] == sorted(expected)
    for line_no, _raw_text, reason, target, source, batch_id in quarantined:
        assert expected[line_no] in reason, (line_no, reason)
        assert (target, source, batch_id) == ("raw.order_lines", "online_retail", report.batch_id)
    by_line = {q[0]: q[1] for q in quarantined}
    raw_lines = path.read_bytes().split(b"\n")
    for line_no in expected:
        if b"\xc9" in raw_lines[line_no - 1]:
            assert by_line[line_no] == raw_lines[line_no - 1].decode("utf-8", errors="backslashreplace")
            assert "\\xc9" in by_line[line_no]
        else:
            assert by_line[line_no] == raw_lines[line_no - 1].decode("utf-8")
    assert {"TEST1", "TEST2", "TEST3"} <= loaded_products
    assert {'12" RULER', 'MUG, "BEST DAD"', "CAF\u00c9 AU LAIT MUG"} <= names


def test_second_load_of_the_same_file_adds_nothing(warehouse, tmp_path):
    path, _, _ = garbage_file(tmp_path, n_lines=500)
    with connect(warehouse) as conn:
        first = load_online_retail(conn, path)
        counts = table_counts(conn)
        second = load_online_retail(conn, path)
        assert table_counts(conn) == counts
        n_batches = conn.execute("select count(*) from audit.load_batches").fetchone()[0]
    assert not first.skipped and second.skipped
    assert second.already_loaded_as == first.batch_id and second.rows_loaded == {}
    assert "0 rows added" in second.summary()
    assert n_batches == 1
    assert counts["raw.order_lines"] == first.rows_loaded["raw.order_lines"] > 0


def test_a_load_failing_after_the_first_copies_leaves_no_rows_and_a_failed_batch(warehouse, tmp_path):
    path, _, _ = garbage_file(tmp_path, n_lines=500)
    with connect(warehouse, autocommit=True) as admin:
        # raw.customers is copied last: order lines, quarantine rows, orders and products are already in
        # when PostgreSQL rejects the customer 17850.
        admin.execute("alter table raw.customers add constraint test_no_17850 check (customer_id <> '17850')")
    before = raw_counts(warehouse)

    with connect(warehouse) as conn, pytest.raises(CrmError, match="test_no_17850") as err:
        load_online_retail(conn, path)
    assert "rolled back" in str(err.value)

    after = raw_counts(warehouse)
    assert {t: after[t] for t in RAW_TABLES} == {t: before[t] for t in RAW_TABLES} == dict.fromkeys(RAW_TABLES, 0)
    assert after["audit.quarantine"] == 0
    with connect(warehouse) as conn:
        batches = conn.execute("select status, error, lines_read from audit.load_batches").fetchall()
    assert len(batches) == 1 and batches[0][0] == "failed" and "test_no_17850" in batches[0][1]

    # the failed attempt does not count as loaded: once the cause is gone, the same file loads in full
    with connect(warehouse, autocommit=True) as admin:
        admin.execute("alter table raw.customers drop constraint test_no_17850")
    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
    assert not report.skipped and report.reconciles and report.rows_loaded["raw.customers"] > 0


def test_a_load_whose_connection_dies_half_way_leaves_no_rows(warehouse, tmp_path):
    path, _, n_lines = garbage_file(tmp_path, n_lines=500)
    outcome: dict[str, BaseException] = {}
    written: set[str] = set()
    with connect(warehouse, autocommit=True) as admin, connect(warehouse) as locker, connect(warehouse) as loader:
        pid = loader.info.backend_pid
        # Hold raw.customers so the load stops right before its last COPY, with the others done.
        locker.execute("lock table raw.customers in access exclusive mode")

        def run() -> None:
            try:
                load_online_retail(loader, path)
            except BaseException as exc:  # handed to the test thread below
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while thread.is_alive() and time.monotonic() < deadline:
                state = admin.execute("select wait_event_type from pg_stat_activity where pid = %s", [pid]).fetchone()
                if state == ("Lock",):
                    break
                time.sleep(0.05)
            # What the loader's open transaction has written to so far.
            written = {
                r[0]
                for r in admin.execute(
                    "select c.relnamespace::regnamespace || '.' || c.relname from pg_locks l "
                    "join pg_class c on c.oid = l.relation "
                    "where l.pid = %s and l.granted and l.mode = 'RowExclusiveLock'",
                    [pid],
                )
            }
        finally:
            # Always end the load, or a failed assertion would leave the thread holding the connection.
            admin.execute("select pg_terminate_backend(%s)", [pid])
            locker.rollback()
            thread.join(120)
    assert not thread.is_alive()
    assert {"raw.order_lines", "audit.quarantine", "raw.orders", "raw.products"} <= written, written
    assert isinstance(outcome.get("error"), WarehouseUnavailable), outcome
    assert "nothing from this file was loaded" in str(outcome["error"])

    after = raw_counts(warehouse)
    assert all(after[t] == 0 for t in [*RAW_TABLES, "audit.quarantine", "audit.load_batches"]), after
    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
    assert not report.skipped and report.lines_read == n_lines and report.reconciles


# ---------------------------------------------------------------------------------------------------------
# The `crm` command: one clear line, non-zero exit, warehouse unchanged
# ---------------------------------------------------------------------------------------------------------
def crm(tmp_path: Path, warehouse_url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        WAREHOUSE_URL=warehouse_url,
        CRM_STATE_DIR=str(tmp_path / "state"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    return subprocess.run(
        [str(Path(sys.executable).parent / "crm"), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )


def assert_one_clear_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crm: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_loads_and_reports_reconciled_counts(warehouse, tmp_path):
    path = tmp_path / "cdnow.csv"
    path.write_text("customer_id,date,number_of_cds,dollar_value\n1,19970101,1,11.77\n2,19970112,x,12.0\n")
    done = crm(tmp_path, warehouse.warehouse_url, "ingest", "cdnow", str(path))
    assert done.returncode == 0, done.stderr
    assert "2 lines read = 1 loaded into raw.orders + 1 quarantined (reconciled)" in done.stdout
    again = crm(tmp_path, warehouse.warehouse_url, "ingest", "cdnow", str(path))
    assert again.returncode == 0 and "0 rows added" in again.stdout


@pytest.mark.parametrize(
    ("source", "content", "needles"),
    [
        ("online-retail", None, ["no such file"]),
        ("online-retail", b"order,sku,qty\n1,A,2\n", ["unknown header", "InvoiceNo", "Customer ID"]),
        ("online-retail", gzip.compress(UCI_HEADER + b"\n" * 1000)[:40], ["cannot be decompressed"]),
        ("cdnow", b"cust;date;cds;dollars\n1;19970101;1;11.77\n", ["unknown header", "number_of_cds"]),
    ],
    ids=["missing-file", "unknown-header", "corrupt-gzip", "cdnow-unknown-header"],
)
def test_cli_bad_input_is_one_clear_error_and_changes_nothing(warehouse, tmp_path, source, content, needles):
    path = tmp_path / ("input.csv.gz" if content and content.startswith(b"\x1f\x8b") else "input.csv")
    if content is not None:
        path.write_bytes(content)
    before = raw_counts(warehouse)
    done = crm(tmp_path, warehouse.warehouse_url, "ingest", source, str(path))
    assert_one_clear_error(done, *needles)
    assert raw_counts(warehouse) == before
    assert before["audit.load_batches"] == 0


def test_cli_unreachable_warehouse_is_one_clear_error(tmp_path):
    path = tmp_path / "cdnow.csv"
    path.write_text("customer_id,date,number_of_cds,dollar_value\n1,19970101,1,11.77\n")
    done = crm(tmp_path, "postgresql://postgres@127.0.0.1:1/crm", "ingest", "cdnow", str(path))
    assert_one_clear_error(done, "cannot reach the warehouse", "127.0.0.1:1")


def _filenodes(conn) -> dict[str, int]:
    return {t: conn.execute("select pg_relation_filenode(%s::regclass)", [t]).fetchone()[0] for t in RAW_TABLES}


def test_the_first_load_into_empty_tables_writes_them_anew_and_later_loads_append(warehouse, tmp_path):
    """The first batch into an empty raw table truncates it in its transaction (its rows written frozen,
    without WAL on the embedded server); a batch into tables that hold rows appends and never truncates."""
    first_file, _, _ = garbage_file(tmp_path, n_lines=300)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second_file, _, _ = garbage_file(second_dir, n_lines=600)
    with connect(warehouse) as conn:
        empty = _filenodes(conn)
        first = load_online_retail(conn, first_file)
        after_first = _filenodes(conn)
        # COPY FREEZE marks the pages all-visible and all-frozen: it creates the visibility map fork
        frozen = conn.execute("select pg_relation_size('raw.order_lines', 'vm') > 0").fetchone()[0]
        second = load_online_retail(conn, second_file)
        after_second = _filenodes(conn)
        lines = conn.execute("select _batch_id, count(*) from raw.order_lines group by 1 order by 1").fetchall()
        with conn.transaction():  # a table with rows: refused without a lock, nothing removed
            assert conn.execute("select audit.crm_truncate_if_empty('raw.orders')").fetchone()[0] is False
        with pytest.raises(Exception, match="is not a raw table"), conn.transaction():
            conn.execute("select audit.crm_truncate_if_empty('audit.load_batches')")
        assert conn.execute("select count(*) from audit.load_batches").fetchone()[0] == 2

    assert all(after_first[t] != empty[t] for t in RAW_TABLES), (empty, after_first)
    assert frozen
    assert after_second == after_first
    assert lines == [(first.batch_id, first.rows_loaded["raw.order_lines"]),
                     (second.batch_id, second.rows_loaded["raw.order_lines"])]


def test_two_first_loads_at_once_never_wait_for_each_other(warehouse):
    """One batch at a time truncates (the other appends), and the one that does never waits for the other:
    two first loads each holding a truncated table the other writes next would deadlock."""
    with connect(warehouse) as a, connect(warehouse) as b:
        for conn in (a, b):
            conn.execute("set lock_timeout = '5s'")  # a wait would fail the test, not hang it
        assert a.execute("select audit.crm_truncate_if_empty('raw.products')").fetchone()[0] is True
        # b's first write into another empty table while a holds a truncation: no truncate, no wait
        assert b.execute("select audit.crm_truncate_if_empty('raw.customers')").fetchone()[0] is False
        b.execute("insert into raw.customers (customer_id, _batch_id) values ('from-b', -2)")
        # a then reaches the table b writes (b's row is not committed, so it looks empty): a appends
        assert a.execute("select audit.crm_truncate_if_empty('raw.customers')").fetchone()[0] is False
        a.execute("insert into raw.customers (customer_id, _batch_id) values ('from-a', -1)")
        a.commit()
        b.commit()
        rows = a.execute("select customer_id from raw.customers order by 1").fetchall()
    assert rows == [("from-a",), ("from-b",)]
