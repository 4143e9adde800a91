-- One row per customer with ≥1 purchase on or before as_of: behavioural features as of as_of and profile.
with

features as (
    select * from {{ ref('int_customer_features_as_of') }}
),

customers as (
    select * from {{ ref('int_customers_unioned') }}
),

final as (
    select
        features.customer_id::text as customer_id,
        features.feature_cutoff_date::date as as_of_date,
        {{ select_feature_columns('features') }},
        coalesce(customers.gender, 'U')::text as gender,
        customers.country::text as country,
        customers.acquisition_channel::text as acquisition_channel,
        {{ select_behaviour_feature_columns('features') }}
    from features
    left join customers
        on features.customer_id = customers.customer_id
)

select * from final
