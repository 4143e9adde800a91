"""The warehouse layer: schemas exist, COPY round-trips values exactly, errors are one clear line."""

import pandas as pd
import pytest

from ml.config import Settings
from ml.errors import WarehouseUnavailable
from ml.warehouse import connect, copy_in, read_table, table_counts


def test_schemas_and_raw_tables_exist(warehouse):
    with connect(warehouse) as conn:
        schemas = {r[0] for r in conn.execute("select schema_name from information_schema.schemata")}
        counts = table_counts(conn)
    assert {"raw", "staging", "marts", "ml", "audit"} <= schemas
    for table in ["raw.customers", "raw.products", "raw.orders", "raw.order_lines", "raw.web_events"]:
        assert counts[table] == 0


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


def test_unreachable_warehouse_is_one_clear_error(tmp_path):
    settings = Settings.from_env({"WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
                                  "CRM_STATE_DIR": str(tmp_path)})
    with pytest.raises(WarehouseUnavailable, match="cannot reach the warehouse at postgresql://nobody@127.0.0.1:1"):
        connect(settings)
