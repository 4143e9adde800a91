-- Least-privilege database roles of the CRM warehouse. Idempotent: safe to run on every deploy and after
-- every dbt build (ml/roles.py apply_roles runs it; it needs the warehouse owner or a superuser).
--
--   crm_loader        writes raw.* and audit.* (the loaders); reads nothing else.
--   crm_transformer   reads raw.* (and ml.*, which downstream marts use); creates and owns staging.* and marts.*.
--   crm_trainer       reads marts.* except personal-data columns; creates and owns ml.* (training + publish).
--   marketing_reader  reads ml.* and the audience marts (marts relations whose name contains "audience"),
--                     never raw.*, staging.*, or a personal-data column anywhere.
--
-- All four are NOLOGIN group roles; people and services log in as members (ml/roles.py create_login), with
-- their session role set to the group, so what they create is owned by the group, not by one login.
--
-- Why grants survive rebuilds:
--   * ml.* is published by ml/publish.py, which never drops what readers use (the ml.<table> view keeps
--     its OID; new history partitions are new tables): default privileges cover every new relation.
--   * dbt rebuilds a marts table by creating <name>__dbt_tmp and renaming it, so a grant on the old table
--     dies with it, and default privileges cannot say "all columns but email". An event trigger applies
--     the marts rules (crm_apply_mart_grants) to every relation created or altered in marts, inside the
--     DDL's own transaction: a rebuilt table is never visible without its grants. (dbt's `grants:` config
--     would fail every build on a server where these roles do not exist yet.)

-- ---------------------------------------------------------------------------------------------------------
-- Roles and schemas
-- ---------------------------------------------------------------------------------------------------------
do $roles$
declare
    role_name text;
begin
    foreach role_name in array array['crm_loader', 'crm_transformer', 'crm_trainer', 'marketing_reader'] loop
        if not exists (select 1 from pg_roles where rolname = role_name) then
            begin
                execute format('create role %I nologin', role_name);
            exception when duplicate_object or unique_violation then
                null;  -- created concurrently by another deploy: same result
            end;
        end if;
    end loop;
end
$roles$;

create schema if not exists raw;
create schema if not exists staging;
create schema if not exists marts;
create schema if not exists ml;
create schema if not exists audit;

-- Nobody reads a warehouse schema by default.
revoke all on schema raw, staging, marts, ml, audit from public;

-- ---------------------------------------------------------------------------------------------------------
-- crm_loader: raw and audit, write only (plus the batch bookkeeping it must read back)
-- ---------------------------------------------------------------------------------------------------------
grant usage on schema raw, audit to crm_loader;
grant insert on all tables in schema raw to crm_loader;
-- load_atomically inserts a batch row, reads it back (idempotency by content hash) and updates its counts.
grant select, insert on all tables in schema audit to crm_loader;
grant update on audit.load_batches to crm_loader;
-- a batch's first write into an empty raw table truncates it first (raw_schema.sql says why)
do $truncate$
begin
    if to_regprocedure('audit.crm_truncate_if_empty(regclass)') is not null then
        grant execute on function audit.crm_truncate_if_empty(regclass) to crm_loader;
    end if;
end
$truncate$;
grant usage on all sequences in schema raw, audit to crm_loader;

-- ---------------------------------------------------------------------------------------------------------
-- crm_transformer: read raw (and ml for downstream marts), create and own staging and marts
-- ---------------------------------------------------------------------------------------------------------
grant usage on schema raw, ml to crm_transformer;
grant select on all tables in schema raw, ml to crm_transformer;
grant usage, create on schema staging, marts to crm_transformer;

-- ---------------------------------------------------------------------------------------------------------
-- crm_trainer: read marts (column rules below), create and own ml
-- ---------------------------------------------------------------------------------------------------------
grant usage on schema marts to crm_trainer;
grant usage, create on schema ml to crm_trainer;

-- ---------------------------------------------------------------------------------------------------------
-- marketing_reader: ml and audience marts only
-- ---------------------------------------------------------------------------------------------------------
grant usage on schema ml, marts to marketing_reader;
grant select on all tables in schema ml to marketing_reader;

-- Relations that exist already change owner, so a member of the group can rebuild or republish them.
do $owners$
declare
    rel record;
begin
    for rel in
        select c.oid::regclass as name, n.nspname as schema_name
        from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in ('staging', 'marts', 'ml')
          and c.relkind in ('r', 'p', 'v', 'm', 'f')
          and not c.relispartition
    loop
        execute format('alter table %s owner to %I', rel.name,
                       case rel.schema_name when 'ml' then 'crm_trainer' else 'crm_transformer' end);
    end loop;
    -- Partitions follow their parent (ALTER TABLE OWNER does not recurse into partitions).
    for rel in
        select c.oid::regclass as name, n.nspname as schema_name
        from pg_class c
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in ('staging', 'marts', 'ml') and c.relispartition
    loop
        execute format('alter table %s owner to %I', rel.name,
                       case rel.schema_name when 'ml' then 'crm_trainer' else 'crm_transformer' end);
    end loop;
