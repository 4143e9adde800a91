-- One row: the point in time of every customer mart, the label horizon and the number of training snapshots.
-- as_of defaults to the latest valid order date. "Valid" also means not a stray future-dated outlier: past the
-- 99th percentile of order dates, the first gap longer than `max_order_date_gap_days` ends the data.
with

orders as (
    select * from {{ ref('int_orders_enriched') }}
    where exclusion_reason is null
      and is_purchase
),

order_dates as (
    select distinct order_date from orders
),

late_threshold as (
    select percentile_disc(0.99) within group (order by order_date) as p99_order_date
    from orders
),

late_dates as (
    select
        order_dates.order_date,
        order_dates.order_date - lag(order_dates.order_date) over (order by order_dates.order_date) as gap_days
    from order_dates
    cross join late_threshold
    where order_dates.order_date >= late_threshold.p99_order_date
),

first_outlier as (
    select min(order_date) as first_outlier_date
    from late_dates
    where gap_days > {{ var('max_order_date_gap_days') }}
),

data_as_of as (
    select max(order_dates.order_date) as latest_valid_order_date
    from order_dates
    cross join first_outlier
    where first_outlier.first_outlier_date is null
       or order_dates.order_date < first_outlier.first_outlier_date
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
