{#- Models land in exactly the schema their folder names (`staging`, `marts`), not `<target>_staging`:
    the ML code and the marketing tools read fixed schema names. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
