-- Blue and green alike (docker-compose.yml mounts this file into both), run once by the
-- postgres image when the data volume is new, as the superuser, in database "shop".
--
-- Logical replication copies rows, not roles, schema or sequences: each color gets the role
-- and the tables here, and the keys are UUIDs (gen_random_uuid()), never serials.

-- The same SCRAM verifier on both colors (it is the one of "shop-demo-password"), so one
-- password logs in on whichever color pgshift picks. To copy a real role's verifier:
-- SELECT rolpassword FROM pg_authid WHERE rolname = '...' on blue, then
-- ALTER ROLE ... PASSWORD '<that verifier>' on green.
CREATE ROLE shop_app LOGIN PASSWORD 'SCRAM-SHA-256$4096:Gz+IEQEOGc33m6rYvOEGMA==$0z1f9wuSycq2ICQ4yKsstAn/nYzkpfVZnon5BhuWcQs=:Tei3iFQvqLGMZXR7fY0ootW07e1d6SaYGZIeGjgUGaU=';

CREATE TABLE tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE
);

CREATE TABLE orders (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    amount_cents integer NOT NULL CHECK (amount_cents > 0),
    placed_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_tenant ON orders (tenant_id, created_at DESC);

GRANT SELECT ON tenants TO shop_app;
GRANT SELECT, INSERT ON orders TO shop_app;
