-- The raw layer as source systems deliver it, plus the audit tables of the load process.
-- Columns are typed only as far as the loader can guarantee (a value that does not parse is quarantined);
-- everything semantic (duplicates, test accounts, bad emails, future dates, returns) is left to dbt staging.
-- Every raw row carries the batch that loaded it and when. Idempotent: safe to run on every start.

create table if not exists audit.load_batches (
    batch_id          bigint generated always as identity primary key,
    source            text        not null,  -- generator | online_retail | cdnow | ...
    source_name       text        not null,  -- file name, or the generator's parameters
    content_sha256    text        not null,  -- what makes a second load of the same input a no-op
    status            text        not null check (status in ('loaded', 'failed')),
    started_at        timestamptz not null default clock_timestamp(),
    finished_at       timestamptz,
    lines_read        bigint,
    rows_loaded       bigint,
    rows_quarantined  bigint,
    rows_by_table     jsonb,
    error             text
);
create unique index if not exists load_batches_loaded_once
    on audit.load_batches (source, content_sha256) where status = 'loaded';

create table if not exists audit.quarantine (
    batch_id     bigint      not null references audit.load_batches (batch_id),
    source       text        not null,
    target_table text        not null,
    line_no      bigint,                 -- 1-based line in the input file (header = line 1)
    raw_text     text,
    reason       text        not null,
    _loaded_at   timestamptz not null default now()
);
create index if not exists quarantine_batch on audit.quarantine (batch_id);

-- One row per nightly run whose dbt data tests passed (ml.nightly.record_data_tests): whether they read every
-- row ('all') or the rows loaded since the previous entry ('new'), and the newest load time of the staged data
-- they covered. The next night's tests read the rows loaded after it, less the incremental look-back
-- (ml.nightly.data_test_scope).
create table if not exists audit.data_test_runs (
    as_of          date        not null,
    scope          text        not null check (scope in ('all', 'new')),
    tested_through timestamptz,
    recorded_at    timestamptz not null default clock_timestamp()
);

create table if not exists raw.customers (
    customer_id          text,
    email                text,
    full_name            text,
    gender               text,
    birth_date           date,
    country              text,
    city                 text,
    signup_at            timestamp,
    acquisition_channel  text,
    is_test_account      boolean,
    _batch_id            bigint      not null,
    _loaded_at           timestamptz not null default now()
);

create table if not exists raw.products (
    product_id    text,
    sku           text,
    product_name  text,
    category      text,
    subcategory   text,
    brand         text,
    list_price    numeric(14, 4),
    _batch_id     bigint      not null,
    _loaded_at    timestamptz not null default now()
);

create table if not exists raw.orders (
    order_id     text,
    customer_id  text,          -- null when the source system lost it
    ordered_at   timestamp,
    status       text,          -- completed | cancelled | returned (source vocabulary, not cleaned)
    channel      text,
    _batch_id    bigint      not null,
    _loaded_at   timestamptz not null default now()
);

create table if not exists raw.order_lines (
    order_id     text,
    line_no      integer,
    product_id   text,
    quantity     integer,       -- negative on returns and cancellations
    unit_price   numeric(14, 4),
    discount     numeric(6, 4), -- fraction of the unit price, 0..1
    _batch_id    bigint      not null,
    _loaded_at   timestamptz not null default now()
);

create table if not exists raw.web_events (
    customer_id  text,
    session_id   text,
    event_type   text,          -- view | cart | search
    product_id   text,
    event_at     timestamp,
    _batch_id    bigint      not null,
    _loaded_at   timestamptz not null default now()
);

-- Block-range indexes on the load time. A raw table is append-only and a load stamps its rows with one
-- `_loaded_at`, so each delivery's rows sit in adjacent blocks: a BRIN index (a few pages for millions of rows)
-- lets an incremental night read just the blocks loaded since its watermark, where the staging models'
-- look-ups and int_rows_rejected scanned every raw table whole (14M web events at 1M customers, ~1 s a scan)
-- to find one day's rows. COPY keeps it up for ~5 % of the insert's server time. Block ranges not yet
-- summarised (the newest, until autovacuum gets to them) are always read: the index is never wrong, only
-- less selective for a while.
create index if not exists customers_loaded_at_brin on raw.customers using brin (_loaded_at);
create index if not exists products_loaded_at_brin on raw.products using brin (_loaded_at);
create index if not exists orders_loaded_at_brin on raw.orders using brin (_loaded_at);
create index if not exists order_lines_loaded_at_brin on raw.order_lines using brin (_loaded_at);
create index if not exists web_events_loaded_at_brin on raw.web_events using brin (_loaded_at);

