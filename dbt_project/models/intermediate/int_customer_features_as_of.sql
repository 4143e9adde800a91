-- One row per customer with an order on or before as_of (snapshot 0, the scoring cut-off): the behavioural
-- features every scoring mart reads (customer_features, clv_scoring_set, dim_customers, int_customer_rfm).
-- Built every night. The SQL is the macro customer_features_from_state, shared with the training snapshots
-- (int_customer_features_snapshots), so training and scoring features are one computation.
{{ customer_features_from_state('= 0') }}
