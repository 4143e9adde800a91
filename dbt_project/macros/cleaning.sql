{#- Source ids arrive as text; numeric ids that went through a float somewhere upstream look like '17850.0'.
    The regular expression runs only on ids holding a dot: it is the costliest part of cleaning web events
    (14M rows at 1M customers, keyed on the customer id), and without a dot it could not match anyway. -#}
{% macro clean_id(column) -%}
nullif(
    case when strpos({{ column }}, '.') > 0 then regexp_replace(trim({{ column }}), '\.0+$', '') else trim({{ column }}) end,
    ''
)
{%- endmacro %}


{#- Fees, postage and manual adjustments that sit in the product column but are not products. -#}
{% macro is_product_code(column) -%}
(
    {{ column }} is not null
    and upper(trim({{ column }})) not in (
        {%- for code in var('non_product_codes') %}'{{ code | upper }}'{{ ", " if not loop.last }}{% endfor -%}
    )
    and lower(trim({{ column }})) not like 'gift\_%'
    and upper(trim({{ column }})) not like 'ADJUST%'
)
{%- endmacro %}


{#- RFM rule: a score 1..5 from a customer's percentile among all customers; ties share a score. -#}
{% macro quintile_score(order_by) -%}
least(5, 1 + floor(5 * percent_rank() over (order by {{ order_by }})))::integer
{%- endmacro %}
