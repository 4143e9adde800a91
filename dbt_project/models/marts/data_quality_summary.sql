-- One row per entity × reason: how many raw rows staging dropped, or the marts excluded or flagged, and why.
with

rejected as (
    select * from {{ ref('int_rows_rejected') }}
),

summary as (
    select
        entity,
        reason,
        action,
        count(*)::bigint as n_records,
        sum(n_rows)::bigint as n_rows
    from rejected
    group by
        entity,
        reason,
        action
)

select * from summary
