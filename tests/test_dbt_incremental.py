"""Incremental facts equal a full refresh, and no feature reads data from after its cut-off.

Both tests start from the hand-written raw layer of test_dbt_project, build, deliver a new batch, build
again, and compare.
"""

from __future__ import annotations

import pandas as pd
from test_dbt_project import _read, lines_frame, load_fixture, orders_frame

from ml.dbt import dbt_build
from ml.warehouse import connect, copy_in

LOADED_3 = "2024-06-01 00:00:00+00"
FACT_KEYS = {"marts.fct_orders": ["order_id"], "marts.fct_order_lines": ["order_id", "line_no"]}
# Every incremental model (staging and intermediates are incremental by _loaded_at too) and the marts
# built over them, with a key that orders their rows.
INCREMENTAL_KEYS = {
    "staging.stg_crm__customers": ["customer_id"],
    "staging.stg_crm__products": ["product_id"],
    "staging.stg_crm__orders": ["order_id"],
    "staging.stg_crm__order_lines": ["order_id", "line_no"],
    "staging.stg_crm__web_events": ["customer_id", "session_id", "event_type", "product_id", "event_at"],
    "staging.int_orders_validated": ["order_id"],
    "staging.int_order_lines_enriched": ["order_id", "line_no"],
    "staging.int_orders_enriched": ["order_id"],
    "staging.int_rows_rejected": ["entity", "record_key", "reason"],
    **FACT_KEYS,
    "marts.customer_features": ["customer_id"],
    "marts.clv_training_set": ["customer_id", "snapshot"],
    "marts.data_quality_summary": ["entity", "reason", "action"],
    "marts.basket_lines": ["basket_id", "product_id"],
}


def _snapshot(settings, table: str) -> pd.DataFrame:
    keys = {**FACT_KEYS, **INCREMENTAL_KEYS}[table]
    return _read(settings, table).sort_values(keys).reset_index(drop=True)


def _web_events(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "session_id", "event_type", "product_id", "event_at",
                                        "_batch_id", "_loaded_at"])
    return frame.assign(event_at=pd.to_datetime(frame["event_at"]))


def _deliver(settings, *, customers=None, products=None, orders=(), lines=(), web_events=()) -> None:
    with connect(settings) as conn:
        if customers is not None:
            copy_in(conn, "raw.customers", customers)
        if products is not None:
            copy_in(conn, "raw.products", products)
        if web_events:
            copy_in(conn, "raw.web_events", _web_events(web_events))
        if orders:
            copy_in(conn, "raw.orders", orders_frame(orders))
        if lines:
            copy_in(conn, "raw.order_lines", lines_frame(lines))
        conn.commit()


