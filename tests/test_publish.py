"""The one publish function: atomic swap, history by as_of, backfills, locks, readers, kill -9."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest
from helpers_warehouse import unique_index_columns

from ml.config import PROJECT_ROOT
from ml.publish import (
    METADATA_COLUMNS,
    PublishError,
    PublishLockTimeout,
    content_checksum,
    current_as_of,
    publish,
)
from ml.warehouse import connect, read_table

TODAY = dt.date(2024, 6, 30)


def _segments(n: int, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:06d}" for i in range(n)],
            "segment_id": rng.integers(0, 5, n).astype("int64"),
            "segment_name": rng.choice(["Champions", "At risk", "New", "Lost, sadly", 'Say "hi"'], n),
            "score": rng.random(n) + shift,
        }
    )


def _publish(settings_or_conn, frame, *, as_of=TODAY, run_id="run-a", version=1, table="customer_segments", **kw):
    return publish(
        settings_or_conn,
        table,
        frame,
        as_of=as_of,
        run_id=run_id,
        model_name="segmentation",
        model_version=version,
        key_columns=["customer_id"],
        **kw,
    )


def test_publish_writes_table_and_history_with_metadata(warehouse):
    frame = _segments(50)
    report = _publish(warehouse, frame, run_id="abc123")
    assert report.rows == 50 and report.replaced_current and report.current_as_of == TODAY
    with connect(warehouse) as conn:
        table = read_table(conn, "ml.customer_segments").sort_values("customer_id").reset_index(drop=True)
        history = read_table(conn, "ml.customer_segments_history")
    assert list(table.columns) == [*frame.columns, *METADATA_COLUMNS]
    assert table["customer_id"].tolist() == frame["customer_id"].tolist()
    assert table["segment_name"].tolist() == frame["segment_name"].tolist()
    np.testing.assert_allclose(table["score"].to_numpy(), frame["score"].to_numpy())
    assert set(table["mlflow_run_id"]) == {"abc123"}
    assert set(table["model_name"]) == {"segmentation"}
    assert set(table["model_version"].astype(str)) == {"1"}
    assert set(pd.to_datetime(table["as_of"]).dt.date) == {TODAY}
    assert table["scored_at"].notna().all()
    assert len(history) == 50


def test_categorical_columns_are_published_as_their_text_and_match_a_plain_frame(warehouse):
    """A pandas Categorical (how the recommendations frame keeps its repeated names small) is stored as the
    text of its values, missing values as NULL: the same table, checksum included, as the plain-text frame."""
    plain = _segments(40)
    plain.loc[3, "segment_name"] = None
    categorical = plain.astype({"segment_name": "category"})
    _publish(warehouse, plain, as_of=TODAY - dt.timedelta(days=1))
    _publish(warehouse, categorical)
    with connect(warehouse) as conn:
        types = dict(conn.execute("select column_name, data_type from information_schema.columns "
                                  "where table_schema = 'ml' and table_name = 'customer_segments'").fetchall())
        assert types["segment_name"] == "text"
        table = read_table(conn, "ml.customer_segments").sort_values("customer_id").reset_index(drop=True)
        without = ("as_of", "model_version", "mlflow_run_id", "scored_at")
        assert (content_checksum(conn, "customer_segments_history", as_of=TODAY, exclude=without)
                == content_checksum(conn, "customer_segments_history", as_of=TODAY - dt.timedelta(days=1),
                                    exclude=without))
    assert table["segment_name"].isna().tolist() == plain["segment_name"].isna().tolist()
    assert table["segment_name"].dropna().tolist() == plain["segment_name"].dropna().tolist()


def test_same_as_of_twice_gives_identical_table_and_history_count(warehouse):
    frame = _segments(200, seed=1)
    _publish(warehouse, frame, run_id="first")
    with connect(warehouse) as conn:
        first = content_checksum(conn, "customer_segments")
    second = _publish(warehouse, frame, run_id="second", version=2)
    third = _publish(warehouse, frame, run_id="third", version=3)
    assert second.history_rows_replaced == 200 and third.history_rows_replaced == 200
    with connect(warehouse) as conn:
        assert content_checksum(conn, "customer_segments") == first
        assert content_checksum(conn, "customer_segments_history") == first
        n_history = conn.execute("select count(*) from ml.customer_segments_history").fetchone()[0]
        runs = conn.execute("select distinct mlflow_run_id from ml.customer_segments").fetchall()
    assert n_history == 200
    assert runs == [("third",)]


def test_checksum_sees_a_changed_value(warehouse):
    frame = _segments(20)
    _publish(warehouse, frame)
    with connect(warehouse) as conn:
        before = content_checksum(conn, "customer_segments")
    _publish(warehouse, frame.assign(score=frame["score"].where(frame.index != 7, -1.0)))
    with connect(warehouse) as conn:
        assert content_checksum(conn, "customer_segments") != before


def test_history_keeps_each_as_of_and_backfill_does_not_replace_current(warehouse):
    today = _segments(30, seed=2)
    _publish(warehouse, today, as_of=TODAY, run_id="today")
    older = _segments(10, seed=3)
    report = _publish(warehouse, older, as_of=TODAY - dt.timedelta(days=7), run_id="backfill")
    assert not report.replaced_current and report.current_as_of == TODAY
    with connect(warehouse) as conn:
        current = read_table(conn, "ml.customer_segments")
        per_day = dict(
            conn.execute("select as_of, count(*) from ml.customer_segments_history group by 1").fetchall()
        )
        assert current_as_of(conn, "customer_segments") == TODAY
    assert set(current["mlflow_run_id"]) == {"today"} and len(current) == 30
    assert per_day == {TODAY: 30, TODAY - dt.timedelta(days=7): 10}
    newer = _publish(warehouse, _segments(5, seed=4), as_of=TODAY + dt.timedelta(days=1), run_id="tomorrow")
    assert newer.replaced_current
    with connect(warehouse) as conn:
        assert conn.execute("select count(*), min(mlflow_run_id) from ml.customer_segments").fetchone() == (
            5,
            "tomorrow",
        )


@pytest.mark.parametrize(
    "bad",
    ["Customer_Segments", "ml.x; drop table raw.customers", "segments--", "1abc", "", "a b", 'x"y', "café",
     "customer_segments_history"],
)
def test_invalid_table_names_are_rejected(warehouse, bad):
    with pytest.raises(PublishError, match="table name"):
        _publish(warehouse, _segments(3), table=bad)
    with connect(warehouse) as conn:
        assert conn.execute("select count(*) from pg_tables where schemaname = 'ml'").fetchone()[0] == 0


def test_bad_frames_are_refused_clearly(warehouse):
    frame = _segments(5)
    with pytest.raises(PublishError, match="share a key"):
        _publish(warehouse, pd.concat([frame, frame.head(1)]))
    with pytest.raises(PublishError, match="null in key"):
        _publish(warehouse, frame.assign(customer_id=[None, "a", "b", "c", "d"]))
    with pytest.raises(PublishError, match="empty frame"):
        _publish(warehouse, frame.head(0))
    with pytest.raises(PublishError, match="already has column"):
        _publish(warehouse, frame.assign(as_of=TODAY))
    with pytest.raises(PublishError, match="invalid column name"):
        _publish(warehouse, frame.rename(columns={"score": "Score; drop"}))
    with pytest.raises(PublishError, match="not in the frame"):
        publish(warehouse, "x", frame, as_of=TODAY, run_id="r", model_name="m", model_version=None,
                key_columns=["nope"])
    _publish(warehouse, frame)
    with pytest.raises(PublishError, match="column 'score' of ml.customer_segments is double precision"):
        _publish(warehouse, frame.assign(score=frame["score"].astype(str)))


def test_empty_frame_when_allowed_empties_the_table(warehouse):
    _publish(warehouse, _segments(5))
    report = _publish(warehouse, _segments(5).head(0), allow_empty=True, as_of=TODAY + dt.timedelta(days=1))
    assert report.rows == 0
    with connect(warehouse) as conn:
        assert conn.execute("select count(*) from ml.customer_segments").fetchone()[0] == 0


def test_new_columns_are_added_and_grants_survive(warehouse):
    role = f"reader_{uuid.uuid4().hex[:8]}"
    _publish(warehouse, _segments(10))
    with connect(warehouse, autocommit=True) as conn:
        conn.execute(f"create role {role} login")
        conn.execute(f"grant usage on schema ml to {role}")
        conn.execute(f"grant select on ml.customer_segments to {role}")
    try:
        _publish(warehouse, _segments(12).assign(extra=1.5), run_id="run-b")
        url = warehouse.warehouse_url.replace("postgres@", f"{role}@")
        with psycopg.connect(url) as reader:
            rows = reader.execute("select count(*), min(extra), min(mlflow_run_id) from ml.customer_segments")
            assert rows.fetchone() == (12, 1.5, "run-b")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute("select count(*) from ml.customer_segments_history")
    finally:
        with connect(warehouse, autocommit=True) as conn:
            conn.execute(f"drop owned by {role}")
            conn.execute(f"drop role {role}")


# ---------------------------------------------------------------------------------------------------------
# Concurrency, locks, faults
# ---------------------------------------------------------------------------------------------------------
def _generation(gen: int, base: int = 2000) -> pd.DataFrame:
    """Generation ``gen``: base + 37*gen rows, every row's ``gen`` column equal to gen, so a reader can tell
    a complete table (count matches gen, min = max) from a mix or a partial one."""
    n = base + 37 * gen
    return pd.DataFrame({"customer_id": [f"C{i:07d}" for i in range(n)], "gen": np.full(n, gen, dtype="int64")})


def _check_generation(count: int, gen_min: int | None, gen_max: int | None, total: int | None) -> str | None:
    if gen_min is None or gen_min != gen_max:
        return f"mixed or empty: count={count} min={gen_min} max={gen_max}"
    if count != 2000 + 37 * gen_min or total != count * gen_min:
        return f"partial: count={count} for gen {gen_min} (sum {total})"
    return None


@pytest.mark.parametrize("mode", ["new_as_of", "rerun"])
def test_concurrent_readers_see_only_complete_old_or_new_tables(warehouse, mode):
    """Nightly publishes (a new as_of: attach a partition) and reruns (same as_of: delete + insert)."""
    _publish(warehouse, _generation(0))
    stop = threading.Event()
    problems: list[str] = []
    seen: list[set[int]] = []

    def reader(isolation: str) -> None:
        gens: set[int] = set()
        seen.append(gens)
        try:
            with connect(warehouse, autocommit=True) as conn:
                while not stop.is_set():
                    with conn.transaction():
                        conn.execute(f"set transaction isolation level {isolation}")
                        if isolation == "repeatable read":
                            # Take the snapshot first and touch the table later, when a swap may have
                            # committed in between: the reader must still see the complete old table.
                            conn.execute("select 1").fetchone()
                            time.sleep(0.01)
                        first = conn.execute(
                            "select count(*), min(gen), max(gen), sum(gen) from ml.customer_segments"
                        ).fetchone()
                        # A second look inside the same transaction: a snapshot-holding reader must keep
                        # seeing the same complete table (TRUNCATE would show it empty here).
                        second = conn.execute(
                            "select count(*), min(gen), max(gen), sum(gen) from ml.customer_segments"
                        ).fetchone()
                    for row in (first, second):
                        problem = _check_generation(*row)
                        if problem:
                            problems.append(f"{isolation}: {problem}")
                        else:
                            gens.add(row[1])
                    if isolation == "repeatable read" and first != second:
                        problems.append(f"repeatable read saw two contents: {first} then {second}")
        except Exception as err:  # noqa: BLE001 - every reader error is a failure of the guarantee
            problems.append(f"{isolation}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=reader, args=(iso,))
               for iso in ("read committed", "read committed", "repeatable read")]
    for thread in threads:
        thread.start()
    try:
        for gen in range(1, 9):
            day = TODAY + dt.timedelta(days=gen) if mode == "new_as_of" else TODAY
            _publish(warehouse, _generation(gen), run_id=f"gen-{gen}", as_of=day)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert not problems, problems[:5]
    # The readers really ran during the publishes: together they saw more than one generation.
    assert len(set().union(*seen)) >= 2, seen
    with connect(warehouse) as conn:
        assert _check_generation(*conn.execute(
            "select count(*), min(gen), max(gen), sum(gen) from ml.customer_segments").fetchone()) is None
        assert conn.execute("select max(gen) from ml.customer_segments").fetchone()[0] == 8


def _waiting_on_advisory_lock(conn) -> int:
    return conn.execute(
        "select count(*) from pg_locks where locktype = 'advisory' and not granted and database = "
        "(select oid from pg_database where datname = current_database())"
    ).fetchone()[0]


def test_overlapping_publish_waits_for_the_lock_then_fails_clearly(warehouse):
    _publish(warehouse, _generation(1))
    holder = connect(warehouse)
    try:
        # An open transaction that has published (and so holds the table's lock) but not committed.
        holder.execute("select 1")  # a transaction is open, so publish runs inside it (a savepoint)
        _publish(holder, _generation(2), run_id="holder")
        with pytest.raises(PublishLockTimeout, match=r"another publish of ml\.customer_segments is running"):
            _publish(warehouse, _generation(3), run_id="second", lock_timeout=0.5)

        # A second publisher with a longer timeout waits, then goes ahead once the first commits.
        result: dict = {}
        waiter = threading.Thread(
            target=lambda: result.update(report=_publish(warehouse, _generation(4), run_id="waiter",
                                                         lock_timeout=60)))
        waiter.start()
        with connect(warehouse, autocommit=True) as watcher:
            deadline = time.monotonic() + 30
            while _waiting_on_advisory_lock(watcher) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _waiting_on_advisory_lock(watcher) == 1, "the second publisher did not wait on the lock"
            # While it waits, readers still see the last committed contents (generation 1).
            assert watcher.execute("select max(gen) from ml.customer_segments").fetchone()[0] == 1
        holder.commit()
        waiter.join(timeout=60)
        assert not waiter.is_alive() and result["report"].run_id == "waiter"
    finally:
        holder.close()
    with connect(warehouse) as conn:
        assert conn.execute("select min(mlflow_run_id), max(gen) from ml.customer_segments").fetchone() == (
            "waiter", 4)


def test_other_tables_are_not_blocked_by_a_publish_in_progress(warehouse):
    _publish(warehouse, _generation(0))
    holder = connect(warehouse)
    try:
        holder.execute("select 1")
        # A new as_of: the holder's transaction is past the swap and holds the history's lock.
        _publish(holder, _generation(1), run_id="holder", as_of=TODAY + dt.timedelta(days=1))
        report = _publish(warehouse, _generation(2), table="segment_profiles", lock_timeout=5)
        assert report.rows == _generation(2).shape[0]
    finally:
        holder.rollback()
        holder.close()


_KILLED_PUBLISHER = r"""
import datetime as dt, sys
import numpy as np, pandas as pd
from ml.config import Settings
from ml.publish import publish
n = int(sys.argv[1])
frame = pd.DataFrame({"customer_id": np.char.add("C", np.arange(n).astype(str)).astype(object),
                      "gen": np.full(n, 99, dtype="int64"),
                      "padding": np.full(n, "x" * 60, dtype=object)})
