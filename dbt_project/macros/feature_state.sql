{#- The body of int_customer_feature_state_p<part>: the feature state of the customers of one part (a hash of
    the customer id modulo `parts`). Every customer's rows depend on its own orders, lines and web events only,
    so the parts are independent models that dbt builds at once, one per core: at 200k customers the two
    halves took 15.9 s side by side against 29.1 s for the whole state in one query, whose aggregates run on
    one core (PostgreSQL does not parallelise a query over CTEs read twice) and spilled to disk more. See
    int_customer_feature_state_p0.sql for what the state holds and when a customer is recomputed. -#}
{% macro customer_feature_state(part, parts) -%}
{#- one config for every part (set here, so the part models cannot drift apart) -#}
{{ config(
    materialized='incremental',
    unique_key=['snapshot', 'customer_id'],
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    pre_hook="set local work_mem = '128MB'",
    post_hook=[
        "{% if is_incremental() %}delete from {{ this }} where not has_orders{% endif %}",
        "{{ ensure_unique_index(this, ['snapshot', 'customer_id']) }}",
    ],
) }}
-- depends_on: {{ ref('int_customer_feature_state_affected') }}
{%- set previous = none %}
{%- if is_incremental() %}
    {%- set previous = adapter.get_relation(this.database, this.schema, 'int_customer_feature_state_watermark') %}
{%- endif %}
{%- set incremental = previous is not none %}
with

as_of as (
    select * from {{ ref('int_as_of') }}
),

cutoffs as (
    select * from {{ ref('int_feature_cutoffs') }}
),

{%- if incremental %}

-- this part's customers among those the night recomputes (int_customer_feature_state_affected)
affected_customers as (
    select customer_id
    from {{ ref('int_customer_feature_state_affected') }}
    where {{ customer_part('customer_id', part, parts) }}
),
{%- endif %}

{#- the filter that restricts a source to the customers to recompute (none on a full build): on the table, not
    the CTE, whose scan PostgreSQL keeps out of parallel workers (the semi-join then ran after the Gather) -#}
{%- set affected_filter = ('and COLUMN in (select customer_id from ' ~ ref('int_customer_feature_state_affected')
    ~ ')') if incremental else '' %}

snapshots as (
    select snapshot
    from cutoffs
),

{#- orders and purchase_lines are read by two aggregates each, so PostgreSQL spools them once: only the columns
    used below, not every column of the fact (at 1M customers 11M lines went to disk whole) -#}
orders as (
    select
        orders.customer_id,
        orders.order_date,
        orders.is_purchase,
        orders.gross_revenue,
        orders.return_value,
        orders.net_revenue,
        orders.n_items,
        {{ snapshot_bucket('orders.order_date') }} as bucket
    from {{ ref('fct_orders') }} as orders
    cross join as_of
    where orders.customer_id is not null
      and {{ customer_part('orders.customer_id', part, parts) }}
      and orders.order_date <= as_of.as_of_date
      {{ affected_filter | replace('COLUMN', 'orders.customer_id') }}
),

-- the customers' purchase lines (sold, not cancelled) up to as_of
purchase_lines as (
    select
        order_lines.customer_id,
        order_lines.product_id,
        order_lines.category,
        order_lines.line_amount,
        order_lines.discount,
        order_lines.unit_price,
        order_lines.line_revenue,
        order_lines.quantity,
        extract(month from order_lines.order_date) in (11, 12) as is_q4,
        {{ snapshot_bucket('order_lines.order_date') }} as bucket
    from {{ ref('fct_order_lines') }} as order_lines
    cross join as_of
    where order_lines.customer_id is not null
      and {{ customer_part('order_lines.customer_id', part, parts) }}
      and order_lines.order_date <= as_of.as_of_date
      and order_lines.quantity > 0
      and not order_lines.is_cancelled
      {{ affected_filter | replace('COLUMN', 'order_lines.customer_id') }}
),

web_events as (
    select
        web_events.customer_id,
        web_events.event_type,
        {{ snapshot_bucket('web_events.event_date') }} as bucket
    from {{ ref('stg_crm__web_events') }} as web_events
    cross join as_of
    where web_events.customer_id is not null
      and {{ customer_part('web_events.customer_id', part, parts) }}
      and web_events.event_date <= as_of.as_of_date
      {{ affected_filter | replace('COLUMN', 'web_events.customer_id') }}
),

feature_categories as (
    select * from {{ ref('feature_categories') }}
),

order_buckets as (
    select
        customer_id,
        bucket,
        min(order_date) filter (where is_purchase) as first_purchase_date,
        max(order_date) filter (where is_purchase) as last_purchase_date,
        count(*) filter (where is_purchase) as n_orders,
        sum(gross_revenue) as gross_spend,
        sum(return_value) as return_value,
        sum(net_revenue) as net_revenue,
        sum(n_items) filter (where is_purchase) as basket_items,
        count(n_items) filter (where is_purchase) as n_baskets
    from orders
    group by
        customer_id,
        bucket
),

-- each cut-off's order sums as running sums over the customer's buckets, oldest first (see category_running)
order_running as (
    select
        customer_id,
        bucket,
        lead(bucket) over customer_buckets as newer_bucket,
        min(first_purchase_date) over customer_buckets as first_purchase_date,
        max(last_purchase_date) over customer_buckets as last_purchase_date,
        {%- for column in ["n_orders", "gross_spend", "return_value", "net_revenue", "basket_items", "n_baskets"] %}
        sum({{ column }}) over customer_buckets as {{ column }}{{ ',' if not loop.last }}
        {%- endfor %}
    from order_buckets
    window customer_buckets as (partition by customer_id order by bucket desc)
),

order_summary as (
    select
        snapshots.snapshot,
        order_running.customer_id,
        order_running.first_purchase_date,
        order_running.last_purchase_date,
        order_running.n_orders,
        order_running.gross_spend,
        order_running.return_value,
        order_running.net_revenue,
        -- avg(n_items) of the purchases: the same numeric division avg() ends with
        order_running.basket_items::numeric / nullif(order_running.n_baskets, 0)::numeric as avg_basket_size
    from order_running
    inner join snapshots
        on snapshots.snapshot <= order_running.bucket
        and snapshots.snapshot > coalesce(order_running.newer_bucket, -1)
),

-- Purchase occasions: several orders on one day are one (BG/NBD's frequency counts repeat days). Distinct
-- counts are taken once per item (in the bucket it was first seen in) and summed per cut-off, since
-- count(distinct) sorts where a plain count hash-aggregates. The days are counted per customer and bucket
-- before the cut-offs multiply the rows (~2.5 times at three cut-offs): a count adds up across buckets.
purchase_days as (
    select
        snapshots.snapshot,
        day_buckets.customer_id,
        sum(day_buckets.n_days) as n_purchase_days
    from (
        select
            customer_id,
            bucket,
            count(*) as n_days
        from (
            select distinct customer_id, order_date, bucket
            from orders
            where is_purchase
        ) as days
        group by
            customer_id,
            bucket
    ) as day_buckets
    inner join snapshots
        on snapshots.snapshot <= day_buckets.bucket
    group by
        snapshots.snapshot,
        day_buckets.customer_id
),

-- first purchase of each product by each customer: the latest bucket holding one of its lines (at 1M
-- customers 3.9M items per part: counted per customer and bucket first, as the purchase days above)
distinct_counts as (
    select
        snapshots.snapshot,
        product_buckets.customer_id,
        sum(product_buckets.n_products) as n_distinct_products
    from (
        select
            customer_id,
            bucket,
            count(*) as n_products
        from (
            select
                customer_id,
                max(bucket) as bucket
            from purchase_lines
            group by
                customer_id,
                product_id,
                category
        ) as customer_products
        group by
            customer_id,
            bucket
    ) as product_buckets
    inner join snapshots
        on snapshots.snapshot <= product_buckets.bucket
    group by
        snapshots.snapshot,
        product_buckets.customer_id
),

-- purchase lines per customer, category and bucket: the category shares, the price index and the distinct
-- categories all come from these
category_buckets as (
    select
        customer_id,
        category,
        bucket,
        sum(line_amount) as line_amount,
        count(*) as n_lines,
        count(*) filter (where discount > 0) as n_discount_lines,
        sum(unit_price) filter (where unit_price > 0) as priced_amount,
        count(*) filter (where unit_price > 0) as n_priced_lines,
        sum(line_revenue) as line_revenue,
        sum(line_revenue) filter (where is_q4) as q4_line_revenue,
        sum(quantity) as quantity
    from purchase_lines
    group by
        customer_id,
        category,
        bucket
),

-- the sums at each cut-off: bucket b holds the rows after cut-off b + 1 up to cut-off b (the last bucket, every
-- row up to its cut-off), so cut-off k sums the buckets k and older. A running sum over a customer's buckets of
-- a category, oldest first, holds at bucket b the sum of b and every older bucket: the value of cut-off b and of
-- each newer cut-off down to the next newer bucket present (a cut-off with no bucket of its own has the sums of
-- the older ones). One sort of the buckets, not a join of every bucket to every cut-off and a hash aggregate of
-- 4.9M rows at 1M customers that spilled to disk. Numeric sums are exact in any order.
{%- set category_sums = ["line_amount", "n_lines", "n_discount_lines", "priced_amount", "n_priced_lines", "line_revenue", "q4_line_revenue", "quantity"] %}
category_running as (
    select
        customer_id,
        category,
        bucket,
        lead(bucket) over customer_category as newer_bucket,
        {%- for column in category_sums %}
        sum({{ column }}) over customer_category as {{ column }}{{ ',' if not loop.last }}
        {%- endfor %}
    from category_buckets
    window customer_category as (partition by customer_id, category order by bucket desc)
),

customer_categories as (
    select
        snapshots.snapshot,
        category_running.customer_id,
        category_running.category,
        {%- for column in category_sums %}
        category_running.{{ column }}{{ ',' if not loop.last }}
        {%- endfor %}
    from category_running
    inner join snapshots
        on snapshots.snapshot <= category_running.bucket
        and snapshots.snapshot > coalesce(category_running.newer_bucket, -1)
),

-- (a customer has one row per category, and a rank one category: max() picks it, a lighter state than sum())
line_summary as (
    select
        customer_categories.snapshot,
        customer_categories.customer_id,
        count(*) as n_distinct_categories,
        sum(customer_categories.line_amount) as purchase_amount,
        {%- for k in range(1, 9) %}
        coalesce(max(customer_categories.line_amount) filter (where feature_categories.rank = {{ k }}), 0)
            as category_spend_{{ k }},
        {%- endfor %}
        sum(customer_categories.n_lines) as n_purchase_lines,
        sum(customer_categories.n_discount_lines) as n_discount_lines,
        -- avg_price_index (the mean over priced lines of unit_price / the category's median at the cut-off) is
        -- per category the summed prices over the median: keep the sums per category, the medians move nightly
        -- (unordered: customer_features_from_state sums the quotients in numeric, exact in any order)
        array_agg(customer_categories.category) filter (where customer_categories.n_priced_lines > 0)
            as price_categories,
        array_agg(customer_categories.priced_amount) filter (where customer_categories.n_priced_lines > 0)
            as category_priced_amounts,
        array_agg(customer_categories.n_priced_lines) filter (where customer_categories.n_priced_lines > 0)
            as category_priced_lines,
        sum(customer_categories.line_revenue) as purchase_revenue,
        sum(customer_categories.q4_line_revenue) as q4_purchase_revenue,
        sum(customer_categories.quantity)::numeric / nullif(sum(customer_categories.n_lines), 0)::numeric
            as avg_units_per_line
    from customer_categories
    left join feature_categories
        on customer_categories.category = feature_categories.category
    group by
        customer_categories.snapshot,
        customer_categories.customer_id
),

web_summary as (
    select
        snapshots.snapshot,
        web_buckets.customer_id,
        sum(web_buckets.n_web_events) as n_web_events,
        sum(web_buckets.n_views) as n_views
    from (
        select
            customer_id,
            bucket,
            count(*) as n_web_events,
            count(*) filter (where event_type in ('view', 'page_view', 'product_view')) as n_views
        from web_events
        group by
            customer_id,
            bucket
    ) as web_buckets
    inner join snapshots
        on snapshots.snapshot <= web_buckets.bucket
    group by
        snapshots.snapshot,
        web_buckets.customer_id
),

keys as (
    select snapshot, customer_id
    from order_summary
    {%- if incremental %}

    -- an affected customer with no order (left) still replaces its old rows (has_orders false, then deleted)
    union

    select snapshots.snapshot, affected_customers.customer_id
    from affected_customers
    cross join snapshots
    {%- endif %}
),

final as (
    select
        keys.snapshot::integer as snapshot,
        keys.customer_id::text as customer_id,
        (order_summary.customer_id is not null) as has_orders,
        order_summary.first_purchase_date::date as first_purchase_date,
        order_summary.last_purchase_date::date as last_purchase_date,
        coalesce(order_summary.n_orders, 0)::bigint as n_orders,
        order_summary.gross_spend::numeric as gross_spend,
        order_summary.return_value::numeric as return_value,
        order_summary.net_revenue::numeric as net_revenue,
        order_summary.avg_basket_size::numeric as avg_basket_size,
        coalesce(purchase_days.n_purchase_days, 0)::bigint as n_purchase_days,
        coalesce(distinct_counts.n_distinct_products, 0)::bigint as n_distinct_products,
        coalesce(line_summary.n_distinct_categories, 0)::bigint as n_distinct_categories,
        line_summary.purchase_amount::numeric as purchase_amount,
        {%- for k in range(1, 9) %}
        line_summary.category_spend_{{ k }}::numeric as category_spend_{{ k }},
        {%- endfor %}
        line_summary.n_purchase_lines::bigint as n_purchase_lines,
        line_summary.n_discount_lines::bigint as n_discount_lines,
        line_summary.price_categories::text[] as price_categories,
        line_summary.category_priced_amounts::numeric[] as category_priced_amounts,
        line_summary.category_priced_lines::bigint[] as category_priced_lines,
        line_summary.purchase_revenue::numeric as purchase_revenue,
        line_summary.q4_purchase_revenue::numeric as q4_purchase_revenue,
        line_summary.avg_units_per_line::numeric as avg_units_per_line,
        coalesce(web_summary.n_web_events, 0)::bigint as n_web_events,
        coalesce(web_summary.n_views, 0)::bigint as n_views
    from keys
    left join order_summary
        on keys.snapshot = order_summary.snapshot
        and keys.customer_id = order_summary.customer_id
    left join line_summary
        on keys.snapshot = line_summary.snapshot
        and keys.customer_id = line_summary.customer_id
    left join web_summary
        on keys.snapshot = web_summary.snapshot
        and keys.customer_id = web_summary.customer_id
    left join purchase_days
        on keys.snapshot = purchase_days.snapshot
        and keys.customer_id = purchase_days.customer_id
    left join distinct_counts
        on keys.snapshot = distinct_counts.snapshot
        and keys.customer_id = distinct_counts.customer_id
)

select * from final
{%- endmacro %}


{#- True for the customers of part `part` of `parts` (abs of mod: hashtext is a signed 32-bit hash). -#}
{% macro customer_part(column, part, parts) -%}
abs(mod(hashtext({{ column }}), {{ parts }})) = {{ part }}
{%- endmacro %}

