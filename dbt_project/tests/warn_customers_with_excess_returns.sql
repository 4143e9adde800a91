{{ config(severity='warn') }}
-- Visible, not fatal: customers whose returns up to as_of exceed their purchases (they returned items
-- bought before the data starts). Their net_spend is floored at 0; this count says how many.
select customer_id, feature_cutoff_date
from {{ ref('int_customer_features_as_of') }}
where has_excess_returns
