-- After returns are netted against purchases, no customer may carry negative spend into training or scoring
-- (a negative monetary value or label would poison the CLV regression). One row per offending record. (The
-- training set's net_spend and future_spend have their own accepted_range tests, run when it is built.)
select 'dim_customers' as model, customer_id, net_spend as value
from {{ ref('dim_customers') }}
where net_spend < 0

union all

select 'customer_features', customer_id, net_spend
from {{ ref('customer_features') }}
where net_spend < 0 or gross_spend < 0

union all

select 'clv_scoring_set', customer_id, net_spend
from {{ ref('clv_scoring_set') }}
where net_spend < 0
