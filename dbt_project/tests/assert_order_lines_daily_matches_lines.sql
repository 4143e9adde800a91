-- int_order_lines_daily is kept incrementally by day (see the model): every day it holds must sum exactly
-- what fct_order_lines holds for that day, and no day with lines may be missing. With the var tested_through
-- (the nightly's incremental nights, see postgres__get_where_subquery) the days checked are those with lines
-- loaded after it less the look-back, and the days the summary rewrote; without it, every day (a full
-- refresh, the first night, data_tests=all, and at least once every 7 days). One row per mismatched
-- day × category × price.
{%- set tested_through = tested_through_var() %}
with

{%- if tested_through %}

checked_days as (
    select distinct order_date
    from {{ ref('fct_order_lines') }}
    where _source_loaded_at > '{{ tested_through }}'::timestamptz - interval '{{ var("incremental_lookback_hours") }} hours'
    union
    select distinct order_date
    from {{ ref('int_order_lines_daily') }}
    where _source_loaded_at > '{{ tested_through }}'::timestamptz - interval '{{ var("incremental_lookback_hours") }} hours'
),

{%- endif %}

expected as (
    select
        order_date,
        category,
        unit_price,
        count(*) as n_lines,
        count(*) filter (where quantity > 0 and not is_cancelled and unit_price > 0) as n_purchase_lines,
        sum(line_revenue) as line_revenue
    from {{ ref('fct_order_lines') }}
    {%- if tested_through %}
    where order_date in (select order_date from checked_days)
    {%- endif %}
    group by
        order_date,
        category,
        unit_price
),

summarised as (
    select order_date, category, unit_price, n_lines, n_purchase_lines, line_revenue
    from {{ ref('int_order_lines_daily') }}
    {%- if tested_through %}
    where order_date in (select order_date from checked_days)
    {%- endif %}
)

select
    coalesce(expected.order_date, summarised.order_date) as order_date,
    coalesce(expected.category, summarised.category) as category,
    coalesce(expected.unit_price, summarised.unit_price) as unit_price,
    expected.n_lines as expected_n_lines,
    summarised.n_lines,
    expected.n_purchase_lines as expected_n_purchase_lines,
    summarised.n_purchase_lines,
    expected.line_revenue as expected_line_revenue,
    summarised.line_revenue
from expected
full outer join summarised
    on expected.order_date = summarised.order_date
    and expected.category = summarised.category
    and expected.unit_price = summarised.unit_price
where expected.n_lines is distinct from summarised.n_lines
   or expected.n_purchase_lines is distinct from summarised.n_purchase_lines
   or expected.line_revenue is distinct from summarised.line_revenue
