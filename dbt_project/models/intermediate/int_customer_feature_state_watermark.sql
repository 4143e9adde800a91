-- depends_on: {{ ref('int_customer_feature_state') }}
-- One row per snapshot × feature category: what int_customer_feature_state was last computed against (the
-- cut-off and the category's feature rank) and the newest deliveries it had seen. (The price medians are not
-- here: the state no longer depends on them.) Built after it, so a
-- failed run leaves the previous marks and the next run re-processes from them. int_customer_feature_state
-- reads it by name (a ref would be a cycle).
with

cutoffs as (
    select * from {{ ref('int_feature_cutoffs') }}
),

feature_categories as (
    select * from {{ ref('feature_categories') }}
),

deliveries as (
    select
        (select max(_source_loaded_at) from {{ ref('fct_orders') }}) as orders_loaded_at,
        (select max(_source_loaded_at) from {{ ref('int_orders_validated') }}) as validated_loaded_at,
        (select max(_loaded_at) from {{ ref('stg_crm__web_events') }}) as web_loaded_at
)

select
    cutoffs.snapshot::integer as snapshot,
    cutoffs.feature_cutoff_date::date as feature_cutoff_date,
    feature_categories.category::text as category,
    feature_categories.rank::integer as category_rank,
    deliveries.orders_loaded_at::timestamptz as orders_loaded_at,
    deliveries.validated_loaded_at::timestamptz as validated_loaded_at,
    deliveries.web_loaded_at::timestamptz as web_loaded_at
from cutoffs
cross join deliveries
left join feature_categories
    on true
