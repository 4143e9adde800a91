"""The dbt project on a small hand-written raw layer: every kind of dirt is handled as designed.

One module-scoped database is built once (``dbt build``: models, data tests and unit tests) and the tests
read its marts. The raw rows are written so that each expectation below can be worked out by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

import pandas as pd
import psycopg
import pytest
from helpers_warehouse import unique_index_columns

from ml.dbt import DbtBuildFailed, dbt_build, dbt_docs_generate, dbt_parse, run_dbt
from ml.warehouse import connect, copy_in, create_database, drop_database, init_schemas

LOADED_1 = "2024-05-01 00:00:00+00"
LOADED_2 = "2024-05-02 00:00:00+00"


def _customers() -> pd.DataFrame:
    rows = [
        # id, email, name, gender, birth, country, signup, test, batch, loaded
        ("c1", " Ann@Shop.COM ", "Ann", "female", "1980-05-01", " fr ", "2024-01-01 00:00", None, 1, LOADED_1),
        ("c2", "bob@old.com", "Bob", "M", None, "DE", "2024-01-01 00:00", False, 1, LOADED_1),
        ("c2", "bob@new.com", "Bob", "M", None, "DE", "2024-01-01 00:00", False, 2, LOADED_2),  # changed
        ("c3", "qa@shop.com", "QA", "F", None, "FR", "2024-01-01 00:00", True, 1, LOADED_1),  # test account
        ("c4", "bad-email", "Cid", "x", "1900-01-01", "uk", "2024-01-01 00:00", False, 1, LOADED_1),
        ("c5", "bot@test.example", "Bot", "M", None, "FR", "2024-01-01 00:00", None, 1, LOADED_1),  # test domain
        ("c6", "dee@shop.com", "Dee", "F", None, "ES", "2024-02-01 00:00", False, 1, LOADED_1),  # late signup
    ]
    frame = pd.DataFrame(rows, columns=["customer_id", "email", "full_name", "gender", "birth_date", "country",
                                        "signup_at", "is_test_account", "_batch_id", "_loaded_at"])
    return frame.assign(birth_date=pd.to_datetime(frame["birth_date"]).dt.date,
                        signup_at=pd.to_datetime(frame["signup_at"]),
                        is_test_account=frame["is_test_account"].astype("boolean"))


def _products() -> pd.DataFrame:
    rows = [
        ("P1", "Mug", "Kitchen", 10.0, 1, LOADED_1),
        ("P1", "Mug", "Kitchen", 10.0, 1, LOADED_1),  # exact duplicate
        ("P2", "Lamp", "Home", 20.0, 1, LOADED_1),
        ("P3", "Spoon", "Kitchen", 5.0, 1, LOADED_1),
        ("POST", "POSTAGE", None, None, 1, LOADED_1),
    ]
    return pd.DataFrame(rows, columns=["product_id", "product_name", "category", "list_price", "_batch_id",
                                       "_loaded_at"])


ORDERS = [
    # order, customer, ordered_at, status, batch, loaded
    ("o1", "c1", "2024-01-10 10:00", "completed", 1, LOADED_1),
    ("o1", "c1", "2024-01-10 10:00", "completed", 2, LOADED_2),  # exact re-delivery
    ("o2", "c1", "2024-03-01 10:00", "Completed", 1, LOADED_1),
    ("o3", "c1", "2024-03-15 10:00", "returned", 1, LOADED_1),  # return of 2 spoons
    ("o4", "c2", "2024-02-01 10:00", "completed", 1, LOADED_1),
    ("o5", "c2", "2024-02-05 10:00", "canceled", 1, LOADED_1),  # cancelled before fulfilment
    ("o6", "c3", "2024-02-10 10:00", "completed", 1, LOADED_1),  # test account
    ("o7", None, "2024-02-15 10:00", "completed", 1, LOADED_1),  # customer lost by the source
    ("o8", "c4", "2099-01-01 10:00", "completed", 1, LOADED_1),  # future-dated
    ("o9", "c6", "2024-01-05 10:00", "completed", 1, LOADED_1),  # before signup
    ("o10", "c4", "2024-04-01 10:00", "completed", 1, LOADED_1),  # the latest valid order: as_of
    ("o11", "c5", "2024-03-20 10:00", "completed", 1, LOADED_1),  # test account by email domain
    ("o12", "c1", "2024-03-20 10:00", "completed", 1, LOADED_1),
    ("o12", "c1", "2024-03-20 11:00", "completed", 2, LOADED_2),  # re-delivered with a corrected time
]

LINES = [
    # order, line, product, quantity, price, batch, loaded
    ("o1", 1, "P1", 2, 10.0, 1, LOADED_1),
    ("o1", 1, "P1", 2, 10.0, 2, LOADED_2),  # exact re-delivery
    ("o1", 2, "P2", 1, 20.0, 1, LOADED_1),
    ("o1", 2, "P2", 1, 20.0, 2, LOADED_2),  # exact re-delivery
    ("o2", 1, "P3", 4, 5.0, 1, LOADED_1),
    ("o2", 2, "POST", 1, 3.0, 1, LOADED_1),
    ("o2", 3, "P1", 1, None, 1, LOADED_1),  # no price: excluded
    ("o3", 1, "P3", -2, 5.0, 1, LOADED_1),
    ("o4", 1, "P2", 2, 20.0, 1, LOADED_1),
    ("o5", 1, "P1", 1, 10.0, 1, LOADED_1),
    ("o6", 1, "P1", 5, 10.0, 1, LOADED_1),
    ("o7", 1, "P1", 1, 10.0, 1, LOADED_1),
    ("o7", 2, "P2", 1, 20.0, 1, LOADED_1),
    ("o8", 1, "P1", 1, 10.0, 1, LOADED_1),
    ("o9", 1, "P2", 1, 20.0, 1, LOADED_1),
    ("o10", 1, "P1", 1, 10.0, 1, LOADED_1),
    ("o11", 1, "P1", 1, 10.0, 1, LOADED_1),
    ("o12", 1, "P2", 1, 20.0, 1, LOADED_1),
    ("o99", 1, "P1", 1, 10.0, 1, LOADED_1),  # orphan: no such order
]


def orders_frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "ordered_at", "status", "_batch_id", "_loaded_at"])
    return frame.assign(ordered_at=pd.to_datetime(frame["ordered_at"]), channel="web")


def lines_frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["order_id", "line_no", "product_id", "quantity", "unit_price", "_batch_id",
                                        "_loaded_at"])
    return frame.assign(discount=0.0)


def load_fixture(settings) -> None:
    """The hand-written raw layer (two batches)."""
    with connect(settings) as conn:
        copy_in(conn, "raw.customers", _customers())
        copy_in(conn, "raw.products", _products())
        copy_in(conn, "raw.orders", orders_frame(ORDERS))
        copy_in(conn, "raw.order_lines", lines_frame(LINES))
        conn.commit()


@pytest.fixture(scope="module")
def built(server_settings):
    """One warehouse with the fixture loaded and built (horizon 60 days so a training window exists)."""
    settings = server_settings.with_database(f"crm_test_dbt_{uuid.uuid4().hex[:8]}")
    create_database(settings)
    with connect(settings) as conn:
        init_schemas(conn)
    load_fixture(settings)
    result = dbt_build(settings, horizon_days=60)
    yield settings, result
    drop_database(settings)


def _read(settings, table: str) -> pd.DataFrame:
    """A mart with Python values (booleans as bool, money as Decimal): small tables only."""
    with connect(settings) as conn:
        cur = conn.execute(f"select * from {table}")
        return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description], dtype=object)


def test_build_passes_with_every_test_and_unit_test(built):
    _, result = built
    assert result.success
    kinds = {n.resource_type for n in result.nodes}
    assert {"model", "test", "unit_test"} <= kinds
    unit_tests = {n.name for n in result.nodes if n.resource_type == "unit_test"}
    assert any("rfm" in name for name in unit_tests) and any("dedup" in name for name in unit_tests)
    assert result.node("fct_orders").status == "success"
    assert not result.failed_nodes


def test_orders_are_deduplicated_and_dirty_ones_excluded(built):
    settings, _ = built
    orders = _read(settings, "marts.fct_orders").set_index("order_id")
    assert sorted(orders.index) == sorted(["o1", "o2", "o3", "o4", "o5", "o7", "o9", "o10", "o12"])
    # the re-delivery with a corrected time wins
    assert orders.loc["o12", "ordered_at"] == pd.Timestamp("2024-03-20 11:00")
    # o2: 4 spoons + postage; the line without a price is excluded
    assert orders.loc["o2", "n_lines"] == 2 and orders.loc["o2", "gross_revenue"] == 23
    # a return is negative net revenue; a cancellation earns nothing
    assert orders.loc["o3", "is_return"] and orders.loc["o3", "net_revenue"] == -10
    assert orders.loc["o3", "return_value"] == 10
    assert orders.loc["o5", "is_cancelled"] and orders.loc["o5", "gross_revenue"] == 0
    assert orders.loc["o5", "status"] == "cancelled" and not orders.loc["o5", "is_purchase"]
    assert pd.isna(orders.loc["o7", "customer_id"])
    assert orders.loc["o9", "is_before_signup"] and not orders.loc["o1", "is_before_signup"]
    lines = _read(settings, "marts.fct_order_lines")
    assert len(lines[lines["order_id"] == "o1"]) == 2
    assert "o99" not in set(lines["order_id"])


def test_customer_dimension_cleans_and_excludes_test_accounts(built):
    settings, _ = built
    customers = _read(settings, "marts.dim_customers").set_index("customer_id")
    assert sorted(customers.index) == ["c1", "c2", "c4", "c6"]
    assert customers.loc["c1", "gender"] == "F" and customers.loc["c1", "country"] == "FR"
    assert customers.loc["c1", "email"] == "ann@shop.com" and customers.loc["c1", "is_valid_email"]
    assert customers.loc["c2", "email"] == "bob@new.com"  # the later delivery
    assert customers.loc["c4", "gender"] == "U" and not customers.loc["c4", "is_valid_email"]
    assert pd.isna(customers.loc["c4", "birth_date"])  # the 1900-01-01 placeholder
    assert customers.loc["c4", "country"] == "UK"
    # c1: 40 (o1) + 23 (o2) - 10 (o3) + 20 (o12)
    assert customers.loc["c1", "net_spend"] == 73 and customers.loc["c1", "n_orders"] == 3
    assert set(customers["rfm_segment"].dropna()) <= {
        "Champions", "Loyal", "Potential loyalists", "New", "Promising", "Need attention", "About to sleep",
        "At risk", "Can't lose them", "Hibernating", "Lost"}
    assert customers["r_score"].dropna().astype(int).between(1, 5).all()


def test_features_and_clv_sets_point_in_time(built):
    settings, _ = built
    features = _read(settings, "marts.customer_features").set_index("customer_id")
    assert sorted(features.index) == ["c1", "c2", "c4", "c6"]  # c4's future order does not count
    assert str(features["as_of_date"].iloc[0]) == "2024-04-01"
    c1 = features.loc["c1"]
    assert c1["n_orders"] == 3 and c1["gross_spend"] == 83 and c1["net_spend"] == 73
    assert c1["return_rate"] == pytest.approx(10 / 83)
    assert c1["recency_days"] == (pd.Timestamp("2024-04-01") - pd.Timestamp("2024-03-20")).days
    assert c1["age_years"] == 43
    assert c1["n_web_events"] == 0 and pd.isna(c1["browse_to_buy_ratio"])
    shares = [c for c in features.columns if c.startswith("category_share_")]
    assert len(shares) == 8 and features[shares].astype(float).sum(axis=1).between(0.99, 1.01).all()
    assert pd.isna(features.loc["c4", "avg_days_between_orders"])

    training = _read(settings, "marts.clv_training_set").set_index("customer_id")
    # cut-off 2024-04-01 - 60 days = 2024-02-01: c1 (o1), c2 (o4), c6 (o9) had bought by then
    assert sorted(training.index) == ["c1", "c2", "c6"]
    assert str(training["feature_cutoff_date"].iloc[0]) == "2024-02-01"
    assert training.loc["c1", "n_orders"] == 1 and training.loc["c1", "future_spend"] == 33
    assert training.loc["c1", "has_future_purchase"]
    assert training.loc["c2", "future_spend"] == 0 and not training.loc["c2", "has_future_purchase"]
    scoring = _read(settings, "marts.clv_scoring_set")
    numeric = [c for c in scoring.columns if c not in ("customer_id", "feature_cutoff_date", "horizon_days")]
    assert set(numeric) <= set(training.columns) and set(numeric) <= set(features.columns)


def test_baskets_products_and_data_quality_counts(built):
    settings, _ = built
    baskets = _read(settings, "marts.basket_lines")
    assert "POST" not in set(baskets["product_id"])
    assert not {"o3", "o5", "o6", "o8"} & set(baskets["basket_id"])
    assert baskets["customer_id"].isna().sum() == 2  # o7 keeps its basket without a customer
    assert (baskets["quantity"].astype(int) > 0).all()
    products = _read(settings, "marts.dim_products").set_index("product_id")
    assert not products.loc["POST", "is_product"] and products.loc["P1", "is_product"]
    assert products.loc["POST", "category"] == "uncategorised"
    assert set(products["price_band"].dropna()) <= {"budget", "mid", "premium", "luxury"}

    summary = _read(settings, "marts.data_quality_summary")
    counts = {(r.entity, r.reason): r.n_rows for r in summary.itertuples()}
    assert counts[("orders", "exact_duplicate")] == 1
    assert counts[("orders", "superseded_by_later_delivery")] == 1
    assert counts[("order_lines", "exact_duplicate")] == 2
    assert counts[("products", "exact_duplicate")] == 1
    assert counts[("customers", "superseded_by_later_delivery")] == 1
    assert counts[("customers", "test_account")] == 2
    assert counts[("orders", "test_account")] == 2
    assert counts[("orders", "future_dated")] == 1
    assert counts[("orders", "missing_customer_id")] == 1
    assert counts[("orders", "ordered_before_signup")] == 1
    assert counts[("order_lines", "orphan_line_without_order")] == 1
    assert counts[("order_lines", "missing_quantity_or_price")] == 1
    assert counts[("customers", "invalid_email")] == 1


def test_a_poisoning_row_fails_the_build_naming_the_test(built):
    settings, _ = built
    with connect(settings) as conn:
        conn.execute("update marts.customer_features set net_spend = -5 where customer_id = 'c2'")
        conn.commit()
    try:
        with pytest.raises(DbtBuildFailed) as caught:
            run_dbt(settings, ["test", "--select", "assert_no_negative_net_spend_per_customer"],
                    vars={"horizon_days": 60, "training_snapshots": 1})
        assert "assert_no_negative_net_spend_per_customer" in str(caught.value)
        assert "1 failing rows" in str(caught.value)
        failed = caught.value.result.failed_nodes
        assert [n.failures for n in failed] == [1]
    finally:
        with connect(settings) as conn:
            conn.execute("update marts.customer_features set net_spend = 40 where customer_id = 'c2'")
            conn.commit()


PER_CUSTOMER_TABLES = ["staging.int_customers_unioned", "staging.int_customer_features_as_of_p0",
                       "staging.int_customer_features_as_of_p1", "staging.int_customer_rfm", "marts.dim_customers",
                       "marts.customer_features", "marts.clv_scoring_set"]


def test_a_second_row_of_a_customer_is_refused_by_every_per_customer_table(built):
    """These tables are rebuilt whole every night: a unique index checks their key as the rows are written,
    where a unique test read each table again (campaign_audiences, built after the trainings: test_dags)."""
    settings, _ = built
    for table in PER_CUSTOMER_TABLES:
        with connect(settings) as conn:
            assert unique_index_columns(conn, table) == [["customer_id"]], table
            one = conn.execute(f"select customer_id from {table} limit 1").fetchone()[0]  # noqa: S608 (fixed names)
            with pytest.raises(psycopg.errors.UniqueViolation, match="customer_id"):
                conn.execute(f"insert into {table} select * from {table} where customer_id = %s", (one,))  # noqa: S608
            conn.rollback()


def test_docs_generate_and_parse_work_offline(built, tmp_path):
    settings, _ = built
    folder = dbt_docs_generate(settings, target_path=tmp_path / "docs", compile=False)
    assert (folder / "index.html").exists()
    catalog = json.loads((folder / "catalog.json").read_text())
    assert "model.crm.customer_features" in catalog["nodes"]
    columns = catalog["nodes"]["model.crm.customer_features"]["columns"]
    assert "category_share_8" in columns
    manifest = dbt_parse(settings, target_path=tmp_path / "parse")
    nodes = json.loads(manifest.read_text())["nodes"]
    assert nodes["model.crm.fct_orders"]["config"]["materialized"] == "incremental"
    assert nodes["model.crm.customer_features"]["config"]["contract"]["enforced"] is True
    assert nodes["model.crm.customer_features"]["schema"] == "marts"


def test_unreachable_warehouse_is_a_clear_error(server_settings):
    settings = server_settings.with_database("no_such_database_dbt")
    with pytest.raises(DbtBuildFailed, match="no_such_database_dbt") as caught:
        run_dbt(settings, ["run", "--select", "int_as_of"])
    assert 'database "no_such_database_dbt" does not exist' in str(caught.value)


def test_amounts_are_exact_decimals(built):
    settings, _ = built
    with connect(settings) as conn:
        total = conn.execute("select sum(net_revenue) from marts.fct_orders where customer_id = 'c1'").fetchone()[0]
    assert total == Decimal("73")


def test_a_failed_model_reports_the_database_cause_not_only_dbt_headline():
    from ml.dbt import NodeResult

    node = NodeResult(unique_id="model.crm.fct_orders", status="error", failures=None, execution_time=0.1,
                      message="Database Error in model fct_orders (models/marts/fct_orders.sql)\n"
                              "  integer out of range\n  compiled code at target/run/crm/models/marts/fct_orders.sql")
    text = node.describe()
    assert "fct_orders" in text and "integer out of range" in text and "compiled code" not in text


@pytest.mark.parametrize("max_customers", [50000, 2])
def test_point_in_time_test_catches_a_feature_that_read_after_its_cutoff(built, max_customers):
    """A feature counting one order too many (as if it read past its cut-off) fails the point-in-time test,
    on every customer and on the hash sample used above ``pit_test_max_customers`` (2: about half of the
    customers are checked; every row is tampered, so any sampled one fails)."""
    settings, _ = built
    with connect(settings) as conn:
        conn.execute("update marts.customer_features set n_orders = n_orders + 1")
        conn.commit()
    try:
        with pytest.raises(DbtBuildFailed) as caught:
            run_dbt(settings, ["test", "--select", "assert_features_do_not_read_after_cutoff"],
                    vars={"horizon_days": 60, "training_snapshots": 1, "pit_test_max_customers": max_customers})
        assert "assert_features_do_not_read_after_cutoff" in str(caught.value)
        assert caught.value.result.failed_nodes[0].failures >= 1
    finally:
        with connect(settings) as conn:
            conn.execute("update marts.customer_features set n_orders = n_orders - 1")
            conn.commit()


# ---------------------------------------------------------------------------------------------------------
# Data tests over the rows a night loaded (dbt var tested_through, macro postgres__get_where_subquery)
# ---------------------------------------------------------------------------------------------------------
DISCOUNT_TEST = "accepted_range_fct_order_lines_discount__1__0"


def _test_failures(settings, test: str, tested_through: str | None) -> int:
    """Failing rows of one data test under a night's tested_through (0 when it passes)."""
    variables = {"horizon_days": 60, "training_snapshots": 1, "tested_through": tested_through}
    try:
        run_dbt(settings, ["test", "--select", test], vars=variables)
    except DbtBuildFailed as failed:
        assert test in str(failed)
        assert failed.result.failed_nodes[0].failures is not None, str(failed)  # failed, not errored
        return failed.result.failed_nodes[0].failures
    return 0


