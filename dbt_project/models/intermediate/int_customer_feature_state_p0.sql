{#- The feature state of the customers of part 0 of 2 (int_customer_feature_state is the union of the parts; the
    SQL is the macro customer_feature_state, read it there). Incremental by customer: a night recomputes only
    the customers the new data touched (int_customer_feature_state_affected) and replaces their rows
    (delete+insert on snapshot × customer). work_mem: the two parts run at once, each with half of the 256 MB the whole state
    had (its hash aggregates spill to disk in batches beyond that; at 256 MB a part, the 200k build's server
    peaked at 4.8 GB against 3.0 GB). The config (incremental, delete+insert, work_mem) is set in the macro. -#}
-- depends_on: {{ ref('int_orders_validated') }}
-- One row per snapshot × customer with any order on or before the snapshot's cut-off (an incremental run
-- writes a row with has_orders false for an affected customer without one, e.g. web events only, so that its
-- old row is replaced; the post-hook then deletes those, as a full build never has them): the sums, counts, first and last
-- dates that the features derive from, none of which depend on where the cut-off lies beyond the
-- customer's last data, so a row stays valid while nothing of that customer moves into its window. The
-- features that do depend on the cut-off itself (recency, tenure, age) are computed from these in
-- the feature models (macro customer_features_from_state).
--
-- One pass over each source, not one per cut-off: every row dated on or before as_of falls in one bucket,
-- the oldest snapshot whose cut-off it is still on or before (snapshot_bucket). Rows are summed per customer
-- and bucket once, and snapshot k is the sum of the buckets j >= k: sums, counts, minima and maxima add up
-- across buckets, averages are kept as a sum and a count. (Joining every cut-off to every line was 296 s at
-- 1M customers.)
--
-- A customer is recomputed (from all of its rows) when, since the last run:
--   * one of its orders was (re)delivered or rewritten (fct_orders' _source_loaded_at: the order's row, lines,
--     products or customer), or disqualified (int_orders_validated: the fact tables delete those orders);
--   * it has web events delivered;
--   * one of its orders or web events lies between a snapshot's previous cut-off and its new one (as_of
--     moved, forward or back);
-- and every customer when the feature categories (top 8 and their ranks: the category shares) changed.
-- The previous cut-offs, ranks and delivery watermarks are those int_customer_feature_state_watermark
-- recorded after the last successful run.
--
-- avg_price_index is not kept here: it divides by the category price medians, which move at some cut-off
-- every night, and keeping it made a night recompute every buyer of such a category (most customers at 1M).
-- The state keeps each customer's priced amount and lines per category instead (price_categories,
-- category_priced_amounts, category_priced_lines: aligned arrays); customer_features_from_state divides
-- them by the current medians, set-based over the state.
{{ customer_feature_state(part=0, parts=2) }}
