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


{#- Incremental staging: a raw table is append-only, so a staged row can only change when a new delivery of
    its key arrives. In an incremental run keep just the raw rows whose key a delivery since the watermark
    touched (all deliveries of those keys, so the ranking and the duplicate counts are recomputed whole);
    the model's delete+insert on the key replaces them. The watermark looks back like the facts' does (a load
    that began before the last run and committed after it carries an older _loaded_at). Keys are compared
    after cleaning, as the dedup partitions them; rows with a null key part never match (staging drops them,
    int_rows_rejected counts them from the raw table). Called inside `if is_incremental()` in the model (unit
    tests override is_incremental only there). -#}
{% macro touched_keys_filter(source_relation, key_expressions) -%}
    where ({{ key_expressions | join(', ') }}) in (
        select {{ key_expressions | join(', ') }}
        from {{ source_relation }}
        where _loaded_at > {{ delivery_watermark('_loaded_at') }}
    )
{%- endmacro %}


{#- The newest load time already processed into this incremental model, minus the look-back. -#}
{% macro delivery_watermark(column) -%}
(
    select coalesce(max({{ column }}), '-infinity'::timestamptz)
        - interval '{{ var("incremental_lookback_hours") }} hours'
    from {{ this }}
)
{%- endmacro %}