def test_incremental_build_equals_full_refresh(warehouse):
    load_fixture(warehouse)
    loaded_1 = "2024-05-01 00:00:00+00"
    _deliver(warehouse, web_events=[
        ("c1", "s1", "view", "P1", "2024-01-09 10:00", 1, loaded_1),
        ("c1", "s1", "search", None, "2024-01-09 10:01", 1, loaded_1),
        ("c2", None, "view", "P2", "2024-01-31 10:00", 1, loaded_1),
        ("c2", None, None, "P2", "2024-01-31 11:00", 1, loaded_1),  # no event type
    ])
    dbt_build(warehouse, horizon_days=60)
    before = _snapshot(warehouse, "marts.fct_order_lines")
    assert "o12" in set(_read(warehouse, "marts.basket_lines")["basket_id"])

    new_customer = pd.DataFrame({
        "customer_id": ["c6", "c7"],
        "email": ["dee@shop.com", "eve@shop.com"],
        "is_test_account": [True, False],  # c6 turns out to be a test account: o9 must go
        "_batch_id": [3, 3],
        "_loaded_at": [LOADED_3, LOADED_3],
    })
    _deliver(
        warehouse,
        customers=new_customer,
        orders=[
            ("o20", "c7", "2024-03-25 09:00", "completed", 3, LOADED_3),  # a new order
            ("o4", "c2", "2024-02-01 10:00", "completed", 3, LOADED_3),  # re-delivered duplicate
            ("o99", "c7", "2024-03-26 09:00", "completed", 3, LOADED_3),  # the orphan line's order, at last
        ],
        lines=[
            ("o20", 1, "P3", 3, 5.0, 3, LOADED_3),
            ("o1", 3, "P3", 1, 5.0, 3, LOADED_3),  # late-arriving line of a January order
            ("o2", 1, "P3", 5, 5.0, 3, LOADED_3),  # corrected quantity of an old line
            ("o12", 1, "P2", 1, 0.0, 3, LOADED_3),  # o12's only line was free after all: its basket must go
        ],
        # the lamp moves to another category: every old line of P2 must follow
        products=pd.DataFrame({"product_id": ["P2"], "product_name": ["Lamp"], "category": ["Lighting"],
                               "list_price": [20.0], "_batch_id": [3], "_loaded_at": [LOADED_3]}),
        web_events=[
            ("c1", "s1", "search", None, "2024-01-09 10:01", 3, LOADED_3),  # exact re-delivery, null product
            ("c7", "s9", "view", "P3", "2024-03-24 10:00", 3, LOADED_3),  # new
            # the same event with a blank event type (cleaned to ''): another key, but the incremental delete
            # coalesces null to '' (stg_crm__web_events' unique key): the null-typed row is deleted and re-inserted
            ("c2", None, " ", "P2", "2024-01-31 11:00", 3, LOADED_3),
        ],
    )
    incremental = dbt_build(warehouse, horizon_days=60)
    assert incremental.node("fct_order_lines").status == "success"
    assert incremental.node("stg_crm__order_lines").status == "success"
    inc_all = {table: _snapshot(warehouse, table) for table in INCREMENTAL_KEYS}
    c2_events = inc_all["staging.stg_crm__web_events"].query("customer_id == 'c2'")
    assert sorted(c2_events["event_type"].fillna("<null>")) == ["", "<null>", "view"]
    inc_orders = _snapshot(warehouse, "marts.fct_orders")
    inc_lines = _snapshot(warehouse, "marts.fct_order_lines")

    # the incremental run did pick the changes up ...
    assert "o20" in set(inc_orders["order_id"]) and "o9" not in set(inc_orders["order_id"])
    assert len(inc_lines[inc_lines["order_id"] == "o1"]) == 3
    o2 = inc_orders.set_index("order_id").loc["o2"]
    assert o2["gross_revenue"] == 28  # 5 spoons + postage
    assert len(inc_lines) == len(before) + 1 + 1 + 1 - 1  # o20, o1's late line, o99's line, minus o9's line
    rejected = inc_all["staging.int_rows_rejected"]
    assert not ((rejected["record_key"] == "o99|1") & (rejected["reason"] == "orphan_line_without_order")).any()
    assert ((rejected["record_key"] == "o4") & (rejected["reason"] == "exact_duplicate")).any()
    baskets = set(inc_all["marts.basket_lines"]["basket_id"])
    assert "o20" in baskets and "o12" not in baskets and "o9" not in baskets

    # rebuild just the two facts from scratch over the same (already current) upstream tables
    dbt_build(warehouse, horizon_days=60, full_refresh=True, select=["fct_orders", "fct_order_lines"])
    full_orders = _snapshot(warehouse, "marts.fct_orders")
    full_lines = _snapshot(warehouse, "marts.fct_order_lines")
    pd.testing.assert_frame_equal(inc_orders, full_orders)
    pd.testing.assert_frame_equal(inc_lines, full_lines)

    # ... and the whole graph rebuilt from the raw rows equals what the incremental run left
    dbt_build(warehouse, horizon_days=60, full_refresh=True)
    assert _snapshot(warehouse, "staging.int_order_lines_enriched").query("product_id == 'P2'")["category"].eq(
        "Lighting").all()
    for table, incremental_rows in inc_all.items():
        pd.testing.assert_frame_equal(incremental_rows, _snapshot(warehouse, table), obj=table)


FEATURE_SETS = {
    "marts.customer_features": ["customer_id"],
    "marts.clv_scoring_set": ["customer_id"],
    "marts.clv_training_set": ["customer_id", "snapshot"],
}


