{#- Incremental like fct_orders: the lines of every order touched by a newer delivery are replaced as a
    whole (delete+insert on order_id, so a line that became invalid disappears with its order's rewrite), and
    the pre-hook removes the lines of orders disqualified since the watermark (see fct_orders). -#}
{{ config(
    materialized='incremental',
    unique_key='order_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    pre_hook="{% if is_incremental() %}delete from {{ this }} where order_id in ({{ disqualified_orders_since(delivery_watermark('_source_loaded_at')) }}){% endif %}",
) }}
-- depends_on: {{ ref('int_orders_validated') }}
with

orders as (
    select * from {{ ref('int_orders_enriched') }}
    where exclusion_reason is null
    {%- if is_incremental() %}
      -- a load whose transaction began before the last run but committed after it carries an older
      -- _loaded_at: the watermark looks back a few hours (re-processing an order is idempotent)
      and _source_loaded_at > {{ delivery_watermark('_source_loaded_at') }}
    {%- endif %}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where exclusion_reason is null
),

final as (
    select
        order_lines.order_id::text as order_id,
        order_lines.line_no::integer as line_no,
        order_lines.customer_id::text as customer_id,
        order_lines.product_id::text as product_id,
        order_lines.category::text as category,
        order_lines.ordered_at::timestamp as ordered_at,
        order_lines.order_date::date as order_date,
        order_lines.quantity::integer as quantity,
        order_lines.unit_price::numeric as unit_price,
        order_lines.discount::numeric as discount,
        order_lines.line_amount::numeric as line_amount,
        order_lines.line_revenue::numeric as line_revenue,
        order_lines.is_return::boolean as is_return,
        order_lines.is_cancelled::boolean as is_cancelled,
        order_lines.is_product::boolean as is_product,
        -- the order's watermark, so that this table and fct_orders advance together
        orders._source_loaded_at::timestamptz as _source_loaded_at
    from order_lines
    inner join orders
        on order_lines.order_id = orders.order_id
)

select * from final
