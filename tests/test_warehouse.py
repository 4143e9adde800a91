"""The warehouse layer: schemas exist, COPY round-trips values exactly, errors are one clear line."""

from datetime import date, datetime

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ml.config import Settings
from ml.errors import WarehouseUnavailable
from ml.warehouse import (
    binary_copy_chunks,
    connect,
    copy_in,
    copy_out,
    init_schemas,
    read_frame,
    read_table,
    table_column_types,
    table_counts,
)


def test_schemas_and_raw_tables_exist(warehouse):
    with connect(warehouse) as conn:
        schemas = {r[0] for r in conn.execute("select schema_name from information_schema.schemata")}
        counts = table_counts(conn)
    assert {"raw", "staging", "marts", "ml", "audit"} <= schemas
    for table in ["raw.customers", "raw.products", "raw.orders", "raw.order_lines", "raw.web_events"]:
        assert counts[table] == 0


def test_a_raw_table_finds_a_new_delivery_by_load_time_without_reading_older_ones(warehouse):
    """init_schemas adds the load-time BRIN indexes to a warehouse made before them (an upgrade), and a night's
    look-up of the rows loaded since its watermark then reads the new delivery's blocks, not the table."""
    def events(n: int, loaded_at: str) -> pd.DataFrame:
        return pd.DataFrame({"customer_id": [f"c{i}" for i in range(n)], "session_id": "s", "event_type": "view",
                             "product_id": "P1", "event_at": pd.Timestamp("2024-01-01"), "_batch_id": 1,
                             "_loaded_at": pd.Timestamp(loaded_at)})

    with connect(warehouse) as conn:
        conn.execute("drop index raw.web_events_loaded_at_brin")
        copy_in(conn, "raw.web_events", events(100_000, "2024-01-01 00:00+00"))
        conn.commit()
        init_schemas(conn)
        copy_in(conn, "raw.web_events", events(100, "2024-01-02 00:00+00"))
        conn.commit()
        blocks = conn.execute("select pg_relation_size('raw.web_events') / current_setting('block_size')::int").fetchone()[0]
        conn.execute("set enable_seqscan = off")  # the plan a large table gets; a small one is scanned whole anyway
        plan = conn.execute("explain (analyze, format json) select count(*) from raw.web_events "
                            "where _loaded_at > '2024-01-01 12:00+00'").fetchone()[0][0]["Plan"]
    scan = plan["Plans"][0]
    assert scan["Node Type"] == "Bitmap Heap Scan" and scan["Plans"][0]["Index Name"] == "web_events_loaded_at_brin"
    assert scan["Actual Rows"] == 100
    read = scan.get("Exact Heap Blocks", 0) + scan.get("Lossy Heap Blocks", 0)
    # BRIN reads whole block ranges (128 blocks): the newest one, not the ~8 ranges of the older delivery
    assert blocks > 800 and read < blocks / 4, (read, blocks)


def test_copy_round_trip_keeps_nulls_quotes_and_newlines(warehouse):
    frame = pd.DataFrame(
        {
            "product_id": ["A1", "B,2", 'C"3', None],
            "product_name": ["plain", "line\nbreak", "", "emoji ☃"],
            "list_price": [1.5, 0.0, -2.25, None],
            "_batch_id": [1, 1, 1, 1],
        }
    )
    with connect(warehouse) as conn:
        assert copy_in(conn, "raw.products", frame) == 4
        back = read_table(conn, "raw.products").sort_values("list_price", na_position="last")
    assert back["product_id"].tolist()[:3] == ["C\"3", "B,2", "A1"]
    assert back["product_name"].tolist() == ["", "line\nbreak", "plain", "emoji ☃"]
    assert back["product_id"].isna().sum() == 1


def test_read_frame_converts_as_arrow_does_while_freeing_the_table(warehouse):
    # read_frame frees each Arrow column as it converts it (self_destruct, one block per column): the frame
    # must still be value for value and type for type what a plain conversion gives
    query = ("select g as n, g * 0.5 as x, 'c' || g as label, g % 3 = 0 as flag, "
             "case when g % 4 = 0 then null else date '2024-01-01' + g end as day, "
             "case when g % 5 = 0 then null else g end as maybe "
             "from generate_series(1, 2000) as g order by g")
    with connect(warehouse) as conn:
        plain = copy_out(conn, query).to_pandas()
        frame = read_frame(conn, query)
    pd.testing.assert_frame_equal(frame, plain)
    assert frame["flag"].dtype == bool and frame["day"].isna().sum() == 500


