{{ config(
    materialized='incremental',
    unique_key='order_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
) }}
-- One row per order with its customer's flags and the reason, if any, it must not reach the marts.
with

{%- if is_incremental() %}
{%- set watermark = delivery_watermark('_source_loaded_at') %}
{%- endif %}
orders as (
    select * from {{ ref('stg_crm__orders') }}
    {%- if is_incremental() %}
    -- only orders re-delivered since the watermark, or whose customer was
    where _loaded_at > {{ watermark }}
       or customer_id in (
           select customer_id from {{ ref('stg_crm__customers') }}
           where _loaded_at > {{ watermark }}
       )
    {%- endif %}
),

customers as (
    select * from {{ ref('stg_crm__customers') }}
),

joined as (
    select
        orders.order_id,
        orders.customer_id,
        orders.ordered_at,
        orders.order_date,
        orders.status,
        orders.channel,
        orders.is_missing_customer,
        orders.is_future_dated,
        coalesce(customers.is_test_account, false) as is_test_account,
        orders.customer_id is not null and customers.customer_id is null as is_unknown_customer,
        coalesce(orders.ordered_at < customers.signup_at, false) as is_before_signup,
        case
            when orders.is_missing_date then 'missing_order_date'
            when orders.is_future_dated then 'future_dated'
            when customers.is_test_account then 'test_account'
        end as exclusion_reason,
        greatest(orders._loaded_at, customers._loaded_at) as _source_loaded_at
    from orders
    left join customers
        on orders.customer_id = customers.customer_id
)

select * from joined
