"""The dbt project builds, with every test passing, on real data loaded by the real importers.

Online Retail (many null customers, C-invoices with negative quantities, fee codes such as POST), CDNOW
(no web events, no demographics, one product) and the synthetic generator with its planted dirt.
"""

from __future__ import annotations

import gzip
from itertools import islice

import pytest
from test_dbt_project import _read

from ml.dbt import dbt_build
from ml.ingest.cdnow import load_cdnow
from ml.ingest.generator import GeneratorParams, generate
from ml.ingest.online_retail import load_online_retail
from ml.warehouse import connect

NON_PRODUCT_CODES = {"POST", "DOT", "M", "D", "C2", "CRUK", "PADS", "BANK CHARGES", "AMAZONFEE", "S", "B"}


def _scalar(settings, query: str):
    with connect(settings) as conn:
        return conn.execute(query).fetchone()[0]


def _assert_marts_consistent(settings) -> None:
    """Invariants every real data set must satisfy after a passing build."""
    n_buyers = _scalar(settings, """
        select count(distinct customer_id) from marts.fct_orders
        where is_purchase and customer_id is not null
          and order_date <= (select as_of_date from staging.int_as_of)""")
    assert _scalar(settings, "select count(*) from marts.customer_features") == n_buyers > 0
    assert _scalar(settings, "select count(*) from marts.clv_scoring_set") == n_buyers
    assert _scalar(settings, "select count(*) from marts.clv_training_set") > 0
    assert _scalar(settings, "select min(net_spend) from marts.customer_features") >= 0
    assert _scalar(settings, "select count(*) from marts.dim_customers where rfm_segment is null and n_orders > 0") == 0
    codes = {r for r in _read(settings, "marts.basket_lines")["product_id"].str.upper().unique()}
    assert not codes & NON_PRODUCT_CODES


def test_online_retail_slice_builds(warehouse, shared_data, tmp_path):
    # the first ~20k lines: about 1,000 invoices, with C-invoices, null customers and POST lines
    slice_file = tmp_path / "online_retail_slice.csv"
    with gzip.open(shared_data / "online_retail.csv.gz", "rt", encoding="utf-8", errors="replace") as src:
        slice_file.write_text("".join(islice(src, 20_001)))
    with connect(warehouse) as conn:
        load_online_retail(conn, slice_file)

    # the slice covers 2010-12-01..12-09: a one-week horizon leaves a labelled training window
    result = dbt_build(warehouse, horizon_days=7)
    assert result.success
    _assert_marts_consistent(warehouse)
    orders = _read(warehouse, "marts.fct_orders")
    cancellations = orders[orders["order_id"].str.startswith("C")]
    assert len(cancellations) > 0
    assert cancellations["is_return"].all() and (cancellations["net_revenue"] <= 0).all()
    assert orders["customer_id"].isna().sum() > 0  # guest invoices stay in the facts
    features = _read(warehouse, "marts.customer_features")
    assert features["browse_to_buy_ratio"].isna().all() and (features["n_web_events"] == 0).all()
    assert features["age_years"].isna().all()
    products = _read(warehouse, "marts.dim_products").set_index("product_id")
    assert not products.loc["POST", "is_product"]


def test_cdnow_builds(warehouse, shared_data):
    with connect(warehouse) as conn:
        load_cdnow(conn, shared_data / "cdnow_master.csv")
    result = dbt_build(warehouse, horizon_days=273)  # the benchmark's 39-week holdout
    assert result.success
    _assert_marts_consistent(warehouse)
    assert str(_scalar(warehouse, "select as_of_date from staging.int_as_of")) == "1998-06-30"
    assert _scalar(warehouse, "select count(*) from marts.customer_features") == 23_570
    training = _read(warehouse, "marts.clv_training_set")
    assert str(training["feature_cutoff_date"].iloc[0]) == "1997-09-30"
    # every customer bought first in 1997-Q1, i.e. before the cut-off
    assert len(training) == 23_570
    assert 0.1 < training["has_future_purchase"].mean() < 0.6
    features = _read(warehouse, "marts.customer_features")
    # one product, one category: all spend is in category 1 (0 for the few customers of $0 orders only)
    paid = features["gross_spend"].astype(float) > 0
    assert paid.sum() > 23_000
    assert (features.loc[paid, "category_share_1"].astype(float) == 1.0).all()
    assert (features.loc[~paid, "category_share_1"].astype(float) == 0.0).all()
    assert (features["category_share_2"].astype(float) == 0.0).all()


def test_generated_crm_builds_and_counts_the_planted_dirt(warehouse):
    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=1000, days=730, seed=7))
        truth = {k: v["count"] for k, v in conn.execute(
            "select key, value from audit.planted_truth where key like 'dirt.%'").fetchall()}
    dbt_build(warehouse)
    _assert_marts_consistent(warehouse)
    assert str(_scalar(warehouse, "select as_of_date from staging.int_as_of")) == "2025-12-31"

    summary = _read(warehouse, "marts.data_quality_summary")
    counts = {(r.entity, r.reason): int(r.n_rows) for r in summary.itertuples()}
    assert counts.get(("orders", "exact_duplicate"), 0) == truth["dirt.duplicate_orders"]
    assert counts.get(("order_lines", "exact_duplicate"), 0) == truth["dirt.duplicate_order_lines"]
    assert counts.get(("customers", "test_account"), 0) == truth["dirt.test_account_customers"]
    assert counts.get(("orders", "missing_customer_id"), 0) == truth["dirt.orders_missing_customer"]
    # future-dated: after their load time, or (dated in the already past year after end_date) after as_of
    future = counts.get(("orders", "future_dated"), 0) + counts.get(("orders", "after_as_of"), 0)
    assert future == truth["dirt.future_orders"]
    customers = _read(warehouse, "marts.dim_customers")
    assert set(customers["gender"]) <= {"M", "F", "U"}
    assert (customers["country"].dropna() == customers["country"].dropna().str.strip().str.upper()).all()
    assert customers["rfm_segment"].dropna().nunique() >= 6
    features = _read(warehouse, "marts.customer_features")
    assert features["browse_to_buy_ratio"].notna().any()
    assert (features[[f"category_share_{k}" for k in range(1, 9)]].astype(float).sum(axis=1) <= 1.0 + 1e-9).all()


@pytest.mark.slow
def test_online_retail_full_file_builds(warehouse, shared_data):
    with connect(warehouse) as conn:
        load_online_retail(conn, shared_data / "online_retail.csv.gz")
    result = dbt_build(warehouse)
    assert result.success
    _assert_marts_consistent(warehouse)
    assert str(_scalar(warehouse, "select as_of_date from staging.int_as_of")) == "2011-12-09"
    assert _scalar(warehouse, "select count(*) from marts.dim_customers") == 4_372
    summary = _read(warehouse, "marts.data_quality_summary")
    missing = summary[(summary["entity"] == "orders") & (summary["reason"] == "missing_customer_id")]
    assert int(missing["n_rows"].iloc[0]) > 1_000  # guest invoices are counted, not hidden
