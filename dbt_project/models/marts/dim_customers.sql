-- One row per real customer (test accounts excluded) with order history and RFM as of `as_of`.
with

customers as (
    select * from {{ ref('int_customers_unioned') }}
),

features as (
    select * from {{ ref('int_customer_features_as_of') }}
),

rfm as (
    select * from {{ ref('int_customer_rfm') }}
),

final as (
    select
        customers.customer_id::text as customer_id,
        customers.email::text as email,
        customers.full_name::text as full_name,
        customers.gender::text as gender,
        customers.birth_date::date as birth_date,
        customers.country::text as country,
        customers.city::text as city,
        customers.signup_at::timestamp as signup_at,
        customers.acquisition_channel::text as acquisition_channel,
        customers.is_valid_email::boolean as is_valid_email,
        customers.has_customer_record::boolean as has_customer_record,
        features.first_purchase_date::date as first_order_date,
        features.last_purchase_date::date as last_order_date,
        coalesce(features.n_orders, 0)::integer as n_orders,
        coalesce(features.net_spend, 0)::numeric as net_spend,
        features.recency_days::integer as recency_days,
        rfm.r_score::integer as r_score,
        rfm.f_score::integer as f_score,
        rfm.m_score::integer as m_score,
        rfm.rfm_score::text as rfm_score,
        rfm.rfm_segment::text as rfm_segment
    from customers
    left join features
        on customers.customer_id = features.customer_id
    left join rfm
        on customers.customer_id = rfm.customer_id
)

select * from final
