{#- Point-in-time correctness of feature sets: the rows of `feature_sets` (pairs of a relation and its cut-off
    column, all of the snapshots `snapshots`) whose features differ from a recomputation restricted to their
    cut-off. The body of the tests assert_features_do_not_read_after_cutoff (the scoring sets) and
    assert_training_features_do_not_read_after_cutoff (the training set). -#}
{% macro point_in_time_violations(feature_sets, snapshots) -%}
-- Point-in-time correctness: recompute the order-based features of every feature set from fct_orders, and
-- the line-based behaviour features from fct_order_lines, restricted to the set's cut-off (per customer and
-- cut-off, not per snapshot as the model does). Any difference means a feature read data from after its
-- cut-off. Above `pit_test_max_customers` customers the check runs on a fixed hash sample of them (a leak
-- touches every customer with orders after a cut-off, so a sample of tens of thousands finds it; recomputing
-- all of them was 153 s of a 1M-customer build).
with

sample as (
    select greatest(1, ceil(count(*)::numeric / {{ snapshots | length }}
                            / {{ var('pit_test_max_customers', 50000) }}))::int as buckets
    from {{ feature_sets[0][0] }}
),

-- (not filtered by the sample's hash here: the planner takes such a filter for 0.5 % of the rows, whatever the
-- sample, and chose nested loops that ran the CDNOW test for over 13 minutes; the joins to the sampled
-- cut-offs below select the same customers)
orders as (
    select * from {{ ref('fct_orders') }}
    where customer_id is not null
),

purchase_lines as (
    select * from {{ ref('fct_order_lines') }}
    where quantity > 0
      and not is_cancelled
),

all_feature_rows as (
    {%- for relation, cutoff_column in feature_sets %}
    select customer_id, {{ cutoff_column }} as feature_cutoff_date, n_orders, gross_spend, recency_days,
        tenure_days, discount_line_share, avg_price_index, q4_spend_share, avg_units_per_line
    from {{ relation }}
    {{ 'union all' if not loop.last }}
    {%- endfor %}
),

feature_rows as (
    select all_feature_rows.*
    from all_feature_rows
    cross join sample
    where mod(abs(hashtext(all_feature_rows.customer_id::text)::bigint), sample.buckets) = 0
),

cutoffs as (
    select distinct
        customer_id,
        feature_cutoff_date
    from feature_rows
),

recomputed as (
    select
        cutoffs.customer_id,
        cutoffs.feature_cutoff_date,
        count(*) filter (where orders.is_purchase) as n_orders,
        coalesce(sum(orders.gross_revenue), 0) as gross_spend,
        cutoffs.feature_cutoff_date - max(orders.order_date) filter (where orders.is_purchase) as recency_days,
        cutoffs.feature_cutoff_date - min(orders.order_date) filter (where orders.is_purchase) as tenure_days
    from cutoffs
    left join orders
        on cutoffs.customer_id = orders.customer_id
        and orders.order_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.customer_id,
        cutoffs.feature_cutoff_date
),

as_of as (
    select * from {{ ref('int_as_of') }}
),

-- The category medians at each cut-off, from the lines' own dates (not the model's snapshot buckets). One pass
-- over the lines' counts per day and price (int_order_lines_daily, rather than over every line each night)
-- summing, per category and price, the purchase lines on or before each cut-off; then the weighted median of
-- those counts, interpolated between the two middle lines like percentile_cont(0.5).
price_counts as (
    select
        daily_lines.category,
        daily_lines.unit_price
        {%- for k in snapshots %},
        coalesce(sum(daily_lines.n_purchase_lines) filter (
            where daily_lines.order_date <= as_of.as_of_date - {{ k }} * as_of.horizon_days
        ), 0) as n_lines_{{ k }}
        {%- endfor %}
    from {{ ref('int_order_lines_daily') }} as daily_lines
    cross join as_of
    where daily_lines.n_purchase_lines > 0
    group by
        daily_lines.category,
        daily_lines.unit_price
),

