-- One row per product id seen in the catalogue or on an order line. Products missing from the catalogue
-- get their observed median selling price; price bands are quartiles of list price within the category.
with

products as (
    select * from {{ ref('stg_crm__products') }}
),

-- Only lines of products without a usable catalogue list price can change a list_price (coalesce(list_price,
-- median) below): the median is sorted for their lines alone, not for all 11M lines at 1M customers (that sort
-- was most of this model). A product missing from the catalogue has no list price either, so the same lines
-- give the uncatalogued products.
catalogue_priced as (
    select product_id from products where list_price is not null
),

unpriced_lines as materialized (
    select
        product_id,
        quantity,
        unit_price
    from {{ ref('stg_crm__order_lines') }} as order_lines
    where product_id is not null
      and not exists (
          select from catalogue_priced where catalogue_priced.product_id = order_lines.product_id
      )
),

observed_prices as (
    select
        product_id,
        percentile_cont(0.5) within group (order by unit_price) as median_unit_price
    from unpriced_lines
    where quantity > 0
      and unit_price > 0
    group by product_id
),

uncatalogued as (
    select distinct
        unpriced_lines.product_id
    from unpriced_lines
    left join products
        on unpriced_lines.product_id = products.product_id
    where products.product_id is null
),

unioned as (
    select
        product_id,
        sku,
        product_name,
        category,
        subcategory,
        brand,
        list_price,
        is_product,
        true as is_in_catalogue
    from products

    union all

    select
        product_id,
        null as sku,
        null as product_name,
        null as category,
        null as subcategory,
        null as brand,
        null::numeric as list_price,
        {{ is_product_code('product_id') }} as is_product,
        false as is_in_catalogue
    from uncatalogued
),

priced as (
    select
        unioned.product_id,
        unioned.sku,
        unioned.product_name,
        coalesce(unioned.category, 'uncategorised') as category,
        unioned.subcategory,
        unioned.brand,
        round(coalesce(unioned.list_price, observed_prices.median_unit_price::numeric), 4) as list_price,
        unioned.is_product,
        unioned.is_in_catalogue
    from unioned
    left join observed_prices
        on unioned.product_id = observed_prices.product_id
),

price_quartiles as (
    select
        product_id,
        ntile(4) over (partition by category order by list_price, product_id) as price_quartile
    from priced
    where list_price is not null
),

final as (
    select
        priced.product_id::text as product_id,
        priced.sku::text as sku,
        priced.product_name::text as product_name,
        priced.category::text as category,
        priced.subcategory::text as subcategory,
        priced.brand::text as brand,
        priced.list_price::numeric as list_price,
        (case price_quartiles.price_quartile
            when 1 then 'budget'
            when 2 then 'mid'
            when 3 then 'premium'
            when 4 then 'luxury'
        end)::text as price_band,
        priced.is_product::boolean as is_product,
        priced.is_in_catalogue::boolean as is_in_catalogue
    from priced
    left join price_quartiles
        on priced.product_id = price_quartiles.product_id
)

select * from final
