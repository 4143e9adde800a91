"""The synthetic CRM generator: deterministic for a seed, planted truth stored and true to the raw rows."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date, timedelta

import numpy as np
import pytest

import ml.ingest.generator as generator
from ml.errors import CrmError
from ml.ingest.generator import GeneratorParams, generate
from ml.warehouse import connect, create_database, drop_database, init_schemas, table_counts

RAW_TABLES = ["raw.customers", "raw.products", "raw.orders", "raw.order_lines", "raw.web_events"]
SMALL = GeneratorParams(customers=1000, days=730, seed=7)


@pytest.fixture
def other_warehouse(server_settings):
    """A second fresh warehouse database, to compare two independent generations."""
    settings = server_settings.with_database(f"crm_test_{uuid.uuid4().hex[:10]}")
    create_database(settings)
    with connect(settings) as conn:
        init_schemas(conn)
    yield settings
    drop_database(settings)


def _content_digest(conn) -> dict[str, str]:
    """md5 of every generated table's rows (load bookkeeping columns left out), in a fixed order."""
    tables = RAW_TABLES + ["audit.planted_customers", "audit.planted_bundles", "audit.planted_truth"]
    digests = {}
    for table in tables:
        schema, name = table.split(".")
        columns = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s "
            "and column_name not in ('_batch_id', '_loaded_at', 'batch_id') order by ordinal_position",
            [schema, name],
        )]
        cols = ", ".join(columns)
        digests[table] = conn.execute(
            f"select md5(string_agg(t::text, '|' order by t::text)) from (select {cols} from {table}) t"
        ).fetchone()[0]
    return digests


def _truth(conn) -> dict:
    return dict(conn.execute("select key, value from audit.planted_truth").fetchall())


def test_same_seed_gives_identical_tables_and_another_seed_does_not(warehouse, other_warehouse, server_settings):
    with connect(warehouse) as conn:
        first = generate(conn, SMALL)
        digest_a = _content_digest(conn)
    with connect(other_warehouse) as conn:
        generate(conn, SMALL)
        digest_b = _content_digest(conn)
        # A different seed, loaded as a second batch in the same database: the tables change.
        other = generate(conn, GeneratorParams(customers=1000, days=730, seed=8))
        digest_c = _content_digest(conn)
    assert first.reconciles and first.lines_read > 0
    assert all(digest_a[t] is not None for t in digest_a)
    assert digest_a == digest_b
    assert not other.skipped
    assert all(digest_c[t] != digest_a[t] for t in RAW_TABLES)


def test_second_generate_with_same_params_adds_nothing(warehouse):
    with connect(warehouse) as conn:
        first = generate(conn, SMALL)
        before = table_counts(conn, ("raw", "audit"))
        again = generate(conn, GeneratorParams(customers=1000, days=730, seed=7, end_date=date(2025, 12, 31)))
        after = table_counts(conn, ("raw", "audit"))
        batch = conn.execute(
            "select source, source_name, lines_read, rows_loaded, status from audit.load_batches"
        ).fetchall()
    assert again.skipped and again.already_loaded_as == first.batch_id
    assert before == after
    assert batch == [("generator", "customers=1000 days=730 seed=7 end_date=2025-12-31",
                      first.lines_read, first.lines_read, "loaded")]
    assert first.rows_loaded["raw.order_lines"] == after["raw.order_lines"] == first.lines_read