-- What the generator planted, so tests can check models against the truth.
create table if not exists audit.planted_truth (
    batch_id  bigint not null references audit.load_batches (batch_id),
    key       text   not null,
    value     jsonb  not null,
    primary key (batch_id, key)
);

-- One row per generated customer, written only by the generator inside its batch's transaction with that
-- batch's id, so like the raw tables' _batch_id it has no foreign key: the per-row check of one was 3 µs a
-- row, 13 % of the server's CPU for a 1M-customer load (the primary key costs a third of that).
create table if not exists audit.planted_customers (
    batch_id          bigint  not null,
    customer_id       text    not null,
    segment           text    not null,
    purchase_rate     double precision not null,  -- lambda: expected purchases per day while alive
    dropout_prob      double precision not null,  -- p: chance of dropping out after each purchase
    mean_order_value  double precision not null,
    is_alive_at_end   boolean not null,
    primary key (batch_id, customer_id)
);
do $$
begin  -- warehouses created before: drop the key once (checked first, so no lock is taken otherwise)
    if exists (select 1 from pg_constraint where conname = 'planted_customers_batch_id_fkey'
               and conrelid = 'audit.planted_customers'::regclass) then
        alter table audit.planted_customers drop constraint planted_customers_batch_id_fkey;
    end if;
end $$;

create table if not exists audit.planted_bundles (
    batch_id     bigint not null references audit.load_batches (batch_id),
    bundle_id    integer not null,
    product_ids  text[] not null,
    add_prob     double precision not null,  -- chance a basket holding the first item gets the rest
    support      double precision,           -- measured on the generated baskets
    confidence   double precision,
    lift         double precision,
    primary key (batch_id, bundle_id)
);

-- A batch's first write into an empty table (the first load of a warehouse's history, by far its largest)
-- truncates it first: COPY into a table truncated in its own transaction can freeze its rows (no hint-bit
-- rewrite of every page when dbt first reads them, no anti-wraparound vacuum later) and, at wal_level
-- minimal (the embedded server), skips the WAL: the table is synced once at commit instead. A rollback
-- restores the (empty) table. Security definer so the loader role, which may only insert, can do this and
-- nothing more: only tables it loads, only when they hold no row, only under read committed (a later
-- snapshot would not see rows committed since the transaction began).
create or replace function audit.crm_truncate_if_empty(target regclass) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    has_rows boolean;
begin
    if not exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                   where c.oid = target and c.relkind = 'r'
                     and (n.nspname = 'raw' or (n.nspname, c.relname) = ('audit', 'planted_customers'))) then
        raise exception 'crm_truncate_if_empty: % is not a raw table', target;
    end if;
    if current_setting('transaction_isolation') <> 'read committed' then
        return false;
    end if;
    execute format('select exists (select from %s)', target) into has_rows;
    if has_rows then  -- the usual night: rows are there, no lock taken
        return false;
    end if;
    -- Empty so far. The truncate's lock keeps every other writer of the table waiting until this batch commits,
    -- so one batch at a time may hold such locks (a transaction-level advisory lock, not waited for), and it
    -- never waits for another batch's lock (nowait): two first loads, each holding a table the other wants
    -- next, would deadlock. Readers of the table wait for this batch's commit too, only on a first load.
    if not pg_try_advisory_xact_lock(hashtext('crm_truncate_if_empty')) then
        return false;
    end if;
    begin
        execute format('lock table %s in access exclusive mode nowait', target);
    exception when lock_not_available then  -- another batch is writing it: append as usual
        return false;
    end;
    execute format('select exists (select from %s)', target) into has_rows;  -- rows committed meanwhile?
    if has_rows then
        return false;
    end if;
    execute format('truncate %s', target);
    return true;
end
$$;
revoke all on function audit.crm_truncate_if_empty(regclass) from public;
