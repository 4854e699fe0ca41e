//! The probe's table on the databases: `--setup BLUE_DSN,GREEN_DSN` creates it without
//! breaking logical replication, and the checks made before a run (the table exists, has the
//! probe's columns, and the user may use it).
//!
//! Setup creates the table on green first, then on blue: a table created on blue under a
//! `FOR ALL TABLES` publication before green has it stops the operator's whole subscription.
//! When blue has publications, the table must reach green through one of them: setup finds the
//! publications that carry it (`pg_publication_tables`, which lists `FOR ALL TABLES` ones too)
//! and green's subscriptions to them, and waits (up to `--verify-timeout`) for the table to be
//! in state `r` in `pg_subscription_rel`. Until then it fails with the exact
//! `ALTER PUBLICATION … ADD TABLE` / `ALTER SUBSCRIPTION … REFRESH PUBLICATION` commands to
//! run — it never runs them itself, and never touches any other table. When CREATE is refused,
//! it names the missing grant (PostgreSQL 15 stopped granting CREATE on schema `public` to
//! everyone). The messages and commands are built by pure functions, tested without a database.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use super::connection::{Target, error_text, open};
use super::table::{TableName, quote_identifier};

/// Pause between looks at green's subscription state.
const SYNC_POLL: Duration = Duration::from_millis(250);

/// The first server version whose schema `public` no longer grants CREATE to everyone.
const PG15: i32 = 150_000;

/// A setup or preflight problem: the message says what is wrong and what to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError(pub String);

