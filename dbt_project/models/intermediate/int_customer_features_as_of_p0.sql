{#- The scoring features (snapshot 0) of the customers of the state's part 0 (int_customer_feature_state_p0),
    rebuilt every night since recency and tenure move with as_of. In one query over the whole state the
    per-customer expressions ran on one core: PostgreSQL evaluates the projection above the Gather, and at 1M
    customers it was 10 of the incremental night's 94 s with nothing else running. The SQL is the macro
    customer_features_from_state, shared with the training snapshots (int_customer_features_snapshots), so
    training and scoring features are one computation. -#}
{{ customer_features_from_state('= 0', ref('int_customer_feature_state_p0')) }}
