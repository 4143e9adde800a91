{#- The feature state of the second half of the customers: see int_customer_feature_state_p0.sql. -#}
{{ config(
    materialized='incremental',
    unique_key=['snapshot', 'customer_id'],
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    pre_hook="set local work_mem = '128MB'",
    post_hook="{% if is_incremental() %}delete from {{ this }} where not has_orders{% endif %}",
) }}
-- depends_on: {{ ref('int_orders_validated') }}
{{ customer_feature_state(part=1, parts=2) }}
