{{ config(
    materialized='incremental',
    unique_key='order_date',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['order_date']}],
    post_hook="{% if is_incremental() %}delete from {{ this }} where n_lines = 0{% endif %}",
) }}
-- One row per order date × category × unit price of fct_order_lines: its lines, its purchase lines (sold, not
-- cancelled, priced above zero) and its net revenue. feature_categories (spend per category up to as_of),
-- int_category_price_medians (price counts per snapshot) and the point-in-time test read this instead of
-- the ~11M lines each: at 1M customers those were three passes over every line, every night, because
-- as_of moves. A night rewrites whole days:
--   * the days of the lines delivered since the last run (within the look-back), and
--   * the days whose line count no longer matches, which catches what the load time cannot: the old date
--     of a re-delivered order that moved, and the lines fct_order_lines deletes when their order is later
--     excluded (say, its customer turns out to be a test account). A day that lost all its lines gets a
--     placeholder row with n_lines = 0, which the post-hook deletes (delete+insert alone would keep it).
-- _source_loaded_at is the newest load time of the row's lines on a full build, and the newest load time in
-- fct_order_lines on a night that rewrites the row: its max is the next night's watermark either way, and a
-- rewritten row (a recounted day's remaining lines are older) falls inside the night's data tests (see
-- postgres__get_where_subquery), while a full build's old days stay out of the next night's.
with

-- not materialized: read three times, a shared CTE would spool all 11M lines to disk (1.2 GB at 1M customers)
-- where each reader needs one index range or one narrow pass
order_lines as not materialized (
    select * from {{ ref('fct_order_lines') }}
),

newest as (
    select max(_source_loaded_at) as loaded_at
    from order_lines
),

{%- if is_incremental() %}

delivered_days as (
    select distinct order_date
    from order_lines
    where _source_loaded_at > {{ delivery_watermark('_source_loaded_at') }}
),

-- one pass counting lines per day (a hash aggregate on one date column: a fraction of the grouping below)
line_counts as (
    select order_date, count(*) as n_lines
    from order_lines
    group by order_date
),

kept_counts as (
    select order_date, sum(n_lines) as n_lines
    from {{ this }}
    group by order_date
),

recounted_days as (
    select coalesce(line_counts.order_date, kept_counts.order_date) as order_date
    from line_counts
    full outer join kept_counts
        on line_counts.order_date = kept_counts.order_date
    where line_counts.n_lines is distinct from kept_counts.n_lines
),

rewritten_days as (
    select order_date from delivered_days
    union
    select order_date from recounted_days
),

{%- endif %}

day_prices as (
    select
        order_lines.order_date,
        order_lines.category,
        order_lines.unit_price,
        count(*) as n_lines,
        count(*) filter (
            where order_lines.quantity > 0
              and not order_lines.is_cancelled
              and order_lines.unit_price > 0
        ) as n_purchase_lines,
        sum(order_lines.line_revenue) as line_revenue,
        max(order_lines._source_loaded_at) as lines_loaded_at
    from order_lines
    {%- if is_incremental() %}
    where order_lines.order_date in (select order_date from rewritten_days)
    {%- endif %}
    group by
        order_lines.order_date,
        order_lines.category,
        order_lines.unit_price
),

{%- if is_incremental() %}

emptied_days as (
    select rewritten_days.order_date
    from rewritten_days
    where not exists (select from day_prices where day_prices.order_date = rewritten_days.order_date)
),

{%- endif %}

final as (
    select
        order_date::date as order_date,
        category::text as category,
        unit_price::numeric as unit_price,
        n_lines::bigint as n_lines,
        n_purchase_lines::bigint as n_purchase_lines,
        line_revenue::numeric as line_revenue,
        {{ 'newest.loaded_at' if is_incremental() else 'day_prices.lines_loaded_at' }}::timestamptz
            as _source_loaded_at
    from day_prices
    cross join newest
    {%- if is_incremental() %}

    union all

    select
        order_date::date,
        null::text,
        null::numeric,
        0::bigint,
        0::bigint,
        0::numeric,
        newest.loaded_at
    from emptied_days
    cross join newest
    {%- endif %}
)

select * from final
