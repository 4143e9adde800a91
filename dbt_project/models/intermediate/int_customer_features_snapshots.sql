-- One row per customer × snapshot: the behavioural features computed from data dated on or before the
-- snapshot's cut-off only. Snapshot 0 is the scoring cut-off (as_of); snapshots 1..training_snapshots are
-- the training cut-offs as_of - k * horizon_days. Every feature mart reads this one model, so training and
-- scoring features are the same computation.
with

as_of as (
    select * from {{ ref('int_as_of') }}
),

orders as (
    select * from {{ ref('fct_orders') }}
    where customer_id is not null
),

order_lines as (
    select * from {{ ref('fct_order_lines') }}
),

web_events as (
    select * from {{ ref('stg_crm__web_events') }}
    where customer_id is not null
),

customers as (
    select * from {{ ref('int_customers_unioned') }}
),

feature_categories as (
    select * from {{ ref('feature_categories') }}
),

cutoffs as (
    select
        0 as snapshot,
        as_of_date as feature_cutoff_date
    from as_of

    union all

    select
        k.snapshot,
        as_of.as_of_date - k.snapshot * as_of.horizon_days as feature_cutoff_date
    from as_of
    cross join generate_series(1, as_of.training_snapshots) as k (snapshot)
),

order_summary as (
    select
        cutoffs.snapshot,
        cutoffs.feature_cutoff_date,
        orders.customer_id,
        min(orders.order_date) filter (where orders.is_purchase) as first_purchase_date,
        max(orders.order_date) filter (where orders.is_purchase) as last_purchase_date,
        count(*) filter (where orders.is_purchase) as n_orders,
        sum(orders.gross_revenue) as gross_spend,
        sum(orders.return_value) as return_value,
        sum(orders.net_revenue) as net_revenue,
        avg(orders.n_items) filter (where orders.is_purchase) as avg_basket_size
    from cutoffs
    inner join orders
        on orders.order_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.snapshot,
        cutoffs.feature_cutoff_date,
        orders.customer_id
    having count(*) filter (where orders.is_purchase) > 0
),

