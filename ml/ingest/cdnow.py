"""Importer for the CDNOW master file (the standard CLV benchmark), into the raw layer.

Input: ``customer_id,date,number_of_cds,dollar_value`` with ``date`` as YYYYMMDD (the CSV shipped with the
``lifetimes`` package), or the original whitespace-separated ``CDNOW_master.txt`` without a header.

Mapping (one batch, primary table ``raw.orders``: one order per transaction line):

- every line -> one ``raw.orders`` row: order_id = ``{customer_id}-{YYYYMMDD}-{n}`` where n numbers the
  lines of the same customer and day in file order (the file has no transaction id and a customer can
  buy twice a day), ordered_at = the day at midnight, status ``completed``, channel null (unknown);
- every line -> one ``raw.order_lines`` row: product ``CD``, quantity = number_of_cds, unit_price =
  dollar_value / number_of_cds rounded to 4 decimals (so quantity * unit_price gives the line's dollars
  back to within 0.0002 per CD), discount 0. A line with 0 CDs keeps quantity 0 and carries the whole
  dollar_value as its unit_price, so no money disappears without a trace (the shipped file has none);
- one ``raw.products`` row ``CD`` (category ``Music``, list_price = median unit price);
- one ``raw.customers`` row per customer id; the other customer columns are unknown (null).

Customer ids are stored without leading zeros (``00001`` in the original text file is ``1`` in the CSV),
so both releases give the same ids.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import psycopg

from ml.errors import InputFileError
from ml.ingest.batch import LoadReport
from ml.ingest.parsing import (
    PreparedLoad,
    Problems,
    decode_lines,
    load_prepared,
    normalise_name,
    parse_header,
    parse_integer,
    parse_money,
    parse_timestamp,
    read_input_bytes,
    split_fields,
)

SOURCE = "cdnow"
PRIMARY_TABLE = "raw.orders"
COLUMNS = ("customer_id", "date", "number_of_cds", "dollar_value")
PRODUCT_ID = "CD"

# The original CDNOW_master.txt: "00001 19970101 1 11.77", no header.
_TEXT_RELEASE_LINE = r"^\s*\d+\s+\d{8}\s+-?\d+\s+-?[\d.]+\s*$"


def load_cdnow(conn: psycopg.Connection, path: Path) -> LoadReport:
    """Load a CDNOW master file as one atomic, idempotent batch."""
    return load_prepared(conn, Path(path), source=SOURCE, primary_table=PRIMARY_TABLE, prepare=prepare_cdnow)


def prepare_cdnow(path: Path) -> PreparedLoad:
    """Read and parse a CDNOW file into the raw tables without touching the warehouse."""
    data = read_input_bytes(path)
    first = data[:200].split(b"\n", 1)[0].decode("utf-8", errors="replace")
    whitespace_release = pd.Series([first]).str.match(_TEXT_RELEASE_LINE).iloc[0]
    if whitespace_release:
        lines = decode_lines(data, has_header=False)
        # Fields are separated by runs of blanks: make them commas and the CSV path does the rest.
        text = lines.data["text"].str.strip().str.replace(r"\s+", ",", regex=True)
        split, malformed = split_fields(lines.data.assign(text=text), list(COLUMNS))
        original = pd.Series(lines.data["text"].to_numpy(), index=lines.data["line_no"].to_numpy())
        split["raw_text"] = original.reindex(split["line_no"].to_numpy()).to_numpy()
        malformed["raw_text"] = original.reindex(malformed["line_no"].to_numpy()).to_numpy()
    else:
        lines = decode_lines(data)
        names = [normalise_name(n) for n in parse_header(lines.header or "")]
        expected = [normalise_name(c) for c in COLUMNS]
        if names != expected:
            raise InputFileError(
                f"{path}: unknown header {(lines.header or '')[:200]!r}: expected the CDNOW columns {','.join(COLUMNS)} "
                "(or the original whitespace-separated CDNOW_master.txt without a header)"
            )
        split, malformed = split_fields(lines.data, list(COLUMNS))
    rejected = pd.concat([lines.rejected, malformed], ignore_index=True)
    return build_tables(split, rejected, lines.lines_read)


def build_tables(fields: pd.DataFrame, rejected: pd.DataFrame, lines_read: int) -> PreparedLoad:
    """String fields (one row per file line) -> typed raw tables + quarantined lines."""
    problems = Problems(len(fields))
    problems.add(fields["customer_id"].eq(""), "empty customer id")
    ordered_at = parse_timestamp(fields["date"], "date", problems, fmt="%Y%m%d")
    cds = parse_integer(fields["number_of_cds"], "number of CDs", problems)
    dollars = parse_money(fields["dollar_value"], "dollar value", problems)

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
    customer = fields["customer_id"][good].str.replace(r"^0+(?=\d)", "", regex=True).reset_index(drop=True)
    day = ordered_at[good].reset_index(drop=True)
    quantity = cds[good].reset_index(drop=True)
    value = dollars[good].reset_index(drop=True)

    keys = pd.DataFrame({"customer": customer, "day": day.dt.strftime("%Y%m%d")})
    occurrence = keys.groupby(["customer", "day"], sort=False).cumcount() + 1
    order_id = keys["customer"] + "-" + keys["day"] + "-" + occurrence.astype("str")

    per_cd = (value / quantity.astype("float64").where(quantity != 0)).round(4)
    unit_price = per_cd.where(quantity != 0, value)

    orders = pd.DataFrame(
        {
            "order_id": order_id,
            "customer_id": customer,
            "ordered_at": day,
            "status": "completed",
            "channel": pd.Series(pd.NA, index=order_id.index, dtype="str"),
        }
    )
    order_lines = pd.DataFrame(
        {
            "order_id": order_id,
            "line_no": 1,
            "product_id": PRODUCT_ID,
            "quantity": quantity,
            "unit_price": unit_price,
            "discount": 0.0,
        }
    )
    tables = {"raw.orders": orders, "raw.order_lines": order_lines}
    if len(orders):
        tables["raw.products"] = pd.DataFrame(
            {
                "product_id": [PRODUCT_ID],
                "sku": [PRODUCT_ID],
                "product_name": ["Compact disc"],
                "category": ["Music"],
                "list_price": [float(per_cd[per_cd > 0].median()) if (per_cd > 0).any() else None],
            }
        )
        tables["raw.customers"] = pd.DataFrame({"customer_id": customer.drop_duplicates().reset_index(drop=True)})
    return PreparedLoad(tables=tables, rejected=rejected.reset_index(drop=True), lines_read=lines_read)