def test_planted_truth_is_stored_and_matches_the_raw_rows(warehouse):
    params = GeneratorParams(customers=1500, days=730, seed=11, missing_customer_rate=0.02, bad_price_rate=0.01,
                             future_order_rate=0.01, duplicate_order_rate=0.01, test_account_rate=0.02)
    end = params.resolved_end_date
    with connect(warehouse) as conn:
        report = generate(conn, params)
        truth = _truth(conn)
        q = lambda sql, *args: conn.execute(sql, list(args)).fetchone()[0]  # noqa: E731
        observed = {
            "duplicate_order_lines": q("select count(*) - count(distinct (order_id, line_no)) from raw.order_lines"),
            "duplicate_orders": q("select count(*) - count(distinct order_id) from raw.orders"),
            "orders_missing_customer": q("select count(*) from raw.orders where customer_id is null"),
            "future_orders": q("select count(*) from raw.orders where ordered_at >= %s", end + timedelta(days=1)),
            "bad_unit_price_lines": q("select count(*) from raw.order_lines where unit_price <= 0"),
            "bad_emails": q("select count(*) from raw.customers where email not like '%%@%%'"),
            "gender_variant_spellings": q(
                "select count(*) from raw.customers where gender is not null and gender not in ('M', 'F')"),
            "bad_countries": q(
                "select count(*) from raw.customers where country <> btrim(country) or country = lower(country)"),
            "bad_birth_dates": q(
                "select count(*) from raw.customers where birth_date = '1900-01-01' or birth_date > %s", end),
            "test_account_customers": q(
                "select count(*) from raw.customers where is_test_account or email like '%%@test.example'"),
            "cancelled_orders": q("select count(*) from raw.orders where status = 'cancelled'"),
            "return_orders": q("select count(*) from raw.orders where status = 'returned'"),
        }
        planted = conn.execute(
            "select count(*), count(distinct segment), min(purchase_rate), min(dropout_prob), "
            "max(dropout_prob), min(mean_order_value), count(*) filter (where is_alive_at_end) "
            "from audit.planted_customers where batch_id = %s", [report.batch_id]
        ).fetchone()
        customers_with_truth = q(
            "select count(*) from raw.customers c join audit.planted_customers p using (customer_id)")
        # What a foreign key would check (the table has none, for load speed): every row is of this batch.
        assert q("select count(*) from audit.planted_customers where batch_id <> %s", report.batch_id) == 0
        wrong_sign = q(
            "select count(*) from raw.order_lines l join raw.orders o using (order_id) "
            "where (o.status = 'returned' and l.quantity >= 0) or (o.status <> 'returned' and l.quantity <= 0)")
        # A return takes back an item the same customer bought in an earlier order.
        unbought_returns = q(
            """
            select count(*) from raw.order_lines rl join raw.orders r using (order_id)
            where r.status = 'returned' and r.customer_id is not null and not exists (
                select 1 from raw.order_lines bl join raw.orders b using (order_id)
                where b.customer_id = r.customer_id and b.status = 'completed'
                  and bl.product_id = rl.product_id and b.ordered_at < r.ordered_at)
            """
        )
        ids = conn.execute(
            "select (select min(customer_id) from raw.customers), (select min(product_id) from raw.products), "
            "(select min(order_id) from raw.orders)").fetchone()
        lines_read = q("select lines_read from audit.load_batches where batch_id = %s", report.batch_id)
        lines = q("select count(*) from raw.order_lines")

    for key, count in observed.items():
        entry = truth[f"dirt.{key}"]
        assert entry["count"] == count, key
        assert entry["rate"] == getattr(params, {
            "duplicate_order_lines": "duplicate_line_rate", "duplicate_orders": "duplicate_order_rate",
            "orders_missing_customer": "missing_customer_rate", "future_orders": "future_order_rate",
            "bad_unit_price_lines": "bad_price_rate", "bad_emails": "bad_email_rate",
            "gender_variant_spellings": "gender_variant_rate", "bad_countries": "bad_country_rate",
            "bad_birth_dates": "bad_birth_date_rate", "test_account_customers": "test_account_rate",
            "cancelled_orders": "cancel_rate", "return_orders": "return_rate"}[key])
        assert count > 0, f"{key}: nothing planted at rate {entry['rate']} — the test would not see a bug"
    assert truth["params"]["customers"] == 1500 and truth["params"]["seed"] == 11
    n, n_segments, min_rate, min_p, max_p, min_value, n_alive = planted
    assert n == customers_with_truth == 1500
    assert 4 <= n_segments <= 8 and n_segments == params.n_segments == len(truth["segments"])
    assert min_rate > 0 and 0 < min_p and max_p < 1 and min_value > 0 and 0 < n_alive < n
    assert sum(s["customers"] for s in truth["segments"]) == 1500
    assert wrong_sign == 0 and unbought_returns == 0
    assert ids == ("C0000001", "P00001", "O00000001")
    assert lines_read == lines == report.lines_read
    # 8–20 order lines per customer over two years, and web events at most ~3 per order line.
    assert 8 <= lines / 1500 <= 20
    assert 0 < report.rows_loaded["raw.web_events"] <= 3 * lines


