-- No scoring feature (customer_features, clv_scoring_set: snapshot 0, cut-off as_of) reads data after its
-- cut-off: see the macro point_in_time_violations. Runs every night.
{{ point_in_time_violations(
    [(ref('customer_features'), 'as_of_date'), (ref('clv_scoring_set'), 'feature_cutoff_date')],
    snapshots=[0],
) }}
