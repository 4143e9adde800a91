{#- The numeric feature columns shared by customer_features, clv_training_set and clv_scoring_set, with
    their types: one list, so training and scoring can never disagree on names or order. -#}
{% macro feature_columns() -%}
{%- set columns = [
    ('recency_days', 'integer'),
    ('tenure_days', 'integer'),
    ('n_orders', 'integer'),
    ('n_purchase_days', 'integer'),
    ('net_spend', 'numeric'),
    ('gross_spend', 'numeric'),
    ('avg_order_value', 'numeric'),
    ('avg_basket_size', 'double precision'),
    ('n_distinct_products', 'integer'),
    ('n_distinct_categories', 'integer'),
    ('return_rate', 'double precision'),
    ('avg_days_between_orders', 'double precision'),
    ('n_web_events', 'integer'),
    ('browse_to_buy_ratio', 'double precision'),
] -%}
{%- for k in range(1, 9) -%}
    {%- do columns.append(('category_share_' ~ k, 'double precision')) -%}
{%- endfor -%}
{%- do columns.append(('age_years', 'integer')) -%}
{{ return(columns) }}
{%- endmacro %}


{% macro select_feature_columns(relation_alias) -%}
{%- for name, type in feature_columns() %}
        {{ relation_alias }}.{{ name }}::{{ type }} as {{ name }}{{ "," if not loop.last }}
{%- endfor %}
{%- endmacro %}


{#- Behaviour features, appended after the original columns of every feature mart (the contract keeps
    existing column positions). One list, like feature_columns(). -#}
{% macro behaviour_feature_columns() -%}
{{ return([
    ('discount_line_share', 'double precision'),
    ('avg_price_index', 'double precision'),
    ('q4_spend_share', 'double precision'),
    ('avg_units_per_line', 'double precision'),
]) }}
{%- endmacro %}


{% macro select_behaviour_feature_columns(relation_alias) -%}
{%- for name, type in behaviour_feature_columns() %}
        {{ relation_alias }}.{{ name }}::{{ type }} as {{ name }}{{ "," if not loop.last }}
{%- endfor %}
{%- endmacro %}


{#- The snapshot bucket of a row dated `date_expr` (on or before as_of; needs the int_as_of row as `as_of`):
    the oldest snapshot whose cut-off (as_of - k * horizon_days) the date is still on or before. A row of
    bucket j counts in snapshots 0..j. -#}
{% macro snapshot_bucket(date_expr) -%}
least(as_of.training_snapshots, (as_of.as_of_date - {{ date_expr }}) / as_of.horizon_days)
{%- endmacro %}
