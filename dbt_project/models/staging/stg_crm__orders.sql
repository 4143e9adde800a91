{{ config(
    materialized='incremental',
    unique_key='order_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['_loaded_at']}, {'columns': ['order_id']}],
) }}
-- One row per order id: the latest delivery, with the source status mapped onto completed/cancelled/returned.
-- An order timestamped after it was loaded cannot have happened yet: flagged future-dated.
with

source as (
    select * from {{ source('crm', 'orders') }}
    {%- if is_incremental() %}
    {{ touched_keys_filter(source('crm', 'orders'), ["nullif(trim(order_id), '')"]) }}
    {%- endif %}
),

cleaned as not materialized (
    select
        nullif(trim(order_id), '') as order_id,
        {{ clean_id('customer_id') }} as customer_id,
        ordered_at,
        case
            when lower(trim(status)) in ('cancelled', 'canceled', 'cancel', 'void') then 'cancelled'
            when lower(trim(status)) in ('returned', 'return', 'refunded') then 'returned'
            when status is null or lower(trim(status)) in ('completed', 'complete', 'delivered', 'shipped', 'paid')
                then 'completed'
            else lower(trim(status))
        end as status,
        nullif(lower(trim(channel)), '') as channel,
        _batch_id,
        _loaded_at
    from source
),

ranked as (
    {{ ranked_deliveries('cleaned', ['order_id']) }}
),

deduplicated as (
    select
        order_id,
        customer_id,
        ordered_at,
        ordered_at::date as order_date,
        status,
        channel,
        customer_id is null as is_missing_customer,
        coalesce(ordered_at > _loaded_at::timestamp, false) as is_future_dated,
        ordered_at is null as is_missing_date,
        {{ delivery_columns() }}
    from ranked
    where _delivery_rank = 1
      and order_id is not null
)

select * from deduplicated
