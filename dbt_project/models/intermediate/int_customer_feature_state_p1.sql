{#- The feature state of the second half of the customers: see int_customer_feature_state_p0.sql. -#}
-- depends_on: {{ ref('int_orders_validated') }}
{{ customer_feature_state(part=1, parts=2) }}
