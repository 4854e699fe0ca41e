//! The guardrails a transparent cutover passes before it changes anything: the new color is
//! reachable, writable, and has slots for the sessions to move; replication is set up and
//! caught up on every table; the old color has no long transaction, no prepared transaction
//! and no client this pgshift does not own (their writes after the marker would be lost; `--force`
//! overrides that one); role and database settings are the same on both colors; the DSN's
//! role may do what the steps need. [`judge`] is pure; [`gather`] reads the facts.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::catalog::{self, Connections, DatabaseNeeds};
use super::setup::{DatabaseFacts, Direction, SetupPlan, plan_setup};
use crate::probe::table::{quote_identifier, quote_literal};

/// The application_name of pgshift's own `auth_query` connections (never foreign).
const AUTH_APPLICATION_NAME: &str = "pgshift auth_query";

/// How long a backend pgshift does not know yet is given to finish its login before it counts
/// as foreign (a session's backend is known once its login completes).
const LOGIN_GRACE: Duration = Duration::from_millis(300);

/// The most backends listed by name in one refusal.
const LISTED: usize = 10;

/// The new color's state, from `pg_is_in_recovery` and `pg_stat_activity`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColorHealth {
    pub in_recovery: bool,
    pub max_connections: i64,
    pub reserved_connections: i64,
    pub client_backends: i64,
}

impl ColorHealth {
    /// Connection slots a non-superuser can still take.
    pub fn free_slots(&self) -> i64 {
        self.max_connections - self.reserved_connections - self.client_backends
    }
}

/// A client backend on the old color.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientBackend {
    pub pid: i32,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    /// Age of its open transaction (`None`: idle, or not visible to the DSN's role).
    pub transaction_age: Option<Duration>,
}

impl ClientBackend {
    fn describe(&self) -> String {
        format!(
            "pid {} ({}@{}, application {:?}, from {})",
            self.pid, self.user, self.database, self.application_name, self.client_addr
        )
    }
}

/// A row of `pg_prepared_xacts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedXact {
    pub gid: String,
    pub owner: String,
    pub database: String,
}

/// One `pg_db_role_setting` entry as the statement that makes it.
pub fn setting_statement(role: Option<&str>, database: Option<&str>, setting: String) -> String {
    let (name, value) = setting
        .split_once('=')
        .map_or((setting.as_str(), ""), |(name, value)| (name, value));
    let set = format!("SET {name} = {}", quote_literal(value));
    match (role, database) {
        (Some(role), Some(database)) => format!(
            "ALTER ROLE {} IN DATABASE {} {set}",
            quote_identifier(role),
            quote_identifier(database)
        ),
        (Some(role), None) => format!("ALTER ROLE {} {set}", quote_identifier(role)),
        (None, Some(database)) => {
            format!("ALTER DATABASE {} {set}", quote_identifier(database))
        }
        (None, None) => format!("ALTER ROLE ALL {set}"),
    }
}

/// Everything the guardrails judge.
#[derive(Debug, Clone)]
pub struct GuardFacts {
    pub direction: Direction,
    pub new_health: ColorHealth,
    pub sessions_to_move: usize,
    pub replication: SetupPlan,
    pub old_backends: Vec<ClientBackend>,
    /// Backend PIDs of this pgshift's sessions on the old color.
    pub owned_pids: HashSet<i32>,
    pub prepared: Vec<PreparedXact>,
    pub old_settings: Vec<String>,
    pub new_settings: Vec<String>,
    /// Privileges the DSN's role lacks, one line each.
    pub missing_privileges: Vec<String>,
    /// With `reverse_slot`: the slot to create on the new color, and what stands there now.
    pub reverse: Option<ReverseFacts>,
}

/// What the new color holds for `[cutover] reverse_slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseFacts {
    pub slot: String,
    /// A replication slot of that name exists already.
    pub slot_exists: bool,
    /// The new color's publications (one must exist before the slot: a logical slot decodes
    /// with the catalog as it was, so a publication created after it publishes nothing before
    /// its own creation).
    pub publications: Vec<String>,
}

/// Limits the guardrails apply.
#[derive(Debug, Clone, Copy)]
pub struct GuardOptions {
    pub max_txn_age: Duration,
    /// Foreign client backends on the old color do not refuse (`promote --force`).
    pub force: bool,
}

/// The guardrails' outcome: passed checks, refusals, and what `--force` let through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardReport {
    pub passed: Vec<String>,
    pub refusals: Vec<String>,
    pub overridden: Vec<String>,
}

impl GuardReport {
    pub fn refused(&self) -> bool {
        !self.refusals.is_empty()
    }
}