def _discount_test(settings, tested_through: str | None) -> int:
    """Failing rows of the discount range test of fct_order_lines (0 when it passes)."""
    return _test_failures(settings, DISCOUNT_TEST, tested_through)


def test_a_night_tests_the_rows_loaded_after_the_last_tested_load_less_the_look_back(built):
    """A bad line loaded long before tested_through is not read (the night it arrived tested it); the same
    line loaded inside the 6 h look-back, or any time when every row is tested, fails the test."""
    settings, _ = built
    with connect(settings) as conn:
        order_id, line_no, discount, loaded_at = conn.execute(
            "select order_id, line_no, discount, _source_loaded_at from marts.fct_order_lines "
            "order by order_id, line_no limit 1").fetchone()
        conn.execute("update marts.fct_order_lines set discount = 5 where order_id = %s and line_no = %s",
                     (order_id, line_no))
        conn.commit()
    try:
        assert _discount_test(settings, None) == 1
        assert _discount_test(settings, (loaded_at + dt.timedelta(hours=7)).isoformat()) == 0
        assert _discount_test(settings, (loaded_at + dt.timedelta(hours=5)).isoformat()) == 1
        assert _discount_test(settings, (loaded_at - dt.timedelta(hours=1)).isoformat()) == 1
    finally:
        with connect(settings) as conn:
            conn.execute("update marts.fct_order_lines set discount = %s where order_id = %s and line_no = %s",
                         (discount, order_id, line_no))
            conn.commit()


