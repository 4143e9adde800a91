{#- Rank every delivery of a (cleaned) source row within its key: rank 1 is the row to keep (latest
    `_loaded_at`, then latest batch). `_row_hash` covers the business columns only, so the same row
    delivered again in another batch is recognisably an exact duplicate; it also breaks ties
    deterministically. The kept row carries how many deliveries it stands for, so the dropped rows are
    counted (int_rows_rejected), never silently lost. -#}
{% macro ranked_deliveries(relation, key_columns) -%}
{%- set key = key_columns | join(', ') -%}
select
    hashed.*,
    row_number() over (
        partition by {{ key }}
        order by hashed._loaded_at desc, hashed._batch_id desc, hashed._row_hash
    ) as _delivery_rank,
    count(*) over (partition by {{ key }}) as _n_deliveries,
    count(*) over (partition by {{ key }}, hashed._row_hash) as _n_same_content
from (
    select
        deliveries.*,
        md5((to_jsonb(deliveries) - '_batch_id' - '_loaded_at')::text) as _row_hash
    from {{ relation }} as deliveries
) as hashed
{%- endmacro %}


{#- The bookkeeping columns every staging model ends with. -#}
{% macro delivery_columns() -%}
        _n_same_content - 1 as _n_exact_duplicates,
        _n_deliveries - _n_same_content as _n_superseded,
        _batch_id,
        _loaded_at
{%- endmacro %}