/// The backends on the old color that are not this pgshift's.
pub fn foreign_backends<'a>(
    backends: &'a [ClientBackend],
    owned: &HashSet<i32>,
) -> Vec<&'a ClientBackend> {
    backends
        .iter()
        .filter(|backend| {
            !owned.contains(&backend.pid)
                && backend.application_name != AUTH_APPLICATION_NAME
                && backend.application_name != catalog::APPLICATION_NAME
        })
        .collect()
}

fn listed<T>(items: &[T], describe: impl Fn(&T) -> String) -> String {
    let mut text: Vec<String> = items.iter().take(LISTED).map(describe).collect();
    if items.len() > LISTED {
        text.push(format!("and {} more", items.len() - LISTED));
    }
    text.join("; ")
}

/// Judges `facts`.
pub fn judge(facts: &GuardFacts, options: GuardOptions) -> GuardReport {
    let Direction {
        publisher: old,
        subscriber: new,
    } = facts.direction;
    let mut report = GuardReport::default();
    let mut check = |ok: bool, passed: String, refusal: String| {
        if ok {
            report.passed.push(passed);
        } else {
            report.refusals.push(refusal);
        }
    };

    let health = &facts.new_health;
    check(
        !health.in_recovery,
        format!("{new} is reachable and not in recovery"),
        format!("{new} is in recovery (a standby): it cannot take writes; promote it first"),
    );
    let free = health.free_slots();
    check(
        free >= facts.sessions_to_move as i64,
        format!(
            "{new} has {free} free connection slot(s) for {} session(s)",
            facts.sessions_to_move
        ),
        format!(
            "{new} has {free} free connection slot(s) but {} session(s) must move: raise its max_connections or close clients",
            facts.sessions_to_move
        ),
    );
    check(
        facts.replication.is_ready(),
        format!("replication {old} → {new} carries the marker, every table in state r"),
        format!(
            "replication {old} → {new} is not ready: {}",
            facts.replication.describe().join("\n  ")
        ),
    );
    check(
        facts.missing_privileges.is_empty(),
        "[cutover] dsn's role has the privileges the steps need".to_string(),
        format!(
            "[cutover] dsn's role lacks privileges: {}",
            facts.missing_privileges.join("; ")
        ),
    );
    let long: Vec<&ClientBackend> = facts
        .old_backends
        .iter()
        .filter(|backend| {
            backend
                .transaction_age
                .is_some_and(|age| age > options.max_txn_age)
        })
        .collect();
    check(
        long.is_empty(),
        format!(
            "no transaction on {old} older than {:?}",
            options.max_txn_age
        ),
        format!(
            "{} transaction(s) on {old} older than max_txn_age ({:?}): {}",
            long.len(),
            options.max_txn_age,
            listed(&long, |backend| format!(
                "{} open {:.1}s",
                backend.describe(),
                backend.transaction_age.unwrap_or_default().as_secs_f64()
            ))
        ),
    );
    check(
        facts.prepared.is_empty(),
        format!("no prepared transaction on {old}"),
        format!(
            "{} prepared transaction(s) on {old} (COMMIT PREPARED or ROLLBACK PREPARED them first): {}",
            facts.prepared.len(),
            listed(&facts.prepared, |xact| format!(
                "{:?} by {} in {}",
                xact.gid, xact.owner, xact.database
            ))
        ),
    );
    let old_settings: BTreeSet<&String> = facts.old_settings.iter().collect();
    let new_settings: BTreeSet<&String> = facts.new_settings.iter().collect();
    let only_old: Vec<&&String> = old_settings.difference(&new_settings).collect();
    let only_new: Vec<&&String> = new_settings.difference(&old_settings).collect();
    check(
        only_old.is_empty() && only_new.is_empty(),
        format!("role and database settings are the same on {old} and {new}"),
        format!(
            "role and database settings differ (sessions would behave differently after the move): only on {old}: [{}]; only on {new}: [{}]",
            listed(&only_old, |s| s.to_string()),
            listed(&only_new, |s| s.to_string())
        ),
    );
    if let Some(reverse) = &facts.reverse {
        check(
            !reverse.slot_exists,
            format!("no replication slot {} on {new} yet", reverse.slot),
            format!(
                "{new} has a replication slot {} already; drop it (SELECT pg_drop_replication_slot('{}');) or choose another reverse_slot",
                reverse.slot, reverse.slot
            ),
        );
        check(
            !reverse.publications.is_empty(),
            format!(
                "{new} publishes {} for the reverse replication",
                reverse.publications.join(", ")
            ),
            format!(
                "{new} has no publication for the reverse replication: create it before promoting (CREATE PUBLICATION pgshift_reverse FOR ALL TABLES; on {new}), or remove reverse_slot"
            ),
        );
    }
    let foreign = foreign_backends(&facts.old_backends, &facts.owned_pids);
    if foreign.is_empty() {
        report
            .passed
            .push(format!("every client backend on {old} is this pgshift's"));
    } else {
        let text = format!(
            "{} client backend(s) on {old} are not this pgshift's; their writes after the catch-up marker would not reach {new}: {}",
            foreign.len(),
            listed(&foreign, |backend| backend.describe())
        );
        if options.force {
            report.overridden.push(format!("--force: {text}"));
        } else {
            report
                .refusals
                .push(format!("{text} (stop them, or promote --force)"));
        }
    }
    report
}

