-- One row: the point in time of every customer mart, the label horizon and the number of training snapshots.
-- as_of defaults to the latest valid order date. Orders timestamped after their own load are already gone
-- (future_dated); orders a clock error put into a later but already past date are sparse, so "valid" also
-- means: the trailing 7 days up to that date hold at least `min_tail_week_share` of a typical week's orders.
with

orders as (
    select * from {{ ref('int_orders_enriched') }}
    where exclusion_reason is null
      and is_purchase
),

daily_orders as (
    select
        order_date,
        count(*) as n_orders
    from orders
    group by order_date
),

typical_week as (
    -- orders per 7 days over the central 98% of the order dates
    select
        7.0 * count(*) / greatest(max(order_date) - min(order_date) + 1, 1) as n_orders_per_week
    from (
        select
            order_date,
            percent_rank() over (order by order_date) as date_rank
        from orders
    ) as ranked
    where date_rank between 0.01 and 0.99
),

trailing_weeks as (
    select
        daily_orders.order_date,
        sum(daily_orders.n_orders) over (
            order by daily_orders.order_date
            range between interval '6 days' preceding and current row
        ) as n_orders_trailing_week
    from daily_orders
),

data_as_of as (
    select
        coalesce(
            max(trailing_weeks.order_date) filter (
                where trailing_weeks.n_orders_trailing_week
                    >= {{ var('min_tail_week_share') }} * typical_week.n_orders_per_week
            ),
            max(trailing_weeks.order_date)
        ) as latest_valid_order_date
    from trailing_weeks
    cross join typical_week
),

final as (
    select
        {%- if var('as_of') %}
        date '{{ var("as_of") }}' as as_of_date,
        {%- else %}
        latest_valid_order_date as as_of_date,
        {%- endif %}
        latest_valid_order_date,
        {{ var('horizon_days') }}::integer as horizon_days,
        {{ var('training_snapshots') }}::integer as training_snapshots
    from data_as_of
)

select * from final
