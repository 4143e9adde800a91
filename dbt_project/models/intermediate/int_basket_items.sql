-- One row per basket (order) × distinct product actually bought: no cancellations, returns, free or negative
-- prices, or fee codes (POST, M, BANK CHARGES, ...). The input of itemset mining.
with

order_lines as (
    select * from {{ ref('fct_order_lines') }}
    where is_product
      and quantity > 0
      and unit_price > 0
      and not is_cancelled
      and not is_return
),

basket_items as (
    select
        order_id as basket_id,
        product_id,
        max(customer_id) as customer_id,
        max(category) as category,
        min(ordered_at) as ordered_at,
        min(order_date) as order_date,
        sum(quantity) as quantity
    from order_lines
    group by
        order_id,
        product_id
)

select * from basket_items
