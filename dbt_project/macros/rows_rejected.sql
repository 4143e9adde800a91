{#- The records whose rejection reasons an incremental run of int_rows_rejected derives again, as
    (entity, record_key) with the model's record keys: staged rows delivered since `watermark`, orders whose
    validation changed (a new delivery of the order or of its customer), and order lines delivered or
    enriched since (an orphan line's order arriving enriches it). The pre-hook deletes their rows, the body
    emits what applies now. -#}
{% macro rows_rejected_touched(watermark) -%}
    select 'customers' as entity, customer_id::text as record_key
    from {{ ref('stg_crm__customers') }}
    where _loaded_at > {{ watermark }}
    union all
    select 'products', product_id::text
    from {{ ref('stg_crm__products') }}
    where _loaded_at > {{ watermark }}
    union all
    select 'orders', order_id::text
    from {{ ref('int_orders_validated') }}
    where _source_loaded_at > {{ watermark }}
    union all
    select 'order_lines', order_id || '|' || line_no
    from ({{ rows_rejected_touched_lines(watermark) }}) as touched_lines
    union all
    select 'web_events', concat_ws('|', customer_id, session_id, event_type, event_at)::text
    from {{ ref('stg_crm__web_events') }}
    where _loaded_at > {{ watermark }}
{%- endmacro %}


{#- The order lines (order_id, line_no) of rows_rejected_touched, each part found through a load-time index. -#}
{% macro rows_rejected_touched_lines(watermark) -%}
    select order_id, line_no
    from {{ ref('stg_crm__order_lines') }}
    where _loaded_at > {{ watermark }}
    union
    select order_id, line_no
    from {{ ref('int_order_lines_enriched') }}
    where _source_loaded_at > {{ watermark }}
{%- endmacro %}
