{#- Rank every delivery of a (cleaned) source row within its key: rank 1 is the row to keep (latest
    `_loaded_at`, then latest batch). `_row_hash` covers the business columns only, so the same row
    delivered again in another batch is recognisably an exact duplicate; it also breaks ties
    deterministically. The kept row carries how many deliveries it stands for, so the dropped rows are
    counted (int_rows_rejected), never silently lost.

    Almost every key is delivered once (at 1M customers 0.4 % of order-line keys repeat), and for those the
    answer is known without hashing or ranking: rank 1, one delivery, no duplicates. Hashing every row as
    JSON and sorting all rows three times was most of the staging build (md5 of to_jsonb alone: 4 µs a row,
    46 CPU s over 11M order lines). So one pass over a 64-bit hash of the key finds the keys seen more than
    once; only their rows are hashed and ranked as before, the rest pass straight through. A hash
    collision only sends a single-delivery key down the exact path, which ranks it the same, so the result is
    identical to ranking everything. `hash_record_extended` hashes a null key part like any value, as
    `partition by` groups nulls (web events have nullable key parts).

    The cleaned rows and their key hash are computed once, into a materialised CTE (`keyed`) that the three
    uses below read: inlined, the cleaning expressions and the key hash ran once per use, four times a row.
    On the 14M web events of a 1M-customer warehouse the full build's query took 50.8 s that way, the
    cleaning ~6 s and the hash ~3.4 s of each pass; spooling the rows (0.9 GB of temporary file) costs less.
    `relation` is read once: declare it `not materialized` in the model, so that it is inlined here. The
    rows keep `_key_hash` (the models select their columns by name). -#}
{% macro ranked_deliveries(relation, key_columns) -%}
{%- set key = key_columns | join(', ') -%}
with keyed as materialized (
    select
        cleaned_rows.*,
        {{ key_hash(key_columns, 'cleaned_rows') }} as _key_hash
    from {{ relation }} as cleaned_rows
),

repeated_keys as (
    -- a window over a sort of 64-bit integers, not a hash aggregate: over 11M distinct order-line keys the
    -- hash table spills and took 14.7 CPU s against 6.7 s. The outer group by leaves each key once and
    -- gives the planner a small estimate (without it, a third of all rows: the joins below then split the
    -- whole table into batches on disk to probe a few thousand keys).
    select _key_hash
    from (
        select _key_hash, count(*) over (partition by _key_hash) as _n_deliveries
        from keyed
    ) as counted
    where _n_deliveries > 1
    group by _key_hash
)
select
    singles.*,
    null::text as _row_hash,
    1::bigint as _delivery_rank,
    1::bigint as _n_deliveries,
    1::bigint as _n_same_content
from keyed as singles
where not exists (
    select from repeated_keys where repeated_keys._key_hash = singles._key_hash
)
union all
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
        md5((to_jsonb(deliveries) - '_batch_id' - '_loaded_at' - '_key_hash')::text) as _row_hash
    from keyed as deliveries
    where exists (
        select from repeated_keys where repeated_keys._key_hash = deliveries._key_hash
    )
) as hashed
{%- endmacro %}


{#- A 64-bit hash of a (possibly null) key, the columns qualified by `alias` when given. -#}
{% macro key_hash(key_columns, alias=none) -%}
hash_record_extended(row(
    {%- for column in key_columns %}{{ alias ~ '.' if alias }}{{ column }}{{ ', ' if not loop.last }}{% endfor -%}
), 0)
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
    tests override is_incremental only there). Each staging model indexes `_loaded_at` (its watermark is a max,
    and the next models read the rows changed since) and its key (the delete of the touched keys).
    `range_column` (of range type `range_type`): a raw column that is part of the key unchanged by cleaning
    (web events' event_at), so a night reads the raw rows outside its own range through one cheap comparison. -#}
{% macro touched_keys_filter(source_relation, key_expressions, range_column=none, range_type='tsrange') -%}
    {%- set watermark = delivery_watermark('_loaded_at') %}
    where ({{ key_expressions | join(', ') }}) in (
        select {{ key_expressions | join(', ') }}
        from {{ source_relation }}
        where _loaded_at > {{ watermark }}
    )
    {%- if range_column %}
      -- the key holds this raw column as delivered: rows outside the night's range of it cannot match, and
      -- the cheap comparison spares them the cleaning expressions and the hash probe (14M web events at 1M)
      -- (one range, so one more scan of the night's rows; empty when nothing was delivered)
      and {{ range_column }} <@ (
          select case when count({{ range_column }}) = 0 then 'empty'::{{ range_type }}
                      else {{ range_type }}(min({{ range_column }}), max({{ range_column }}), '[]') end
          from {{ source_relation }}
          where _loaded_at > {{ watermark }}
      )
    {%- endif %}
{%- endmacro %}


{#- The newest load time already processed into this incremental model, minus the look-back, as a literal.
    It is read once when the model runs (dbt compiles a model just before running it), not left as a
    subquery: a subquery is planned as an unknown value (a third of the rows taken), so the planner hashed
    or sorted whole tables to find the night's few thousand rows, and it was re-evaluated (a scan of this
    model) at every reference. A literal lets the statistics say "a few rows", and the BRIN / btree indexes
    find them. Call it once per model (`set watermark = delivery_watermark(...)`). At parse time (no
    database) it renders the equivalent subquery. -#}
{% macro delivery_watermark(column) -%}
{%- set watermark_sql -%}
    select coalesce(max({{ column }}), '-infinity'::timestamptz)
        - interval '{{ var("incremental_lookback_hours") }} hours'
    from {{ this }}
{%- endset -%}
{%- if execute -%}
    {#- the 'wm:' prefix keeps agate from parsing the text back into a datetime (and its time zone) -#}
    {%- set value = run_query("select 'wm:' || (" ~ watermark_sql ~ ")::text").columns[0].values()[0] -%}
'{{ value[3:] }}'::timestamptz
{%- else -%}
({{ watermark_sql }})
{%- endif -%}
{%- endmacro %}
