"""The ``crm`` command: every action a user takes by hand, each a thin call into the modules that do it."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

from ml.config import Settings
from ml.errors import CrmError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        settings = Settings.from_env()
        return args.run(settings, args) or 0
    except CrmError as err:
        print(f"crm: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # configuration errors from Settings
        print(f"crm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crm: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm", description="CRM precision-marketing platform")
    sub = parser.add_subparsers(metavar="COMMAND")

    wh = sub.add_parser("warehouse", help="start, stop or inspect the embedded PostgreSQL warehouse")
    wh_sub = wh.add_subparsers(metavar="ACTION", required=True)
    wh_sub.add_parser("start", help="start the embedded server and create the schemas").set_defaults(
        run=_warehouse_start
    )
    wh_sub.add_parser("stop", help="stop the embedded server").set_defaults(run=_warehouse_stop)
    wh_sub.add_parser("url", help="print the warehouse URL (password redacted)").set_defaults(run=_warehouse_url)

    gen = sub.add_parser("generate", help="generate a synthetic CRM into the raw layer")
    gen.add_argument("--customers", type=int, default=5000)
    gen.add_argument("--days", type=int, default=730, help="days of order history")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--end-date", type=date.fromisoformat, default=None,
                     help="last day of history (default: the generator's fixed anchor date)")
    gen.add_argument("--append-days", type=int, default=0,
                     help="continue the history this many days after the end date, one batch per day "
                          "(days already loaded are skipped)")
    gen.set_defaults(run=_generate)

    ing = sub.add_parser("ingest", help="load a real data file into the raw layer")
    ing_sub = ing.add_subparsers(metavar="SOURCE", required=True)
    for name, helptext in [
        ("online-retail", "UCI Online Retail or Online Retail II (CSV, .csv.gz or XLSX)"),
        ("cdnow", "CDNOW master file (customer_id,date,number_of_cds,dollar_value)"),
    ]:
        one = ing_sub.add_parser(name, help=helptext)
        one.add_argument("file", type=Path)
        one.set_defaults(run=_ingest, source=name)

    dbt = sub.add_parser("dbt", help="build or document the dbt project against the warehouse")
    dbt_sub = dbt.add_subparsers(metavar="ACTION", required=True)
    build = dbt_sub.add_parser("build", help="dbt build (models, tests, unit tests) with point-in-time vars")
    build.add_argument("--as-of", type=date.fromisoformat, default=None,
                       help="feature date (default: the latest valid order date in the data)")
    build.add_argument("--horizon-days", type=int, default=90)
    build.add_argument("--training-snapshots", type=int, default=1)
    build.add_argument("--full-refresh", action="store_true")
    build.add_argument("--select", default=None)
    build.set_defaults(run=_dbt_build)
    dbt_sub.add_parser("docs", help="generate the dbt docs site (offline) and print how to open it").set_defaults(
        run=_dbt_docs
    )

    run = sub.add_parser("run", help="run the nightly DAG once end to end (airflow dags test)")
    run.add_argument("--conf", default=None, help='run parameters as JSON, e.g. \'{"k_min": 4, "min_support": 0.02}\'')
    run.add_argument("--as-of", default=None, help="shorthand for the as_of parameter (YYYY-MM-DD)")
    run.set_defaults(run=_run)

    ui = sub.add_parser("ui", help="start the Airflow and MLflow UIs on 127.0.0.1 (Ctrl-C stops them)")
    ui.add_argument("--airflow-port", type=int, default=8080)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(run=_ui)

    sub.add_parser("status", help="warehouse row counts and the latest load batches").set_defaults(run=_status)
    sub.add_parser(
        "demo", help="the main job: warehouse up, demo CRM generated, the whole nightly pipeline run once"
    ).set_defaults(run=_demo)
    return parser


# ---------------------------------------------------------------------------------------------------------
def _warehouse_start(settings: Settings, args) -> int:
    from ml.warehouse import ensure_warehouse

    if not settings.embedded:
        print(f"using the external warehouse {settings.warehouse.redacted()} (WAREHOUSE_URL)")
    ensure_warehouse(settings)
    print(f"warehouse ready: {settings.warehouse.redacted()}")
    if settings.embedded:
        print(f"  data folder: {settings.pgdata}")
    return 0


def _warehouse_stop(settings: Settings, args) -> int:
    from ml.warehouse import stop_embedded

    if not settings.embedded:
        raise CrmError("WAREHOUSE_URL is set: the external warehouse is not ours to stop")
    print("warehouse stopped" if stop_embedded(settings) else "warehouse was not running")
    return 0


def _warehouse_url(settings: Settings, args) -> int:
    print(settings.warehouse.redacted())
    return 0


def _generate(settings: Settings, args) -> int:
    from ml.ingest.generator import GeneratorParams, generate
    from ml.warehouse import connect, ensure_warehouse

    ensure_warehouse(settings)
    params = GeneratorParams(customers=args.customers, days=args.days, seed=args.seed, end_date=args.end_date,
                             append_days=args.append_days)
    started = time.perf_counter()
    reports = []  # the window's batch, then one per appended day
    with connect(settings) as conn:
        generate(conn, params, reports=reports)
    for report in reports:
        print(report.summary())
    print(f"  took {time.perf_counter() - started:.1f} s")
    return 0


def _ingest(settings: Settings, args) -> int:
    from ml.warehouse import connect, ensure_warehouse

    path: Path = args.file
    if not path.is_file():
        raise CrmError(f"no such file: {path}")
    if args.source == "online-retail":
        from ml.ingest.online_retail import load_online_retail as load
    else:
        from ml.ingest.cdnow import load_cdnow as load
    ensure_warehouse(settings)
    started = time.perf_counter()
    with connect(settings) as conn:
        report = load(conn, path)
    _print_report(report, time.perf_counter() - started)
    return 0


def _dbt_build(settings: Settings, args) -> int:
    from ml.dbt import dbt_build
    from ml.warehouse import ensure_warehouse

    ensure_warehouse(settings)
    result = dbt_build(
        settings,
        as_of=args.as_of,
        horizon_days=args.horizon_days,
        training_snapshots=args.training_snapshots,
        full_refresh=args.full_refresh,
        select=args.select,
    )
    print(result.summary())
    return 0


def _dbt_docs(settings: Settings, args) -> int:
    from ml.dbt import dbt_docs_generate
    from ml.warehouse import ensure_warehouse

    ensure_warehouse(settings)
    folder = dbt_docs_generate(settings)
    print(f"dbt docs written to {folder}")
    print(
        f"open them with: .venv/bin/python -m http.server 8081 --bind 127.0.0.1 --directory {folder}"
        "  then browse http://127.0.0.1:8081/index.html"
    )
    return 0


def _status(settings: Settings, args) -> int:
    from ml.warehouse import connect, table_counts

    with connect(settings) as conn:
        counts = table_counts(conn)
        batches = conn.execute(
            "select batch_id, source, source_name, status, lines_read, rows_loaded, rows_quarantined, "
            "finished_at from audit.load_batches order by batch_id desc limit 10"
        ).fetchall()
    print(f"warehouse {settings.warehouse.redacted()}")
    for table, n in counts.items():
        print(f"  {table:<40} {n:>12,}")
    print("latest load batches:")
    for b in batches:
        print(f"  #{b[0]} {b[1]} {b[2]} {b[3]}: read {b[4]}, loaded {b[5]}, quarantined {b[6]} at {b[7]}")
    return 0


def _run(settings: Settings, args) -> int:
    import json

    from ml.nightly import run_nightly

    try:
        conf = json.loads(args.conf) if args.conf else {}
    except json.JSONDecodeError as err:
        raise CrmError(f"--conf is not valid JSON: {err}") from None
    if not isinstance(conf, dict):
        raise CrmError("--conf must be a JSON object of run parameters")
    if args.as_of:
        conf["as_of"] = args.as_of
    return run_nightly(settings, conf)


def _ui(settings: Settings, args) -> int:
    from ml.ui import run_ui

    return run_ui(settings, airflow_port=args.airflow_port, mlflow_port=args.mlflow_port)


def _demo(settings: Settings, args) -> int:
    """The main job: the whole nightly pipeline on a generated demo CRM (see ml/pipeline.py)."""
    from ml.pipeline import run_demo

    return run_demo(settings)


def _print_report(report, seconds: float) -> None:
    print(report.summary())
    print(f"  took {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
