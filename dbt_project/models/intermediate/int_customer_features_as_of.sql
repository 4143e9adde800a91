{#- The union of the parts int_customer_features_as_of_p0 / _p1, built side by side (one query per core, as
    the state's parts are). A view: nothing is copied; every scoring mart scans both parts. -#}
{{ config(materialized='view') }}
-- One row per customer with an order on or before as_of (snapshot 0, the scoring cut-off): the behavioural
-- features every scoring mart reads (customer_features, clv_scoring_set, dim_customers, int_customer_rfm).
select * from {{ ref('int_customer_features_as_of_p0') }}
union all
select * from {{ ref('int_customer_features_as_of_p1') }}
