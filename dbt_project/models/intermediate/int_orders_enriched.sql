{{ config(
    materialized='incremental',
    unique_key='order_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
) }}
-- One row per order with its line totals. Gross revenue counts sale lines of orders that were not cancelled;
-- returns are negative lines plus whole orders returned; net = gross - returns = sum of line_revenue.
with

{%- if is_incremental() %}
{%- set watermark = delivery_watermark('_source_loaded_at') %}
-- only orders whose own row or any of whose lines changed since the watermark, recomputed from all their lines
changed_orders as (
    select order_id from {{ ref('int_orders_validated') }}
    where _source_loaded_at > {{ watermark }}
    union
    select order_id from {{ ref('int_order_lines_enriched') }}
    where _source_loaded_at > {{ watermark }}
),
{%- endif %}

orders as (
    select * from {{ ref('int_orders_validated') }}
    {%- if is_incremental() %}
    where order_id in (select order_id from changed_orders)
    {%- endif %}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    {%- if is_incremental() %}
    where order_id in (select order_id from changed_orders)
    {%- endif %}
),

line_totals as (
    select
        order_id,
        count(*) filter (where exclusion_reason is null) as n_lines,
        coalesce(sum(quantity) filter (where exclusion_reason is null and quantity > 0), 0) as n_items,
        coalesce(sum(line_amount) filter (
            where exclusion_reason is null and quantity > 0 and not is_cancelled
        ), 0) as gross_revenue,
        coalesce(sum(-line_amount) filter (where exclusion_reason is null and quantity < 0), 0)
            + coalesce(sum(line_amount) filter (
                where exclusion_reason is null and quantity > 0 and order_status = 'returned'
            ), 0) as return_value,
        coalesce(sum(line_revenue) filter (where exclusion_reason is null), 0) as net_revenue,
        bool_or(quantity < 0) filter (where exclusion_reason is null) as has_returned_lines,
        max(_source_loaded_at) as lines_loaded_at
    from order_lines
    group by order_id
),

joined as (
    select
        orders.order_id,
        orders.customer_id,
        orders.ordered_at,
        orders.order_date,
        orders.status,
        orders.channel,
        coalesce(line_totals.n_lines, 0) as n_lines,
        coalesce(line_totals.n_items, 0) as n_items,
        coalesce(line_totals.gross_revenue, 0) as gross_revenue,
        coalesce(line_totals.return_value, 0) as return_value,
        coalesce(line_totals.net_revenue, 0) as net_revenue,
        orders.status = 'cancelled' as is_cancelled,
        orders.status = 'returned' or coalesce(line_totals.has_returned_lines, false) as is_return,
        -- a purchase sold at least one item and was not cancelled (free items count: CDNOW has $0 orders)
        orders.status <> 'cancelled' and coalesce(line_totals.n_items, 0) > 0 as is_purchase,
        orders.is_before_signup,
        orders.is_unknown_customer,
        orders.exclusion_reason,
        greatest(orders._source_loaded_at, line_totals.lines_loaded_at) as _source_loaded_at
    from orders
    left join line_totals
        on orders.order_id = line_totals.order_id
)

select * from joined
