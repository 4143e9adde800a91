{#- The behavioural features of every customer at the cut-offs of the snapshots that `snapshots` (a condition on
    the snapshot number, e.g. '= 0') selects: the body of int_customer_features_as_of (snapshot 0, scoring)
    and int_customer_features_snapshots (the training snapshots), so that training and scoring features are
    one computation. What the columns mean and how they derive from the state: see below. `state_relation`: one
    part of the state (int_customer_feature_state_p<k>, for the part models of int_customer_features_as_of)
    instead of the whole (the view over both parts). -#}
{% macro customer_features_from_state(snapshots, state_relation=none) -%}
-- Features computed from data dated on or before the snapshot's cut-off only.
-- The sums and counts come from int_customer_feature_state (incremental by customer); what depends on the
-- cut-off itself (recency, tenure, age) is computed here, for every customer, from its dates; so is
-- avg_price_index, from the state's priced amounts per category and the category medians at the cut-off (the
-- medians move every night: kept out of the state, they would make a night recompute every buyer).
with

cutoffs as (
    select * from {{ ref('int_feature_cutoffs') }}
    where snapshot {{ snapshots }}
),

state as (
    select * from {{ state_relation if state_relation is not none else ref('int_customer_feature_state') }}
    where n_orders > 0
      and snapshot {{ snapshots }}
),

-- per snapshot, the categories and the reciprocals of their medians as two aligned arrays: a lookup per state
-- row, no join. A numeric multiplication per category instead of a division: 0.8 of 2.5 CPU s at 100k.
medians as (
    select
        snapshot,
        array_agg(category) as categories,
        array_agg(round(1 / nullif(median_unit_price::numeric, 0), 20)) as inverse_medians
    from {{ ref('int_category_price_medians') }}
    where category is not null
      and snapshot {{ snapshots }}
    group by snapshot
),

customers as (
    select * from {{ ref('int_customers_unioned') }}
),

features as (
    select
        state.snapshot,
        cutoffs.feature_cutoff_date,
        state.customer_id,
        state.first_purchase_date,
        state.last_purchase_date,
        (cutoffs.feature_cutoff_date - state.last_purchase_date)::integer as recency_days,
        (cutoffs.feature_cutoff_date - state.first_purchase_date)::integer as tenure_days,
        state.n_orders::integer as n_orders,
        state.n_purchase_days::integer as n_purchase_days,
        -- returns of purchases made before the data starts can exceed the purchases seen: floor at 0
        greatest(state.net_revenue, 0)::numeric as net_spend,
        state.gross_spend::numeric as gross_spend,
        round(greatest(state.net_revenue, 0) / state.n_orders, 4)::numeric as avg_order_value,
        state.avg_basket_size::double precision as avg_basket_size,
        state.n_distinct_products::integer as n_distinct_products,
        state.n_distinct_categories::integer as n_distinct_categories,
        least(1, state.return_value / nullif(state.gross_spend, 0))::double precision as return_rate,
        case
            when state.n_orders > 1
                then (state.last_purchase_date - state.first_purchase_date)::double precision
                    / (state.n_orders - 1)
        end as avg_days_between_orders,
        state.n_web_events::integer as n_web_events,
        case
            when state.n_web_events > 0
                then state.n_views::double precision / state.n_orders
        end as browse_to_buy_ratio,
        {%- for k in range(1, 9) %}
        coalesce(state.category_spend_{{ k }} / nullif(state.purchase_amount, 0), 0)::double precision
            as category_share_{{ k }},
        {%- endfor %}
        extract(year from age(cutoffs.feature_cutoff_date, customers.birth_date))::integer as age_years,
        greatest(state.net_revenue, 0) <> state.net_revenue as has_excess_returns,
        -- behaviour: what separates bargain hunters, premium buyers and seasonal gift buyers (RFM does not)
        (state.n_discount_lines::double precision / nullif(state.n_purchase_lines, 0)) as discount_line_share,
        -- the mean over priced lines of unit_price / category median = per category the summed prices over its
        -- median; in numeric, not double, so that the sum is exact whatever order the categories come in
        (
            select
                sum(prices.amount * prices.inverse_median)
                    / nullif(sum(prices.n_lines) filter (where prices.inverse_median is not null), 0)
            from (
                select
                    priced.amount,
                    priced.n_lines,
                    medians.inverse_medians[array_position(medians.categories, priced.category)] as inverse_median
                from unnest(state.price_categories, state.category_priced_amounts, state.category_priced_lines)
                    as priced (category, amount, n_lines)
            ) as prices
        )::double precision as avg_price_index,
        -- purchase lines' line_revenue is ≥ 0 (cancelled and wholly returned orders count 0), so this is in [0, 1]
        (coalesce(state.q4_purchase_revenue, 0)::double precision
            / nullif(state.purchase_revenue, 0)) as q4_spend_share,
        state.avg_units_per_line::double precision as avg_units_per_line,
        -- unfloored, so that a label window's spend is the difference of two snapshots (clv_training_set)
        state.net_revenue::numeric as net_revenue
    from state
    inner join cutoffs
        on state.snapshot = cutoffs.snapshot
    left join medians
        on state.snapshot = medians.snapshot
    left join customers
        on state.customer_id = customers.customer_id
)

select * from features
{%- endmacro %}