print("ready", flush=True)
publish(Settings.from_env(), "customer_segments", frame, as_of=dt.date(2024, 7, 1), run_id="killed",
        model_name="segmentation", model_version=2, key_columns=["customer_id"])
print("published", flush=True)
"""


def test_publish_killed_during_copy_leaves_previous_table_intact(warehouse, tmp_path):
    _publish(warehouse, _generation(5).assign(padding="y"), run_id="before")
    with connect(warehouse) as conn:
        before = content_checksum(conn, "customer_segments_history")
        before_table = content_checksum(conn, "customer_segments")
    script = tmp_path / "publisher.py"
    script.write_text(_KILLED_PUBLISHER)
    env = {**os.environ, "WAREHOUSE_URL": warehouse.warehouse_url, "PGAPPNAME": "publish_to_kill",
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), "1500000"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    copying = None
    try:
        with connect(warehouse, autocommit=True) as watcher:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                copying = watcher.execute(
                    "select p.bytes_processed from pg_stat_progress_copy p join pg_stat_activity a using (pid) "
                    "where a.application_name = 'publish_to_kill' and p.bytes_processed > 0"
                ).fetchone()
                if copying:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert copying is not None, f"never saw the COPY running: {proc.stdout.read()} {proc.stderr.read()}"
    assert proc.returncode == -signal.SIGKILL

    with connect(warehouse, autocommit=True) as conn:
        # The previous contents are readable at once, while the server is still noticing the dead client.
        assert content_checksum(conn, "customer_segments") == before_table
        assert content_checksum(conn, "customer_segments_history") == before
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and conn.execute(
            "select count(*) from pg_stat_activity where application_name = 'publish_to_kill'"
        ).fetchone()[0]:
            time.sleep(0.05)
    # Nothing of the killed run remains, and its lock is gone: the next publish goes through.
    report = _publish(warehouse, _generation(6), run_id="after", lock_timeout=10)
    with connect(warehouse) as conn:
        assert conn.execute("select count(*) from ml.customer_segments_history where mlflow_run_id = 'killed'"
                            ).fetchone()[0] == 0
        assert conn.execute("select count(*), max(gen) from ml.customer_segments").fetchone() == (report.rows, 6)


# ---------------------------------------------------------------------------------------------------------
# Storage layout: optional key index, histories of earlier versions, metadata not written per row
# ---------------------------------------------------------------------------------------------------------
def _primary_key(conn, relation: str) -> list[str]:
    return next(iter(unique_index_columns(conn, relation, primary=True)), [])


def test_index_keys_gives_a_primary_key_on_every_partition_and_reruns_keep_it(warehouse):
    frame = _segments(40, seed=5)
    _publish(warehouse, frame, index_keys=True)
    _publish(warehouse, frame, as_of=TODAY + dt.timedelta(days=1), run_id="next")
    rerun = _publish(warehouse, frame.assign(score=0.5), as_of=TODAY + dt.timedelta(days=1), run_id="rerun",
                     version=None)
    with connect(warehouse) as conn:
        assert conn.execute("select count(*) from ml.customer_segments where mlflow_run_id = 'rerun' and "
                            "model_version is null and scored_at = %s and as_of = %s",
                            [rerun.scored_at, TODAY + dt.timedelta(days=1)]).fetchone()[0] == 40
        assert _primary_key(conn, "ml.customer_segments_history") == ["customer_id", "as_of"]
        for day in ("20240630", "20240701"):
            assert _primary_key(conn, f"ml.customer_segments_history_{day}") == ["customer_id", "as_of"]
        assert conn.execute("select count(*), min(score), max(score) from ml.customer_segments").fetchone() == (
            40, 0.5, 0.5)
    with pytest.raises(PublishError, match="share a key"):
        _publish(warehouse, pd.concat([frame, frame.head(2)]), as_of=TODAY + dt.timedelta(days=2))


def test_without_index_keys_there_is_no_index_but_keys_are_not_null_columns(warehouse):
    _publish(warehouse, _segments(10))
    with connect(warehouse) as conn:
        assert _primary_key(conn, "ml.customer_segments_history") == []
        assert conn.execute("select attnotnull from pg_attribute where attrelid = "
                            "'ml.customer_segments_history'::regclass and attname = 'customer_id'").fetchone()[0]
        with pytest.raises(psycopg.errors.NotNullViolation):
            conn.execute("insert into ml.customer_segments_history (customer_id, model_name, mlflow_run_id, as_of, "
                         "scored_at) values (null, 'm', 'r', %s, now())", [TODAY])


def test_a_history_created_by_an_earlier_version_keeps_its_key_order(warehouse):
    """Earlier versions created histories with primary key (as_of, keys...); a partition's index must match
    its parent's, so new partitions follow the existing order."""
    with connect(warehouse) as conn:
        conn.execute("""
            create table ml.customer_segments_history (
                customer_id text, segment_id bigint, segment_name text, score double precision,
                model_name text not null, model_version text, mlflow_run_id text not null, as_of date not null,
                scored_at timestamptz not null, primary key (as_of, customer_id)) partition by list (as_of)""")
        conn.commit()
    frame = _segments(25, seed=6)
    _publish(warehouse, frame)
    _publish(warehouse, frame, run_id="rerun")
    report = _publish(warehouse, frame, as_of=TODAY + dt.timedelta(days=1), run_id="next")
    assert report.replaced_current
    with connect(warehouse) as conn:
        assert _primary_key(conn, "ml.customer_segments_history_20240701") == ["as_of", "customer_id"]
        assert conn.execute("select count(*), min(mlflow_run_id) from ml.customer_segments").fetchone() == (25, "next")