def test_features_ignore_data_after_their_cutoff(warehouse):
    load_fixture(warehouse)
    as_of = "2024-04-01"
    dbt_build(warehouse, as_of=as_of, horizon_days=60)
    before = {t: _read(warehouse, t).sort_values(k).reset_index(drop=True) for t, k in FEATURE_SETS.items()}

    # After as_of: a new purchase of c1 and a brand-new customer. After the training cut-off (2024-02-01)
    # but before as_of: a purchase of c2, which may change c2's training label but no training feature.
    _deliver(
        warehouse,
        customers=pd.DataFrame({"customer_id": ["c8"], "_batch_id": [3], "_loaded_at": [LOADED_3]}),
        orders=[
            ("o30", "c1", "2024-05-01 09:00", "completed", 3, LOADED_3),
            ("o31", "c8", "2024-04-15 09:00", "completed", 3, LOADED_3),
            ("o32", "c2", "2024-03-10 09:00", "completed", 3, LOADED_3),
        ],
        lines=[
            ("o30", 1, "P2", 10, 20.0, 3, LOADED_3),
            ("o31", 1, "P1", 1, 10.0, 3, LOADED_3),
            ("o32", 1, "P1", 3, 10.0, 3, LOADED_3),
        ],
    )
    dbt_build(warehouse, as_of=as_of, horizon_days=60)
    after = {t: _read(warehouse, t).sort_values(k).reset_index(drop=True) for t, k in FEATURE_SETS.items()}

    # the new rows are in the warehouse ...
    orders = _read(warehouse, "marts.fct_orders")
    assert {"o30", "o31", "o32"} <= set(orders["order_id"])
    # ... the training label saw c2's purchase inside the horizon ...
    labels_before = before["marts.clv_training_set"].set_index("customer_id")
    labels_after = after["marts.clv_training_set"].set_index("customer_id")
    assert labels_before.loc["c2", "future_spend"] == 0 and labels_after.loc["c2", "future_spend"] == 30
    # ... c2's purchase before as_of rightly moved c2's scoring features ...
    scoring_before = before["marts.clv_scoring_set"].set_index("customer_id")
    scoring_after = after["marts.clv_scoring_set"].set_index("customer_id")
    assert scoring_after.loc["c2", "n_orders"] == scoring_before.loc["c2", "n_orders"] + 1
    # ... and nothing else moved: no training feature, no other customer's scoring feature.
    labels = ["future_spend", "has_future_purchase"]
    pd.testing.assert_frame_equal(before["marts.clv_training_set"].drop(columns=labels),
                                  after["marts.clv_training_set"].drop(columns=labels))
    for table in ("marts.customer_features", "marts.clv_scoring_set"):
        unchanged_before = before[table][before[table]["customer_id"] != "c2"].reset_index(drop=True)
        unchanged_after = after[table][after[table]["customer_id"] != "c2"].reset_index(drop=True)
        pd.testing.assert_frame_equal(unchanged_before, unchanged_after)


STATISTICS_TABLES = ["staging.stg_crm__order_lines", "staging.stg_crm__web_events", "marts.fct_order_lines",
                     "marts.customer_features"]


def _last_analyzed(settings) -> dict:
    """When each of STATISTICS_TABLES was last analysed by a build (autovacuum's own analyses left out)."""
    with connect(settings) as conn:
        rows = conn.execute(
            "select schemaname || '.' || relname, last_analyze from pg_stat_user_tables "
            "where schemaname || '.' || relname = any(%s)", (STATISTICS_TABLES,)).fetchall()
    return dict(rows)


def test_a_night_gathers_statistics_only_where_they_went_stale(warehouse):
    load_fixture(warehouse)
    dbt_build(warehouse, horizon_days=60)
    built = _last_analyzed(warehouse)
    assert set(built) == set(STATISTICS_TABLES) and all(built.values()), built  # every table has statistics

    # one new order line: far below the threshold (50 rows + 10 % of the table)
    _deliver(warehouse, orders=[("o40", "c1", "2024-03-28 09:00", "completed", 3, LOADED_3)],
             lines=[("o40", 1, "P1", 1, 10.0, 3, LOADED_3)])
    dbt_build(warehouse, horizon_days=60)
    assert "o40" in set(_read(warehouse, "staging.stg_crm__order_lines")["order_id"])
    night = _last_analyzed(warehouse)
    for table in ("staging.stg_crm__order_lines", "marts.fct_order_lines"):
        assert night[table] == built[table], f"{table} was re-analysed for one new row"
    # a table model is a new table on every build: analysed every time
    assert night["marts.customer_features"] > built["marts.customer_features"]

    # a delivery that is most of a table is analysed in the same night, before its tests and readers are planned
    loaded_4 = "2024-06-02 00:00:00+00"
    _deliver(warehouse, web_events=[("c1", f"s{i}", "view", "P1", "2024-03-27 10:00", 4, loaded_4) for i in range(80)])
    dbt_build(warehouse, horizon_days=60)
    after = _last_analyzed(warehouse)
    assert after["staging.stg_crm__web_events"] > night["staging.stg_crm__web_events"]
    assert after["staging.stg_crm__order_lines"] == built["staging.stg_crm__order_lines"]
