{#- Values outside [min_value, max_value] (nulls pass; pair with not_null when they must not). -#}
{% test accepted_range(model, column_name, min_value=none, max_value=none) %}
select *
from {{ model }}
where {{ outside_range(column_name, min_value, max_value) }}
{% endtest %}