cutoff_price_counts as (
    {%- for k in snapshots %}
    select
        (as_of.as_of_date - {{ k }} * as_of.horizon_days)::date as feature_cutoff_date,
        price_counts.category,
        price_counts.unit_price,
        price_counts.n_lines_{{ k }} as n_lines
    from price_counts
    cross join as_of
    where price_counts.n_lines_{{ k }} > 0
    {{ 'union all' if not loop.last }}
    {%- endfor %}
),

category_prices as (
    select
        feature_cutoff_date,
        category,
        -- the lines at 0-based positions floor((n - 1) / 2) and ceil((n - 1) / 2) of the sorted prices
        (min(unit_price) filter (where n_at_or_below > floor((n_total - 1) / 2.0))::double precision
            + min(unit_price) filter (where n_at_or_below > ceil((n_total - 1) / 2.0))::double precision
        ) / 2 as median_unit_price
    from (
        select
            cutoff_price_counts.*,
            sum(n_lines) over (partition by feature_cutoff_date, category order by unit_price) as n_at_or_below,
            sum(n_lines) over (partition by feature_cutoff_date, category) as n_total
        from cutoff_price_counts
    ) as ranked
    group by
        feature_cutoff_date,
        category
),

recomputed_lines as (
    select
        cutoffs.customer_id,
        cutoffs.feature_cutoff_date,
        avg(case when purchase_lines.discount > 0 then 1.0 else 0.0 end) as discount_line_share,
        avg(purchase_lines.unit_price / nullif(category_prices.median_unit_price, 0))
            filter (where purchase_lines.unit_price > 0) as avg_price_index,
        coalesce(sum(purchase_lines.line_revenue) filter (where extract(month from purchase_lines.order_date) >= 11), 0)
            / nullif(sum(purchase_lines.line_revenue), 0) as q4_spend_share,
        avg(purchase_lines.quantity) as avg_units_per_line
    from cutoffs
    inner join purchase_lines
        on cutoffs.customer_id = purchase_lines.customer_id
        and purchase_lines.order_date <= cutoffs.feature_cutoff_date
    left join category_prices
        on cutoffs.feature_cutoff_date = category_prices.feature_cutoff_date
        and purchase_lines.category = category_prices.category
    group by
        cutoffs.customer_id,
        cutoffs.feature_cutoff_date
)

select
    feature_rows.*,
    recomputed.n_orders as expected_n_orders,
    recomputed.recency_days as expected_recency_days,
    recomputed.gross_spend as expected_gross_spend
from feature_rows
inner join recomputed
    on feature_rows.customer_id = recomputed.customer_id
    and feature_rows.feature_cutoff_date = recomputed.feature_cutoff_date
left join recomputed_lines
    on feature_rows.customer_id = recomputed_lines.customer_id
    and feature_rows.feature_cutoff_date = recomputed_lines.feature_cutoff_date
where feature_rows.n_orders <> recomputed.n_orders
   or feature_rows.gross_spend <> recomputed.gross_spend
   or feature_rows.recency_days is distinct from recomputed.recency_days
   or feature_rows.tenure_days is distinct from recomputed.tenure_days
   or feature_rows.recency_days < 0
   -- floating-point features: equal up to rounding (the model divides in double precision)
   or (feature_rows.discount_line_share is null) <> (recomputed_lines.discount_line_share is null)
   or abs(feature_rows.discount_line_share - recomputed_lines.discount_line_share::double precision) > 1e-9
   or (feature_rows.avg_price_index is null) <> (recomputed_lines.avg_price_index is null)
   or abs(feature_rows.avg_price_index - recomputed_lines.avg_price_index::double precision) > 1e-9
   or (feature_rows.q4_spend_share is null) <> (recomputed_lines.q4_spend_share is null)
   or abs(feature_rows.q4_spend_share - recomputed_lines.q4_spend_share::double precision) > 1e-9
   or (feature_rows.avg_units_per_line is null) <> (recomputed_lines.avg_units_per_line is null)
   or abs(feature_rows.avg_units_per_line - recomputed_lines.avg_units_per_line::double precision) > 1e-9
{%- endmacro %}