impl std::fmt::Display for SetupError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A publication on blue and whether it is `FOR ALL TABLES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub name: String,
    pub all_tables: bool,
}

/// A subscription on green, its publications, and the table's state in it (`None`: the
/// subscription does not know the table yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub name: String,
    pub enabled: bool,
    pub publications: Vec<String>,
    pub table_state: Option<char>,
}

/// How the table stands with logical replication from blue to green.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// Blue publishes nothing: the table is not replicated (verifying against green would
    /// find every row missing).
    NotReplicated,
    /// Green's subscription has the table in state `r`.
    Ready { subscription: String },
    /// The table is not replicated yet: the message says why and what to run.
    NotReady(String),
}

/// Judges the replication of `table` from blue's publications and green's subscriptions.
pub fn judge_replication(
    table: &TableName,
    publications: &[Publication],
    carrying: &[String],
    subscriptions: &[Subscription],
) -> Replication {
    if publications.is_empty() {
        return Replication::NotReplicated;
    }
    if carrying.is_empty() {
        let mut message = format!(
            "blue publishes tables through logical replication, but none of its publications carries {table}, so the probe's writes would never reach green. Run on blue (one of):"
        );
        for publication in publications.iter().filter(|p| !p.all_tables) {
            message.push_str(&format!(
                "\n  ALTER PUBLICATION {} ADD TABLE {};",
                quote_identifier(&publication.name),
                table.quoted()
            ));
        }
        message.push_str("\nthen on green:");
        let relevant: Vec<&Subscription> = subscriptions
            .iter()
            .filter(|subscription| {
                subscription
                    .publications
                    .iter()
                    .any(|name| publications.iter().any(|p| &p.name == name))
            })
            .collect();
        if relevant.is_empty() {
            message.push_str("\n  ALTER SUBSCRIPTION <the subscription to that publication> REFRESH PUBLICATION;");
        }
        for subscription in relevant {
            message.push_str(&format!(
                "\n  ALTER SUBSCRIPTION {} REFRESH PUBLICATION;",
                quote_identifier(&subscription.name)
            ));
        }
        message.push_str("\nand run --setup again.");
        return Replication::NotReady(message);
    }
    let subscribed: Vec<&Subscription> = subscriptions
        .iter()
        .filter(|subscription| {
            subscription
                .publications
                .iter()
                .any(|name| carrying.contains(name))
        })
        .collect();
    if subscribed.is_empty() {
        return Replication::NotReady(format!(
            "blue publishes {table} (publication {}), but green has no subscription to it in this database, so nothing reaches green. Create one on green, e.g.:\n  CREATE SUBSCRIPTION <name> CONNECTION '<blue DSN>' PUBLICATION {};\nand run --setup again.",
            carrying.join(", "),
            carrying
                .iter()
                .map(|name| quote_identifier(name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(ready) = subscribed
        .iter()
        .find(|subscription| subscription.enabled && subscription.table_state == Some('r'))
    {
        return Replication::Ready {
            subscription: ready.name.clone(),
        };
    }
    let mut reasons = Vec::new();
    for subscription in &subscribed {
        let name = quote_identifier(&subscription.name);
        reasons.push(match (subscription.enabled, subscription.table_state) {
            (false, _) => format!(
                "green's subscription {} is disabled; run on green:\n  ALTER SUBSCRIPTION {name} ENABLE;",
                subscription.name
            ),
            (true, None) => format!(
                "green's subscription {} does not have {table} yet; run on green:\n  ALTER SUBSCRIPTION {name} REFRESH PUBLICATION;",
                subscription.name
            ),
            (true, Some(state)) => format!(
                "green's subscription {} is still copying {table} (state {state}: {}); wait until it reaches r (ready)",
                subscription.name,
                describe_state(state)
            ),
        });
    }
    Replication::NotReady(format!(
        "{table} is not replicated to green yet: {}\nand run --setup again.",
        reasons.join("\n")
    ))
}

/// `pg_subscription_rel.srsubstate` in words.
pub fn describe_state(state: char) -> &'static str {
    match state {
        'i' => "initialize",
        'd' => "data is being copied",
        'f' => "finished table copy",
        's' => "synchronized",
        'r' => "ready",
        _ => "unknown",
    }
}

/// The message for a CREATE refused for want of a privilege on the schema.
pub fn missing_grant_message(
    color: &str,
    table: &TableName,
    user: &str,
    server_version: i32,
    has_usage: bool,
    has_create: bool,
) -> String {
    let schema = quote_identifier(&table.schema);
    let user_sql = quote_identifier(user);
    let missing: Vec<&str> = [
        (!has_usage).then_some("USAGE"),
        (!has_create).then_some("CREATE"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let grants = if missing.is_empty() {
        "CREATE".to_string()
    } else {
        missing.join(", ")
    };
    let mut message = format!(
        "cannot create {table} on {color}: {user} lacks {grants} on schema {}. As the schema's owner, run on {color}:\n  GRANT {grants} ON SCHEMA {schema} TO {user_sql};",
        table.schema
    );
    if server_version >= PG15 && table.schema == "public" {
        message.push_str(
            "\n(PostgreSQL 15 and later no longer grant CREATE on schema public to everyone.)",
        );
    }
    message.push_str("\nOr pick a schema the user may create in with --table schema.name.");
    message
}

/// Creates the table on green, then on blue, and checks that blue's publications carry it to
/// green, waiting up to `wait` for the initial copy. `progress` hears each step done.
pub async fn set_up(
    blue: &Target,
    green: &Target,
    table: &TableName,
    wait: Duration,
    mut progress: impl FnMut(&str),
) -> Result<(), SetupError> {
    let green_client = connect("green", green).await?;
    let blue_client = connect("blue", blue).await?;
    create_table(&green_client, "green", green, table).await?;
    progress(&format!("{table} is ready on green ({})", green.label));
    create_table(&blue_client, "blue", blue, table).await?;
    progress(&format!("{table} is ready on blue ({})", blue.label));

    let started = Instant::now();
    loop {
        let publications = blue_publications(&blue_client).await?;
        let carrying = blue_publications_carrying(&blue_client, table).await?;
        let subscriptions = green_subscriptions(&green_client, table).await?;
        match judge_replication(table, &publications, &carrying, &subscriptions) {
            Replication::NotReplicated => {
                progress(&format!(
                    "blue has no publication: {table} is not replicated (--verify against green would find every write missing)"
                ));
                break;
            }
            Replication::Ready { subscription } => {
                progress(&format!(
                    "{table} replicates from blue to green (subscription {subscription}, state r)"
                ));
                break;
            }
            Replication::NotReady(message) => {
                let still_copying = subscriptions.iter().any(|subscription| {
                    subscription.enabled
                        && subscription.table_state.is_some_and(|state| state != 'r')
                });
                if !still_copying || started.elapsed() + SYNC_POLL > wait {
                    return Err(SetupError(message));
                }
                tokio::time::sleep(SYNC_POLL).await;
            }
        }
    }
    Ok(())
}

async fn connect(color: &str, target: &Target) -> Result<Client, SetupError> {
    open(target)
        .await
        .map(|connection| connection.client)
        .map_err(|failure| {
            SetupError(format!(
                "cannot connect to {color} ({}): {}",
                target.label, failure.message
            ))
        })
}

async fn create_table(
    client: &Client,
    color: &str,
    target: &Target,
    table: &TableName,
) -> Result<(), SetupError> {
    let Err(error) = client.batch_execute(&table.create_statement()).await else {
        return Ok(());
    };
    let code = error.code().map(|code| code.code().to_string());
    match code.as_deref() {
        Some("42501") => {
            let facts = client
                .query_one(
                    "SELECT current_setting('server_version_num')::int, current_user::text, \
                     has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE')",
                    &[&table.schema],
                )
                .await;
            let message = match facts {
                Ok(row) => missing_grant_message(
                    color,
                    table,
                    &row.try_get::<_, String>(1)
                        .unwrap_or_else(|_| target.user()),
                    row.try_get(0).unwrap_or(0),
                    row.try_get(2).unwrap_or(false),
                    row.try_get(3).unwrap_or(false),
                ),
                Err(_) => format!(
                    "cannot create {table} on {color} ({}): {}",
                    target.label,
                    error_text(&error)
                ),
            };
            Err(SetupError(message))
        }
        Some("3F000") => Err(SetupError(format!(
            "cannot create {table} on {color} ({}): schema {} does not exist there",
            target.label, table.schema
        ))),
        _ => Err(SetupError(format!(
            "cannot create {table} on {color} ({}): {}",
            target.label,
            error_text(&error)
        ))),
    }
}

async fn blue_publications(client: &Client) -> Result<Vec<Publication>, SetupError> {
    let rows = client
        .query(
            "SELECT pubname::text, puballtables FROM pg_publication ORDER BY pubname",
            &[],
        )
        .await
        .map_err(|error| catalog_error("blue", "pg_publication", &error))?;
    rows.iter()
        .map(|row| {
            Ok(Publication {
                name: row
                    .try_get(0)
                    .map_err(|error| catalog_error("blue", "pg_publication", &error))?,
                all_tables: row
                    .try_get(1)
                    .map_err(|error| catalog_error("blue", "pg_publication", &error))?,
            })
        })
        .collect()
}

async fn blue_publications_carrying(
    client: &Client,
    table: &TableName,
) -> Result<Vec<String>, SetupError> {
    let rows = client
        .query(
            "SELECT DISTINCT pubname::text FROM pg_publication_tables \
             WHERE schemaname = $1 AND tablename = $2 ORDER BY 1",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|error| catalog_error("blue", "pg_publication_tables", &error))?;
    rows.iter()
        .map(|row| {
            row.try_get(0)
                .map_err(|error| catalog_error("blue", "pg_publication_tables", &error))
        })
        .collect()
}

async fn green_subscriptions(
    client: &Client,
    table: &TableName,
) -> Result<Vec<Subscription>, SetupError> {
    let rows = client
        .query(
            "SELECT s.subname::text, s.subenabled, s.subpublications::text[], \
                    (SELECT r.srsubstate::text FROM pg_subscription_rel r \
                      WHERE r.srsubid = s.oid AND r.srrelid = to_regclass($1)) \
               FROM pg_subscription s \
               JOIN pg_database d ON d.oid = s.subdbid \
              WHERE d.datname = current_database() \
              ORDER BY s.subname",
            &[&table.quoted()],
        )
        .await
        .map_err(|error| catalog_error("green", "pg_subscription", &error))?;
    rows.iter()
        .map(|row| {
            let state: Option<String> = row
                .try_get(3)
                .map_err(|error| catalog_error("green", "pg_subscription_rel", &error))?;
            Ok(Subscription {
                name: row
                    .try_get(0)
                    .map_err(|error| catalog_error("green", "pg_subscription", &error))?,
                enabled: row
                    .try_get(1)
                    .map_err(|error| catalog_error("green", "pg_subscription", &error))?,
                publications: row
                    .try_get(2)
                    .map_err(|error| catalog_error("green", "pg_subscription", &error))?,
                table_state: state.and_then(|state| state.chars().next()),
            })
        })
        .collect()
}

fn catalog_error(color: &str, catalog: &str, error: &tokio_postgres::Error) -> SetupError {
    SetupError(format!(
        "cannot read {catalog} on {color}: {}",
        error_text(error)
    ))
}

/// Before a run: the table exists on `target`, has the probe's columns, and the user may read
/// it (and insert into it when `writes`). `role` names the database in messages.
pub async fn check_table(
    client: &Client,
    role: &str,
    target: &Target,
    table: &TableName,
    writes: bool,
) -> Result<(), SetupError> {
    let failed = |error: &tokio_postgres::Error| {
        SetupError(format!(
            "cannot check {table} on {role} ({}): {}",
            target.label,
            error_text(error)
        ))
    };
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, current_user::text",
            &[&table.quoted()],
        )
        .await
        .map_err(|error| failed(&error))?;
    let exists: bool = row.try_get(0).map_err(|error| failed(&error))?;
    let user: String = row.try_get(1).map_err(|error| failed(&error))?;
    if !exists {
        return Err(SetupError(format!(
            "{table} does not exist on {role} ({}): create it with `pgshift probe --setup BLUE_DSN,GREEN_DSN --table {table}` (green first, then blue, so logical replication keeps working){}",
            target.label,
            if role == "--dsn" {
                ""
            } else {
                "; on a database fed by replication it may not have arrived yet"
            }
        )));
    }
    let row = client
        .query_one(
            "SELECT has_table_privilege($1, 'SELECT'), has_table_privilege($1, 'INSERT')",
            &[&table.quoted()],
        )
        .await
        .map_err(|error| failed(&error))?;
    let may_select: bool = row.try_get(0).map_err(|error| failed(&error))?;
    let may_insert: bool = row.try_get(1).map_err(|error| failed(&error))?;
    let missing: Vec<&str> = [
        (!may_select).then_some("SELECT"),
        (writes && !may_insert).then_some("INSERT"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        return Err(SetupError(format!(
            "{user} may not use {table} on {role} ({}): run as its owner:\n  GRANT {} ON {} TO {};",
            target.label,
            missing.join(", "),
            table.quoted(),
            quote_identifier(&user)
        )));
    }
    if let Err(error) = client.batch_execute(&table.shape_check_query()).await {
        return Err(SetupError(format!(
            "{table} on {role} ({}) is not the probe's table (run_id, client, seq, payload, created_at): {}",
            target.label,
            error_text(&error)
        )));
    }
    Ok(())
}

/// Opens a connection for a preflight check; an unreachable database is a setup error.
pub async fn connect_checked(role: &str, target: &Target) -> Result<Client, SetupError> {
    open(target)
        .await
        .map(|connection| connection.client)
        .map_err(|failure| {
            SetupError(format!(
                "cannot connect to {role} ({}): {}",
                target.label, failure.message
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableName {
        TableName::parse("public.pgshift_probe").expect("valid")
    }

    fn all_tables(name: &str) -> Publication {
        Publication {
            name: name.to_string(),
            all_tables: true,
        }
    }

    fn subscription(name: &str, publication: &str, state: Option<char>) -> Subscription {
        Subscription {
            name: name.to_string(),
            enabled: true,
            publications: vec![publication.to_string()],
            table_state: state,
        }
    }

    #[test]
    fn no_publication_means_no_replication() {
        assert_eq!(
            judge_replication(&table(), &[], &[], &[]),
            Replication::NotReplicated
        );
    }

    #[test]
    fn a_published_table_without_a_subscription_on_green_is_not_ready() {
        let Replication::NotReady(message) = judge_replication(
            &table(),
            &[all_tables("cutover")],
            &["cutover".to_string()],
            &[],
        ) else {
            panic!("should not be ready");
        };
        assert!(message.contains("green has no subscription"), "{message}");
        assert!(
            message.contains(
                "CREATE SUBSCRIPTION <name> CONNECTION '<blue DSN>' PUBLICATION \"cutover\";"
            ),
            "{message}"
        );
    }

    #[test]
    fn a_subscription_that_does_not_know_the_table_needs_a_refresh() {
        let Replication::NotReady(message) = judge_replication(
            &table(),
            &[all_tables("cutover")],
            &["cutover".to_string()],
            &[subscription("from_blue", "cutover", None)],
        ) else {
            panic!("should not be ready");
        };
        assert!(
            message.contains("ALTER SUBSCRIPTION \"from_blue\" REFRESH PUBLICATION;"),
            "{message}"
        );
    }

    #[test]
    fn a_copy_in_progress_is_not_ready_and_state_r_is() {
        let publications = [all_tables("cutover")];
        let carrying = ["cutover".to_string()];
        let Replication::NotReady(message) = judge_replication(
            &table(),
            &publications,
            &carrying,
            &[subscription("from_blue", "cutover", Some('d'))],
        ) else {
            panic!("should not be ready");
        };
        assert!(
            message.contains("state d: data is being copied"),
            "{message}"
        );
        assert_eq!(
            judge_replication(
                &table(),
                &publications,
                &carrying,
                &[subscription("from_blue", "cutover", Some('r'))],
            ),
            Replication::Ready {
                subscription: "from_blue".to_string()
            }
        );
        let mut disabled = subscription("from_blue", "cutover", Some('r'));
        disabled.enabled = false;
        let Replication::NotReady(message) =
            judge_replication(&table(), &publications, &carrying, &[disabled])
        else {
            panic!("a disabled subscription is not ready");
        };
        assert!(
            message.contains("ALTER SUBSCRIPTION \"from_blue\" ENABLE;"),
            "{message}"
        );
    }

    #[test]
    fn a_table_no_publication_carries_needs_adding_to_one() {
        let publications = [Publication {
            name: "orders".to_string(),
            all_tables: false,
        }];
        let Replication::NotReady(message) = judge_replication(
            &table(),
            &publications,
            &[],
            &[subscription("from_blue", "orders", Some('r'))],
        ) else {
            panic!("should not be ready");
        };
        assert!(
            message
                .contains("ALTER PUBLICATION \"orders\" ADD TABLE \"public\".\"pgshift_probe\";"),
            "{message}"
        );
        assert!(
            message.contains("ALTER SUBSCRIPTION \"from_blue\" REFRESH PUBLICATION;"),
            "{message}"
        );
    }

    #[test]
    fn a_refused_create_names_the_missing_grant() {
        let message = missing_grant_message("green", &table(), "app", 150_004, true, false);
        assert!(
            message.contains("GRANT CREATE ON SCHEMA \"public\" TO \"app\";"),
            "{message}"
        );
        assert!(message.contains("PostgreSQL 15"), "{message}");
        let locked = TableName::parse("locked.probe").expect("valid");
        let message = missing_grant_message("blue", &locked, "app", 140_000, false, false);
        assert!(
            message.contains("GRANT USAGE, CREATE ON SCHEMA \"locked\" TO \"app\";"),
            "{message}"
        );
        assert!(!message.contains("PostgreSQL 15"), "{message}");
    }
}