def test_bundles_have_lift_above_one_measured_on_the_baskets(warehouse):
    with connect(warehouse) as conn:
        generate(conn, SMALL)
        bundles = conn.execute(
            "select product_ids, add_prob, support, confidence, lift from audit.planted_bundles order by bundle_id"
        ).fetchall()
        # Recount each bundle's support independently over the completed baskets in raw.
        recount = []
        for product_ids, *_ in bundles:
            recount.append(conn.execute(
                """
                with baskets as (
                    select l.order_id, array_agg(distinct l.product_id) as items
                    from raw.order_lines l join raw.orders o using (order_id)
                    where o.status = 'completed' group by l.order_id
                )
                select count(*) filter (where items @> %s::text[])::float8 / count(*) from baskets
                """,
                [product_ids],
            ).fetchone()[0])
    assert 5 <= len(bundles) <= 10
    for (product_ids, add_prob, support, confidence, lift), support_in_raw in zip(bundles, recount, strict=True):
        assert 2 <= len(product_ids) <= 3
        assert lift > 1.5 and 0 < confidence <= 1 and support > 0
        assert support == pytest.approx(support_in_raw, rel=1e-9)
        # The rule first → rest fires at least as often as it was planted (minus sampling noise).
        assert confidence > 0.5 * add_prob


def test_customers_with_higher_planted_rate_buy_more(warehouse):
    with connect(warehouse) as conn:
        generate(conn, GeneratorParams(customers=2000, seed=3))
        rows = conn.execute(
            """
            select p.purchase_rate, p.dropout_prob, p.is_alive_at_end, count(distinct o.order_id) as n_orders,
                   max(o.ordered_at) filter (where o.ordered_at < '2026-01-01') as last_order
            from audit.planted_customers p
            left join raw.orders o on o.customer_id = p.customer_id and o.status <> 'returned'
            group by 1, 2, 3
            """
        ).fetchall()
    rate = np.array([r[0] for r in rows])
    orders = np.array([r[3] for r in rows], float)
    quartile = np.digitize(rate, np.quantile(rate, [0.25, 0.5, 0.75]))
    means = [orders[quartile == q].mean() for q in range(4)]
    assert means == sorted(means) and means[3] > 2 * means[0]
    # Churned customers are those whose drop-out probability was higher.
    alive = np.array([r[2] for r in rows])
    dropout = np.array([r[1] for r in rows])
    assert dropout[~alive].mean() > dropout[alive].mean()


def test_chunks_continue_ids_and_numbering(warehouse, monkeypatch):
    # Small chunks stand in for the 50k-customer chunks of a big run: ids must not collide across chunks.
    monkeypatch.setattr(generator, "CHUNK_CUSTOMERS", 300)
    with connect(warehouse) as conn:
        report = generate(conn, GeneratorParams(customers=1000, seed=5))
        checks = conn.execute(
            """
            select (select count(distinct customer_id) from raw.customers),
                   (select count(*) from audit.planted_customers),
                   (select count(*) from (select order_id from raw.orders group by order_id
                                          having count(distinct (customer_id, ordered_at)) > 1) x),
                   (select count(*) from (select session_id from raw.web_events group by session_id
                                          having count(distinct customer_id) > 1) x),
                   (select max(customer_id) from raw.customers)
            """
        ).fetchone()
    assert report.reconciles
    assert checks == (1000, 1000, 0, 0, "C0001000")


