-- One row per distinct web event (exact re-deliveries dropped).
with

source as (
    select * from {{ source('crm', 'web_events') }}
),

cleaned as (
    select
        {{ clean_id('customer_id') }} as customer_id,
        nullif(trim(session_id), '') as session_id,
        lower(trim(event_type)) as event_type,
        nullif(trim(product_id), '') as product_id,
        event_at,
        _batch_id,
        _loaded_at
    from source
),

ranked as (
    {{ ranked_deliveries('cleaned', ['customer_id', 'session_id', 'event_type', 'product_id', 'event_at']) }}
),

deduplicated as (
    select
        customer_id,
        session_id,
        event_type,
        product_id,
        event_at,
        event_at::date as event_date,
        {{ delivery_columns() }}
    from ranked
    where _delivery_rank = 1
      and event_at is not null
)

select * from deduplicated
