"""Least privilege: log in as a member of each role and check what it can and cannot do.

One warehouse for the module, built the way production runs it: roles applied first, the raw layer loaded
by a crm_loader login (the generator), dbt built by a crm_transformer login, ML output published by a
crm_trainer login, and campaign tools reading as a marketing_reader login.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pandas as pd
import psycopg
import pytest
from psycopg import errors

from ml.dbt import dbt_build
from ml.ingest.generator import GeneratorParams, generate
from ml.publish import publish
from ml.roles import GROUP_ROLES, PERSONAL_DATA_COLUMNS, apply_roles, create_login, drop_login
from ml.warehouse import connect, create_database, drop_database, init_schemas

AS_OF = dt.date(2025, 12, 31)
# Marts the ML code reads: keyed by the surrogate customer_id, never by a personal attribute.
ML_MARTS = ("customer_features", "clv_training_set", "clv_scoring_set", "basket_lines", "fct_order_lines",
            "fct_orders", "feature_categories", "dim_products")
RAW_TABLES = ("raw.customers", "raw.products", "raw.orders", "raw.order_lines", "raw.web_events")


class Warehouse:
    def __init__(self, admin, logins):
        self.admin = admin  # Settings of the warehouse owner
        self.logins = logins  # role -> Settings of a login in that role

    def as_role(self, role: str, **kwargs) -> psycopg.Connection:
        return connect(self.logins[role], autocommit=True, **kwargs)


def _as_login(settings, name: str):
    from dataclasses import replace
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(settings.warehouse_url)
    netloc = f"{name}:pw-{name}@{parts.hostname}:{parts.port}"
    return replace(settings, warehouse_url=urlunsplit(parts._replace(netloc=netloc)))


def _build_audience(conn) -> None:
    """An audience mart the way dbt's table materialization writes one: a __dbt_tmp table, then a rename.

    The contract's ``marts.campaign_audiences`` is a downstream dbt model; when the project has it, the real
    build made it already. Its stand-in here deliberately carries an email column, which marketing must
    still not be able to read.
    """
    conn.execute("drop table if exists marts.campaign_audiences__dbt_tmp")
    conn.execute(
        """
        create table marts.campaign_audiences__dbt_tmp as
        select s.customer_id, s.score, c.email, c.rfm_segment
        from ml.customer_scores s join marts.dim_customers c using (customer_id)
        """
    )
    conn.execute("drop table if exists marts.campaign_audiences")
    conn.execute("alter table marts.campaign_audiences__dbt_tmp rename to campaign_audiences")


def _publish_scores(conn, as_of: dt.date) -> int:
    ids = [r[0] for r in conn.execute("select customer_id from marts.customer_features order by 1 limit 50")]
    frame = pd.DataFrame({"customer_id": ids, "score": [i / 50 for i in range(len(ids))]})
    publish(conn, "customer_scores", frame, as_of=as_of, run_id="run-roles", model_name="roles-test",
            model_version="1", key_columns=["customer_id"])
    return len(ids)


@pytest.fixture(scope="module")
def secured(server_settings):
    admin = server_settings.with_database(f"crm_roles_{uuid.uuid4().hex[:8]}")
    create_database(admin)
    suffix = uuid.uuid4().hex[:6]
    names = {role: f"t_{role}_{suffix}" for role in GROUP_ROLES}
    with connect(admin, autocommit=True) as conn:
        init_schemas(conn)
        apply_roles(conn)  # before any data: everything created afterwards must be covered
        for role, name in names.items():
            create_login(conn, role, name, f"pw-{name}")
    logins = {role: _as_login(admin, name) for role, name in names.items()}
    wh = Warehouse(admin, logins)
    try:
        with wh.as_role("crm_loader") as conn:
            generate(conn, GeneratorParams(customers=300, days=365, seed=5, end_date=AS_OF, n_products=100))
        dbt_build(logins["crm_transformer"], as_of=AS_OF)
        with wh.as_role("crm_trainer") as conn:
            _publish_scores(conn, AS_OF)
        with wh.as_role("crm_transformer") as conn:
            exists = conn.execute("select to_regclass('marts.campaign_audiences')").fetchone()[0]
            if exists is None:
                _build_audience(conn)
        yield wh
    finally:
        drop_database(admin)
        with connect(server_settings.with_database("postgres"), autocommit=True) as conn:
            for name in names.values():
                drop_login(conn, name)


def denied(conn: psycopg.Connection, query: str) -> bool:
    """True when the statement fails for lack of privilege (nothing else counts as denied)."""
    try:
        conn.execute(query).fetchall() if query.lstrip().lower().startswith("select") else conn.execute(query)
    except errors.InsufficientPrivilege:
        return True
    return False


def test_marketing_reader_reads_ml_and_audiences_but_not_raw_staging_or_personal_data(secured):
    with secured.as_role("marketing_reader") as conn:
        assert conn.execute("select current_user").fetchone()[0] == "marketing_reader"
        assert conn.execute("select count(*) from ml.customer_scores").fetchone()[0] == 50
        assert conn.execute("select count(*) from ml.customer_scores_history").fetchone()[0] == 50
        assert conn.execute("select count(*) from ml.published_tables").fetchone()[0] >= 1
        assert conn.execute("select count(customer_id), count(rfm_segment) from marts.campaign_audiences"
                            ).fetchone()[0] > 0
        # The audience's personal column, and every other mart, raw and staging, are out of reach.
        assert denied(conn, "select email from marts.campaign_audiences")
        assert denied(conn, "select * from marts.campaign_audiences")
        for table in RAW_TABLES:
            assert denied(conn, f"select count(*) from {table}"), table
        assert denied(conn, "select count(*) from staging.stg_crm__customers")
        for column in ("email", "full_name", "birth_date", "customer_id"):
            assert denied(conn, f"select {column} from marts.dim_customers"), column
        assert denied(conn, "select count(*) from marts.customer_features")
        assert denied(conn, "select count(*) from audit.load_batches")
        # Read only.
        assert denied(conn, "delete from ml.customer_scores_history")
        assert denied(conn, "create table ml.x (a int)")
        assert denied(conn, "create table marts.x (a int)")


def test_loader_writes_raw_and_audit_but_reads_nothing_downstream(secured):
    with secured.as_role("crm_loader") as conn:
        assert conn.execute("select count(*) from audit.load_batches").fetchone()[0] >= 1
        with conn.transaction():
            conn.execute("insert into raw.orders (order_id, _batch_id) values ('loader-probe', -7)")
            raise psycopg.Rollback  # allowed, and left out of the marts the next tests rebuild
        with conn.transaction():  # the one truncate it may ask for: of an empty raw table (this one has rows)
            assert conn.execute("select audit.crm_truncate_if_empty('raw.orders')").fetchone()[0] is False
        for query in ("select count(*) from raw.customers", "select count(*) from staging.stg_crm__orders",
                      "select count(*) from marts.fct_orders", "select count(*) from ml.customer_scores",
                      "select count(*) from marts.campaign_audiences", "delete from raw.orders",
                      "truncate raw.orders", "drop table raw.orders", "create table raw.x (a int)",
                      "create table marts.x (a int)"):
            assert denied(conn, query), query


def test_transformer_reads_raw_and_owns_marts_but_cannot_touch_raw_or_ml(secured):
    with secured.as_role("crm_transformer") as conn:
        assert conn.execute("select count(*) from raw.customers").fetchone()[0] > 0
        assert conn.execute("select count(email) from marts.dim_customers").fetchone()[0] > 0
        owner = conn.execute("select tableowner from pg_tables where schemaname = 'marts' "
                             "and tablename = 'dim_customers'").fetchone()[0]
        assert owner == "crm_transformer"
        for query in ("insert into raw.orders (order_id, _batch_id) values ('x', -1)", "delete from raw.orders",
                      "delete from ml.customer_scores_history", "create table ml.x (a int)",
                      "select count(*) from audit.quarantine"):
            assert denied(conn, query), query


def test_trainer_reads_marts_without_personal_data_and_publishes_ml(secured):
    with secured.as_role("crm_trainer") as conn:
        for mart in ML_MARTS:
            assert conn.execute(f"select count(*) from marts.{mart}").fetchone()[0] >= 0
        assert conn.execute("select count(customer_id), count(rfm_segment) from marts.dim_customers"
                            ).fetchone()[0] > 0
        for column in ("email", "full_name", "birth_date"):
            assert denied(conn, f"select {column} from marts.dim_customers"), column
        assert denied(conn, "select * from marts.dim_customers")
        for query in ("select count(*) from raw.customers", "select count(*) from staging.stg_crm__customers",
                      "delete from marts.fct_orders", "create table marts.x (a int)",
                      "insert into raw.orders (order_id, _batch_id) values ('x', -1)"):
            assert denied(conn, query), query


def test_grants_survive_dbt_rebuild_and_republish(secured):
    dbt_build(secured.logins["crm_transformer"], as_of=AS_OF)  # every marts table is replaced
    if not _audience_is_a_dbt_model():
        with secured.as_role("crm_transformer") as conn:
            _build_audience(conn)  # the stand-in is rebuilt the way dbt rebuilds a table
    with secured.as_role("crm_trainer") as conn:
        assert conn.execute("select count(*) from marts.customer_features").fetchone()[0] > 0
        assert denied(conn, "select email from marts.dim_customers")
        _publish_scores(conn, AS_OF + dt.timedelta(days=1))  # a new as_of: a new history partition
    with secured.as_role("marketing_reader") as conn:
        as_of = conn.execute("select distinct as_of from ml.customer_scores").fetchall()
        assert as_of == [(AS_OF + dt.timedelta(days=1),)]
        assert conn.execute("select count(*) from ml.customer_scores_history").fetchone()[0] == 100
        assert conn.execute("select count(customer_id) from marts.campaign_audiences").fetchone()[0] > 0
        assert denied(conn, "select email from marts.campaign_audiences")
        assert denied(conn, "select customer_id from marts.dim_customers")


def _audience_is_a_dbt_model() -> bool:
    from ml.config import PROJECT_ROOT

    return any((PROJECT_ROOT / "dbt_project" / "models").rglob("campaign_audiences.sql"))


def test_ml_marts_use_a_surrogate_customer_key_not_personal_data(secured):
    with connect(secured.admin) as conn:
        columns = conn.execute(
            "select table_name, column_name from information_schema.columns "
            "where table_schema in ('marts', 'ml') and table_name = any(%s)",
            [list(ML_MARTS) + ["customer_scores", "customer_scores_history"]],
        ).fetchall()
        found = {t for t, _ in columns}
        assert set(ML_MARTS) <= found, set(ML_MARTS) - found
        personal = [(t, c) for t, c in columns if c in PERSONAL_DATA_COLUMNS]
        assert not personal, f"ML marts hold personal data: {personal}"
        # The key is the source's customer id: not an email, and not any customer's email either.
        leaks = conn.execute(
            """
            select count(*) from marts.customer_features f
            where f.customer_id like '%%@%%'
               or exists (select 1 from marts.dim_customers c where c.email = f.customer_id)
            """
        ).fetchone()[0]
        assert leaks == 0


def test_personal_data_columns_match_the_sql_rules(secured):
    with connect(secured.admin) as conn:
        in_sql = conn.execute("select audit.crm_personal_data_columns()").fetchone()[0]
    assert tuple(in_sql) == PERSONAL_DATA_COLUMNS


def test_apply_roles_is_idempotent(secured):
    def privileges(conn):
        return conn.execute(
            """
            select r.rolname, c.oid::regclass::text,
                   has_table_privilege(r.rolname, c.oid, 'select'), has_table_privilege(r.rolname, c.oid, 'insert'),
                   has_column_privilege(r.rolname, c.oid, 'customer_id', 'select')
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            cross join pg_roles r
            where n.nspname in ('raw', 'staging', 'marts', 'ml', 'audit') and c.relkind in ('r', 'v', 'p')
              and r.rolname = any(%s)
              and exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attname = 'customer_id')
            order by 1, 2
            """,
            [list(GROUP_ROLES)],
        ).fetchall()

    with connect(secured.admin, autocommit=True) as conn:
        before = privileges(conn)
        apply_roles(conn)
        apply_roles(conn)
        assert privileges(conn) == before