def test_run_metadata_is_stored_once_per_partition_not_in_every_row(warehouse):
    """The metadata columns of a new partition are catalog defaults ("fast defaults"): every row reads
    them, none carries them, so the rows are as narrow as the frame's."""
    report = _publish(warehouse, _segments(30), run_id="meta-run", version=7)
    with connect(warehouse) as conn:
        missing = dict(conn.execute(
            "select attname, atthasmissing from pg_attribute where attrelid = "
            "'ml.customer_segments_history_20240630'::regclass and attnum > 0").fetchall())
        assert missing["mlflow_run_id"] and missing["model_name"] and missing["scored_at"]
        assert not missing["customer_id"]
        rows = conn.execute("select count(*) filter (where mlflow_run_id = 'meta-run' and model_version = '7' "
                            "and model_name = 'segmentation' and scored_at = %s and as_of = %s) "
                            "from ml.customer_segments_history", [report.scored_at, TODAY]).fetchone()[0]
        # no defaults are left behind for rows inserted later (a rerun inserts explicit values)
        defaults = conn.execute("select count(*) from pg_attrdef where adrelid = "
                                "'ml.customer_segments_history_20240630'::regclass").fetchone()[0]
    assert rows == 30 and defaults == 0


def test_carry_forward_copies_unlisted_rows_of_an_earlier_as_of_and_reruns_are_identical(warehouse):
    """The incremental night: rescored customers come from the frame, every other customer of yesterday's
    rows (except the listed ones, e.g. gone) is carried server-side, all under tonight's run metadata; a rerun
    that carries from the same date is identical."""
    from ml.publish import CarryForward

    yesterday = TODAY - dt.timedelta(days=1)
    full = _segments(40, seed=1)
    _publish(warehouse, full, as_of=yesterday, run_id="yesterday")
    rescored = _segments(40, seed=2).iloc[:10]  # customers 0..9 changed; 10..34 unchanged; 35..39 are gone
    gone = full["customer_id"].iloc[35:].tolist()
    with connect(warehouse) as conn:
        conn.execute("create temp table gone (customer_id text)")
        conn.execute("insert into gone select unnest(%s::text[])", [gone])
        carry = CarryForward(yesterday, "customer_id", "gone")
        with pytest.raises(PublishError, match="Settings"):
            _publish(warehouse, rescored, run_id="tonight", carry=carry)
        with pytest.raises(PublishError, match="nothing was published"):
            _publish(conn, rescored, run_id="tonight", carry=CarryForward(yesterday - dt.timedelta(days=5),
                                                                          "customer_id", "gone"))
        report = _publish(conn, rescored, run_id="tonight", carry=carry)
        conn.commit()
        assert (report.rows, report.rows_carried, report.current_as_of) == (35, 25, TODAY)
        got = read_table(conn, "ml.customer_segments").sort_values("customer_id", ignore_index=True)
        expected = pd.concat([rescored, full.iloc[10:35]], ignore_index=True)
        pd.testing.assert_frame_equal(got[expected.columns.tolist()], expected, check_dtype=False)
        assert set(got["mlflow_run_id"]) == {"tonight"} and set(got["as_of"].astype(str)) == {TODAY.isoformat()}
        assert conn.execute("select n_rows from ml.published_tables where table_name = 'customer_segments'"
                            ).fetchone()[0] == 35
        before = content_checksum(conn, "customer_segments")
        # a rerun of tonight carrying from tonight's own partition (what a rerun of a scoring night does)
        again = _publish(conn, rescored, run_id="rerun", carry=CarryForward(TODAY, "customer_id", "gone"))
        conn.commit()
        assert (again.rows, again.rows_carried, again.history_rows_replaced) == (35, 25, 35)
        assert content_checksum(conn, "customer_segments") == before
        assert conn.execute("select count(*) from ml.customer_segments_history where as_of = %s",
                            [yesterday]).fetchone()[0] == 40
    # without exceptions (and on Settings): everything of the earlier date that the frame does not replace
    nothing_gone = _publish(warehouse, rescored.iloc[:3], as_of=TODAY + dt.timedelta(days=1), run_id="next",
                            carry=CarryForward(TODAY, "customer_id"))
    assert (nothing_gone.rows, nothing_gone.rows_carried) == (35, 32)
