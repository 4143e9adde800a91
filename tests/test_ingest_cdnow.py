"""CDNOW importer: one order and one order line per transaction, customers, the CD product."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pandas as pd
import pytest

from ml.errors import InputFileError
from ml.ingest.cdnow import load_cdnow
from ml.warehouse import connect, table_counts

HEADER = "customer_id,date,number_of_cds,dollar_value"


def fetch(conn, query: str) -> pd.DataFrame:
    cur = conn.execute(query)
    return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


@pytest.mark.slow
def test_full_cdnow_file_loads_and_a_second_load_adds_nothing(warehouse, shared_data):
    path = shared_data / "cdnow_master.csv"
    source = pd.read_csv(path)
    with connect(warehouse) as conn:
        report = load_cdnow(conn, path)
        counts = table_counts(conn)
        n_orders, n_unique, n_customers = conn.execute(
            "select count(*), count(distinct order_id), count(distinct customer_id) from raw.orders"
        ).fetchone()
        total_cds, total_dollars = conn.execute(
            "select sum(quantity), sum(quantity * unit_price) from raw.order_lines"
        ).fetchone()
        product = conn.execute("select product_id, category, list_price from raw.products").fetchall()
        again = load_cdnow(conn, path)
        counts_again = table_counts(conn)

    assert report.lines_read == 69_659 and report.rows_quarantined == 0 and report.reconciles
    assert counts["raw.orders"] == counts["raw.order_lines"] == 69_659
    assert n_orders == n_unique == 69_659
    assert counts["raw.customers"] == n_customers == 23_570
    assert total_cds == source["number_of_cds"].sum()
    # unit prices are dollars per CD to 4 decimals: the dollars come back to within 0.0002 per CD
    assert abs(float(total_dollars) - source["dollar_value"].sum()) < 0.0002 * total_cds
    assert [(p[0], p[1]) for p in product] == [("CD", "Music")] and product[0][2] > 0
    assert again.skipped and counts_again == counts


def test_same_day_purchases_get_numbered_order_ids(warehouse, tmp_path):
    path = tmp_path / "cdnow.csv"
    path.write_text(
        HEADER + "\n1,19970101,1,11.77\n2,19970112,1,12.0\n2,19970112,5,77.0\n3,19970102,2,20.76\n"
        "3,19970330,2,20.76\n4,19970101,0,9.99\n",
        encoding="utf-8",
    )
    with connect(warehouse) as conn:
        report = load_cdnow(conn, path)
        rows = fetch(
            conn,
            "select o.order_id, o.customer_id, o.ordered_at, o.status, o.channel, l.line_no, l.product_id, "
            "l.quantity, l.unit_price, l.discount from raw.orders o join raw.order_lines l using (order_id) "
            "order by o.order_id",
        ).set_index("order_id")
        customers = sorted(r[0] for r in conn.execute("select customer_id from raw.customers"))

    assert report.lines_read == 6 and report.rows_loaded == {
        "raw.orders": 6, "raw.order_lines": 6, "raw.products": 1, "raw.customers": 4
    }
    assert list(rows.index) == [
        "1-19970101-1", "2-19970112-1", "2-19970112-2", "3-19970102-1", "3-19970330-1", "4-19970101-1"
    ]
    assert rows.loc["2-19970112-2", ["quantity", "unit_price"]].tolist() == [5, Decimal("15.4000")]
    assert rows.loc["3-19970102-1", "unit_price"] == Decimal("10.3800")
    # a line of 0 CDs keeps its dollars as the unit price
    assert rows.loc["4-19970101-1", ["quantity", "unit_price"]].tolist() == [0, Decimal("9.9900")]
    assert rows.loc["2-19970112-1", "ordered_at"] == datetime(1997, 1, 12)
    assert set(rows["status"]) == {"completed"} and rows["channel"].isna().all()
    assert set(rows["product_id"]) == {"CD"} and set(rows["line_no"]) == {1} and set(rows["discount"]) == {0}
    assert customers == ["1", "2", "3", "4"]


def test_original_whitespace_release_loads_with_the_same_ids(warehouse, tmp_path):
    path = tmp_path / "CDNOW_master.txt"
    path.write_text(
        "00001 19970101  1  11.77\n00002 19970112  1  12.00\n00002 19970112  5  77.00\n00003 1997x102  2  20.76\n",
        encoding="ascii",
    )
    with connect(warehouse) as conn:
        report = load_cdnow(conn, path)
        ids = [r[0] for r in conn.execute("select order_id from raw.orders order by order_id")]
        quarantined = conn.execute("select line_no, raw_text, reason from audit.quarantine").fetchall()

    assert report.lines_read == 4 and report.rows_quarantined == 1 and report.reconciles
    assert ids == ["1-19970101-1", "2-19970112-1", "2-19970112-2"]
    assert quarantined == [(4, "00003 1997x102  2  20.76", "date '1997x102' is not a date")]


def test_bad_cdnow_lines_are_quarantined_with_reasons(warehouse, tmp_path):
    path = tmp_path / "cdnow.csv"
    path.write_text(
        HEADER + "\n1,19970101,1,11.77\n2,19971340,1,12.0\n3,19970102,two,20.76\n4,19970102,1\n"
        ",19970103,1,5.00\n5,19970104,1,1e12\n6,19970105,1,8.50\n",
        encoding="utf-8",
    )
    with connect(warehouse) as conn:
        report = load_cdnow(conn, path)
        quarantined = conn.execute(
            "select line_no, reason, target_table, source from audit.quarantine order by line_no"
        ).fetchall()

    assert report.lines_read == 7 and report.rows_loaded["raw.orders"] == 2 and report.rows_quarantined == 5
    assert [q[0] for q in quarantined] == [3, 4, 5, 6, 7]
    reasons = {q[0]: q[1] for q in quarantined}
    assert reasons[3] == "date '19971340' is not a date"
    assert reasons[4] == "number of CDs 'two' is not a number"
    assert reasons[5] == "wrong number of fields: 3 (expected 4)"
    assert reasons[6] == "empty customer id"
    assert reasons[7] == "dollar value '1e12' is out of range"
    assert {(q[2], q[3]) for q in quarantined} == {("raw.orders", "cdnow")}


def test_unknown_cdnow_header_is_refused(warehouse, tmp_path):
    path = tmp_path / "cdnow.csv"
    path.write_text("cust,when,cds,dollars\n1,19970101,1,11.77\n", encoding="utf-8")
    with connect(warehouse) as conn:
        before = table_counts(conn)
        with pytest.raises(InputFileError, match="customer_id,date,number_of_cds,dollar_value"):
            load_cdnow(conn, path)
        assert table_counts(conn) == before
