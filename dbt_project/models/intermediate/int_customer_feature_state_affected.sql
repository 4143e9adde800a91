-- One row per customer whose feature state a night recomputes (see int_customer_feature_state_p0 for when a
-- customer is), read by both parts of the state. Computed once, here, rather than by each part (which
-- scanned fct_orders and the ~14M web events twice each at 1M customers), and as a table with statistics,
-- so that the parts' semi-joins on these few thousand customers run in their parallel scans' workers instead
-- of gathering every row to the leader first.
-- Empty on a --full-refresh and when there is no int_customer_feature_state_watermark yet: the parts are then
-- built whole and do not read this.
-- depends_on: {{ ref('int_feature_cutoffs') }}
-- depends_on: {{ ref('feature_categories') }}
-- depends_on: {{ ref('fct_orders') }}
-- depends_on: {{ ref('int_orders_validated') }}
-- depends_on: {{ ref('stg_crm__web_events') }}
{%- set previous = none if flags.FULL_REFRESH else
    adapter.get_relation(this.database, this.schema, 'int_customer_feature_state_watermark') %}
with

{%- if previous is none %}

affected_customers as (
    select null::text as customer_id
    where false
)

{%- else %}

cutoffs as (
    select * from {{ ref('int_feature_cutoffs') }}
),

previous as (
    select * from {{ previous }}
),

previous_cutoffs as (
    select distinct snapshot, feature_cutoff_date
    from previous
),

-- the dates each snapshot's cut-off moved across since the last run: (least, greatest]
moved_dates as (
    select generate_series(
        least(previous_cutoffs.feature_cutoff_date, cutoffs.feature_cutoff_date) + 1,
        greatest(previous_cutoffs.feature_cutoff_date, cutoffs.feature_cutoff_date),
        interval '1 day'
    )::date as moved_date
    from cutoffs
    inner join previous_cutoffs
        on cutoffs.snapshot = previous_cutoffs.snapshot
    where previous_cutoffs.feature_cutoff_date <> cutoffs.feature_cutoff_date
),

watermarks as (
    select
        coalesce(max(orders_loaded_at), '-infinity'::timestamptz)
            - interval '{{ var("incremental_lookback_hours") }} hours' as orders_loaded_at,
        coalesce(max(validated_loaded_at), '-infinity'::timestamptz)
            - interval '{{ var("incremental_lookback_hours") }} hours' as validated_loaded_at,
        coalesce(max(web_loaded_at), '-infinity'::timestamptz)
            - interval '{{ var("incremental_lookback_hours") }} hours' as web_loaded_at
    from previous
),

previous_ranks as (
    select distinct category, category_rank
    from previous
    where category_rank is not null
),

current_ranks as (
    select category, rank as category_rank
    from {{ ref('feature_categories') }}
),

-- a new snapshot, or other feature categories (the category shares of everyone), recompute every customer
recompute as (
    select (
        exists (select snapshot from cutoffs except select snapshot from previous_cutoffs)
        or exists (select * from previous_ranks except select * from current_ranks)
        or exists (select * from current_ranks except select * from previous_ranks)
    ) as everyone
),

-- The filters compare with scalar subqueries (one value, or an array of the few moved dates): parameters the
-- parallel workers of a scan apply themselves. A join to a CTE is applied after the Gather, which ships every
-- row to the leader (14M web events at 1M customers). `everyone` (the feature categories changed) takes
-- every customer with an order or a web event into this set, so that the parts still filter their sources
-- by a plain semi-join: an `everyone or customer_id in (...)` filter there cannot be planned as a hash join,
-- and at 1M customers became a 15-minute nested scan of this set for every order line.
affected_customers as (
    select orders.customer_id
    from {{ ref('fct_orders') }} as orders
    where orders.customer_id is not null
      and (
          (select everyone from recompute)
          or orders._source_loaded_at > (select orders_loaded_at from watermarks)
          or orders.order_date = any (array(select moved_date from moved_dates))
      )

    union

    select validated.customer_id
    from {{ ref('int_orders_validated') }} as validated
    where validated.customer_id is not null
      and validated.exclusion_reason is not null
      and validated._source_loaded_at > (select validated_loaded_at from watermarks)

    union

    select web_events.customer_id
    from {{ ref('stg_crm__web_events') }} as web_events
    where web_events.customer_id is not null
      and (
          (select everyone from recompute)
          or web_events._loaded_at > (select web_loaded_at from watermarks)
          or web_events.event_date = any (array(select moved_date from moved_dates))
      )
)

{%- endif %}

select customer_id::text as customer_id
from affected_customers
