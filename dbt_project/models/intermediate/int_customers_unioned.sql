-- One row per real customer: every non-test customer record, plus customer ids that only appear on orders
-- (the source lost their master record), so that every order's customer has a dimension row.
with

customers as (
    select * from {{ ref('stg_crm__customers') }}
    where not is_test_account
),

orders as (
    select * from {{ ref('int_orders_validated') }}
    where exclusion_reason is null
      and is_unknown_customer
),

order_only_customers as (
    select distinct
        customer_id
    from orders
),

unioned as (
    select
        customer_id,
        email,
        full_name,
        gender,
        birth_date,
        country,
        city,
        signup_at,
        acquisition_channel,
        is_valid_email,
        true as has_customer_record
    from customers

    union all

    select
        customer_id,
        null as email,
        null as full_name,
        'U' as gender,
        null::date as birth_date,
        null as country,
        null as city,
        null::timestamp as signup_at,
        null as acquisition_channel,
        false as is_valid_email,
        false as has_customer_record
    from order_only_customers
)

select * from unioned
