"""Fault: the database restarts in the middle of a dbt build.

The build must fail clearly (not hang, not report success), and its retry — what the Airflow task's retry
does — must succeed and leave marts identical to a build nobody disturbed (ordered-content checksums).

The restart needs a server of its own (a fast shutdown kills every connection on it), so this module starts
a dedicated embedded PostgreSQL on a free port beside the tests' usual one.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from psycopg import sql

from ml.config import Settings
from ml.dbt import DbtBuildFailed, dbt_build
from ml.ingest.generator import GeneratorParams, generate
from ml.warehouse import (
    connect,
    create_database,
    init_schemas,
    start_embedded,
    stop_embedded,
    wait_until_reachable,
)

AS_OF = "2025-12-31"
DATA = GeneratorParams(customers=400, days=365, seed=21)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def own_server(server_settings):
    """A dedicated embedded server (its own data folder and port), stopped at the end."""
    state = server_settings.state_dir.parent / (server_settings.state_dir.name + "-restart")
    settings = Settings.from_env({"CRM_STATE_DIR": str(state), "CRM_PG_PORT": str(_free_port())})
    if not settings.embedded:
        pytest.fail("this test restarts its own embedded server; WAREHOUSE_URL must not be set for it")
    stop_embedded(settings)  # a leftover from an interrupted run would hold another port
    start_embedded(settings)
    yield settings
    stop_embedded(settings)


def _warehouse(settings: Settings, name: str) -> Settings:
    db = settings.with_database(name)
    with connect(settings.with_database("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
    create_database(db)
    with connect(db) as conn:
        init_schemas(conn)
        generate(conn, DATA)
    return db


def mart_checksums(settings: Settings) -> dict[str, tuple[int, str]]:
    """``marts.<table> -> (rows, md5 of its rows as text in C-collation order)``: equal iff same contents.

    Load-time lineage columns (``*_loaded_at``: when the raw rows arrived) are left out: the two databases
    were loaded a few seconds apart; every other column, keys, money, dates and features, must match.
    """
    with connect(settings) as conn:
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(
            "select c.table_name, c.column_name from information_schema.columns c "
            "join pg_tables t on t.schemaname = c.table_schema and t.tablename = c.table_name "
            "where c.table_schema = 'marts' order by c.table_name, c.ordinal_position"
        ).fetchall():
            if not column.endswith("_loaded_at"):
                columns.setdefault(table, []).append(column)
        out = {}
        for table, kept in columns.items():
            row = sql.SQL("row({})::text").format(sql.SQL(", ").join(map(sql.Identifier, kept)))
            query = sql.SQL(
                "select count(*), md5(coalesce(string_agg(r, E'\\n' order by r collate \"C\"), '')) "
                "from (select {} as r from marts.{}) rows"
            ).format(row, sql.Identifier(table))
            out[table] = tuple(conn.execute(query).fetchone())
    return out


def _marts_built(settings: Settings) -> int:
    with connect(settings) as conn:
        return conn.execute("select count(*) from pg_tables where schemaname = 'marts'").fetchone()[0]


def test_dbt_build_interrupted_by_a_restart_fails_clearly_and_its_retry_equals_an_undisturbed_build(own_server):
    undisturbed = _warehouse(own_server, "undisturbed")
    disturbed = _warehouse(own_server, "disturbed")

    outcome: dict[str, object] = {}

    def build() -> None:
        try:
            outcome["result"] = dbt_build(disturbed, as_of=AS_OF)
        except Exception as err:  # the assertion below says what was expected
            outcome["error"] = err

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    # Mid-way: as soon as the first mart table exists (staging and intermediate are done, most marts and
    # all their tests are still to come), restart the server with a fast shutdown: every session is killed.
    deadline = time.monotonic() + 300
    while _marts_built(disturbed) == 0:
        assert worker.is_alive(), f"dbt ended before building any mart: {outcome}"
        assert time.monotonic() < deadline, "dbt built no mart in 300 s"
        time.sleep(0.05)
    stop_embedded(own_server)
    start_embedded(own_server)
    wait_until_reachable(own_server)
    worker.join(timeout=600)
    assert not worker.is_alive(), "dbt hung after the restart instead of failing"

    error = outcome.get("error")
    assert isinstance(error, DbtBuildFailed), f"the interrupted build did not fail clearly: {outcome}"
    message = str(error)
    assert "failed" in message and error.result.failed_nodes, message
    reasons = " ".join((n.message or "") for n in error.result.failed_nodes).lower() + error.result.output.lower()
    assert any(word in reasons for word in ("terminat", "connection", "shutdown", "closed")), message

    retry = dbt_build(disturbed, as_of=AS_OF)  # what the task's retry runs
    assert retry.success, retry.summary()

    dbt_build(undisturbed, as_of=AS_OF)
    expected = mart_checksums(undisturbed)
    got = mart_checksums(disturbed)
    assert set(got) == set(expected)
    assert got == expected, {t: (got[t], expected[t]) for t in expected if got[t] != expected[t]}
    # And no dbt leftovers (temporary or backup relations) survive the interruption.
    with connect(disturbed) as conn:
        leftovers = conn.execute(
            "select relname from pg_class where relname like '%%__dbt_tmp' or relname like '%%__dbt_backup'"
        ).fetchall()
    assert leftovers == []


def test_a_table_built_in_one_transaction_survives_a_crash_of_the_embedded_server(own_server):
    """The embedded server runs with wal_level minimal: a table created and filled in one transaction (how dbt
    builds a table, how a history partition is published) skips the WAL and is synced at commit instead. A
    crash right after the commit (immediate shutdown: no checkpoint, recovery from the WAL at the next start)
    must keep every row. (The session commits synchronously: the server's synchronous_commit off lets a
    crash lose the last ~0.6 s of commits by design, whatever the WAL level.)"""
    db = own_server.with_database("crashed")
    with connect(own_server.with_database("postgres"), autocommit=True) as conn:
        conn.execute("drop database if exists crashed with (force)")
    create_database(db)
    with connect(db, autocommit=True) as conn:
        assert conn.execute("show wal_level").fetchone()[0] == "minimal"
        conn.execute("set synchronous_commit = on")
        with conn.transaction():
            conn.execute("create table built as select g as id, md5(g::text) as payload "
                         "from generate_series(1, 200000) as g")
        expected = conn.execute("select count(*), md5(string_agg(payload, '' order by id)) from built").fetchone()
    assert stop_embedded(own_server, mode="immediate")
    start_embedded(own_server)
    wait_until_reachable(own_server)
    with connect(db) as conn:
        got = conn.execute("select count(*), md5(string_agg(payload, '' order by id)) from built").fetchone()
    assert got == expected
