"""The one publish function: atomic swap, history by as_of, backfills, locks, readers, kill -9."""

from __future__ import annotations

import datetime as dt
import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest

from ml.publish import (
    METADATA_COLUMNS,
    PublishError,
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
