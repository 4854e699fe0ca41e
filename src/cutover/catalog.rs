//! Reading (and, for `cutover-setup`, changing) each color's catalogs with `[cutover] dsn`: the
//! replication facts [`super::setup`] judges, the facts the guardrails judge, and the
//! privileges the cutover steps need. Every query is here; every judgment is in the pure
//! modules beside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio_postgres::Client;

use super::guardrails::{ClientBackend, ColorHealth, PreparedXact};
use super::setup::{
    DatabaseFacts, Direction, MARKER_SCHEMA, MARKER_TABLE, PublicationFacts, SqlStep,
    SubscriptionFacts,
};
use crate::auth::dsn::{self, AuthDsn, ColorTarget, error_text};
use crate::color::Color;
use crate::config::Config;

/// The application_name of pgshift's own cutover connections.
pub const APPLICATION_NAME: &str = "pgshift cutover";

/// How pgshift reaches each color for the cutover steps.
pub struct Connections {
    config: Arc<Config>,
    dsn: AuthDsn,
    tls: [Option<Arc<ClientConfig>>; 2],
}

impl Connections {
    /// From `[cutover] dsn` and each color's TLS config (`None` where its `tls` is off).
    pub fn new(
        config: Arc<Config>,
        tls: [Option<Arc<ClientConfig>>; 2],
    ) -> Result<Connections, String> {
        let text = config.cutover.dsn.as_deref().ok_or(
            "no [cutover] dsn: pgshift needs it to read both colors' catalogs and write the catch-up marker",
        )?;
        let dsn = dsn::parse(text).map_err(|error| format!("[cutover] dsn: {error}"))?;
        Ok(Connections { config, dsn, tls })
    }

    /// From the running proxy's config and live TLS configs.
    pub fn of_proxy(shared: &crate::proxy::Shared) -> Result<Connections, String> {
        Connections::new(
            shared.config.load_full(),
            [
                shared.tls.backend(Color::Blue),
                shared.tls.backend(Color::Green),
            ],
        )
    }

