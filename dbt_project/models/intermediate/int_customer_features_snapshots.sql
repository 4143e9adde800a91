-- One row per customer × training snapshot k = 1..training_snapshots (cut-off as_of - k * horizon_days): the
-- features clv_training_set learns from, the same computation as the scoring features
-- (int_customer_features_as_of; macro customer_features_from_state).
-- Tagged `training`: the nightly builds it only when the value family retrains (a scoring-only night does
-- not read it; ml.nightly.value_training_needed decides), so it can be older than the scoring marts.
{{ config(tags=['training']) }}
{{ customer_features_from_state('>= 1') }}
