-- One row per snapshot and its cut-off: 0 = as_of (scoring), k = as_of - k * horizon_days (training).
with

as_of as (
    select * from {{ ref('int_as_of') }}
)

select
    k.snapshot::integer as snapshot,
    (as_of.as_of_date - k.snapshot * as_of.horizon_days)::date as feature_cutoff_date
from as_of
cross join generate_series(0, as_of.training_snapshots) as k (snapshot)