end
$owners$;

-- Relations created later: default privileges per creating role (the groups, and whoever runs this file,
-- which is the owner that creates raw/audit tables and runs dbt/publish in a single-user setup).
do $defaults$
declare
    creator text;
begin
    foreach creator in array array[current_user::text, 'crm_transformer', 'crm_trainer'] loop
        execute format('alter default privileges for role %I in schema raw grant insert on tables to crm_loader', creator);
        execute format('alter default privileges for role %I in schema raw grant select on tables to crm_transformer', creator);
        execute format('alter default privileges for role %I in schema audit grant select, insert on tables to crm_loader', creator);
        execute format('alter default privileges for role %I in schema ml grant select on tables to marketing_reader, crm_transformer', creator);
    end loop;
end
$defaults$;

-- ---------------------------------------------------------------------------------------------------------
-- Marts: one rule, applied to every marts relation now and, by the event trigger, to every one created later
-- ---------------------------------------------------------------------------------------------------------
create or replace function audit.crm_personal_data_columns() returns text[]
language sql immutable
as $$
    select array['email', 'full_name', 'first_name', 'last_name', 'birth_date', 'phone', 'address', 'street']
$$;

-- crm_trainer reads every column but personal data; marketing_reader the same, on audience marts only.
create or replace function audit.crm_apply_mart_grants(rel regclass) returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    rel_name text;
    all_columns text;
    safe_columns text;
    has_personal boolean;
begin
    select c.relname into rel_name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.oid = rel and n.nspname = 'marts' and c.relkind in ('r', 'p', 'v', 'm', 'f');
    if rel_name is null or not exists (select 1 from pg_roles where rolname = 'marketing_reader') then
        return;
    end if;
    select string_agg(quote_ident(a.attname), ', ' order by a.attnum),
           string_agg(quote_ident(a.attname), ', ' order by a.attnum)
               filter (where a.attname <> all (audit.crm_personal_data_columns())),
           bool_or(a.attname = any (audit.crm_personal_data_columns()))
    into all_columns, safe_columns, has_personal
    from pg_attribute a
    where a.attrelid = rel and a.attnum > 0 and not a.attisdropped;
    if all_columns is null then
        return;
    end if;

    -- Start from nothing (a table-level grant would make column revokes meaningless), then grant.
    execute format('revoke all on %s from crm_trainer, marketing_reader', rel);
    execute format('revoke all (%s) on %s from crm_trainer, marketing_reader', all_columns, rel);
    if not has_personal then
        execute format('grant select on %s to crm_trainer', rel);
        if rel_name like '%audience%' then
            execute format('grant select on %s to marketing_reader', rel);
        end if;
    elsif safe_columns is not null then
        execute format('grant select (%s) on %s to crm_trainer', safe_columns, rel);
        if rel_name like '%audience%' then
            execute format('grant select (%s) on %s to marketing_reader', safe_columns, rel);
        end if;
    end if;
end
$$;
revoke all on function audit.crm_apply_mart_grants(regclass) from public;

do $existing$
declare
    rel regclass;
begin
    for rel in
        select c.oid::regclass from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'marts' and c.relkind in ('r', 'p', 'v', 'm', 'f')
    loop
        perform audit.crm_apply_mart_grants(rel);
    end loop;
end
$existing$;

create or replace function audit.crm_mart_grants_on_ddl() returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    rel regclass;
begin
    for rel in
        select distinct d.objid::regclass
        from pg_event_trigger_ddl_commands() d
        where d.classid = 'pg_class'::regclass and d.schema_name = 'marts'
    loop
        perform audit.crm_apply_mart_grants(rel);
    end loop;
end
$$;
revoke all on function audit.crm_mart_grants_on_ddl() from public;

-- Event triggers need a superuser; without one, run apply_roles after each dbt build instead.
do $trigger$
begin
    if not (select rolsuper from pg_roles where rolname = current_user) then
        raise notice 'not a superuser: no event trigger; re-run ml/roles.sql after each dbt build';
        return;
    end if;
    drop event trigger if exists crm_mart_grants;
    create event trigger crm_mart_grants on ddl_command_end
        when tag in ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'CREATE VIEW',
                     'CREATE MATERIALIZED VIEW', 'ALTER TABLE', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW')
        execute function audit.crm_mart_grants_on_ddl();
end
$trigger$;
