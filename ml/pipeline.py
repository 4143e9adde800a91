"""The main job, as the README's first command runs it: the nightly pipeline once, on a demo CRM."""

from __future__ import annotations

from ml.config import Settings
from ml.nightly import DEMO_CUSTOMERS, DEMO_DAYS, DEMO_SEED, run_nightly


def run_demo(settings: Settings) -> int:
    print(
        "CRM platform demo: the nightly DAG crm_nightly runs once end to end. An empty warehouse first gets a "
        f"generated CRM ({DEMO_CUSTOMERS:,} customers, {DEMO_DAYS} days, seed {DEMO_SEED}).",
        flush=True,
    )
    code = run_nightly(settings, {})
    print(
        "\nNext:\n"
        "  .venv/bin/crm ui        Airflow and MLflow UIs on 127.0.0.1 (URLs and login are printed)\n"
        "  .venv/bin/crm status    row counts and load batches\n"
        "  .venv/bin/crm dbt docs  the dbt documentation site\n"
        f"  psql {settings.warehouse.redacted()}   and read marts.campaign_audiences, ml.*"
    )
    return code
