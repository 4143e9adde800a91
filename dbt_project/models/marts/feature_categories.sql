-- One row per feature category (rank 1..8): the top categories by net spend up to as_of, which
-- customer_features.category_share_<rank> refer to. From the lines' daily summary (int_order_lines_daily),
-- not the lines themselves: the ranks are on every night's critical path.
with

daily_lines as (
    select * from {{ ref('int_order_lines_daily') }}
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

category_spend as (
    select
        daily_lines.category,
        sum(daily_lines.line_revenue) as net_spend
    from daily_lines
    cross join as_of
    where daily_lines.order_date <= as_of.as_of_date
    group by daily_lines.category
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
