-- A line of a million units or more is a source error (a sentinel such as 2147483647 for "unknown", a
-- barcode typed into the quantity field), not a sale: the largest real line in UCI Online Retail is 80,995
-- units. Such lines pass loading (they are valid integers) but would poison spend and basket features, and
-- two of them in one order overflow the integer order totals of fct_orders. Fail the build, naming the lines,
-- so that the batch is fixed or quarantined before training. One row per offending line.
select
    order_id,
    line_no,
    product_id,
    quantity,
    _batch_id
from {{ ref('stg_crm__order_lines') }}
where abs(quantity) >= 1000000