def test_the_signup_check_reads_the_orders_a_night_processed(built):
    """assert_no_order_before_signup_unless_flagged: an unflagged order before its customer's signup fails the
    test when the order was (re)processed after tested_through less the look-back, or when every row is
    tested; processed long before, the night that processed it checked it."""
    settings, _ = built
    test = "assert_no_order_before_signup_unless_flagged"
    with connect(settings) as conn:
        # o9 was placed before c6 signed up, and is flagged (see test_orders_flags)
        loaded_at = conn.execute("select _source_loaded_at from marts.fct_orders where order_id = 'o9'").fetchone()[0]
        conn.execute("update marts.fct_orders set is_before_signup = false where order_id = 'o9'")
        conn.commit()

    def failures(tested_through: dt.datetime | None) -> int:
        return _test_failures(settings, test, tested_through and tested_through.isoformat())

    try:
        assert failures(None) == 1
        assert failures(loaded_at + dt.timedelta(hours=7)) == 0
        assert failures(loaded_at + dt.timedelta(hours=5)) == 1
    finally:
        with connect(settings) as conn:
            conn.execute("update marts.fct_orders set is_before_signup = true where order_id = 'o9'")
            conn.commit()
    assert failures(None) == 0


def test_a_table_without_a_load_time_is_tested_whole_on_every_night(built):
    settings, _ = built
    with connect(settings) as conn:
        conn.execute("update marts.customer_features set recency_days = -1 where customer_id = 'c2'")
        conn.commit()
    try:
        with pytest.raises(DbtBuildFailed, match="accepted_ranges_customer_features"):
            run_dbt(settings, ["test", "--select", "accepted_ranges_customer_features"],
                    vars={"horizon_days": 60, "tested_through": "2999-01-01T00:00:00+00:00"})
    finally:
        with connect(settings) as conn:
            conn.execute("update marts.customer_features c set recency_days = f.recency_days "
                         "from staging.int_customer_features_as_of f "
                         "where c.customer_id = 'c2' and f.customer_id = c.customer_id")
            conn.commit()


