-- Training labels come from (cutoff, cutoff + horizon] and never from after as_of. Tagged `training`: runs when
-- the training set is built.
{{ config(tags=['training']) }}
with

as_of as (
    select * from {{ ref('int_as_of') }}
)

select training.*
from {{ ref('clv_training_set') }} as training
cross join as_of
where training.feature_cutoff_date + training.horizon_days > as_of.as_of_date
   or training.horizon_days <> as_of.horizon_days
