"""The incremental scoring night: only customers whose inputs changed are re-scored, the rest carried forward.

One generated warehouse (1,500 customers), trained once; then one new day is appended, the basket marts are
rebuilt for the next as_of, and the champion scores incrementally. The published table must equal, row for
row, a full re-score of every customer with the same champion (only ``scored_as_of`` / ``scored_run_id``
say which night computed a carried row); carried rows are yesterday's rows unchanged; a rerun publishes the
same table; a changed champion, a backfill or a table without fingerprints scores everyone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pandas as pd
import pytest
from helpers_warehouse import generated_warehouse

from ml.ingest.generator import GeneratorParams, generate
from ml.publish import RUN_COLUMNS, content_checksum
from ml.train_baskets import MODEL_NAME, build_basket_marts, plan_scoring, score_baskets, train_baskets
from ml.warehouse import connect, read_table

GENERATED = GeneratorParams(customers=1500, days=730, seed=7)
DAY1 = GENERATED.resolved_end_date
DAY2 = DAY1 + dt.timedelta(days=1)
PARAMS = {"min_support": 0.0003, "category_min_support": 0.01, "min_confidence": 0.1, "min_lift": 1.0,
          "max_len": 3, "rule_recommender_min_support": 0.001}
MODEL = f"{MODEL_NAME}_{uuid.uuid4().hex[:6]}"
WHO_SCORED = (*RUN_COLUMNS, "scored_as_of")  # the columns that say which night computed a row
CONTENT = ["customer_id", "rank", "product_id", "product_name", "score", "method", "reason", "recommender",
           "input_fingerprint"]


def _recs(conn) -> pd.DataFrame:
    frame = read_table(conn, "ml.product_recommendations")
    return frame.sort_values(["customer_id", "rank"], ignore_index=True)


@pytest.fixture(scope="module")
def nights(server_settings, tmp_path_factory):
    """Night 1 trains (as_of DAY1); one generated day is appended and night 2 scores incrementally (DAY2)."""
    root = tmp_path_factory.mktemp("incremental_mlflow")
    with generated_warehouse(server_settings, root, GENERATED) as settings:
        build_basket_marts(settings, DAY1)
        trained = train_baskets(settings, as_of=DAY1, model_name=MODEL, **PARAMS)
        with connect(settings) as conn:
            night1 = _recs(conn)
            generate(conn, dataclasses.replace(GENERATED, append_days=1))
        build_basket_marts(settings, DAY2)
        scored = score_baskets(settings, as_of=DAY2, model_name=MODEL, orchestrator_run_id="night2")
        with connect(settings) as conn:
            night2 = _recs(conn)
            checksum = content_checksum(conn, "product_recommendations", exclude=WHO_SCORED)
            new_day = {c for (c,) in conn.execute(
                "select distinct customer_id from marts.basket_lines where ordered_at::date = %s "
                "and customer_id is not null", [DAY2])}
        yield settings, trained, night1, scored, night2, checksum, new_day


def test_only_customers_with_new_lines_are_scored_and_the_rest_carried_unchanged(nights):
    _, trained, night1, scored, night2, _, new_day = nights
    report = scored.reports["product_recommendations"]
    assert new_day, "the appended day brought no basket line: the test would prove nothing"
    rescored = set(night2.loc[night2["scored_as_of"].astype(str) == DAY2.isoformat(), "customer_id"])
    carried = night2[night2["scored_as_of"].astype(str) == DAY1.isoformat()]
    # exactly the customers whose lines changed: those who bought on the new day (nothing else moved here)
    assert rescored == new_day
    assert report.rows_carried == len(carried) > 0
    assert scored.n_customers == night2["customer_id"].nunique() == len(set(night1["customer_id"]) | new_day)
    # carried rows are night 1's rows, unchanged (and say so: night 1's as_of and run)
    before = night1.set_index(["customer_id", "rank"])[CONTENT[2:]]
    after = carried.set_index(["customer_id", "rank"])[CONTENT[2:]]
    pd.testing.assert_frame_equal(after, before.loc[after.index], check_dtype=False)
    assert set(carried["scored_run_id"]) == {trained.run_id}
    assert set(night2["mlflow_run_id"]) == {scored.run_id}  # published by tonight's scoring run
    assert set(night2.loc[night2["customer_id"].isin(rescored), "scored_run_id"]) == {scored.run_id}


def test_incremental_night_equals_a_full_rescore_and_reruns_are_identical(nights):
    settings, _, _, _, night2, content, _ = nights
    full = score_baskets(settings, as_of=DAY2, model_name=MODEL, incremental=False)
    assert full.reports["product_recommendations"].rows_carried == 0
    with connect(settings) as conn:
        rescored_all = _recs(conn)
        assert content_checksum(conn, "product_recommendations", exclude=WHO_SCORED) == content
        full_checksum = content_checksum(conn, "product_recommendations")
    assert (rescored_all["scored_as_of"].astype(str) == DAY2.isoformat()).all()
    pd.testing.assert_frame_equal(night2[CONTENT], rescored_all[CONTENT], check_dtype=False)
    # a rerun of the night carries every customer from tonight's own table: the same published table
    rerun = score_baskets(settings, as_of=DAY2, model_name=MODEL)
    assert rerun.reports["product_recommendations"].rows_carried == len(rescored_all)
    with connect(settings) as conn:
        assert content_checksum(conn, "product_recommendations") == full_checksum


def test_a_changed_champion_or_a_backfill_scores_everyone(nights):
    settings, _, _, scored, _, _, _ = nights
    champion = scored.champion_version
    with connect(settings) as conn:
        same = plan_scoring(conn, as_of=DAY2, model_name=MODEL, champion_version=champion)
        changed = plan_scoring(conn, as_of=DAY2, model_name=MODEL, champion_version=str(int(champion) + 1))
        backfill = plan_scoring(conn, as_of=DAY1, model_name=MODEL, champion_version=champion)
        other = plan_scoring(conn, as_of=DAY2, model_name=f"{MODEL}_other", champion_version=champion)
    assert same.carry_from == DAY2
    assert changed.carry_from is None and "every customer" in changed.reason
    assert backfill.carry_from is None and "backfill" in backfill.reason
    assert other.carry_from is None
