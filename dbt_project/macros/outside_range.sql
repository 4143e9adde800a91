{#- The condition "`column` is not null and lies outside [min_value, max_value]" (either bound may be none),
    shared by accepted_range and accepted_ranges. The bounds are pasted into SQL, so they must be numbers. -#}
{% macro outside_range(column, min_value=none, max_value=none) -%}
    {%- for bound in [min_value, max_value] if bound is not none and bound is not number -%}
        {{ exceptions.raise_compiler_error("accepted range of " ~ column ~ ": bounds must be numbers, got "
                                           ~ (bound | string)) }}
    {%- endfor -%}
    {%- if min_value is none and max_value is none -%}
        {{ exceptions.raise_compiler_error("accepted range of " ~ column ~ ": give min_value, max_value or both") }}
    {%- endif -%}
    ({{ column }} is not null and (false
    {%- if min_value is not none %} or {{ column }} < {{ min_value }}{% endif %}
    {%- if max_value is not none %} or {{ column }} > {{ max_value }}{% endif %}))
{%- endmacro %}
