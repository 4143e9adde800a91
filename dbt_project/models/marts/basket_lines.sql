{#- (basket_id, product_id) is unique by a unique index, built once after the insert: every build checks it
    without the separate test query that re-sorted ~10M rows at 1M customers. -#}
{{ config(indexes=[{'columns': ['basket_id', 'product_id'], 'unique': True}]) }}
-- One row per basket (order) × distinct product bought up to as_of, for itemset mining.
with

basket_items as (
    select * from {{ ref('int_basket_items') }}
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

final as (
    select
        basket_items.basket_id::text as basket_id,
        basket_items.customer_id::text as customer_id,
        basket_items.product_id::text as product_id,
        basket_items.category::text as category,
        basket_items.ordered_at::timestamp as ordered_at,
        basket_items.quantity::bigint as quantity
    from basket_items
    cross join as_of
    where basket_items.order_date <= as_of.as_of_date
)

select * from final
