{#- The orders a delivery disqualified since `watermark` (a rendered delivery_watermark): disqualifying an order
    rewrites its row in int_orders_validated, so its load time is newer than the watermark of every model that
    already holds it. The facts and basket_lines delete these in a pre-hook (dbt renders hooks when it runs
    them: a post-hook's watermark would already include tonight's rows). Looked up through the load-time index,
    not every excluded order ever (a hash of 18.8k orders against a scan of each table: 1.2 s in fct_orders,
    3.0 s in fct_order_lines at 1M customers). -#}
{% macro disqualified_orders_since(watermark) -%}
select order_id from {{ ref('int_orders_validated') }}
where exclusion_reason is not null
  and _source_loaded_at > {{ watermark }}
{%- endmacro %}
