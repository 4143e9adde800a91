"""The customer feature layer is incremental by customer and equals a full refresh.

int_customer_feature_state keeps, per snapshot and customer, the sums and dates that do not depend on where
the cut-off lies; a night recomputes only the customers whose data changed or moved across a cut-off (and
everyone when the feature categories changed). avg_price_index divides by category price medians that move
every night, so the state keeps priced amounts per category and the index is computed over the state. These tests deliver batches on
top of a built warehouse, build incrementally, and compare every customer mart with a full refresh; they
also check, by the rows' transaction ids, that customers the batch did not touch were left alone.
"""

from __future__ import annotations

import pandas as pd
import psycopg
import pytest
from test_dbt_incremental import _deliver
from test_dbt_project import LOADED_2, _read, load_fixture

from ml.dbt import DbtBuildFailed, dbt_build, run_dbt
from ml.warehouse import connect

LOADED_3 = "2024-06-01 00:00:00+00"
LOADED_4 = "2024-06-02 00:00:00+00"
CUSTOMER_MARTS = {
    "staging.int_customer_features_as_of": ["customer_id"],
    "staging.int_customer_features_snapshots": ["customer_id", "snapshot"],
    "staging.int_customer_rfm": ["customer_id"],
    "marts.customer_features": ["customer_id"],
    "marts.clv_scoring_set": ["customer_id"],
    "marts.clv_training_set": ["customer_id", "snapshot"],
    "marts.dim_customers": ["customer_id"],
    "marts.feature_categories": ["rank"],
    "staging.int_order_lines_daily": ["order_date", "category", "unit_price"],
    "staging.int_category_price_medians": ["snapshot", "category"],
}


# when a row was written, not what it holds: a night's rows carry that night's newest load time, a full
# refresh's the newest of their own lines
WRITE_TIME_COLUMNS = {"staging.int_order_lines_daily": ["_source_loaded_at"]}


def _marts(settings) -> dict[str, pd.DataFrame]:
    return {table: _read(settings, table).drop(columns=WRITE_TIME_COLUMNS.get(table, []))
            .sort_values(keys).reset_index(drop=True)
            for table, keys in CUSTOMER_MARTS.items()}


def _state_versions(settings) -> dict[tuple[int, str], str]:
    """The transaction id that last wrote each state row (unchanged = the row was not rewritten)."""
    with connect(settings) as conn:
        # (the state is a view over its parts: the transaction ids are the parts' rows')
        rows = conn.execute(
            "select snapshot, customer_id, xmin::text from staging.int_customer_feature_state_p0 "
            "union all select snapshot, customer_id, xmin::text from staging.int_customer_feature_state_p1"
        ).fetchall()
    return {(snapshot, customer): xmin for snapshot, customer, xmin in rows}


def _daily_versions(settings) -> dict[tuple, str]:
    """The transaction id that last wrote each row of the lines' daily summary."""
    with connect(settings) as conn:
        rows = conn.execute("select order_date, category, unit_price, xmin::text "
                            "from staging.int_order_lines_daily").fetchall()
    return {(str(day), category, price): xmin for day, category, price, xmin in rows}


def _assert_equals_full_refresh(settings, incremental: dict[str, pd.DataFrame]) -> None:
    state_keys = set(_state_versions(settings))
    dbt_build(settings, horizon_days=60, full_refresh=True)
    full = _marts(settings)
    for table, rows in incremental.items():
        pd.testing.assert_frame_equal(rows, full[table], obj=table)
    # the state itself has the same rows (an affected customer left without orders keeps none)
    assert state_keys == set(_state_versions(settings))


