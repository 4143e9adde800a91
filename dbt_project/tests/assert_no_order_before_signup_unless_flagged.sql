-- An order placed before its customer signed up is either a data error or an imported history; it must
-- carry is_before_signup so that analyses can tell. Unflagged ones fail the build.
select
    orders.order_id,
    orders.customer_id,
    orders.ordered_at,
    customers.signup_at
from {{ ref('fct_orders') }} as orders
inner join {{ ref('dim_customers') }} as customers
    on orders.customer_id = customers.customer_id
where orders.ordered_at < customers.signup_at
  and not orders.is_before_signup
