"""Online Retail importer: UCI and II variants, CSV / .csv.gz / XLSX, mapped into the raw layer."""

from __future__ import annotations

import gzip
import io
from datetime import datetime

import openpyxl
import pandas as pd
import pytest

from ml.config import PROJECT_ROOT
from ml.errors import InputFileError
from ml.ingest.online_retail import load_online_retail
from ml.warehouse import connect, table_counts

UCI_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
II_HEADER = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country"


@pytest.fixture(scope="module")
def uci_lines() -> list[str]:
    """The data lines of the real UCI file (no header), read once per module."""
    with gzip.open(PROJECT_ROOT.parent / "shared" / "data" / "online_retail.csv.gz", "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == UCI_HEADER
    return lines[1:]


def first_invoices(lines: list[str], n: int) -> list[str]:
    """The lines of the first ``n`` invoices (the file is grouped by invoice)."""
    seen: set[str] = set()
    out = []
    for line in lines:
        invoice = line.split(",", 1)[0]
        if invoice not in seen:
            if len(seen) == n:
                break
            seen.add(invoice)
        out.append(line)
    return out


def fetch(conn, table: str) -> pd.DataFrame:
    """A raw table with its SQL types kept (text ids stay text), for small test tables."""
    cur = conn.execute(f"select * from {table}")
    return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


def expected_from(csv_text: str) -> pd.DataFrame:
    """An independent reading of a slice with pandas' C parser, to compare the warehouse against."""
    return pd.read_csv(io.StringIO(csv_text), dtype=str, keep_default_na=False)


def test_uci_slice_maps_every_line_invoice_product_and_customer(warehouse, uci_lines, tmp_path):
    body = first_invoices(uci_lines, 300)
    text = UCI_HEADER + "\n" + "\n".join(body) + "\n"
    path = tmp_path / "slice.csv"
    path.write_text(text, encoding="utf-8")
    expected = expected_from(text)

    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        lines = fetch(conn, "raw.order_lines")
        orders = fetch(conn, "raw.orders")
        products = fetch(conn, "raw.products")
        customers = fetch(conn, "raw.customers")
        batch = conn.execute("select status, lines_read, rows_loaded, rows_quarantined from audit.load_batches").fetchall()

    assert report.lines_read == len(body) == len(expected)
    assert report.rows_quarantined == 0 and report.reconciles
    assert batch == [("loaded", len(body), len(body), 0)]
    assert len(lines) == len(body)
    assert len(orders) == expected["InvoiceNo"].nunique() == 300
    assert len(products) == expected["StockCode"].nunique()
    assert len(customers) == expected.loc[expected["CustomerID"] != "", "CustomerID"].nunique()
    assert set(lines["_batch_id"]) == {report.batch_id}

    # line_no numbers the lines of an invoice 1..k in file order
    sizes = expected.groupby("InvoiceNo").size()
    lines = lines.sort_values(["order_id", "line_no"])
    assert lines.groupby("order_id")["line_no"].max().sort_index().tolist() == sizes.sort_index().tolist()
    assert (lines.groupby("order_id")["line_no"].min() == 1).all()

    # totals survive the trip exactly (numeric(14,4) holds every price of the file)
    exp_qty = pd.to_numeric(expected["Quantity"])
    exp_amount = (exp_qty * pd.to_numeric(expected["UnitPrice"])).sum()
    assert lines["quantity"].sum() == exp_qty.sum()
    assert (lines["quantity"] * lines["unit_price"].astype(float)).sum() == pytest.approx(exp_amount, abs=1e-6)
    assert lines["discount"].eq(0).all()

    first = lines[(lines["order_id"] == "536365") & (lines["line_no"] == 1)].iloc[0]
    assert (first["product_id"], first["quantity"], float(first["unit_price"])) == ("85123A", 6, 2.55)

    o = orders.set_index("order_id")
    assert o.loc["536365", "customer_id"] == "17850"
    assert o.loc["536365", "ordered_at"] == datetime(2010, 12, 1, 8, 26)
    cancelled = {i for i in expected["InvoiceNo"] if i.startswith("C")}
    assert cancelled, "the slice should hold cancellations"
    assert set(o.index[o["status"] == "cancelled"]) == cancelled
    assert set(o["status"]) == {"cancelled", "completed"}
    assert set(o["channel"]) == {"online"}
    no_customer = set(expected.loc[expected["CustomerID"] == "", "InvoiceNo"])
    assert o.loc[sorted(no_customer), "customer_id"].isna().all()

    p = products.set_index("product_id")
    assert p.loc["85123A", "product_name"] == "WHITE HANGING HEART T-LIGHT HOLDER"
    prices = pd.to_numeric(expected.loc[expected["StockCode"] == "85123A", "UnitPrice"])
    assert float(p.loc["85123A", "list_price"]) == pytest.approx(prices[prices > 0].median())
    assert p[["category", "subcategory", "brand"]].isna().all().all()

    c = customers.set_index("customer_id")
    assert c.loc["17850", "country"] == "United Kingdom"
    assert not c.index.str.endswith(".0").any()


@pytest.mark.slow
def test_full_uci_file_loads_reconciled_and_a_second_load_adds_nothing(warehouse, shared_data):
    path = shared_data / "online_retail.csv.gz"
    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        counts = table_counts(conn)
        again = load_online_retail(conn, path)
        counts_again = table_counts(conn)
        n_countries = conn.execute("select count(distinct country) from raw.customers").fetchone()[0]

    assert report.lines_read == 541_909
    assert report.rows_loaded["raw.order_lines"] + report.rows_quarantined == 541_909
    assert report.rows_quarantined == 0
    assert counts["raw.order_lines"] == 541_909
    assert counts["raw.orders"] == 25_900
    assert counts["raw.customers"] == 4_372
    assert counts["raw.products"] == 4_070
    assert n_countries <= 38  # one (most frequent) country per customer, from 38 in the file
    assert "reconciled" in report.summary() and "541,909 lines read" in report.summary()

    assert again.skipped and again.already_loaded_as == report.batch_id
    assert counts_again == counts


def test_online_retail_ii_csv_header_loads(warehouse, uci_lines, tmp_path):
    body = first_invoices(uci_lines, 100)
    # Online Retail II's CSV export writes customer ids as floats: 17850.0
    body_ii = [line.replace(",17850,", ",17850.0,") for line in body]
    path = tmp_path / "online_retail_II.csv"
    path.write_text(II_HEADER + "\n" + "\n".join(body_ii) + "\n", encoding="utf-8")

    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        customers = fetch(conn, "raw.customers")["customer_id"]
        orders = conn.execute("select count(*) from raw.orders").fetchone()[0]

    assert report.lines_read == len(body) and report.reconciles and report.rows_quarantined == 0
    assert report.rows_loaded["raw.order_lines"] == len(body)
    assert orders == 100
    assert "17850" in set(customers) and not customers.str.contains(r"\.").any()


def test_online_retail_ii_xlsx_loads_every_sheet(warehouse, uci_lines, tmp_path):
    frame = expected_from(UCI_HEADER + "\n" + "\n".join(first_invoices(uci_lines, 60)) + "\n")
    half = len(frame) // 2
    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    for title, part in [("Year 2009-2010", frame.iloc[:half]), ("Year 2010-2011", frame.iloc[half:])]:
        sheet = workbook.create_sheet(title)
        sheet.append(II_HEADER.split(","))
        for row in part.itertuples(index=False):  # building the test workbook, not loading it
            sheet.append(
                [
                    row.InvoiceNo if row.InvoiceNo.startswith("C") else int(row.InvoiceNo),
                    row.StockCode,
                    row.Description or None,
                    int(row.Quantity),
                    datetime.fromisoformat(row.InvoiceDate),
                    float(row.UnitPrice),
                    float(row.CustomerID) if row.CustomerID else None,
                    row.Country,
                ]
            )
    path = tmp_path / "online_retail_II.xlsx"
    workbook.save(path)

    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        lines = fetch(conn, "raw.order_lines")
        orders = fetch(conn, "raw.orders").set_index("order_id")
        customers = fetch(conn, "raw.customers")["customer_id"]

    assert report.lines_read == len(frame) and report.reconciles and report.rows_quarantined == 0
    assert len(lines) == len(frame)
    assert len(orders) == frame["InvoiceNo"].nunique()
    assert lines["quantity"].sum() == pd.to_numeric(frame["Quantity"]).sum()
    assert orders.loc["536365", "ordered_at"] == datetime(2010, 12, 1, 8, 26)
    assert "17850" in set(customers) and not customers.str.endswith(".0").any()
    # the invoice split across the two sheets keeps numbering its lines in workbook order
    split_invoice = frame["InvoiceNo"].iloc[half]
    numbers = sorted(lines.loc[lines["order_id"] == split_invoice, "line_no"])
    assert numbers == list(range(1, (frame["InvoiceNo"] == split_invoice).sum() + 1))


def test_legacy_latin1_file_with_us_dates_decodes(warehouse, tmp_path):
    # UCI's own CSV export: cp1252 bytes for the pound sign, month-first dates without zero padding.
    text = (
        UCI_HEADER + "\r\n"
        "539492,gift_0001_40,Dotcomgiftshop Gift Voucher \u00a340.00,1,12/20/2010 10:14,34.04,,United Kingdom\r\n"
        "539493,22086,PAPER CHAIN KIT 50'S CHRISTMAS ,2,1/5/2011 9:05,2.95,14911,EIRE\r\n"
    )
    path = tmp_path / "latin1.csv"
    path.write_bytes(text.encode("cp1252"))

    with connect(warehouse) as conn:
        report = load_online_retail(conn, path)
        names = dict(conn.execute("select product_id, product_name from raw.products").fetchall())
        dates = dict(conn.execute("select order_id, ordered_at from raw.orders").fetchall())

    assert report.lines_read == 2 and report.rows_quarantined == 0
    assert names["gift_0001_40"] == "Dotcomgiftshop Gift Voucher \u00a340.00"
    assert dates == {"539492": datetime(2010, 12, 20, 10, 14), "539493": datetime(2011, 1, 5, 9, 5)}


def test_unknown_header_is_refused_before_touching_the_warehouse(warehouse, tmp_path):
    path = tmp_path / "orders.csv"
    path.write_text("order,sku,qty\n1,A,2\n", encoding="utf-8")
    with connect(warehouse) as conn:
        before = table_counts(conn)
        with pytest.raises(InputFileError, match="InvoiceNo,StockCode,Description") as err:
            load_online_retail(conn, path)
        assert "Customer ID" in str(err.value)
        assert table_counts(conn) == before


# ---------------------------------------------------------------------------------------------------------
# The shared parsing rules, without a database
# ---------------------------------------------------------------------------------------------------------
def test_decode_lines_numbers_file_lines_and_skips_blank_ones():
    from ml.ingest.parsing import decode_lines

    lines = decode_lines(b"\xef\xbb\xbfa,b\r\n1,2\r\n\r\n   \n3,4\n")
    assert lines.header == "a,b" and lines.encoding == "utf-8"
    assert lines.data["line_no"].tolist() == [2, 5] and lines.data["text"].tolist() == ["1,2", "3,4"]
    assert lines.lines_read == 2

    legacy = decode_lines("h\n\u00a340 caf\u00e9\n".encode("cp1252") + b"\x81 undefined in cp1252\n")
    assert legacy.encoding == "latin-1" and legacy.rejected.empty
    assert legacy.data["text"].tolist() == ["\u00a340 caf\u00e9", "\x81 undefined in cp1252"]


def test_slash_dates_are_read_day_first_only_when_the_file_proves_it():
    from ml.ingest.parsing import Problems, parse_timestamp

    us = pd.Series(["12/1/2010 8:26", "1/12/2011 17:05", "12/13/2011 9:00:30"], dtype="str")
    eu = pd.Series(["01/12/2010 08:26", "13/01/2011 17:05", "nonsense"], dtype="str")
    problems = Problems(3)
    assert parse_timestamp(us, "d", problems).tolist() == [
        pd.Timestamp("2010-12-01 08:26"), pd.Timestamp("2011-01-12 17:05"), pd.Timestamp("2011-12-13 09:00:30")
    ]
    assert not problems.bad.any()
    problems = Problems(3)
    parsed = parse_timestamp(eu, "d", problems)
    assert parsed.tolist()[:2] == [pd.Timestamp("2010-12-01 08:26"), pd.Timestamp("2011-01-13 17:05")]
    assert problems.reasons().tolist() == ["", "", "d 'nonsense' is not a date"]
