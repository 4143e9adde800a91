"""A throwaway warehouse for module fixtures: its own database on the test server, its own MLflow store,
the generated raw layer loaded; dropped afterwards (with any MLflow run a failed test left open)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ml.config import Settings
from ml.warehouse import connect, create_database, drop_database, init_schemas


@contextmanager
def generated_warehouse(server_settings: Settings, root: Path, params) -> Iterator[Settings]:
    import mlflow

    from ml.ingest.generator import generate

    settings = dataclasses.replace(
        server_settings.with_database(f"crm_test_{uuid.uuid4().hex[:10]}"),
        mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        mlflow_artifact_root=root / "artifacts",
    )
    create_database(settings)
    try:
        with connect(settings) as conn:
            init_schemas(conn)
            generate(conn, params)
        yield settings
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        drop_database(settings)


def unique_index_columns(conn, relation: str, *, primary: bool = False) -> list[list[str]]:
    """The key columns, in index order, of each unique index of ``relation`` (only its primary key when
    ``primary``)."""
    rows = conn.execute(
        "select array_agg(a.attname::text order by u.ord) from pg_index i "
        "cross join lateral unnest(i.indkey::int2[]) with ordinality u(attnum, ord) "
        "join pg_attribute a on a.attrelid = i.indrelid and a.attnum = u.attnum "
        "where i.indrelid = %s::regclass and i.indisunique and (i.indisprimary or not %s) "
        "group by i.indexrelid order by i.indexrelid", [relation, primary]).fetchall()
    return [row[0] for row in rows]
