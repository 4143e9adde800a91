-- One row: the point in time of every customer mart, the label horizon and the number of training snapshots.
-- as_of defaults to the latest valid order date. Orders timestamped after their own load are already gone
-- (future_dated); orders a clock error put on a later, already past date are sparse: at most one or two a day
-- where a real day of trading has many. So "valid" also means a day with at least `min_tail_day_share` of a
-- typical day's orders (the median over the four weeks before the 99th percentile date), and at least 2.
-- Data too sparse to tell (a typical day under 4 orders) just uses the latest order date.
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

-- the 99th percentile of the orders' dates, percentile_disc(0.99) over every order, from the daily counts: the
-- first date at which the running count reaches 99 % of all orders (no sort of every order: 3.7M at 1M
-- customers, every night)
late_threshold as (
    select min(order_date) as p99_order_date
    from (
        select
            order_date,
            sum(n_orders) over (order by order_date) as n_orders_so_far,
            sum(n_orders) over () as n_orders_total
        from daily_orders
    ) as cumulative
    where n_orders_so_far >= 0.99 * n_orders_total
),

typical_day as (
    select
        percentile_cont(0.5) within group (order by daily_orders.n_orders) as n_orders_per_day
    from daily_orders
    cross join late_threshold
    where daily_orders.order_date between late_threshold.p99_order_date - 28 and late_threshold.p99_order_date
),

data_as_of as (
    select
        case
            when typical_day.n_orders_per_day >= 4 then coalesce(
                max(daily_orders.order_date) filter (
                    where daily_orders.n_orders
                        >= greatest(2, {{ var('min_tail_day_share') }} * typical_day.n_orders_per_day)
                ),
                max(daily_orders.order_date)
            )
            else max(daily_orders.order_date)
        end as latest_valid_order_date
    from daily_orders
    cross join typical_day
    group by typical_day.n_orders_per_day
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