def test_copy_out_reads_every_row_and_reports_an_error_raised_midway(warehouse):
    """copy_out drains the rows itself: a large result arrives whole and in order, an error the server raises
    after sending rows is the server's error, and the connection is usable after the rollback."""
    with connect(warehouse) as conn:
        big = copy_out(conn, "select g, repeat('x', g % 50) as pad from generate_series(1, 300000) as g order by g")
        assert big.num_rows == 300_000 and big.column("g").to_pylist() == list(range(1, 300_001))
        assert big.column("pad").to_pylist()[-1] == "x" * (300_000 % 50)
        with pytest.raises(psycopg.errors.DivisionByZero):
            copy_out(conn, "select 1 / (200000 - g) as x from generate_series(1, 300000) as g")
        conn.rollback()
        assert copy_out(conn, "select 2 as two").column("two").to_pylist() == [2]
        assert conn.execute("select 3").fetchone() == (3,)


def _web_events(customer_ids, sessions, kinds, products, times) -> pa.Table:
    return pa.table({
        "customer_id": pa.array(customer_ids, pa.string()),
        "session_id": pa.array(sessions, pa.string()),
        "event_type": pa.array(kinds, pa.string()),
        # As the generator builds it: null slots keep a full-width value (Arrow allows both forms).
        "product_id": pc.if_else(pa.array([p is not None for p in products]),
                                 pa.array([p or "P99999" for p in products], pa.string()),
                                 pa.scalar(None, pa.string())),
        "event_at": pa.array(times, pa.timestamp("s")),
        "_batch_id": pa.array([7] * len(customer_ids), pa.int64()),
    })


def test_binary_copy_loads_the_same_rows_as_csv(warehouse):
    """Binary COPY (the generator's web events and orders) stores exactly what CSV stores: nulls, empty and
    multi-byte text, vocabulary and fixed-width ids, timestamps before 1970 / 2000 and after, a sliced frame."""
    times = [datetime(2025, 12, 31, 23, 59, 59), datetime(1999, 12, 31, 23, 0, 1), None, datetime(1969, 7, 20, 20, 17),
             datetime(2000, 1, 1), datetime(2024, 2, 29, 12, 30)]
    frame = _web_events(
        ["C0000001", "C0000002", None, "C0000004", "C0000005", "C0000006"],
        ["S1", "S22", "S333", "", "S☃", None],  # variable width, empty, multi-byte, null: a vocabulary
        ["view", "cart", "search", "view", "search", None],
        ["P00001", None, "P00003", "P00004", None, "P00006"],
        times,
    )
    frame = pa.concat_tables([frame.slice(0, 2), frame.slice(2)])  # two chunks, the second with an offset
    types = ["text", "text", "text", "text", "timestamp without time zone", "bigint"]
    assert binary_copy_chunks(frame, types) is not None  # the binary path is really taken
    assert frame.column("product_id").combine_chunks().buffers()[2].size == 6 * 6  # full-width null slots
    with connect(warehouse) as conn:
        conn.execute("create table raw.web_events_csv (like raw.web_events including defaults)")
        assert copy_in(conn, "raw.web_events", frame, binary=True) == 6
        assert copy_in(conn, "raw.web_events_csv", frame) == 6
        columns = "customer_id, session_id, event_type, product_id, event_at, _batch_id"
        binary = conn.execute(f"select {columns} from raw.web_events order by event_at nulls first").fetchall()
        csv = conn.execute(f"select {columns} from raw.web_events_csv order by event_at nulls first").fetchall()
    assert binary == csv
    assert binary[0] == (None, "S333", "search", "P00003", None, 7)
    assert ("C0000006", None, None, "P00006", datetime(2024, 2, 29, 12, 30), 7) in binary
    assert ("C0000004", "", "view", "P00004", datetime(1969, 7, 20, 20, 17), 7) in binary

    typed = pa.table({  # the planted-truth kinds: doubles (bit-exact), booleans, dates, small integers
        "f": pa.array([0.1, -1e-300, 1.7976931348623157e308, None, 2.5e-7], pa.float64()),
        "b": pa.array([True, False, None, True, False]),
        "d": pa.array([date(1900, 1, 1), date(1999, 12, 31), date(2000, 1, 1), None, date(2031, 5, 17)]),
        "i": pa.array([1, -2, None, 2**31 - 1, -(2**31)], pa.int32()),
    })
    assert binary_copy_chunks(typed, ["double precision", "boolean", "date", "integer"]) is not None
    with connect(warehouse) as conn:
        conn.execute("create table raw.typed_bin (f double precision, b boolean, d date, i integer)")
        conn.execute("create table raw.typed_csv (like raw.typed_bin)")
        copy_in(conn, "raw.typed_bin", typed, binary=True)
        copy_in(conn, "raw.typed_csv", typed)
        query = "select f, b, d, i from raw.{} order by i nulls last"
        assert conn.execute(query.format("typed_bin")).fetchall() == conn.execute(query.format("typed_csv")).fetchall()
        assert conn.execute("select count(*) from raw.typed_bin where f = 0.1 and b and d = '1900-01-01'").fetchone() == (1,)