/// What the DSN's role lacks for the cutover steps in `direction`, one line per grant.
pub async fn missing_privileges(
    connections: &Connections,
    direction: Direction,
    databases: &[DatabaseFacts],
    sync_sequences: bool,
    reverse_slot: bool,
) -> Result<Vec<String>, String> {
    let Direction {
        publisher: old,
        subscriber: new,
    } = direction;
    let mut missing = Vec::new();
    let user = connections.user();
    let old_role = catalog::read_role(&connections.connect(old, None).await?, old).await?;
    if !old_role.superuser && !old_role.reads_all_stats {
        missing.push(format!(
            "{old}: {user} must see every session's transaction (GRANT pg_read_all_stats TO {user};)"
        ));
    }
    if reverse_slot {
        let new_role = catalog::read_role(&connections.connect(new, None).await?, new).await?;
        if !new_role.superuser && !new_role.replication {
            missing.push(format!(
                "{new}: {user} needs REPLICATION to create the reverse slot (ALTER ROLE {user} REPLICATION;)"
            ));
        }
    }
    for facts in databases {
        let sides = [
            (
                old,
                DatabaseNeeds {
                    writes_marker: true,
                    own_subscriptions: false,
                    sequences: sync_sequences.then_some("SELECT"),
                },
            ),
            (
                new,
                DatabaseNeeds {
                    writes_marker: false,
                    own_subscriptions: true,
                    sequences: sync_sequences.then_some("UPDATE"),
                },
            ),
        ];
        for (color, needs) in sides {
            let client = connections.connect(color, Some(&facts.database)).await?;
            missing.extend(
                catalog::missing_privileges_in(&client, color, &facts.database, needs).await?,
            );
        }
    }
    Ok(missing)
}

