"""Importer for the Online Retail files of a UK gift retailer, into the raw layer.

Accepts the UCI "Online Retail" release (``InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,
CustomerID,Country``) and "Online Retail II" (``Invoice,StockCode,Description,Quantity,InvoiceDate,Price,
Customer ID,Country``), as CSV, gzipped CSV or XLSX (every sheet of a workbook is loaded: II ships as two
sheets). Column order does not matter and extra columns are ignored; the variant is told by the header.

Mapping (one batch, primary table ``raw.order_lines``):

- every file line -> one ``raw.order_lines`` row: order_id = invoice, line_no = position of the line within
  its invoice in file order, product_id = stock code, quantity, unit_price, discount 0;
- every invoice -> one ``raw.orders`` row: customer (nullable), ordered_at, status ``cancelled`` for
  invoices starting with ``C`` else ``completed``, channel ``online``;
- every stock code -> one ``raw.products`` row: name = most frequent description, list_price = median
  positive unit price, sku = the stock code; category, subcategory and brand are unknown (null);
- every customer id -> one ``raw.customers`` row: id as text without a spreadsheet's ``.0``, country = most
  frequent; the other columns are unknown (null).

Nothing semantic is cleaned here (cancellations, non-product codes like ``POST``, zero prices, duplicate
lines, the invoices Online Retail II repeats in both sheets): that is dbt staging's job. Lines that do not
parse go to ``audit.quarantine`` with their line number, raw text and reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

from ml.errors import InputFileError
from ml.ingest.batch import LoadReport
from ml.ingest.parsing import (
    ZIP_MAGIC,
    PreparedLoad,
    Problems,
    decode_lines,
    empty_rejected,
    load_prepared,
    most_frequent,
    normalise_name,
    nullable_text,
    parse_header,
    parse_integer,
    parse_money,
    parse_timestamp,
    read_input_bytes,
    split_fields,
)

SOURCE = "online_retail"
PRIMARY_TABLE = "raw.order_lines"

UCI_COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")
II_COLUMNS = ("Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country")
FIELDS = ("invoice", "stock_code", "description", "quantity", "invoice_date", "unit_price", "customer_id", "country")

# Accepted header names per field, after normalise_name (case, spaces and underscores ignored).
_SYNONYMS = {
    "invoice": {"invoiceno", "invoice"},
    "stock_code": {"stockcode"},
    "description": {"description"},
    "quantity": {"quantity"},
    "invoice_date": {"invoicedate"},
    "unit_price": {"unitprice", "price"},
    "customer_id": {"customerid"},
    "country": {"country"},
}


def load_online_retail(conn: psycopg.Connection, path: Path) -> LoadReport:
    """Load an Online Retail (UCI or II) CSV, .csv.gz or XLSX file as one atomic, idempotent batch."""
    return load_prepared(conn, Path(path), source=SOURCE, primary_table=PRIMARY_TABLE, prepare=prepare_online_retail)


def prepare_online_retail(path: Path) -> PreparedLoad:
    """Read and parse a file into the raw tables without touching the warehouse."""
    data = read_input_bytes(path)
    if data.startswith(ZIP_MAGIC):
        fields, rejected, lines_read, variant = _read_xlsx(path)
    else:
        fields, rejected, lines_read, variant = _read_csv(path, data)
    prepared = build_tables(fields, rejected, lines_read)
    prepared.notes["variant"] = variant
    return prepared


# ---------------------------------------------------------------------------------------------------------
# Reading: every input format ends as string fields + line_no + raw_text
# ---------------------------------------------------------------------------------------------------------
def match_header(names: list[str], where: Path | str) -> tuple[list[int], str]:
    """Positions of our fields in the file's header, and the variant. Unknown header -> InputFileError."""
    normalised = [normalise_name(n) for n in names]
    positions = []
    for name in FIELDS:
        found = [i for i, n in enumerate(normalised) if n in _SYNONYMS[name]]
        if not found:
            raise InputFileError(
                f"{where}: unknown header {','.join(names)[:200]!r}: expected the Online Retail columns "
                f"{','.join(UCI_COLUMNS)} or the Online Retail II columns {','.join(II_COLUMNS)}"
            )
        positions.append(found[0])
    variant = "Online Retail (UCI)" if "invoiceno" in normalised else "Online Retail II"
    return positions, variant


def _read_csv(path: Path, data: bytes) -> tuple[pd.DataFrame, pd.DataFrame, int, str]:
    lines = decode_lines(data)
    names = parse_header(lines.header or "")
    positions, variant = match_header(names, path)
    columns = [f"c{i}" for i in range(len(names))]
    split, malformed = split_fields(lines.data, columns)
    fields = split[[columns[p] for p in positions] + ["line_no", "raw_text"]]
    fields.columns = [*FIELDS, "line_no", "raw_text"]
    rejected = pd.concat([lines.rejected, malformed], ignore_index=True)
    return fields, rejected, lines.lines_read, variant


