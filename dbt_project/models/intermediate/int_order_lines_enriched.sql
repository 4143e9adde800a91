{{ config(
    materialized='incremental',
    unique_key=['order_id', 'line_no'],
    incremental_strategy='delete+insert',
    on_schema_change='fail',
) }}
-- One row per order line with its order's customer, date and status and its product's category.
-- line_amount is what the line says (negative for returned items); line_revenue is its contribution to net
-- revenue (0 for sale lines of cancelled orders and of orders returned as a whole).
with

{%- if is_incremental() %}
{%- set watermark = delivery_watermark('_source_loaded_at') %}
{%- endif %}
order_lines as (
    select * from {{ ref('stg_crm__order_lines') }}
    {%- if is_incremental() %}
    -- only lines re-delivered since the watermark, or whose order (with its customer) or product was: a
    -- semi-join on the union of their keys, each branch found through an index (an OR of the three filters
    -- could only be a scan of every staged line)
    where (order_id, line_no) in (
        select order_id, line_no from {{ ref('stg_crm__order_lines') }}
        where _loaded_at > {{ watermark }}
        union
        select order_id, line_no from {{ ref('stg_crm__order_lines') }}
        where order_id in (
            select order_id from {{ ref('int_orders_validated') }}
            where _source_loaded_at > {{ watermark }}
        )
        union
        -- a re-delivered product rewrites all its lines (a scan, but only on a night that re-delivers one:
        -- with no changed product the hash join ends before reading the lines)
        select order_id, line_no from {{ ref('stg_crm__order_lines') }}
        where product_id in (
            select product_id from {{ ref('stg_crm__products') }}
            where _loaded_at > {{ watermark }}
        )
    )
    {%- endif %}
),

orders as (
    select * from {{ ref('int_orders_validated') }}
),

products as (
    select * from {{ ref('stg_crm__products') }}
),

joined as (
    select
        order_lines.order_id,
        order_lines.line_no,
        orders.customer_id,
        order_lines.product_id,
        coalesce(products.category, 'uncategorised') as category,
        coalesce(products.is_product, {{ is_product_code('order_lines.product_id') }}) as is_product,
        orders.ordered_at,
        orders.order_date,
        orders.status as order_status,
        order_lines.quantity,
        order_lines.unit_price,
        order_lines.discount,
        round(order_lines.quantity * order_lines.unit_price * (1 - order_lines.discount), 4) as line_amount,
        orders.status = 'cancelled' as is_cancelled,
        order_lines.quantity < 0 or orders.status = 'returned' as is_return,
        case
            when order_lines.product_id is null then 'missing_product'
            when order_lines.is_missing_amount then 'missing_quantity_or_price'
            when order_lines.unit_price < 0 then 'negative_price'
            else orders.exclusion_reason
        end as exclusion_reason,
        greatest(order_lines._loaded_at, orders._source_loaded_at, products._loaded_at) as _source_loaded_at
    from order_lines
    inner join orders
        on order_lines.order_id = orders.order_id
    left join products
        on order_lines.product_id = products.product_id
),

final as (
    select
        *,
        case
            when quantity > 0 and order_status in ('cancelled', 'returned') then 0
            else line_amount
        end as line_revenue
    from joined
)

select * from final
