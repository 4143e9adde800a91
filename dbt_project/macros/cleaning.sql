{#- Source ids arrive as text; numeric ids that went through a float somewhere upstream look like '17850.0'. -#}
{% macro clean_id(column) -%}
nullif(regexp_replace(trim({{ column }}), '\.0+$', ''), '')
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
