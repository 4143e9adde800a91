{#- Ephemeral: only basket_lines reads it, so it is inlined there rather than written as a second ~10M-row
    table at 1M customers (plus its ANALYZE and a uniqueness test that re-aggregated it: basket_lines carries
    the same test on the same rows up to as_of, and the group by makes the pair unique by construction). -#}
{{ config(materialized='ephemeral') }}
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