def test_accepted_ranges_reports_each_column_outside_its_range_in_one_scan(built):
    """The per-customer marts' column ranges are one test per model (tests/generic/test_accepted_ranges.sql):
    it passes on the built marts and fails with one row per offending column, naming the column, its range,
    how many rows are outside and the extreme values, wherever the values break the min or the max."""
    settings, _ = built
    test = "accepted_ranges_clv_scoring_set"
    run_dbt(settings, ["test", "--select", test], vars={"horizon_days": 60})
    with connect(settings) as conn:
        customers = [r[0] for r in conn.execute(
            "select customer_id from marts.clv_scoring_set order by customer_id limit 3").fetchall()]
        saved = conn.execute("select customer_id, recency_days, return_rate, q4_spend_share from marts.clv_scoring_set "
                             "where customer_id = any(%s)", [customers]).fetchall()
        conn.execute("update marts.clv_scoring_set set recency_days = -3 where customer_id = %s", [customers[0]])
        conn.execute("update marts.clv_scoring_set set recency_days = -1, return_rate = 1.5 where customer_id = %s",
                     [customers[1]])
        # a null is not out of range (pair the column with not_null for that)
        conn.execute("update marts.clv_scoring_set set q4_spend_share = null where customer_id = %s", [customers[2]])
        conn.commit()
    try:
        with pytest.raises(DbtBuildFailed, match=test) as failed:
            run_dbt(settings, ["test", "--select", test, "--store-failures"], vars={"horizon_days": 60})
        assert failed.value.result.failed_nodes[0].failures == 2
        with connect(settings) as conn:
            audit = conn.execute("select table_schema from information_schema.tables where table_name = %s",
                                 [test]).fetchone()[0]
            rows = conn.execute(f'select column_name, accepted_range, n_rows_outside, lowest_outside, highest_outside '
                                f'from "{audit}"."{test}" order by column_name').fetchall()
        assert rows == [("recency_days", "[0, ]", 2, "-3", "-1"), ("return_rate", "[0, 1]", 1, "1.5", "1.5")]
    finally:
        with connect(settings) as conn:
            for customer_id, recency_days, return_rate, share in saved:
                conn.execute("update marts.clv_scoring_set set recency_days = %s, return_rate = %s, q4_spend_share = %s "
                             "where customer_id = %s", [recency_days, return_rate, share, customer_id])
            conn.commit()
    run_dbt(settings, ["test", "--select", test], vars={"horizon_days": 60})