def _read_xlsx(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, int, str]:
    """Every sheet of the workbook; line_no is the row number within its sheet (header = row 1)."""
    try:
        sheets = pd.read_excel(path, sheet_name=None, header=None, dtype=object, engine="openpyxl")
    except Exception as err:  # openpyxl raises many types for a broken workbook; all mean the same to a user
        raise InputFileError(f"{path} is not a readable XLSX workbook: {err}") from None
    parts, variants = [], set()
    for sheet, frame in sheets.items():
        frame = frame.dropna(how="all")
        if frame.empty:
            continue
        header = [_cell_text(v) for v in frame.iloc[0]]
        positions, variant = match_header(header, f"{path} sheet {sheet!r}")
        variants.add(variant)
        body = frame.iloc[1:]
        cells = pd.DataFrame(
            {name: _cells_as_text(body.iloc[:, p]) for name, p in zip(FIELDS, positions, strict=True)}
        )
        every = [_cells_as_text(body.iloc[:, i]) for i in range(body.shape[1])]
        raw = every[0].str.cat(every[1:], sep=",") if len(every) > 1 else every[0]
        cells["line_no"] = body.index.to_numpy(dtype=np.int64) + 1
        cells["raw_text"] = f"[{sheet}] " + raw
        parts.append(cells.reset_index(drop=True))
    if not parts:
        raise InputFileError(f"{path}: the workbook has no data rows")
    fields = pd.concat(parts, ignore_index=True)
    return fields, empty_rejected(), len(fields), " + ".join(sorted(variants))


def _cell_text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _cells_as_text(column: pd.Series) -> pd.Series:
    """Spreadsheet cells (numbers, datetimes, text) as the strings a CSV export would hold."""
    text = column.astype("str").str.strip()
    return text.where(column.notna(), "").astype("str")


# ---------------------------------------------------------------------------------------------------------
# Mapping into the raw tables
# ---------------------------------------------------------------------------------------------------------
def build_tables(fields: pd.DataFrame, rejected: pd.DataFrame, lines_read: int) -> PreparedLoad:
    """String fields (one row per file line) -> typed raw tables + quarantined lines."""
    problems = Problems(len(fields))
    problems.add(fields["invoice"].eq(""), "empty invoice number")
    problems.add(fields["stock_code"].eq(""), "empty stock code")
    quantity = parse_integer(fields["quantity"], "quantity", problems)
    unit_price = parse_money(fields["unit_price"], "unit price", problems)
    ordered_at = parse_timestamp(fields["invoice_date"], "invoice date", problems)

    bad = problems.bad
    rejected = pd.concat(
        [
            rejected,
            pd.DataFrame(
                {
                    "line_no": fields["line_no"].to_numpy()[bad],
                    "raw_text": fields["raw_text"].to_numpy()[bad],
                    "reason": problems.reasons()[bad],
                }
            ),
        ],
        ignore_index=True,
    ).sort_values("line_no", kind="stable")

    good = ~bad
    lines = pd.DataFrame(
        {
            "order_id": fields["invoice"][good],
            "product_id": fields["stock_code"][good],
            "description": nullable_text(fields["description"][good]),
            "quantity": quantity[good],
            "unit_price": unit_price[good],
            "ordered_at": ordered_at[good],
            # Spreadsheets turn ids into floats: 17850.0 is customer 17850.
            "customer_id": nullable_text(fields["customer_id"][good].str.replace(r"\.0+$", "", regex=True)),
            "country": nullable_text(fields["country"][good]),
        }
    ).reset_index(drop=True)
    lines["line_no"] = lines.groupby("order_id", sort=False).cumcount() + 1

    order_lines = lines[["order_id", "line_no", "product_id", "quantity", "unit_price"]].assign(discount=0.0)

    orders = (
        lines.groupby("order_id", sort=False)
        .agg(customer_id=("customer_id", "first"), ordered_at=("ordered_at", "first"))
        .reset_index()
    )
    orders["status"] = np.where(orders["order_id"].str.startswith("C"), "cancelled", "completed")
    orders["channel"] = "online"

    codes = pd.Index(lines["product_id"].unique(), name="product_id")
    positive = lines.loc[lines["unit_price"] > 0]
    products = pd.DataFrame(
        {
            "product_id": codes,
            "sku": codes,
            "product_name": most_frequent(lines, "product_id", "description").reindex(codes).to_numpy(),
            "list_price": positive.groupby("product_id")["unit_price"].median().reindex(codes).to_numpy(),
        }
    )

    known = lines.loc[lines["customer_id"].notna()]
    customer_ids = pd.Index(known["customer_id"].unique(), name="customer_id")
    customers = pd.DataFrame(
        {
            "customer_id": customer_ids,
            "country": most_frequent(known, "customer_id", "country").reindex(customer_ids).to_numpy(),
        }
    )

    return PreparedLoad(
        tables={
            "raw.order_lines": order_lines,
            "raw.orders": orders,
            "raw.products": products,
            "raw.customers": customers,
        },
        rejected=rejected.reset_index(drop=True),
        lines_read=lines_read,
    )