def test_a_night_recomputes_the_touched_customers_and_equals_a_full_refresh(warehouse):
    load_fixture(warehouse)
    # c2 buys on 2024-02-10: after the training cut-off (as_of 2024-04-01 - 60 days = 2024-02-01) for now
    _deliver(warehouse,
             orders=[("o40", "c2", "2024-02-10 09:00", "completed", 1, "2024-05-01 00:00:00+00")],
             lines=[("o40", 1, "P3", 2, 5.0, 1, "2024-05-01 00:00:00+00")])
    dbt_build(warehouse, horizon_days=60)
    first = _marts(warehouse)
    assert first["marts.clv_training_set"].set_index("customer_id").loc["c2", "has_future_purchase"]

    # A new day (2024-04-20) moves as_of and the training cut-off to 2024-02-20, across c2's o40; plus a
    # late line of an old order, a re-delivered order with another time, web events and a new customer.
    _deliver(
        warehouse,
        customers=pd.DataFrame({"customer_id": ["c7"], "email": ["eve@shop.com"], "_batch_id": [3],
                                "_loaded_at": [LOADED_3]}),
        orders=[
            ("o41", "c7", "2024-04-20 09:00", "completed", 3, LOADED_3),
            ("o42", "c1", "2024-04-20 10:00", "completed", 3, LOADED_3),
            ("o12", "c1", "2024-03-20 12:00", "completed", 3, LOADED_3),
        ],
        lines=[
            ("o41", 1, "P1", 1, 10.0, 3, LOADED_3),
            ("o42", 1, "P2", 1, 20.0, 3, LOADED_3),
            ("o1", 3, "P3", 1, 5.0, 3, LOADED_3),
        ],
        web_events=[("c1", "s2", "view", "P1", "2024-04-19 10:00", 3, LOADED_3)],
    )
    night = dbt_build(warehouse, horizon_days=60)
    assert night.node("int_customer_feature_state_p0").status == night.node("int_customer_feature_state_p1").status \
        == "success"
    incremental = _marts(warehouse)

    features = incremental["marts.customer_features"].set_index("customer_id")
    assert str(features.loc["c7", "as_of_date"]) == "2024-04-20"
    assert features.loc["c1", "n_web_events"] == 1
    training = incremental["marts.clv_training_set"].set_index("customer_id")
    # o40 is now before c2's training cut-off: a feature, no longer a label
    assert training.loc["c2", "n_orders"] == 2 and not training.loc["c2", "has_future_purchase"]
    _assert_equals_full_refresh(warehouse, incremental)

    # snapshot × customer is unique by an index on each part (no data test re-checks it), also on the tables
    # the full refresh just rebuilt
    for part in ("int_customer_feature_state_p0", "int_customer_feature_state_p1"):
        with connect(warehouse) as conn:
            if not conn.execute(f"select exists (select from staging.{part})").fetchone()[0]:
                continue
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(f"insert into staging.{part} select * from staging.{part} limit 1")


def test_a_delivery_touching_one_customer_rewrites_only_that_customer(warehouse):
    load_fixture(warehouse)
    dbt_build(warehouse, horizon_days=60)
    before = _state_versions(warehouse)

    # web events of c2 only: no order, so as_of, the price medians and the category ranks stay put
    _deliver(warehouse, web_events=[
        ("c2", "s3", "view", "P2", "2024-03-30 10:00", 3, LOADED_3),
        ("c2", "s3", "page_view", None, "2024-03-30 10:01", 3, LOADED_3),
    ])
    dbt_build(warehouse, horizon_days=60)
    after = _state_versions(warehouse)
    assert before.keys() == after.keys()
    rewritten = {key for key in after if after[key] != before[key]}
    # c2, and c1 whose orders came in the newest earlier delivery (LOADED_2): like the fact tables, the
    # state re-processes whatever lies within the look-back before its watermark. c4 (LOADED_1) is left alone.
    assert {customer for _, customer in rewritten} == {"c1", "c2"}
    assert ("c4" in {customer for _, customer in after}) and {(0, "c2"), (1, "c2")} <= rewritten
    incremental = _marts(warehouse)
    assert incremental["marts.customer_features"].set_index("customer_id").loc["c2", "n_web_events"] == 2

    # a later order disqualified (its customer turns out to be a test account) leaves that customer's row
    _deliver(warehouse, customers=pd.DataFrame({"customer_id": ["c2"], "email": ["bob@new.com"],
                                                "is_test_account": [True], "_batch_id": [4],
                                                "_loaded_at": [LOADED_4]}))
    dbt_build(warehouse, horizon_days=60)
    incremental = _marts(warehouse)
    assert "c2" not in set(incremental["marts.customer_features"]["customer_id"])
    _assert_equals_full_refresh(warehouse, incremental)


