{#- Incremental like fct_order_lines: the baskets of every order a newer delivery touched are rebuilt whole.
    The pre-hook deletes them first, so an order rewritten into no products at all (every line cancelled,
    say) loses its baskets too, which delete+insert alone would keep (it only replaces the keys it inserts),
    and the baskets of orders a delivery since disqualified (fct_order_lines no longer has them). One
    statement reading the watermark once, before tonight's rows move it (as two hooks, the second read it
    after the first had deleted the newest baskets: a night older, twice the orders to look up). A night
    also adds the orders dated after the newest basket kept, up to as_of: as_of moving forward past lines
    loaded earlier. The post-hook removes baskets after
    as_of (as_of moved back). A full rebuild regrouped every line (~10M at 1M customers) every night; the
    index on _source_loaded_at makes each watermark a look-up instead of a scan.
    (basket_id, product_id) is unique by a unique index: built once on a full build, then checked on every
    insert, without a separate test query that re-sorted every row; its leading basket_id serves the
    deletes. -#}
{{ config(
    materialized='incremental',
    unique_key='basket_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['basket_id', 'product_id'], 'unique': True}, {'columns': ['_source_loaded_at']}],
    pre_hook="{% if is_incremental() %}{% set watermark = delivery_watermark('_source_loaded_at') %}delete from {{ this }} where basket_id in (select order_id from {{ ref('fct_order_lines') }} where _source_loaded_at > {{ watermark }} union all {{ disqualified_orders_since(watermark) }}){% endif %}",
    post_hook="{% if is_incremental() %}delete from {{ this }} where ordered_at >= (select as_of_date + 1 from {{ ref('int_as_of') }}){% endif %}",
) }}
-- depends_on: {{ ref('int_orders_validated') }}
-- One row per basket (order) × distinct product actually bought up to as_of: no cancellations, returns, free
-- or negative prices, or fee codes (POST, M, BANK CHARGES, ...). The input of itemset mining.
{%- if is_incremental() and execute %}
    {#- a literal, like the watermark: the newest basket date kept (later orders were never added) -#}
    {%- set newest_date = run_query(
        "select 'd:' || coalesce(max(ordered_at)::date, '-infinity'::date)::text from " ~ this
    ).columns[0].values()[0][2:] %}
{%- endif %}
with

as_of as (
    select * from {{ ref('int_as_of') }}
),

order_lines as (
    select order_lines.*
    from {{ ref('fct_order_lines') }} as order_lines
    cross join as_of
    where order_lines.is_product
      and order_lines.quantity > 0
      and order_lines.unit_price > 0
      and not order_lines.is_cancelled
      and not order_lines.is_return
      and order_lines.order_date <= as_of.as_of_date
      {%- if is_incremental() %}
      and (
          order_lines._source_loaded_at > {{ delivery_watermark('_source_loaded_at') }}
          or order_lines.order_date > '{{ newest_date if execute else "-infinity" }}'::date
      )
      {%- endif %}
),

basket_items as (
    select
        order_id as basket_id,
        product_id,
        max(customer_id) as customer_id,
        max(category) as category,
        min(ordered_at) as ordered_at,
        sum(quantity) as quantity,
        max(_source_loaded_at) as _source_loaded_at
    from order_lines
    group by
        order_id,
        product_id
),

final as (
    select
        basket_id::text as basket_id,
        customer_id::text as customer_id,
        product_id::text as product_id,
        category::text as category,
        ordered_at::timestamp as ordered_at,
        quantity::bigint as quantity,
        -- the order's watermark, as in fct_order_lines: where the next night's incremental run starts
        _source_loaded_at::timestamptz as _source_loaded_at
    from basket_items
)

-- Written in key order: basket training reads every line in this order (read_basket_marts, so that a rerun
-- fits identical models), and a table already in that order is read along its unique index instead of being
-- sorted by the server each time (9.7M lines at 1M customers). A night appends its baskets after the others,
-- where (as with the generator's and most sources' order numbers) newer order ids sort last anyway.
select * from final
order by
    basket_id,
    product_id
