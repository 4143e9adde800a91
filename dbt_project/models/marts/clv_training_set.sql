-- One row per customer × training snapshot: features as of the cut-off (as_of - snapshot * horizon_days),
-- labels from the horizon_days after it. Snapshot 1 is the latest fully labelled window.
with

features as (
    select * from {{ ref('int_customer_features_snapshots') }}
    where snapshot >= 1
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

orders as (
    select * from {{ ref('fct_orders') }}
    where customer_id is not null
),

labels as (
    select
        features.snapshot,
        features.customer_id,
        -- a window holding only returns of earlier purchases is "no spend", not negative spend
        greatest(coalesce(sum(orders.net_revenue), 0), 0) as future_spend,
        coalesce(bool_or(orders.is_purchase), false) as has_future_purchase
    from features
    cross join as_of
    left join orders
        on features.customer_id = orders.customer_id
        and orders.order_date > features.feature_cutoff_date
        and orders.order_date <= features.feature_cutoff_date + as_of.horizon_days
    group by
        features.snapshot,
        features.customer_id
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