    /// The database the DSN names (its user's name when it names none).
    pub fn default_database(&self) -> String {
        let config = &self.dsn.config;
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// The user the DSN logs in as.
    pub fn user(&self) -> &str {
        self.dsn.config.get_user().unwrap_or_default()
    }

    /// A connection to `color`, in `database` (the DSN's own when `None`).
    pub async fn connect(&self, color: Color, database: Option<&str>) -> Result<Client, String> {
        let target = ColorTarget {
            color,
            backend: self.config.backend(color),
            backend_tls: self.tls[color.index()].clone(),
            database,
            application_name: APPLICATION_NAME,
        };
        let shown = database.map_or_else(|| self.default_database(), str::to_string);
        dsn::connect(&self.dsn, target).await.map_err(|error| {
            format!(
                "cannot reach {color} ({}) as {} in database {shown} with [cutover] dsn: {error}",
                self.config.backend(color).address(),
                self.user()
            )
        })
    }
}

/// A failed catalog query, with the color and what was being read.
pub fn query_error(color: Color, what: &str, error: &tokio_postgres::Error) -> String {
    format!("cannot read {what} on {color}: {}", error_text(error))
}

/// Every database in which the subscriber has subscriptions, with the facts
/// [`super::setup::plan_setup`] judges.
pub async fn read_replication(
    connections: &Connections,
    direction: Direction,
) -> Result<Vec<DatabaseFacts>, String> {
    let Direction {
        publisher,
        subscriber,
    } = direction;
    let cluster = connections.connect(subscriber, None).await?;
    let rows = cluster
        .query(
            "SELECT s.subname::text, d.datname::text, s.subenabled, s.subpublications::text[] \
             FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid = s.subdbid \
             ORDER BY 2, 1",
            &[],
        )
        .await
        .map_err(|error| query_error(subscriber, "pg_subscription", &error))?;
    let mut by_database: BTreeMap<String, Vec<SubscriptionFacts>> = BTreeMap::new();
    for row in rows {
        by_database
            .entry(row.get(1))
            .or_default()
            .push(SubscriptionFacts {
                name: row.get(0),
                enabled: row.get(2),
                publications: row.get(3),
                tables: Vec::new(),
            });
    }
    let mut databases = Vec::new();
    for (database, mut subscriptions) in by_database {
        let on_subscriber = connections.connect(subscriber, Some(&database)).await?;
        let marker_on_subscriber = marker_exists(&on_subscriber, subscriber).await?;
        let rels = on_subscriber
            .query(
                "SELECT s.subname::text, n.nspname || '.' || c.relname, r.srsubstate::text \
                 FROM pg_catalog.pg_subscription_rel r \
                 JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid \
                 JOIN pg_catalog.pg_class c ON c.oid = r.srrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(|error| query_error(subscriber, "pg_subscription_rel", &error))?;
        for row in rels {
            let name: String = row.get(0);
            let state: String = row.get(2);
            if let Some(subscription) = subscriptions.iter_mut().find(|s| s.name == name) {
                subscription
                    .tables
                    .push((row.get(1), state.chars().next().unwrap_or('?')));
            }
        }
        let mut wanted: Vec<String> = subscriptions
            .iter()
            .flat_map(|s| s.publications.iter().cloned())
            .collect();
        wanted.sort();
        wanted.dedup();
        let on_publisher = connections.connect(publisher, Some(&database)).await?;
        let marker_on_publisher = marker_exists(&on_publisher, publisher).await?;
        let publications = on_publisher
            .query(
                "SELECT p.pubname::text, p.puballtables, EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
                 FROM pg_catalog.pg_publication p WHERE p.pubname = ANY($1::text[]) ORDER BY 1",
                &[&wanted, &MARKER_SCHEMA, &MARKER_TABLE],
            )
            .await
            .map_err(|error| query_error(publisher, "pg_publication", &error))?
            .into_iter()
            .map(|row| PublicationFacts {
                name: row.get(0),
                all_tables: row.get(1),
                has_marker: row.get(2),
            })
            .collect();
        databases.push(DatabaseFacts {
            database,
            marker_on_publisher,
            marker_on_subscriber,
            publications,
            subscriptions,
        });
    }
    Ok(databases)
}

/// The marker table's OID, from the catalog (`to_regclass` would need USAGE on the schema).
fn marker_oid() -> String {
    format!(
        "(SELECT c.oid FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = '{MARKER_SCHEMA}' AND c.relname = '{MARKER_TABLE}')"
    )
}

async fn marker_exists(client: &Client, color: Color) -> Result<bool, String> {
    client
        .query_one(&format!("SELECT {} IS NOT NULL", marker_oid()), &[])
        .await
        .map(|row| row.get(0))
        .map_err(|error| query_error(color, "the marker table", &error))
}

/// Runs one setup statement (each alone: `REFRESH PUBLICATION` refuses a transaction block).
pub async fn apply(connections: &Connections, step: &SqlStep) -> Result<(), String> {
    let client = connections
        .connect(step.color, Some(&step.database))
        .await?;
    client.batch_execute(&step.sql).await.map_err(|error| {
        format!(
            "on {}, database {}: {} failed: {}",
            step.color,
            step.database,
            step.sql,
            error_text(&error)
        )
    })
}

/// `ALTER SUBSCRIPTION … DISABLE` on `color` in `database`.
pub async fn disable_subscription(
    connections: &Connections,
    color: Color,
    database: &str,
    name: &str,
) -> Result<(), String> {
    let client = connections.connect(color, Some(database)).await?;
    client
        .batch_execute(&format!(
            "ALTER SUBSCRIPTION {} DISABLE",
            crate::probe::table::quote_identifier(name)
        ))
        .await
        .map_err(|error| error_text(&error))
}

/// The reverse slot's state on `color`: whether it exists, and the publications there.
pub async fn read_reverse(
    client: &Client,
    color: Color,
    slot: &str,
) -> Result<super::guardrails::ReverseFacts, String> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1), \
             ARRAY(SELECT pubname::text FROM pg_catalog.pg_publication ORDER BY 1)",
            &[&slot],
        )
        .await
        .map_err(|error| query_error(color, "replication slots and publications", &error))?;
    Ok(super::guardrails::ReverseFacts {
        slot: slot.to_string(),
        slot_exists: row.get(0),
        publications: row.get(1),
    })
}

