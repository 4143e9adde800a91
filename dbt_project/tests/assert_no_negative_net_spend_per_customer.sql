-- After returns are netted against purchases, no customer may carry negative spend into training or scoring
-- (a negative monetary value or label would poison the CLV regression). One row per offending record.
select 'dim_customers' as model, customer_id, net_spend as value
from {{ ref('dim_customers') }}
where net_spend < 0

union all

select 'customer_features', customer_id, net_spend
from {{ ref('customer_features') }}
where net_spend < 0 or gross_spend < 0

union all

select 'clv_training_set', customer_id, least(net_spend, future_spend)
from {{ ref('clv_training_set') }}
where net_spend < 0 or future_spend < 0

union all

select 'clv_scoring_set', customer_id, net_spend
from {{ ref('clv_scoring_set') }}
where net_spend < 0