def test_a_malformed_tested_through_is_a_clear_error(built):
    settings, _ = built
    with pytest.raises(DbtBuildFailed, match="tested_through must be an ISO timestamp"):
        run_dbt(settings, ["test", "--select", DISCOUNT_TEST],
                vars={"horizon_days": 60, "tested_through": "2024-01-01' or true --"})


def test_the_nightly_tests_every_row_until_a_night_passed_then_weekly(built):
    """ml.nightly.data_test_scope: every row with nothing recorded, on a full refresh, under data_tests=all and
    when the last night that tested every row is a week old; otherwise the staged rows after the last record."""
    from ml.nightly import data_test_scope, record_data_tests

    settings, _ = built
    auto = {"full_refresh": False, "data_tests": "auto"}
    with connect(settings) as conn:
        conn.execute("delete from audit.data_test_runs")
        assert data_test_scope(conn, auto)["scope"] == "all"
        record_data_tests(conn, dt.date(2024, 6, 1), "all")
        newest = conn.execute("select max(_loaded_at) from staging.stg_crm__order_lines").fetchone()[0]
        scope = data_test_scope(conn, auto)
        assert scope["scope"] == "new" and dt.datetime.fromisoformat(scope["tested_through"]) >= newest
        assert data_test_scope(conn, {**auto, "full_refresh": True})["scope"] == "all"
        assert data_test_scope(conn, {**auto, "data_tests": "all"})["scope"] == "all"
        conn.execute("update audit.data_test_runs set recorded_at = now() - interval '8 days'")
        record_data_tests(conn, dt.date(2024, 6, 2), "new")  # nights testing new rows do not reset the week
        assert data_test_scope(conn, auto)["scope"] == "all"
        conn.execute("delete from audit.data_test_runs")
        conn.commit()
