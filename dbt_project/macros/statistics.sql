{#- Gather the planner's statistics of `relation` when they are missing or stale: the post-hook of every table
    model. A table model is a new table on every build (no statistics yet), as is every model on a full
    refresh; an incremental night changes a small share of a large table (at 1M customers ~0.3 % of the
    staging, fact and feature-state rows), and re-sampling all of them every night was 14 of the incremental
    build's 137 node-seconds. Stale means what autovacuum's own analyze threshold means (more than 50 rows +
    10 % of the table changed since the last analyze), counting this transaction's writes too, so a night that
    rewrites a large share (a backfill) is analyzed before its tests and the next models are planned. A plain
    `analyze` when the table has no statistics row at all. -#}
{% macro analyze_if_stale(relation) -%}
do $analyze_if_stale$
begin
    if (
        select
            coalesce(stat.last_analyze, stat.last_autoanalyze) is not null
            and stat.n_mod_since_analyze
                + pg_stat_get_xact_tuples_inserted(stat.relid)
                + pg_stat_get_xact_tuples_updated(stat.relid)
                + pg_stat_get_xact_tuples_deleted(stat.relid)
                <= 50 + 0.1 * greatest(class.reltuples, 0)
        from pg_stat_user_tables as stat
        inner join pg_class as class
            on stat.relid = class.oid
        where stat.relid = '{{ relation }}'::regclass
    ) then
        return;
    end if;
    analyze {{ relation }};
end
$analyze_if_stale$
{%- endmacro %}
