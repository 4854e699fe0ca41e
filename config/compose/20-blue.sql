-- Blue only (after 10-schema.sql): the data, and what green's subscription needs from blue.

INSERT INTO tenants (name)
VALUES ('acme'), ('globex'), ('initech'), ('umbrella'), ('hooli'), ('stark');

INSERT INTO orders (tenant_id, amount_cents, placed_by, created_at)
SELECT t.id, 100 + (random() * 99900)::int, 'seed', now() - random() * interval '30 days'
FROM generate_series(1, 20000) AS n
JOIN (SELECT id, row_number() OVER (ORDER BY name) - 1 AS k FROM tenants) AS t ON t.k = n % 6;

-- The role green's subscription connects as: replication, and reading the published tables
-- for the initial copy.
CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'replicator-demo-password';
GRANT SELECT ON tenants, orders TO replicator;

CREATE PUBLICATION shop_pub FOR TABLE tenants, orders;
