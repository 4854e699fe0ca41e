-- pgbench script (the "load" service): a new order, through pgshift. An order written while
-- pgshift sends this session to green stays on green: replication runs blue → green only.
\set tenant random(0, 5)
\set amount random(100, 100000)
INSERT INTO orders (tenant_id, amount_cents, placed_by)
SELECT id, :amount, 'pgbench'
FROM tenants
WHERE name = (ARRAY['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark'])[:tenant + 1];