/// Creates the logical replication slot `slot` (pgoutput) on `color`; its LSN.
pub async fn create_slot(
    connections: &Connections,
    color: Color,
    slot: &str,
    database: &str,
) -> Result<String, String> {
    let client = connections.connect(color, Some(database)).await?;
    client
        .query_one(
            "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|error| {
            format!(
                "cannot create replication slot {slot} on {color}: {}",
                error_text(&error)
            )
        })
}

/// Whether `color` has any subscription (any database).
pub async fn has_subscriptions(connections: &Connections, color: Color) -> Result<bool, String> {
    let client = connections.connect(color, None).await?;
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_subscription)",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|error| query_error(color, "pg_subscription", &error))
}

/// Whether the new color can take the sessions: recovery, connection slots.
pub async fn read_health(client: &Client, color: Color) -> Result<ColorHealth, String> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_is_in_recovery(), \
             pg_catalog.current_setting('max_connections')::int8, \
             pg_catalog.current_setting('superuser_reserved_connections')::int8, \
             (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend')::int8",
            &[],
        )
        .await
        .map_err(|error| query_error(color, "the server's state", &error))?;
    Ok(ColorHealth {
        in_recovery: row.get(0),
        max_connections: row.get(1),
        reserved_connections: row.get(2),
        client_backends: row.get(3),
    })
}

/// Every client backend of `color` but the one asking.
pub async fn read_client_backends(
    client: &Client,
    color: Color,
) -> Result<Vec<ClientBackend>, String> {
    let rows = client
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(datname::text, ''), \
             coalesce(application_name, ''), coalesce(host(client_addr), 'local'), \
             extract(epoch FROM now() - xact_start)::float8 \
             FROM pg_catalog.pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid() ORDER BY pid",
            &[],
        )
        .await
        .map_err(|error| query_error(color, "pg_stat_activity", &error))?;
    Ok(rows
        .into_iter()
        .map(|row| ClientBackend {
            pid: row.get(0),
            user: row.get(1),
            database: row.get(2),
            application_name: row.get(3),
            client_addr: row.get(4),
            transaction_age: row
                .get::<_, Option<f64>>(5)
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                .map(Duration::from_secs_f64),
        })
        .collect())
}

/// Two-phase-commit transactions prepared on `color`.
pub async fn read_prepared_xacts(
    client: &Client,
    color: Color,
) -> Result<Vec<PreparedXact>, String> {
    let rows = client
        .query(
            "SELECT gid, owner::text, database::text FROM pg_catalog.pg_prepared_xacts ORDER BY prepared",
            &[],
        )
        .await
        .map_err(|error| query_error(color, "pg_prepared_xacts", &error))?;
    Ok(rows
        .into_iter()
        .map(|row| PreparedXact {
            gid: row.get(0),
            owner: row.get(1),
            database: row.get(2),
        })
        .collect())
}

/// Role and database settings (`ALTER ROLE … SET`, `ALTER DATABASE … SET`), one line each, as
/// the statement that makes them.
pub async fn read_role_settings(client: &Client, color: Color) -> Result<Vec<String>, String> {
    let rows = client
        .query(
            "SELECT r.rolname::text, d.datname::text, setting \
             FROM pg_catalog.pg_db_role_setting s \
             LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole \
             LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase, \
             unnest(s.setconfig) AS setting ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .map_err(|error| query_error(color, "pg_db_role_setting", &error))?;
    Ok(rows
        .into_iter()
        .map(|row| {
            super::guardrails::setting_statement(
                row.get::<_, Option<String>>(0).as_deref(),
                row.get::<_, Option<String>>(1).as_deref(),
                row.get(2),
            )
        })
        .collect())
}

/// What the DSN's role may do on one color, for the privilege checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleFacts {
    pub superuser: bool,
    pub replication: bool,
    pub reads_all_stats: bool,
}

