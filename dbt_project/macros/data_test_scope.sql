{#- Which rows a generic data test reads (dbt calls this for the tested model of every generic test: not_null,
    unique, accepted_values, accepted_range, relationships' child side, ...).

    With the var `tested_through` (a timestamp: the newest load time the tests of the last night whose tests
    passed covered; the nightly sets it on incremental nights, see ml.nightly.data_test_scope), a test of a
    table that carries a load time (`_source_loaded_at` on the intermediate and fact tables, `_loaded_at` on
    staging) reads only the rows loaded after it less the incremental look-back (the same tolerance the
    incremental models give a delivery that commits late): what this night (re)processed. The older rows
    passed the same tests on the night they arrived, and an incremental model never rewrites a row without
    moving its load time. At 1M customers the
    whole-table tests of the order line tables read tens of millions of rows every night for a day's new ones.
    Tables without a load time (rebuilt whole every night: the customer marts) are tested whole, as are
    singular tests, and every test reads every row without the var: the nightly omits it on a full refresh,
    when no earlier night's tests passed, and at least once every 7 days.

    A test's own `where` config still applies, on top. -#}
{% macro postgres__get_where_subquery(relation) -%}
    {%- set conditions = [] -%}
    {%- set where = config.get('where', '') -%}
    {%- if where -%}
        {%- do conditions.append('(' ~ where ~ ')') -%}
    {%- endif -%}
    {%- set tested_through = tested_through_var() -%}
    {%- if tested_through and execute -%}
        {%- set columns = adapter.get_columns_in_relation(relation) | map(attribute='name') | list -%}
        {%- for column in ['_source_loaded_at', '_loaded_at'] if column in columns -%}
            {%- if loop.first -%}
                {%- do conditions.append(column ~ " > '" ~ tested_through ~ "'::timestamptz - interval '"
                    ~ var('incremental_lookback_hours') ~ " hours'") -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if conditions -%}
        {%- do return('(select * from ' ~ relation ~ ' where ' ~ conditions | join(' and ') ~ ') dbt_subquery') -%}
    {%- else -%}
        {%- do return(relation) -%}
    {%- endif -%}
{%- endmacro %}


{#- The var `tested_through`, checked to be an ISO timestamp (it is pasted into SQL), or none. -#}
{% macro tested_through_var() -%}
    {%- set tested_through = var('tested_through', none) -%}
    {%- if tested_through and not modules.re.fullmatch(
            '[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.]+([+-][0-9:]+|Z)?', tested_through | string) -%}
        {{ exceptions.raise_compiler_error(
            "var tested_through must be an ISO timestamp, got " ~ (tested_through | string)) }}
    {%- endif -%}
    {%- do return(tested_through) -%}
{%- endmacro %}