def test_a_moved_price_median_rewrites_no_other_buyer(warehouse):
    """Cheap Kitchen lines of c2 move Kitchen's price median at as_of (10 -> 5): every Kitchen buyer's
    avg_price_index moves, yet only the customers with new data are recomputed (the index is derived over the
    state). Web events of a customer without orders leave no state row, as in a full refresh."""
    load_fixture(warehouse)
    dbt_build(warehouse, horizon_days=60)
    before = _state_versions(warehouse)
    index_before = _marts(warehouse)["marts.customer_features"].set_index("customer_id")["avg_price_index"]
    assert index_before["c4"] == 1.0  # one Mug at 10.0, Kitchen's median

    # dated before as_of (2024-04-01), so the cut-offs stay; Kitchen stays behind Home by spend (ranks stay)
    _deliver(
        warehouse,
        orders=[("o43", "c2", "2024-03-30 09:00", "completed", 3, LOADED_3)],
        lines=[("o43", k, "P3", 1, 1.0, 3, LOADED_3) for k in (1, 2, 3)],
        web_events=[("c9", "s9", "view", "P1", "2024-03-30 10:00", 3, LOADED_3)],
    )
    dbt_build(warehouse, horizon_days=60)
    after = _state_versions(warehouse)
    rewritten = {customer for key, customer in ((k, k[1]) for k in after) if after[key] != before.get(key)}
    # c2 (new order) and c1 (within the look-back of the last delivery, see above); not c4
    assert rewritten == {"c1", "c2"}
    assert "c9" not in {customer for _, customer in after}
    incremental = _marts(warehouse)
    assert incremental["marts.customer_features"].set_index("customer_id").loc["c4", "avg_price_index"] == 2.0
    _assert_equals_full_refresh(warehouse, incremental)

    # the point-in-time test recomputes the medians per cut-off on its own: a training row priced against
    # other medians (e.g. ones that saw later lines) fails it
    with connect(warehouse) as conn:
        conn.execute("update marts.clv_training_set set avg_price_index = avg_price_index * 1.5")
        conn.commit()
    with pytest.raises(DbtBuildFailed) as caught:
        run_dbt(warehouse, ["test", "--select", "assert_training_features_do_not_read_after_cutoff"],
                vars={"horizon_days": 60, "training_snapshots": 1})
    assert caught.value.result.failed_nodes[0].failures >= 1


def test_the_daily_line_summary_rewrites_the_changed_days_only(warehouse):
    """int_order_lines_daily (what the category ranks, the price medians and the point-in-time tests read
    instead of every line) rewrites the days of the night's lines, and the days whose line count changed: the
    old date of a re-delivered order that moved, which the load time alone cannot find. A drifted day fails
    the summary's data test and is repaired by the next night."""
    load_fixture(warehouse)
    dbt_build(warehouse, horizon_days=60)
    before = _daily_versions(warehouse)
    assert {day for day, _, _ in before} >= {"2024-02-01", "2024-03-01", "2024-03-15"}

    _deliver(
        warehouse,
        orders=[
            ("o44", "c4", "2024-03-28 09:00", "completed", 3, LOADED_3),
            ("o4", "c2", "2024-02-03 10:00", "completed", 3, LOADED_3),  # was 2024-02-01, that day's only order
        ],
        lines=[("o44", 1, "P1", 1, 10.0, 3, LOADED_3)],
    )
    dbt_build(warehouse, horizon_days=60)
    after = _daily_versions(warehouse)
    days_after = {day for day, _, _ in after}
    assert "2024-02-01" not in days_after and {"2024-02-03", "2024-03-28"} <= days_after
    rewritten = {key[0] for key in after if after[key] != before.get(key)}
    # the days of the lines the fact (re)wrote since the summary's watermark (LOADED_2 less the look-back:
    # tonight's, and those of the earlier delivery inside the look-back, as every incremental model does)
    with connect(warehouse) as conn:
        delivered = {str(day) for (day,) in conn.execute(
            "select distinct order_date from marts.fct_order_lines "
            "where _source_loaded_at > %s::timestamptz - interval '6 hours'", [LOADED_2])}
    assert {"2024-02-03", "2024-03-28", "2024-01-10", "2024-03-20"} <= delivered
    assert rewritten == delivered
    assert not rewritten & {"2024-03-01", "2024-03-15"}  # untouched days keep their rows
    _assert_equals_full_refresh(warehouse, _marts(warehouse))

    with connect(warehouse) as conn:
        conn.execute("update staging.int_order_lines_daily set n_lines = n_lines + 1 "
                     "where order_date = '2024-03-01' and unit_price = 5")
        conn.commit()
    with pytest.raises(DbtBuildFailed) as caught:
        run_dbt(warehouse, ["test", "--select", "assert_order_lines_daily_matches_lines"],
                vars={"horizon_days": 60})
    assert caught.value.result.failed_nodes[0].failures == 1
    dbt_build(warehouse, horizon_days=60)  # its tests include that one: it passes again
    repaired = _daily_versions(warehouse)
    assert {key[0] for key in repaired if repaired[key] != after[key]} >= {"2024-03-01"}
