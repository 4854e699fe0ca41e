-- pgbench script (the "load" service): a tenant's latest orders, through pgshift.
\set tenant random(0, 5)
SELECT o.id, o.amount_cents
FROM orders o JOIN tenants t ON t.id = o.tenant_id
WHERE t.name = (ARRAY['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark'])[:tenant + 1]
ORDER BY o.created_at DESC
LIMIT 5;
