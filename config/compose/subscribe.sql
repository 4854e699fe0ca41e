-- Run on green by the one-shot "replication" service once blue and green are healthy:
-- subscribes green to blue's publication (copying the existing rows first). Safe to run
-- again: an existing subscription is left alone.
SELECT NOT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = 'shop_sub') AS missing
\gset
\if :missing
CREATE SUBSCRIPTION shop_sub
    CONNECTION 'host=blue port=5432 dbname=shop user=replicator password=replicator-demo-password'
    PUBLICATION shop_pub
    WITH (copy_data = true);
\else
\echo 'subscription shop_sub exists already'
\endif
