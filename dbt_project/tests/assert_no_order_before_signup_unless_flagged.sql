-- An order placed before its customer signed up is either a data error or an imported history; it must
-- carry is_before_signup so that analyses can tell. Unflagged ones fail the build.
--
-- The orders checked are those the night (re)processed, as in the generic tests (var tested_through, see
-- postgres__get_where_subquery): an order's flag and its customer's signup both come from the order's and
-- the customer's deliveries, and fct_orders' _source_loaded_at is the later of the two (a re-delivered
-- customer re-processes its orders, int_orders_validated), so a pair that could have changed tonight is in
-- scope. Without the var, every order (a full refresh, the first night, data_tests=all, and at least once
-- every 7 days). At 1M customers the whole check took 1.4 s alone (4.2 s in the incremental build, on its longest
-- path), the night's orders 0.1 s.
with

orders as (
    select * from {{ get_where_subquery(ref('fct_orders')) }}
),

customers as (
    select * from {{ ref('dim_customers') }}
)

select
    orders.order_id,
    orders.customer_id,
    orders.ordered_at,
    customers.signup_at
from orders
inner join customers
    on orders.customer_id = customers.customer_id
where orders.ordered_at < customers.signup_at
  and not orders.is_before_signup