-- Distinct counts per cut-off without count(distinct): PostgreSQL sorts the whole (cut-offs × rows) set for a
-- count(distinct) but hash-aggregates a plain count, so the distinct items are collapsed once, with the date
-- each was first seen, and counted per cut-off.
-- Purchase occasions: several orders on one day are one (BG/NBD's frequency counts repeat days).
purchase_days as (
    select
        cutoffs.snapshot,
        days.customer_id,
        count(*) as n_purchase_days
    from cutoffs
    inner join (
        select distinct customer_id, order_date
        from orders
        where is_purchase
    ) as days
        on days.order_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.snapshot,
        days.customer_id
),

-- first purchase of each product (and so of its category) by each customer
customer_products as (
    select
        customer_id,
        product_id,
        category,
        min(order_date) as first_date
    from order_lines
    where customer_id is not null
      and quantity > 0
      and not is_cancelled
    group by
        customer_id,
        product_id,
        category
),

customer_categories as (
    select
        customer_id,
        category,
        min(first_date) as first_date
    from customer_products
    group by
        customer_id,
        category
),

distinct_counts as (
    select
        cutoffs.snapshot,
        customer_products.customer_id,
        count(*) as n_distinct_products
    from cutoffs
    inner join customer_products
        on customer_products.first_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.snapshot,
        customer_products.customer_id
),

distinct_categories as (
    select
        cutoffs.snapshot,
        customer_categories.customer_id,
        count(*) as n_distinct_categories
    from cutoffs
    inner join customer_categories
        on customer_categories.first_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.snapshot,
        customer_categories.customer_id
),

-- every purchase line (sold, not cancelled) up to each cut-off, of known and unknown customers alike: the
-- category price medians below are over all valid lines, the customer summaries drop the unknown ones
purchase_lines as (
    select
        cutoffs.snapshot,
        order_lines.customer_id,
        order_lines.product_id,
        order_lines.category,
        order_lines.quantity,
        order_lines.unit_price,
        order_lines.discount,
        order_lines.line_amount,
        order_lines.line_revenue,
        extract(month from order_lines.order_date) in (11, 12) as is_q4,
        feature_categories.rank as category_rank
    from cutoffs
    inner join order_lines
        on order_lines.order_date <= cutoffs.feature_cutoff_date
    left join feature_categories
        on order_lines.category = feature_categories.category
    where order_lines.quantity > 0
      and not order_lines.is_cancelled
),

-- the typical price of a category at each cut-off, the yardstick of avg_price_index (premium vs bargain
-- buyers of the same category); computed per cut-off so that later prices never leak into a snapshot
-- (the median is taken over the few distinct prices with their line counts, a hash aggregate, rather than by
-- sorting every line; it interpolates the two middle values like percentile_cont(0.5))
price_counts as (
    select
        snapshot,
        category,
        unit_price,
        count(*) as n_lines
    from purchase_lines
    where unit_price > 0
    group by
        snapshot,
        category,
        unit_price
),

price_ranks as (
    select
        snapshot,
        category,
        unit_price,
        -- 0-based positions of the first and last line at this price in the sorted prices
        sum(n_lines) over (partition by snapshot, category order by unit_price) - n_lines as first_position,
        sum(n_lines) over (partition by snapshot, category order by unit_price) - 1 as last_position,
        sum(n_lines) over (partition by snapshot, category) as n_total
    from price_counts
),

category_prices as (
    select
        snapshot,
        category,
        lower_price::double precision
            + (upper_price::double precision - lower_price::double precision) * middle_fraction::double precision as median_unit_price
    from (
        select
            snapshot,
            category,
            min(unit_price) filter (where last_position >= floor((n_total - 1) / 2.0)) as lower_price,
            min(unit_price) filter (where last_position >= ceil((n_total - 1) / 2.0)) as upper_price,
            (n_total - 1) / 2.0 - floor((n_total - 1) / 2.0) as middle_fraction
        from price_ranks
        group by
            snapshot,
            category,
            n_total
    ) as middle
),

line_summary as (
    select
        purchase_lines.snapshot,
        purchase_lines.customer_id,
        sum(purchase_lines.line_amount) as purchase_amount,
        {%- for k in range(1, 9) %}
        coalesce(sum(purchase_lines.line_amount) filter (where purchase_lines.category_rank = {{ k }}), 0) as category_spend_{{ k }},
        {%- endfor %}
        count(*) as n_purchase_lines,
        count(*) filter (where purchase_lines.discount > 0) as n_discount_lines,
        -- in numeric, not double: a sum of doubles depends on the order rows arrive in (hash aggregates,
        -- parallel workers), and a rebuild must give the same bits
        avg(purchase_lines.unit_price / nullif(category_prices.median_unit_price::numeric, 0))
            filter (where purchase_lines.unit_price > 0) as avg_price_index,
        sum(purchase_lines.line_revenue) as purchase_revenue,
        sum(purchase_lines.line_revenue) filter (where purchase_lines.is_q4) as q4_purchase_revenue,
        avg(purchase_lines.quantity) as avg_units_per_line
    from purchase_lines
    left join category_prices
        on purchase_lines.snapshot = category_prices.snapshot
        and purchase_lines.category = category_prices.category
    where purchase_lines.customer_id is not null
    group by
        purchase_lines.snapshot,
        purchase_lines.customer_id
),

web_summary as (
    select
        cutoffs.snapshot,
        web_events.customer_id,
        count(*) as n_web_events,
        count(*) filter (where web_events.event_type in ('view', 'page_view', 'product_view')) as n_views
    from cutoffs
    inner join web_events
        on web_events.event_date <= cutoffs.feature_cutoff_date
    group by
        cutoffs.snapshot,
        web_events.customer_id
),

features as (
    select
        order_summary.snapshot,
        order_summary.feature_cutoff_date,
        order_summary.customer_id,
        order_summary.first_purchase_date,
        order_summary.last_purchase_date,
        (order_summary.feature_cutoff_date - order_summary.last_purchase_date)::integer as recency_days,
        (order_summary.feature_cutoff_date - order_summary.first_purchase_date)::integer as tenure_days,
        order_summary.n_orders::integer as n_orders,
        coalesce(purchase_days.n_purchase_days, 0)::integer as n_purchase_days,
        -- returns of purchases made before the data starts can exceed the purchases seen: floor at 0
        greatest(order_summary.net_revenue, 0)::numeric as net_spend,
        order_summary.gross_spend::numeric as gross_spend,
        round(greatest(order_summary.net_revenue, 0) / order_summary.n_orders, 4)::numeric as avg_order_value,
        order_summary.avg_basket_size::double precision as avg_basket_size,
        coalesce(distinct_counts.n_distinct_products, 0)::integer as n_distinct_products,
        coalesce(distinct_categories.n_distinct_categories, 0)::integer as n_distinct_categories,
        least(1, order_summary.return_value / nullif(order_summary.gross_spend, 0))::double precision as return_rate,
        case
            when order_summary.n_orders > 1
                then (order_summary.last_purchase_date - order_summary.first_purchase_date)::double precision
                    / (order_summary.n_orders - 1)
        end as avg_days_between_orders,
        coalesce(web_summary.n_web_events, 0)::integer as n_web_events,
        case
            when web_summary.n_web_events > 0
                then web_summary.n_views::double precision / order_summary.n_orders
        end as browse_to_buy_ratio,
        {%- for k in range(1, 9) %}
        coalesce(
            line_summary.category_spend_{{ k }} / nullif(line_summary.purchase_amount, 0), 0
        )::double precision as category_share_{{ k }},
        {%- endfor %}
        extract(year from age(order_summary.feature_cutoff_date, customers.birth_date))::integer as age_years,
        greatest(order_summary.net_revenue, 0) <> order_summary.net_revenue as has_excess_returns,
        -- behaviour: what separates bargain hunters, premium buyers and seasonal gift buyers (RFM does not)
        (line_summary.n_discount_lines::double precision / nullif(line_summary.n_purchase_lines, 0))
            as discount_line_share,
        line_summary.avg_price_index::double precision as avg_price_index,
        -- purchase lines' line_revenue is ≥ 0 (cancelled and wholly returned orders count 0), so this is in [0, 1]
        (coalesce(line_summary.q4_purchase_revenue, 0)::double precision
            / nullif(line_summary.purchase_revenue, 0)) as q4_spend_share,
        line_summary.avg_units_per_line::double precision as avg_units_per_line
    from order_summary
    left join line_summary
        on order_summary.snapshot = line_summary.snapshot
        and order_summary.customer_id = line_summary.customer_id
    left join web_summary
        on order_summary.snapshot = web_summary.snapshot
        and order_summary.customer_id = web_summary.customer_id
    left join purchase_days
        on order_summary.snapshot = purchase_days.snapshot
        and order_summary.customer_id = purchase_days.customer_id
    left join distinct_counts
        on order_summary.snapshot = distinct_counts.snapshot
        and order_summary.customer_id = distinct_counts.customer_id
    left join distinct_categories
        on order_summary.snapshot = distinct_categories.snapshot
        and order_summary.customer_id = distinct_categories.customer_id
    left join customers
        on order_summary.customer_id = customers.customer_id
)

select * from features
