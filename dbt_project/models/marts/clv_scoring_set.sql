-- One row per customer with ≥1 purchase on or before as_of: the model inputs to score the next horizon_days.
with

features as (
    select * from {{ ref('int_customer_features_as_of') }}
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

final as (
    select
        features.customer_id::text as customer_id,
        features.feature_cutoff_date::date as feature_cutoff_date,
        as_of.horizon_days::integer as horizon_days,
        {{ select_feature_columns('features') }},
        {{ select_behaviour_feature_columns('features') }}
    from features
    cross join as_of
)

select * from final
