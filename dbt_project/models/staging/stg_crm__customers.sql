{{ config(
    materialized='incremental',
    unique_key='customer_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['_loaded_at']}, {'columns': ['customer_id']}],
) }}
-- One row per customer id: the latest delivery, cleaned. Test accounts stay here, flagged; the marts drop them.
with

source as (
    select * from {{ source('crm', 'customers') }}
    {%- if is_incremental() %}
    {{ touched_keys_filter(source('crm', 'customers'), [clean_id('customer_id')]) }}
    {%- endif %}
),

cleaned as not materialized (
    select
        {{ clean_id('customer_id') }} as customer_id,
        nullif(lower(trim(email)), '') as email,
        nullif(trim(full_name), '') as full_name,
        case
            when upper(trim(gender)) in ('M', 'MALE', 'MAN', 'H', 'HOMME') then 'M'
            when upper(trim(gender)) in ('F', 'FEMALE', 'WOMAN', 'W', 'FEMME') then 'F'
            else 'U'
        end as gender,
        -- 1900-01-01 is a placeholder, and nobody under 10 shops on their own account
        case
            when birth_date > date '1900-01-01'
             and birth_date <= (_loaded_at::date - interval '10 years')::date then birth_date
        end as birth_date,
        nullif(upper(trim(country)), '') as country,
        nullif(trim(city), '') as city,
        signup_at,
        nullif(lower(trim(acquisition_channel)), '') as acquisition_channel,
        coalesce(
            is_test_account
            or split_part(lower(trim(email)), '@', 2) in (
                {%- for domain in var('test_email_domains') %}'{{ domain | lower }}'{{ ", " if not loop.last }}{% endfor -%}
            ),
            false
        ) as is_test_account,
        coalesce(trim(email) ~* '^[^@[:space:]]+@[^@[:space:]]+\.[a-z]{2,}$', false) as is_valid_email,
        coalesce(
            birth_date <= date '1900-01-01' or birth_date > (_loaded_at::date - interval '10 years')::date, false
        ) as is_birth_date_invalid,
        _batch_id,
        _loaded_at
    from source
),

ranked as (
    {{ ranked_deliveries('cleaned', ['customer_id']) }}
),

deduplicated as (
    select
        customer_id,
        email,
        full_name,
        gender,
        birth_date,
        country,
        city,
        signup_at,
        acquisition_channel,
        is_test_account,
        is_valid_email,
        is_birth_date_invalid,
        {{ delivery_columns() }}
    from ranked
    where _delivery_rank = 1
      and customer_id is not null
)

select * from deduplicated