/// Reads every fact the guardrails judge. `owned_pids` is asked twice when a backend is not
/// known at first: a session still logging in becomes known within [`LOGIN_GRACE`].
pub async fn gather(
    connections: &Connections,
    direction: Direction,
    sessions_to_move: usize,
    sync_sequences: bool,
    reverse_slot: Option<&str>,
    owned_pids: impl Fn() -> HashSet<i32>,
) -> Result<GuardFacts, String> {
    let Direction {
        publisher: old,
        subscriber: new,
    } = direction;
    let new_client = connections.connect(new, None).await?;
    let old_client = connections.connect(old, None).await?;
    let new_health = catalog::read_health(&new_client, new).await?;
    let databases = catalog::read_replication(connections, direction).await?;
    let replication = plan_setup(direction, &databases);

    let missing_privileges = missing_privileges(
        connections,
        direction,
        &databases,
        sync_sequences,
        reverse_slot.is_some(),
    )
    .await?;
    let reverse = match reverse_slot {
        Some(slot) => Some(catalog::read_reverse(&new_client, new, slot).await?),
        None => None,
    };

    let mut old_backends = catalog::read_client_backends(&old_client, old).await?;
    let mut owned = owned_pids();
    if !foreign_backends(&old_backends, &owned).is_empty() {
        tokio::time::sleep(LOGIN_GRACE).await;
        let again = catalog::read_client_backends(&old_client, old).await?;
        owned = owned_pids();
        // Still there, still unknown: foreign. Those gone meanwhile were short-lived.
        old_backends.retain(|backend| again.iter().any(|other| other.pid == backend.pid));
    }
    let prepared = catalog::read_prepared_xacts(&old_client, old).await?;
    let old_settings = catalog::read_role_settings(&old_client, old).await?;
    let new_settings = catalog::read_role_settings(&new_client, new).await?;
    Ok(GuardFacts {
        direction,
        new_health,
        sessions_to_move,
        replication,
        old_backends,
        owned_pids: owned,
        prepared,
        old_settings,
        new_settings,
        missing_privileges,
        reverse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;

    fn backend(pid: i32, application_name: &str, age: Option<u64>) -> ClientBackend {
        ClientBackend {
            pid,
            user: "app".into(),
            database: "shop".into(),
            application_name: application_name.into(),
            client_addr: "127.0.0.1".into(),
            transaction_age: age.map(Duration::from_secs),
        }
    }

    fn healthy() -> GuardFacts {
        GuardFacts {
            direction: Direction::FORWARD,
            new_health: ColorHealth {
                in_recovery: false,
                max_connections: 100,
                reserved_connections: 3,
                client_backends: 7,
            },
            sessions_to_move: 2,
            replication: SetupPlan::default(),
            old_backends: vec![backend(11, "shop", None), backend(12, "shop", Some(1))],
            owned_pids: HashSet::from([11, 12]),
            prepared: Vec::new(),
            old_settings: vec!["ALTER ROLE \"app\" SET work_mem = '8MB'".into()],
            new_settings: vec!["ALTER ROLE \"app\" SET work_mem = '8MB'".into()],
            missing_privileges: Vec::new(),
            reverse: None,
        }
    }

    const OPTIONS: GuardOptions = GuardOptions {
        max_txn_age: Duration::from_secs(5),
        force: false,
    };

    #[test]
    fn healthy_facts_pass_every_guardrail() {
        let report = judge(&healthy(), OPTIONS);
        assert!(!report.refused(), "{report:?}");
        assert_eq!(report.passed.len(), 8, "{report:?}");
        assert!(report.passed[1].contains("90 free connection slot(s) for 2"));
    }

    #[test]
    fn each_fact_refuses_with_its_reason() {
        let mut facts = healthy();
        facts.new_health.in_recovery = true;
        facts.new_health.client_backends = 97;
        facts.old_backends.push(backend(13, "cron", Some(60)));
        facts
            .old_backends
            .push(backend(14, AUTH_APPLICATION_NAME, None));
        facts.prepared.push(PreparedXact {
            gid: "tx1".into(),
            owner: "app".into(),
            database: "shop".into(),
        });
        facts.new_settings.clear();
        facts
            .replication
            .problems
            .push("green has no subscription".into());
        facts.missing_privileges.push("blue: lacks".into());
        let report = judge(&facts, OPTIONS);
        let refusals = report.refusals.join("\n");
        assert_eq!(report.refusals.len(), 8, "{refusals}");
        for expected in [
            "green is in recovery",
            "0 free connection slot(s) but 2 session(s)",
            "green has no subscription",
            "lacks privileges: blue: lacks",
            "1 transaction(s) on blue older than max_txn_age (5s): pid 13",
            "\"tx1\" by app in shop",
            "only on blue: [ALTER ROLE \"app\" SET work_mem = '8MB']",
            "1 client backend(s) on blue are not this pgshift's",
        ] {
            assert!(refusals.contains(expected), "{expected}\n{refusals}");
        }
        assert!(!refusals.contains("pid 14"), "{refusals}");
    }

    #[test]
    fn force_lets_foreign_backends_through_and_says_so() {
        let mut facts = healthy();
        facts.old_backends.push(backend(13, "cron", None));
        let report = judge(
            &facts,
            GuardOptions {
                force: true,
                ..OPTIONS
            },
        );
        assert!(!report.refused(), "{report:?}");
        assert!(report.overridden[0].starts_with("--force: 1 client backend(s) on blue"));
    }

    #[test]
    fn rollback_direction_names_the_colors_the_other_way() {
        let mut facts = healthy();
        facts.direction = Direction {
            publisher: Color::Green,
            subscriber: Color::Blue,
        };
        facts.prepared.push(PreparedXact {
            gid: "g".into(),
            owner: "o".into(),
            database: "d".into(),
        });
        let report = judge(&facts, OPTIONS);
        assert!(report.refusals[0].contains("on green"), "{report:?}");
        assert!(report.passed[0].starts_with("blue is reachable"));
    }

    #[test]
    fn settings_become_statements() {
        assert_eq!(
            setting_statement(Some("app"), Some("shop"), "search_path=a, b".into()),
            "ALTER ROLE \"app\" IN DATABASE \"shop\" SET search_path = 'a, b'"
        );
        assert_eq!(
            setting_statement(None, Some("shop"), "work_mem=4MB".into()),
            "ALTER DATABASE \"shop\" SET work_mem = '4MB'"
        );
        assert_eq!(
            setting_statement(None, None, "x=1".into()),
            "ALTER ROLE ALL SET x = '1'"
        );
    }
}
