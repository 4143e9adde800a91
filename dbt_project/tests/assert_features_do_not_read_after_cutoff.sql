-- Point-in-time correctness: recompute the order-based features of every feature set from fct_orders
-- restricted to the set's cut-off. Any difference means a feature read data from after its cut-off.
with

orders as (
    select * from {{ ref('fct_orders') }}
    where customer_id is not null
),

feature_rows as (
    select customer_id, feature_cutoff_date, n_orders, gross_spend, recency_days, tenure_days
    from {{ ref('clv_training_set') }}
    union all
    select customer_id, feature_cutoff_date, n_orders, gross_spend, recency_days, tenure_days
    from {{ ref('clv_scoring_set') }}
    union all
    select customer_id, as_of_date, n_orders, gross_spend, recency_days, tenure_days
    from {{ ref('customer_features') }}
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
where feature_rows.n_orders <> recomputed.n_orders
   or feature_rows.gross_spend <> recomputed.gross_spend
   or feature_rows.recency_days is distinct from recomputed.recency_days
   or feature_rows.tenure_days is distinct from recomputed.tenure_days
   or feature_rows.recency_days < 0