pub async fn read_role(client: &Client, color: Color) -> Result<RoleFacts, String> {
    let row = client
        .query_one(
            "SELECT rolsuper, rolreplication, \
             pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
             FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|error| query_error(color, "the role's attributes", &error))?;
    Ok(RoleFacts {
        superuser: row.get(0),
        replication: row.get(1),
        reads_all_stats: row.get(2),
    })
}

/// Privileges in one database: on the marker table (when it exists), over each subscription
/// (owner), on sequences. Each missing one is a line saying what to grant.
pub async fn missing_privileges_in(
    client: &Client,
    color: Color,
    database: &str,
    needs: DatabaseNeeds,
) -> Result<Vec<String>, String> {
    let qualified = format!("{MARKER_SCHEMA}.{MARKER_TABLE}");
    let row = client
        .query_one(
            &format!(
                "SELECT CASE WHEN {marker} IS NULL THEN NULL \
                 ELSE pg_catalog.has_schema_privilege($1, 'USAGE') \
                 AND pg_catalog.has_table_privilege({marker}, $2) END, \
                 pg_catalog.has_database_privilege(current_database(), 'CREATE'), \
                 current_user::text",
                marker = marker_oid()
            ),
            &[&MARKER_SCHEMA, &needs.marker_privileges()],
        )
        .await
        .map_err(|error| query_error(color, "privileges", &error))?;
    let marker: Option<bool> = row.get(0);
    let can_create: bool = row.get(1);
    let user: String = row.get(2);
    let mut missing = Vec::new();
    match marker {
        Some(false) => missing.push(format!(
            "{color}, database {database}: {user} lacks {} on {qualified} (GRANT USAGE ON SCHEMA {MARKER_SCHEMA} TO {user}; GRANT {} ON {qualified} TO {user};)",
            needs.marker_privileges(),
            needs.marker_privileges()
        )),
        None if !can_create => missing.push(format!(
            "{color}, database {database}: {qualified} does not exist and {user} may not create schemas (GRANT CREATE ON DATABASE {database} TO {user}; or run cutover-setup as an owner)"
        )),
        _ => {}
    }
    if needs.own_subscriptions {
        let rows = client
            .query(
                "SELECT s.subname::text FROM pg_catalog.pg_subscription s \
                 WHERE s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
                 AND NOT pg_catalog.pg_has_role(current_user, s.subowner, 'USAGE') ORDER BY 1",
                &[],
            )
            .await
            .map_err(|error| query_error(color, "subscription owners", &error))?;
        for row in rows {
            let name: String = row.get(0);
            missing.push(format!(
                "{color}, database {database}: {user} does not own subscription {name} (cutover disables and refreshes it: ALTER SUBSCRIPTION {name} OWNER TO {user};)"
            ));
        }
    }
    if let Some(privilege) = needs.sequences {
        let row = client
            .query_one(
                "SELECT count(*)::int8 FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND CASE WHEN c.relkind = 'S' \
                     THEN NOT pg_catalog.has_sequence_privilege(c.oid, $1) ELSE false END",
                &[&privilege],
            )
            .await
            .map_err(|error| query_error(color, "sequence privileges", &error))?;
        let count: i64 = row.get(0);
        if count > 0 {
            missing.push(format!(
                "{color}, database {database}: {user} lacks {privilege} on {count} sequence(s) (sync_sequences: GRANT {privilege} ON ALL SEQUENCES IN SCHEMA … TO {user};)"
            ));
        }
    }
    Ok(missing)
}

/// What the cutover does in one database on one color.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseNeeds {
    /// The marker is written here (the publisher), not only read.
    pub writes_marker: bool,
    pub own_subscriptions: bool,
    /// `sync_sequences`: the privilege needed on every sequence (`SELECT` to read, `UPDATE`
    /// to set).
    pub sequences: Option<&'static str>,
}

