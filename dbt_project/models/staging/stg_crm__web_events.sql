{#- The dedup key has nullable parts (product_id, session_id): delete+insert needs a non-null key, so the
    row carries _event_key, the key as a JSON array (null stays distinct from the text 'null'). -#}
{{ config(
    materialized='incremental',
    unique_key='_event_key',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
) }}
-- One row per distinct web event (exact re-deliveries dropped).
with

source as (
    select * from {{ source('crm', 'web_events') }}
    {#- coalesced so that the touched keys can be hash-matched: conflating null with '' only re-processes a
        few more rows, never fewer -#}
    {%- if is_incremental() %}
    {{ touched_keys_filter(source('crm', 'web_events'), [
        "coalesce(" ~ clean_id('customer_id') ~ ", '')",
        "coalesce(nullif(trim(session_id), ''), '')",
        "coalesce(lower(trim(event_type)), '')",
        "coalesce(nullif(trim(product_id), ''), '')",
        "event_at",
    ]) }}
    {%- endif %}
),

cleaned as not materialized (
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
        {{ delivery_columns() }},
        md5(jsonb_build_array(customer_id, session_id, event_type, product_id, event_at)::text) as _event_key
    from ranked
    where _delivery_rank = 1
      and event_at is not null
)

select * from deduplicated
