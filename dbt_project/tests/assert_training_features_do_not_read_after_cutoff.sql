-- No training feature (clv_training_set, snapshots 1..training_snapshots) reads data after its cut-off: see
-- the macro point_in_time_violations. Tagged `training`: runs when the training set is built.
{{ config(tags=['training']) }}
{{ point_in_time_violations(
    [(ref('clv_training_set'), 'feature_cutoff_date')],
    snapshots=range(1, var('training_snapshots') + 1) | list,
) }}
