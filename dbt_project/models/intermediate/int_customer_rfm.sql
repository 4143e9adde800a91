-- One row per customer with ≥1 purchase on or before as_of: rule-based RFM scores (1..5 by percentile
-- among customers; ties share a score) and the standard RFM segment named from R and the mean of F and M.
with

features as (
    select * from {{ ref('int_customer_features_as_of') }}
),

scored as (
    select
        customer_id,
        recency_days,
        n_orders,
        net_spend,
        {{ quintile_score('recency_days desc') }} as r_score,
        {{ quintile_score('n_orders') }} as f_score,
        {{ quintile_score('net_spend') }} as m_score
    from features
),

segmented as (
    select
        *,
        r_score::text || f_score::text || m_score::text as rfm_score,
        case
            when r_score = 5 and fm_score >= 4 then 'Champions'
            when r_score in (3, 4) and fm_score >= 4 then 'Loyal'
            when r_score in (4, 5) and fm_score in (2, 3) then 'Potential loyalists'
            when r_score = 5 and fm_score = 1 then 'New'
            when r_score = 4 and fm_score = 1 then 'Promising'
            when r_score = 3 and fm_score = 3 then 'Need attention'
            when r_score = 3 and fm_score <= 2 then 'About to sleep'
            when r_score <= 2 and fm_score = 5 then 'Can''t lose them'
            when r_score <= 2 and fm_score in (3, 4) then 'At risk'
            when r_score = 1 and fm_score = 1 then 'Lost'
            else 'Hibernating'
        end as rfm_segment
    from (
        select
            *,
            round((f_score + m_score) / 2.0)::integer as fm_score
        from scored
    ) as with_fm
)

select * from segmented
