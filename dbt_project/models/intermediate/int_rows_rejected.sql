{#- Incremental: a night re-derives the reasons of the records its deliveries touched, not of every record.
    Rebuilt whole, this model scanned every staged, enriched and raw table (25M rows at 1M customers): the
    longest node of an incremental night (36.7 s of 484 node-seconds). A record's reasons depend on its own
    rows only, so the pre-hook deletes every reason of the touched records (rows_rejected_touched) and the
    body derives them again; a record with no reason left is simply gone. Two kinds of rows are handled
    apart: `after_as_of` depends on as_of, which moves every night, so those rows are all deleted and
    derived again (orders after as_of are few); and a batch's rows with a missing key are counted once per
    batch (`record_key` is the batch id), when the batch is new. -#}
{{ config(
    materialized='incremental',
    unique_key=['entity', 'record_key', 'reason'],
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['_source_loaded_at']}, {'columns': ['entity', 'record_key']}],
    pre_hook="{% if is_incremental() %}delete from {{ this }} where reason = 'after_as_of' or (entity, record_key) in ({{ rows_rejected_touched(delivery_watermark('_source_loaded_at')) }}){% endif %}",
) }}
-- One row per raw record (or group of re-delivered rows) that staging dropped, or that a mart excludes or
-- flags, with the reason and what happened to it. Nothing is cleaned away silently: data_quality_summary
-- counts these by reason.
{%- if is_incremental() %}
{%- set watermark = delivery_watermark('_source_loaded_at') %}
{%- endif %}
{%- set staged = rows_rejected_entities() %}
{%- set keys = {
    'customers': "nullif(regexp_replace(trim(customer_id), '\\.0+$', ''), '') is null",
    'products': "nullif(trim(product_id), '') is null",
    'orders': "nullif(trim(order_id), '') is null",
    'order_lines': "nullif(trim(order_id), '') is null or line_no is null",
    'web_events': "event_at is null",
} %}
with

{% for entity, model, key in staged -%}
{{ entity }}_duplicates as (
    -- one pass over the staged table for both counts (it has a row per key: 11M order lines at 1M customers)
    select
        '{{ entity }}' as entity,
        ({{ key }})::text as record_key,
        dropped.reason,
        'dropped' as action,
        dropped.n_rows,
        _loaded_at as _source_loaded_at
    from {{ ref(model) }}
    cross join lateral (
        values
            ('exact_duplicate', _n_exact_duplicates::bigint),
            ('superseded_by_later_delivery', _n_superseded::bigint)
    ) as dropped (reason, n_rows)
    where (_n_exact_duplicates > 0 or _n_superseded > 0)
      and dropped.n_rows > 0
      {%- if is_incremental() %}
      and {{ rows_rejected_touched_filter(entity, watermark) }}
      {%- endif %}
),

{{ entity }}_missing_key as (
    -- no key to cite: counted per delivery (batch)
    select
        '{{ entity }}' as entity,
        _batch_id::text as record_key,
        'missing_key' as reason,
        'dropped' as action,
        count(*)::bigint as n_rows,
        max(_loaded_at) as _source_loaded_at
    from {{ source('crm', entity) }}
    where ({{ keys[entity] }})
      {%- if is_incremental() %}
      and _loaded_at > {{ watermark }}
      {%- endif %}
    group by _batch_id
),

{% endfor -%}

customer_flags as (
    select
        'customers' as entity,
        customer_id as record_key,
        flag.reason,
        flag.action,
        1::bigint as n_rows,
        _loaded_at as _source_loaded_at
    from {{ ref('stg_crm__customers') }}
    cross join lateral (
        values
            ('test_account', 'excluded', is_test_account),
            ('invalid_email', 'flagged', email is not null and not is_valid_email),
            ('invalid_birth_date', 'nulled', is_birth_date_invalid)
    ) as flag (reason, action, applies)
    where flag.applies
      {%- if is_incremental() %}
      and {{ rows_rejected_touched_filter('customers', watermark) }}
      {%- endif %}
),

order_flags as (
    select
        'orders' as entity,
        order_id as record_key,
        flag.reason,
        flag.action,
        1::bigint as n_rows,
        _source_loaded_at
    from {{ ref('int_orders_validated') }}
    cross join lateral (
        values
            (coalesce(exclusion_reason, ''), 'excluded', exclusion_reason is not null),
            ('missing_customer_id', 'kept_without_customer', exclusion_reason is null and is_missing_customer),
            ('unknown_customer', 'kept_order_only_customer', exclusion_reason is null and is_unknown_customer),
            ('ordered_before_signup', 'flagged', exclusion_reason is null and is_before_signup)
    ) as flag (reason, action, applies)
    where flag.applies
      {%- if is_incremental() %}
      and {{ rows_rejected_touched_filter('orders', watermark) }}
      {%- endif %}
),

orders_after_as_of as (
    -- every night whole: as_of moves (the pre-hook deletes the previous night's)
    select
        'orders' as entity,
        orders.order_id as record_key,
        'after_as_of' as reason,
        'excluded_from_customer_marts' as action,
        1::bigint as n_rows,
        orders._source_loaded_at
    from {{ ref('int_orders_enriched') }} as orders
    cross join {{ ref('int_as_of') }} as as_of
    where orders.exclusion_reason is null
      and orders.order_date > as_of.as_of_date
),

line_flags as (
    select
        'order_lines' as entity,
        order_id || '|' || line_no as record_key,
        exclusion_reason as reason,
        'excluded' as action,
        1::bigint as n_rows,
        _source_loaded_at
    from {{ ref('int_order_lines_enriched') }}
    where exclusion_reason in ('missing_product', 'missing_quantity_or_price', 'negative_price')
      {%- if is_incremental() %}
      and {{ rows_rejected_touched_filter('order_lines', watermark) }}
      {%- endif %}
),

orphan_lines as (
    select
        'order_lines' as entity,
        order_lines.order_id || '|' || order_lines.line_no as record_key,
        'orphan_line_without_order' as reason,
        'excluded' as action,
        1::bigint as n_rows,
        order_lines._loaded_at as _source_loaded_at
    from {{ ref('stg_crm__order_lines') }} as order_lines
    left join {{ ref('stg_crm__orders') }} as orders
        on order_lines.order_id = orders.order_id
    where orders.order_id is null
      {%- if is_incremental() %}
      and {{ rows_rejected_touched_filter('order_lines', watermark, 'order_lines') }}
      {%- endif %}
),

unioned as (
    {% for entity, model, key in staged -%}
    select * from {{ entity }}_duplicates
    union all
    select * from {{ entity }}_missing_key
    union all
    {% endfor -%}
    select * from customer_flags
    union all
    select * from order_flags
    union all
    select * from orders_after_as_of
    union all
    select * from line_flags
    union all
    select * from orphan_lines
)

select * from unioned
