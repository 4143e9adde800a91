-- One row per raw record (or group of re-delivered rows) that staging dropped, or that a mart excludes or
-- flags, with the reason and what happened to it. Nothing is cleaned away silently: data_quality_summary
-- counts these by reason.
{%- set staged = [
    ('customers', 'stg_crm__customers', "customer_id"),
    ('products', 'stg_crm__products', "product_id"),
    ('orders', 'stg_crm__orders', "order_id"),
    ('order_lines', 'stg_crm__order_lines', "order_id || '|' || line_no"),
    ('web_events', 'stg_crm__web_events', "concat_ws('|', customer_id, session_id, event_type, event_at)"),
] %}
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
        dropped.n_rows
    from {{ ref(model) }}
    cross join lateral (
        values
            ('exact_duplicate', _n_exact_duplicates::bigint),
            ('superseded_by_later_delivery', _n_superseded::bigint)
    ) as dropped (reason, n_rows)
    where (_n_exact_duplicates > 0 or _n_superseded > 0)
      and dropped.n_rows > 0
),

{{ entity }}_missing_key as (
    select
        '{{ entity }}' as entity,
        null::text as record_key,
        'missing_key' as reason,
        'dropped' as action,
        count(*)::bigint as n_rows
    from {{ source('crm', entity) }}
    where {{ keys[entity] }}
    having count(*) > 0
),

{% endfor -%}

customer_flags as (
    select
        'customers' as entity,
        customer_id as record_key,
        flag.reason,
        flag.action,
        1::bigint as n_rows
    from {{ ref('stg_crm__customers') }}
    cross join lateral (
        values
            ('test_account', 'excluded', is_test_account),
            ('invalid_email', 'flagged', email is not null and not is_valid_email),
            ('invalid_birth_date', 'nulled', is_birth_date_invalid)
    ) as flag (reason, action, applies)
    where flag.applies
),

order_flags as (
    select
        'orders' as entity,
        order_id as record_key,
        flag.reason,
        flag.action,
        1::bigint as n_rows
    from {{ ref('int_orders_validated') }}
    cross join lateral (
        values
            (coalesce(exclusion_reason, ''), 'excluded', exclusion_reason is not null),
            ('missing_customer_id', 'kept_without_customer', exclusion_reason is null and is_missing_customer),
            ('unknown_customer', 'kept_order_only_customer', exclusion_reason is null and is_unknown_customer),
            ('ordered_before_signup', 'flagged', exclusion_reason is null and is_before_signup)
    ) as flag (reason, action, applies)
    where flag.applies
),

orders_after_as_of as (
    select
        'orders' as entity,
        orders.order_id as record_key,
        'after_as_of' as reason,
        'excluded_from_customer_marts' as action,
        1::bigint as n_rows
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
        1::bigint as n_rows
    from {{ ref('int_order_lines_enriched') }}
    where exclusion_reason in ('missing_product', 'missing_quantity_or_price', 'negative_price')
),

orphan_lines as (
    select
        'order_lines' as entity,
        order_lines.order_id || '|' || order_lines.line_no as record_key,
        'orphan_line_without_order' as reason,
        'excluded' as action,
        1::bigint as n_rows
    from {{ ref('stg_crm__order_lines') }} as order_lines
    left join {{ ref('stg_crm__orders') }} as orders
        on order_lines.order_id = orders.order_id
    where orders.order_id is null
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