def test_binary_numeric_stores_what_csv_stores(warehouse):
    """Doubles into numeric(p,s) columns (the order lines' prices and discounts) go binary when each is exactly
    a decimal of at most s places, and the server stores the same values with the same scale as from CSV."""
    rng = np.random.default_rng(7)
    prices = np.round(rng.lognormal(2, 3, 5_000) * rng.choice([-1, 1], 5_000), 2)
    prices[:8] = [0.0, -0.0, 0.01, -0.01, 9_999_999_999.99, 1e-4, 1234.5678, 100.0]
    discounts = rng.choice([0.0, 0.05, 0.1, 0.15, 0.25, 0.3333, 0.9999], 5_000)
    lines = pa.table({
        "order_id": pa.array([f"O{i:07d}" for i in range(5_000)]),
        "line_no": pa.array(np.arange(5_000) % 7 + 1, pa.int32()),
        "unit_price": pa.array(prices, pa.float64(), mask=np.arange(5_000) % 97 == 3),  # some nulls
        "discount": pa.array(discounts, pa.float64()),
        "_batch_id": pa.array(np.ones(5_000, np.int64)),
    })
    with connect(warehouse) as conn:
        conn.execute("create table raw.lines_csv (like raw.order_lines including defaults)")
        types = table_column_types(conn, "raw.order_lines")
        assert types["unit_price"] == "numeric(14,4)"
        assert binary_copy_chunks(lines, [types[c] for c in lines.column_names]) is not None
        assert copy_in(conn, "raw.order_lines", lines, binary=True) == 5_000
        assert copy_in(conn, "raw.lines_csv", lines) == 5_000
        query = "select order_id, unit_price::text, discount::text from raw.{} order by order_id"
        binary = conn.execute(query.format("order_lines")).fetchall()
        assert binary == conn.execute(query.format("lines_csv")).fetchall()
        assert [row[1] for row in binary[:8]] == ["0.0000", "0.0000", "0.0100", None, "9999999999.9900",
                                                  "0.0001", "1234.5678", "100.0000"]

        # No exact form: more decimals than the column keeps, NaN, wider than the column. CSV takes them,
        # so the server rounds or refuses them as it always does.
        for value, pg_type in [(0.12345, "numeric(14,4)"), (float("nan"), "numeric(14,4)"), (100.0, "numeric(6,4)")]:
            assert binary_copy_chunks(pa.table({"x": pa.array([value])}), [pg_type]) is None
        conn.execute("create table raw.narrow (x numeric(6,4))")
        copy_in(conn, "raw.narrow", pa.table({"x": pa.array([0.12345])}), binary=True)
        assert conn.execute("select x::text from raw.narrow").fetchall() == [("0.1235",)]
        with pytest.raises(Exception, match="numeric field overflow"):
            copy_in(conn, "raw.narrow", pa.table({"x": pa.array([100.0])}), binary=True)


def test_binary_copy_falls_back_to_csv_where_it_has_no_exact_form(warehouse):
    """Free text (too many layouts), numeric columns and integers wider than their column go as CSV, so
    the server still checks them (an out-of-range quantity is an error, not a wrapped number)."""
    many = pa.table({"email": [f"user{'x' * i}@example.com" for i in range(300)]})
    assert binary_copy_chunks(many, ["text"]) is None
    assert binary_copy_chunks(pa.table({"p": pa.array([1.5])}), ["numeric"]) is None
    assert binary_copy_chunks(pa.table({"q": pa.array([1], pa.int64())}), ["integer"]) is None
    lines = pa.table({
        "order_id": ["O1", "O2"], "line_no": pa.array([1, 2], pa.int32()), "product_id": ["P1", "P2"],
        "quantity": pa.array([3, 2**40], pa.int64()), "unit_price": [1.25, 2.5], "discount": [0.0, 0.1],
        "_batch_id": pa.array([1, 1], pa.int64()),
    })
    with connect(warehouse) as conn:
        with pytest.raises(Exception, match="out of range for type integer"):
            copy_in(conn, "raw.order_lines", lines, binary=True)
        conn.rollback()
        assert copy_in(conn, "raw.order_lines", lines.slice(0, 1), binary=True) == 1
        assert conn.execute("select quantity, unit_price from raw.order_lines").fetchall() == [(3, 1.25)]


def test_unreachable_warehouse_is_one_clear_error(tmp_path):
    settings = Settings.from_env({"WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
                                  "CRM_STATE_DIR": str(tmp_path)})
    with pytest.raises(WarehouseUnavailable, match="cannot reach the warehouse at postgresql://nobody@127.0.0.1:1"):
        connect(settings)
