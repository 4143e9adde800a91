{#- The scoring features of the customers of the state's part 1: see int_customer_features_as_of_p0.sql. -#}
{{ customer_features_from_state('= 0', ref('int_customer_feature_state_p1')) }}
