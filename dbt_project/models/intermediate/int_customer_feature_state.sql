{#- The feature state of every customer: the union of its parts (int_customer_feature_state_p0 / _p1, built
    side by side, one per core; see feature_state.sql). A view: nothing is copied, the reader scans both. -#}
{{ config(materialized='view') }}
select * from {{ ref('int_customer_feature_state_p0') }}
union all
select * from {{ ref('int_customer_feature_state_p1') }}
