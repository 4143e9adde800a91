"""The main job end to end, as the README's first command runs it."""

from __future__ import annotations

import time

from ml.config import Settings
from ml.warehouse import connect, ensure_warehouse, table_counts

DEMO_CUSTOMERS = 5000
DEMO_DAYS = 730
DEMO_SEED = 42


def run_demo(settings: Settings) -> int:
    from ml.ingest.generator import GeneratorParams, generate

    started = time.perf_counter()
    print(f"[1/2] warehouse: {settings.warehouse.redacted()}")
    ensure_warehouse(settings)
    print(f"[2/2] generating a demo CRM ({DEMO_CUSTOMERS:,} customers, {DEMO_DAYS} days, seed {DEMO_SEED})")
    with connect(settings) as conn:
        report = generate(conn, GeneratorParams(customers=DEMO_CUSTOMERS, days=DEMO_DAYS, seed=DEMO_SEED))
        print("      " + report.summary())
        counts = table_counts(conn, ("raw", "audit"))
    print(f"\ndone in {time.perf_counter() - started:.1f} s. Results:")
    for table, n in counts.items():
        print(f"  {table:<32} {n:>10,} rows")
    print(f"\nwarehouse URL: {settings.warehouse.redacted()}  (psql it, or `crm status`)")
    return 0
