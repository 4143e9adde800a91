-- One row per feature category (rank 1..8): the top categories by net spend up to as_of, which
-- customer_features.category_share_<rank> refer to.
with

order_lines as (
    select * from {{ ref('fct_order_lines') }}
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

category_spend as (
    select
        order_lines.category,
        sum(order_lines.line_revenue) as net_spend
    from order_lines
    cross join as_of
    where order_lines.order_date <= as_of.as_of_date
    group by order_lines.category
),

ranked as (
    select
        row_number() over (order by net_spend desc, category)::integer as rank,
        category::text as category,
        net_spend::numeric as net_spend
    from category_spend
)

select * from ranked
where rank <= 8
