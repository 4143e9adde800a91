{{ config(pre_hook="set local work_mem = '128MB'") }}
-- One row per snapshot × category: the median unit price of the purchase lines (sold, not cancelled, of
-- known and unknown customers alike) dated on or before the snapshot's cut-off, the yardstick of
-- avg_price_index (premium vs bargain buyers of the same category). Per cut-off, so that later prices never
-- leak into a snapshot. From the lines' counts per day and price (int_order_lines_daily, kept incrementally)
-- rather than the lines: each day counts in its snapshot bucket (see snapshot_bucket), and a cut-off's prices
-- are the sum of the buckets at or before it. The median is taken
-- over the few distinct prices with their line counts, a hash aggregate, rather than by sorting every line;
-- it interpolates the two middle values like percentile_cont(0.5).
with

as_of as (
    select * from {{ ref('int_as_of') }}
),

snapshots as (
    select k.snapshot
    from as_of
    cross join generate_series(0, as_of.training_snapshots) as k (snapshot)
),

bucket_prices as (
    select
        {{ snapshot_bucket('daily_lines.order_date') }} as bucket,
        daily_lines.category,
        daily_lines.unit_price,
        sum(daily_lines.n_purchase_lines) as n_lines
    from {{ ref('int_order_lines_daily') }} as daily_lines
    cross join as_of
    where daily_lines.order_date <= as_of.as_of_date
      and daily_lines.n_purchase_lines > 0
    group by 1, 2, 3
),

price_counts as (
    select
        snapshots.snapshot,
        bucket_prices.category,
        bucket_prices.unit_price,
        sum(bucket_prices.n_lines) as n_lines
    from bucket_prices
    inner join snapshots
        on snapshots.snapshot <= bucket_prices.bucket
    group by
        snapshots.snapshot,
        bucket_prices.category,
        bucket_prices.unit_price
),

price_ranks as (
    select
        snapshot,
        category,
        unit_price,
        -- 0-based position of the last line at this price in the sorted prices
        sum(n_lines) over (partition by snapshot, category order by unit_price) - 1 as last_position,
        sum(n_lines) over (partition by snapshot, category) as n_total
    from price_counts
),

final as (
    select
        snapshot::integer as snapshot,
        category::text as category,
        (lower_price::double precision
            + (upper_price::double precision - lower_price::double precision) * middle_fraction::double precision
        )::double precision as median_unit_price
    from (
        select
            snapshot,
            category,
            min(unit_price) filter (where last_position >= floor((n_total - 1) / 2.0)) as lower_price,
            min(unit_price) filter (where last_position >= ceil((n_total - 1) / 2.0)) as upper_price,
            (n_total - 1) / 2.0 - floor((n_total - 1) / 2.0) as middle_fraction
        from price_ranks
        group by
            snapshot,
            category,
            n_total
    ) as middle
)

select * from final
