{#- A unique index on `columns` of `relation`, created once (a warehouse built before it had none gets it on the
    next run): every write then checks the key, which a unique test re-checked by hashing all of the state's
    rows on the critical path of every night (5 s at 1M customers). Unnamed, so that PostgreSQL picks a free
    name: on a full refresh the backup table dbt drops after the commit still holds the old one. -#}
{% macro ensure_unique_index(relation, columns) -%}
do $$
begin
    if not exists (
        select from pg_index
        where indrelid = '{{ relation }}'::regclass
          and indisunique
    ) then
        create unique index on {{ relation }} ({{ columns | join(', ') }});
    end if;
end
$$
{%- endmacro %}
