{{ config(
    materialized='incremental',
    unique_key='product_id',
    incremental_strategy='delete+insert',
    on_schema_change='fail',
    indexes=[{'columns': ['_loaded_at']}, {'columns': ['product_id']}],
) }}
-- One row per product id: the latest delivery, trimmed. `is_product` is false for fee and adjustment codes.
with

source as (
    select * from {{ source('crm', 'products') }}
    {%- if is_incremental() %}
    {{ touched_keys_filter(source('crm', 'products'), ["nullif(trim(product_id), '')"]) }}
    {%- endif %}
),

cleaned as not materialized (
    select
        nullif(trim(product_id), '') as product_id,
        nullif(trim(sku), '') as sku,
        nullif(trim(product_name), '') as product_name,
        nullif(trim(category), '') as category,
        nullif(trim(subcategory), '') as subcategory,
        nullif(trim(brand), '') as brand,
        case when list_price > 0 then list_price end as list_price,
        {{ is_product_code('product_id') }} as is_product,
        _batch_id,
        _loaded_at
    from source
),

ranked as (
    {{ ranked_deliveries('cleaned', ['product_id']) }}
),

deduplicated as (
    select
        product_id,
        sku,
        product_name,
        category,
        subcategory,
        brand,
        list_price,
        is_product,
        {{ delivery_columns() }}
    from ranked
    where _delivery_rank = 1
      and product_id is not null
)

select * from deduplicated