@pytest.mark.parametrize("bad", [dict(n_segments=9), dict(n_segments=3), dict(customers=0),
                                 dict(bad_email_rate=1.5), dict(days=5)])
def test_invalid_parameters_are_one_clear_error(bad):
    with pytest.raises(CrmError, match="invalid generator parameters"):
        GeneratorParams(**bad).validate()


def _batch_rows(conn, batch_ids) -> dict[str, int]:
    return {t: conn.execute(f"select count(*) from {t} where _batch_id = any(%s)", [batch_ids]).fetchone()[0]
            for t in RAW_TABLES}


def test_appended_days_continue_the_window_and_load_only_the_new_day(warehouse, other_warehouse, monkeypatch):
    # Three chunks, so the continuation replays each chunk's customers from its own stream.
    monkeypatch.setattr(generator, "CHUNK_CUSTOMERS", 400)
    end = SMALL.resolved_end_date
    with connect(warehouse) as conn:
        base = generate(conn, SMALL)
        window = _content_digest(conn)
        day1 = generate(conn, replace(SMALL, append_days=1))
        after_day1 = _batch_rows(conn, [base.batch_id])
        day2 = generate(conn, replace(SMALL, append_days=2))
        again = generate(conn, replace(SMALL, append_days=2))
        continued = _content_digest(conn)
        q = lambda sql, *args: conn.execute(sql, list(args)).fetchone()[0]  # noqa: E731
        # Every new order is on its own day, except the planted clock errors (dated after the new end).
        off_day = q("select count(*) from raw.orders where _batch_id = %s and ordered_at::date <> %s "
                    "and ordered_at < %s", day1.batch_id, end + timedelta(days=1), end + timedelta(days=2))
        orphans = q("select count(*) from raw.orders o where _batch_id = any(%s) and customer_id is not null "
                    "and not exists (select 1 from raw.customers c where c.customer_id = o.customer_id)",
                    [day1.batch_id, day2.batch_id])
        # Old customers keep buying: most of a day's orders are theirs, not the new signups'.
        old_buyers = q("select count(*) from raw.orders where _batch_id = any(%s) and customer_id <= %s",
                       [day1.batch_id, day2.batch_id], "C0001000")
        duplicate_customers = q("select count(*) - count(distinct customer_id) from raw.customers")
        max_order_before = q("select max(order_id) from raw.orders where _batch_id = %s", base.batch_id)
        min_order_after = q("select min(order_id) from raw.orders where _batch_id = %s", day1.batch_id)
        truth = q("select value from audit.planted_truth where batch_id = %s and key = 'append_day'", day2.batch_id)
    with connect(other_warehouse) as conn:
        direct = generate(conn, replace(SMALL, append_days=2))  # the window and both days in one call
        direct_digest = _content_digest(conn)

    # The window is untouched by the continuation, and continuing equals generating all the days at once.
    assert after_day1 == {t: base.rows_loaded.get(t, 0) for t in RAW_TABLES}
    assert continued == direct_digest and continued != window
    assert direct.lines_read == day2.lines_read and again.skipped and again.already_loaded_as == day2.batch_id
    # A day is a day: small next to the window (~1/730 of it), and not empty.
    per_day = base.lines_read / SMALL.days
    for day in (day1, day2):
        assert day.reconciles and 0 < day.lines_read < 5 * per_day
        assert set(day.rows_loaded) <= {"raw.customers", "raw.orders", "raw.order_lines"}
    assert off_day == 0 and orphans == 0 and old_buyers > 0 and duplicate_customers == 0
    assert min_order_after > max_order_before
    assert truth["day"] == 2 and truth["date"] == (end + timedelta(days=2)).isoformat()
