-- One row per customer × training snapshot: features as of the cut-off (as_of - snapshot * horizon_days),
-- labels from the horizon_days after it. Snapshot 1 is the latest fully labelled window.
-- Tagged `training`: built on the nights the value family retrains (ml.nightly.value_training_needed); on a
-- scoring-only night it keeps the last training night's rows (its feature_cutoff_date says which).
{{ config(tags=['training']) }}
with

features as (
    select * from {{ ref('int_customer_features_snapshots') }}
),

-- the features one horizon later: snapshot k - 1's cut-off is snapshot k's plus horizon_days (snapshot 0 is
-- as_of's, in int_customer_features_as_of)
later as (
    select snapshot, customer_id, net_revenue, n_orders
    from {{ ref('int_customer_features_as_of') }}
    union all
    select snapshot, customer_id, net_revenue, n_orders
    from {{ ref('int_customer_features_snapshots') }}
    where snapshot < {{ var('training_snapshots') }}
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

-- The label window (cutoff, cutoff + horizon_days] is what the next snapshot adds: its orders' net revenue
-- and purchases are the differences of the two snapshots' sums (exact, in numeric), with no pass over the
-- orders. A customer in snapshot k has a purchase by its cut-off, so is in snapshot k - 1 too.
labels as (
    select
        features.snapshot,
        features.customer_id,
        -- a window holding only returns of earlier purchases is "no spend", not negative spend
        greatest(coalesce(later.net_revenue - features.net_revenue, 0), 0) as future_spend,
        coalesce(later.n_orders > features.n_orders, false) as has_future_purchase
    from features
    inner join later
        on later.snapshot = features.snapshot - 1
        and later.customer_id = features.customer_id
),

final as (
    select
        features.customer_id::text as customer_id,
        features.snapshot::integer as snapshot,
        features.feature_cutoff_date::date as feature_cutoff_date,
        as_of.horizon_days::integer as horizon_days,
        {{ select_feature_columns('features') }},
        labels.future_spend::numeric as future_spend,
        labels.has_future_purchase::boolean as has_future_purchase,
        {{ select_behaviour_feature_columns('features') }}
    from features
    cross join as_of
    inner join labels
        on features.snapshot = labels.snapshot
        and features.customer_id = labels.customer_id
)

select * from final