impl DatabaseNeeds {
    fn marker_privileges(&self) -> &'static str {
        if self.writes_marker {
            "SELECT, INSERT, UPDATE"
        } else {
            "SELECT"
        }
    }
}

/// One marker written: the token to look for on the subscriber, per (database, publication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerWrite {
    pub database: String,
    pub publication: String,
    pub token: String,
}

/// The connections catch-up writes and reads its markers through, one pair per replicated
/// database, opened before the freeze so that the freeze does not pay for them.
pub struct MarkerLinks {
    direction: Direction,
    links: Vec<MarkerLink>,
}

struct MarkerLink {
    database: String,
    publications: Vec<String>,
    publisher: Client,
    subscriber: Client,
}

impl MarkerLinks {
    /// Opens both connections of every database in `databases`.
    pub async fn open(
        connections: &Connections,
        direction: Direction,
        databases: &[DatabaseFacts],
    ) -> Result<MarkerLinks, String> {
        let mut links = Vec::new();
        for facts in databases {
            links.push(MarkerLink {
                database: facts.database.clone(),
                publications: facts.publications.iter().map(|p| p.name.clone()).collect(),
                publisher: connections
                    .connect(direction.publisher, Some(&facts.database))
                    .await?,
                subscriber: connections
                    .connect(direction.subscriber, Some(&facts.database))
                    .await?,
            });
        }
        Ok(MarkerLinks { direction, links })
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Writes one marker row per publication on the publisher, one transaction per database,
    /// committed with `synchronous_commit = on`: the WAL up to the marker is flushed, so the
    /// walsender sends it (and everything committed before it) at once.
    pub async fn write(&mut self, token: &str) -> Result<Vec<MarkerWrite>, String> {
        let publisher = self.direction.publisher;
        let upsert = format!(
            "INSERT INTO {MARKER_SCHEMA}.{MARKER_TABLE} (publication, token, written_at) VALUES ($1, $2, now()) \
             ON CONFLICT (publication) DO UPDATE SET token = EXCLUDED.token, written_at = EXCLUDED.written_at"
        );
        let mut written = Vec::new();
        for link in &mut self.links {
            let transaction =
                link.publisher.transaction().await.map_err(|error| {
                    query_error(publisher, "a transaction for the marker", &error)
                })?;
            transaction
                .batch_execute("SET LOCAL synchronous_commit = on")
                .await
                .map_err(|error| query_error(publisher, "the marker (setting)", &error))?;
            for publication in &link.publications {
                transaction
                    .execute(&upsert, &[publication, &token])
                    .await
                    .map_err(|error| query_error(publisher, "the marker (write)", &error))?;
                written.push(MarkerWrite {
                    database: link.database.clone(),
                    publication: publication.clone(),
                    token: token.to_string(),
                });
            }
            transaction
                .commit()
                .await
                .map_err(|error| query_error(publisher, "the marker (commit)", &error))?;
        }
        Ok(written)
    }

    /// The markers of `written` that the subscriber does not show yet.
    pub async fn missing(&self, written: &[MarkerWrite]) -> Result<Vec<MarkerWrite>, String> {
        let subscriber = self.direction.subscriber;
        let query = format!(
            "SELECT EXISTS (SELECT 1 FROM {MARKER_SCHEMA}.{MARKER_TABLE} WHERE publication = $1 AND token = $2)"
        );
        let mut missing = Vec::new();
        for marker in written {
            let Some(link) = self
                .links
                .iter()
                .find(|link| link.database == marker.database)
            else {
                continue;
            };
            let seen: bool = link
                .subscriber
                .query_one(&query, &[&marker.publication, &marker.token])
                .await
                .map_err(|error| query_error(subscriber, "the marker (read)", &error))?
                .get(0);
            if !seen {
                missing.push(marker.clone());
            }
        }
        Ok(missing)
    }
}
