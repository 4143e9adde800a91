{#- The staged record of each entity of int_rows_rejected: (entity, staging model, record key expression).
    One list for the model's body and its pre-hook, so both name a record the same way. -#}
{% macro rows_rejected_entities() -%}
    {%- do return([
        ('customers', 'stg_crm__customers', "customer_id"),
        ('products', 'stg_crm__products', "product_id"),
        ('orders', 'stg_crm__orders', "order_id"),
        ('order_lines', 'stg_crm__order_lines', "order_id || '|' || line_no"),
        ('web_events', 'stg_crm__web_events', "concat_ws('|', customer_id, session_id, event_type, event_at)"),
    ]) -%}
{%- endmacro %}


{#- Whether a staged row of `entity` (columns qualified by `alias` when given) belongs to a record an
    incremental run of int_rows_rejected derives again: rows delivered since `watermark`; for orders, those
    whose validation changed (a new delivery of the order or of its customer); for order lines, those
    delivered or enriched since (an orphan line's order arriving enriches it). Each found through a
    load-time index. The body filters every part with it, the pre-hook deletes what it selects. -#}
{% macro rows_rejected_touched_filter(entity, watermark, alias=none) -%}
    {%- set a = alias ~ '.' if alias else '' -%}
    {%- if entity == 'orders' -%}
    {{ a }}order_id in (
        select order_id from {{ ref('int_orders_validated') }} where _source_loaded_at > {{ watermark }}
    )
    {%- elif entity == 'order_lines' -%}
    ({{ a }}order_id, {{ a }}line_no) in (
        select order_id, line_no from {{ ref('stg_crm__order_lines') }} where _loaded_at > {{ watermark }}
        union
        select order_id, line_no from {{ ref('int_order_lines_enriched') }} where _source_loaded_at > {{ watermark }}
    )
    {%- else -%}
    {{ a }}_loaded_at > {{ watermark }}
    {%- endif -%}
{%- endmacro %}


{#- The records (entity, record_key) whose reasons an incremental run derives again: the pre-hook deletes
    their rows, the body emits what applies now. -#}
{% macro rows_rejected_touched(watermark) -%}
    {%- for entity, model, key in rows_rejected_entities() %}
    select '{{ entity }}' as entity, ({{ key }})::text as record_key
    from {{ ref(model) }}
    where {{ rows_rejected_touched_filter(entity, watermark) }}
    {{ 'union all' if not loop.last }}
    {%- endfor %}
{%- endmacro %}
