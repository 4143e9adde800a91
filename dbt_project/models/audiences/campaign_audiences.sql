{{ config(
    schema='marts',
    materialized='table',
    indexes=[{'columns': ['customer_id'], 'unique': True}],
    post_hook="{{ analyze_if_stale(this) }}",
) }}

with

segments as (
    select * from {{ source('ml', 'customer_segments') }}
),

scores as (
    select * from {{ source('ml', 'customer_scores') }}
),

recommendations as (
    select * from {{ source('ml', 'product_recommendations') }}
),

customers as (
    select * from {{ ref('dim_customers') }}
),

top_recommendations as (
    select
        recommendations.customer_id,
        string_agg(recommendations.product_id, ' ' order by recommendations.rank) as top_product_ids,
        (array_agg(recommendations.reason order by recommendations.rank))[1] as first_recommendation_reason
    from recommendations
    where recommendations.rank <= 3
    group by recommendations.customer_id
),

joined as (
    select
        scores.customer_id,
        segments.segment_id,
        segments.segment_name,
        customers.rfm_segment,
        scores.value_decile,
        scores.predicted_spend,
        scores.horizon_days,
        scores.churn_probability,
        case
            when scores.churn_probability >= 0.7 then 'high'
            when scores.churn_probability >= 0.4 then 'medium'
            when scores.churn_probability is not null then 'low'
        end as churn_risk,
        top_recommendations.top_product_ids,
        top_recommendations.first_recommendation_reason,
        customers.country,
        customers.acquisition_channel,
        scores.as_of as scores_as_of,
        segments.as_of as segments_as_of,
        scores.model_version as clv_model_version,
        segments.model_version as segmentation_model_version
    from scores
    left join segments
        on scores.customer_id = segments.customer_id
    left join top_recommendations
        on scores.customer_id = top_recommendations.customer_id
    left join customers
        on scores.customer_id = customers.customer_id
)

select * from joined
