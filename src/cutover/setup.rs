//! What a transparent cutover needs of logical replication, judged from catalog facts: the
//! `pgshift.marker` table on both colors in every replicated database, in every publication a
//! subscription reads, and in state `r` in every subscription — beside every other subscribed
//! table. Pure: [`plan_setup`] turns the facts [`super::catalog`] read into the exact SQL still
//! missing (in the order it must run) and the problems SQL from pgshift cannot fix.
//!
//! Order matters: the marker table is created on the subscriber first, then on the publisher —
//! a table the subscriber lacks that reaches it through a `FOR ALL TABLES` publication stops
//! the whole subscription. Then publication membership, then `REFRESH PUBLICATION` so the
//! subscription learns the table.

use crate::color::Color;
use crate::probe::setup::describe_state;
use crate::probe::table::quote_identifier;

/// The marker table's schema and name. Catch-up writes one row per publication on the old
/// color and waits until the new color shows it.
pub const MARKER_SCHEMA: &str = "pgshift";
pub const MARKER_TABLE: &str = "marker";

/// The statement creating the marker table (idempotent).
pub fn marker_create_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {MARKER_SCHEMA}; \
         CREATE TABLE IF NOT EXISTS {MARKER_SCHEMA}.{MARKER_TABLE} \
         (publication text PRIMARY KEY, token text NOT NULL, written_at timestamptz NOT NULL DEFAULT now());"
    )
}

/// Which way the rows flow: the publisher is the color clients leave, the subscriber the one
/// they move to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direction {
    pub publisher: Color,
    pub subscriber: Color,
}

impl Direction {
    /// Promote: blue publishes, green subscribes.
    pub const FORWARD: Direction = Direction {
        publisher: Color::Blue,
        subscriber: Color::Green,
    };

    /// Green → blue: the reverse replication a rollback after a promotion rides on. It starts
    /// at the cutover with the data already on both sides (`copy_data = false`).
    pub fn is_reverse(self) -> bool {
        self.publisher == Color::Green
    }
}

/// A publication on the publisher that a subscription reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationFacts {
    pub name: String,
    pub all_tables: bool,
    /// `pg_publication_tables` lists the marker table for it.
    pub has_marker: bool,
}

/// A subscription on the subscriber and the state of each table it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFacts {
    pub name: String,
    pub enabled: bool,
    pub publications: Vec<String>,
    /// (qualified table name, `srsubstate`), the marker table included when known.
    pub tables: Vec<(String, char)>,
}

impl SubscriptionFacts {
    /// The marker table's state in this subscription, `None` when it does not know it.
    pub fn marker_state(&self) -> Option<char> {
        let marker = format!("{MARKER_SCHEMA}.{MARKER_TABLE}");
        self.tables
            .iter()
            .find(|(table, _)| *table == marker)
            .map(|(_, state)| *state)
    }
}

/// One database that the subscriber has subscriptions in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFacts {
    pub database: String,
    pub marker_on_publisher: bool,
    pub marker_on_subscriber: bool,
    /// The publications the subscriptions name that exist on the publisher.
    pub publications: Vec<PublicationFacts>,
    pub subscriptions: Vec<SubscriptionFacts>,
}

/// One statement to run on one color in one database, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlStep {
    pub color: Color,
    pub database: String,
    pub sql: String,
    pub why: String,
}

/// What is still missing: statements pgshift can run (`pgshift cutover-setup`), and problems
/// that need the operator or time (a table still copying, a disabled subscription).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupPlan {
    pub steps: Vec<SqlStep>,
    /// Waiting for the initial copy of the marker table: `cutover-setup` waits for it.
    pub copying_marker: Vec<String>,
    pub problems: Vec<String>,
}

impl SetupPlan {
    pub fn is_ready(&self) -> bool {
        self.steps.is_empty() && self.copying_marker.is_empty() && self.problems.is_empty()
    }

    /// The statements as a script: a comment naming color and database before each group.
    pub fn script(&self) -> String {
        let mut script = String::new();
        let mut current: Option<(Color, &str)> = None;
        for step in &self.steps {
            if current != Some((step.color, step.database.as_str())) {
                script.push_str(&format!(
                    "-- on {}, database {}\n",
                    step.color, step.database
                ));
                current = Some((step.color, step.database.as_str()));
            }
            script.push_str(&format!("{}  -- {}\n", step.sql, step.why));
        }
        script
    }

    /// Every line an operator needs: problems, the marker copies still running, the SQL.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = self.problems.clone();
        lines.extend(self.copying_marker.iter().cloned());
        if !self.steps.is_empty() {
            lines.push(
                "missing (run `pgshift cutover-setup --config FILE`, or this SQL):".to_string(),
            );
            lines.extend(self.script().lines().map(str::to_string));
        }
        lines
    }
}

/// Plans what `databases` still lack for a transparent cutover in `direction`.
pub fn plan_setup(direction: Direction, databases: &[DatabaseFacts]) -> SetupPlan {
    let Direction {
        publisher,
        subscriber,
    } = direction;
    let mut plan = SetupPlan::default();
    if databases.is_empty() {
        plan.problems.push(format!(
            "{subscriber} has no subscription: a transparent cutover needs logical replication {publisher} → {subscriber} \
             (CREATE PUBLICATION on {publisher}, then on {subscriber}: CREATE SUBSCRIPTION <name> CONNECTION '<{publisher} DSN>' PUBLICATION <publication>;)"
        ));
        return plan;
    }
    let create = |color: Color, database: &str| SqlStep {
        color,
        database: database.to_string(),
        sql: marker_create_sql(),
        why: format!("the catch-up marker, on {subscriber} before {publisher}"),
    };
    // Subscriber first, for every database, then the publisher.
    for facts in databases {
        if !facts.marker_on_subscriber {
            plan.steps.push(create(subscriber, &facts.database));
        }
    }
    for facts in databases {
        if !facts.marker_on_publisher {
            plan.steps.push(create(publisher, &facts.database));
        }
    }
    let mut refreshes = Vec::new();
    for facts in databases {
        let database = &facts.database;
        let mut added = Vec::new();
        for publication in &facts.publications {
            // A FOR ALL TABLES publication takes the table once it exists.
            let gets_it =
                publication.has_marker || (publication.all_tables && !facts.marker_on_publisher);
            if !gets_it && !publication.all_tables {
                plan.steps.push(SqlStep {
                    color: publisher,
                    database: database.clone(),
                    sql: format!(
                        "ALTER PUBLICATION {} ADD TABLE {MARKER_SCHEMA}.{MARKER_TABLE};",
                        quote_identifier(&publication.name)
                    ),
                    why: "the marker must travel with the rows".to_string(),
                });
                added.push(publication.name.clone());
            }
        }
        for subscription in &facts.subscriptions {
            let label = format!(
                "{subscriber}'s subscription {} (database {database})",
                subscription.name
            );
            let missing: Vec<&String> = subscription
                .publications
                .iter()
                .filter(|name| !facts.publications.iter().any(|p| &p.name == *name))
                .collect();
            if !missing.is_empty() {
                plan.problems.push(format!(
                    "{label} reads publication(s) {} that {publisher} does not have",
                    join_quoted(&missing)
                ));
            }
            if !subscription.enabled {
                plan.problems.push(format!(
                    "{label} is disabled: nothing replicates; run on {subscriber}: ALTER SUBSCRIPTION {} ENABLE; (then cutover-setup again)",
                    quote_identifier(&subscription.name)
                ));
            }
            match subscription.marker_state() {
                // REFRESH is refused on a disabled subscription: enabling comes first.
                None if !subscription.enabled => {}
                None => refreshes.push(SqlStep {
                    color: subscriber,
                    database: database.clone(),
                    sql: format!(
                        "ALTER SUBSCRIPTION {} REFRESH PUBLICATION{};",
                        quote_identifier(&subscription.name),
                        // Both sides hold the same marker rows already: a copy would collide.
                        if direction.is_reverse() {
                            " WITH (copy_data = false)"
                        } else {
                            ""
                        }
                    ),
                    why: "so the subscription learns the marker table".to_string(),
                }),
                Some('r') => {}
                Some(state) => plan.copying_marker.push(format!(
                    "{label} is still copying {MARKER_SCHEMA}.{MARKER_TABLE} (state {state}: {})",
                    describe_state(state)
                )),
            }
            let marker = format!("{MARKER_SCHEMA}.{MARKER_TABLE}");
            let unready: Vec<String> = subscription
                .tables
                .iter()
                .filter(|(table, state)| *state != 'r' && *table != marker)
                .map(|(table, state)| format!("{table} ({state}: {})", describe_state(*state)))
                .collect();
            if !unready.is_empty() {
                plan.problems.push(format!(
                    "{label} has tables not in state r (ready): {}; wait for the initial copy to finish",
                    unready.join(", ")
                ));
            }
        }
    }
    plan.steps.extend(refreshes);
    plan
}

fn join_quoted(names: &[&String]) -> String {
    names
        .iter()
        .map(|name| quote_identifier(name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(name: &str, tables: &[(&str, char)]) -> SubscriptionFacts {
        SubscriptionFacts {
            name: name.to_string(),
            enabled: true,
            publications: vec!["shop_pub".to_string()],
            tables: tables.iter().map(|(t, s)| (t.to_string(), *s)).collect(),
        }
    }

    fn database(all_tables: bool) -> DatabaseFacts {
        DatabaseFacts {
            database: "app".to_string(),
            marker_on_publisher: false,
            marker_on_subscriber: false,
            publications: vec![PublicationFacts {
                name: "shop_pub".to_string(),
                all_tables,
                has_marker: false,
            }],
            subscriptions: vec![subscription("shop_sub", &[("public.orders", 'r')])],
        }
    }

    fn sql_of(plan: &SetupPlan) -> Vec<(Color, String)> {
        plan.steps
            .iter()
            .map(|step| (step.color, step.sql.clone()))
            .collect()
    }

    #[test]
    fn a_fresh_table_list_publication_needs_every_step_in_order() {
        let plan = plan_setup(Direction::FORWARD, &[database(false)]);
        assert_eq!(
            sql_of(&plan),
            vec![
                (Color::Green, marker_create_sql()),
                (Color::Blue, marker_create_sql()),
                (
                    Color::Blue,
                    "ALTER PUBLICATION \"shop_pub\" ADD TABLE pgshift.marker;".to_string()
                ),
                (
                    Color::Green,
                    "ALTER SUBSCRIPTION \"shop_sub\" REFRESH PUBLICATION;".to_string()
                ),
            ]
        );
        assert!(plan.problems.is_empty());
        let script = plan.script();
        assert!(
            script.starts_with("-- on green, database app\n"),
            "{script}"
        );
        assert!(script.contains("-- on blue, database app\n"), "{script}");
    }

    #[test]
    fn a_for_all_tables_publication_takes_the_marker_once_it_exists() {
        let plan = plan_setup(Direction::FORWARD, &[database(true)]);
        assert_eq!(plan.steps.len(), 3, "{plan:?}");
        assert!(!plan.script().contains("ALTER PUBLICATION"));
    }

    #[test]
    fn ready_when_the_marker_is_everywhere_and_in_state_r() {
        let mut facts = database(false);
        facts.marker_on_publisher = true;
        facts.marker_on_subscriber = true;
        facts.publications[0].has_marker = true;
        facts.subscriptions[0]
            .tables
            .push(("pgshift.marker".to_string(), 'r'));
        assert!(plan_setup(Direction::FORWARD, &[facts.clone()]).is_ready());

        facts.subscriptions[0].tables[1].1 = 'd';
        let plan = plan_setup(Direction::FORWARD, &[facts.clone()]);
        assert!(plan.steps.is_empty() && plan.problems.is_empty());
        assert!(plan.copying_marker[0].contains("state d"), "{plan:?}");
    }

    #[test]
    fn problems_sql_cannot_fix_are_named() {
        assert!(
            plan_setup(Direction::FORWARD, &[]).problems[0].contains("green has no subscription")
        );
        let mut facts = database(true);
        facts.subscriptions[0].enabled = false;
        facts.subscriptions[0].tables[0].1 = 'd';
        facts.subscriptions[0].publications.push("gone".to_string());
        let problems = plan_setup(Direction::FORWARD, &[facts]).problems.join("\n");
        assert!(
            problems.contains("ALTER SUBSCRIPTION \"shop_sub\" ENABLE;"),
            "{problems}"
        );
        assert!(
            problems.contains("public.orders (d: data is being copied)"),
            "{problems}"
        );
        assert!(
            problems.contains("\"gone\" that blue does not have"),
            "{problems}"
        );
    }

    #[test]
    fn the_reverse_direction_mirrors_the_colors() {
        let reverse = Direction {
            publisher: Color::Green,
            subscriber: Color::Blue,
        };
        let plan = plan_setup(reverse, &[database(false)]);
        assert_eq!(plan.steps[0].color, Color::Blue);
        assert_eq!(plan.steps[1].color, Color::Green);
        assert_eq!(
            plan.steps[3].sql,
            "ALTER SUBSCRIPTION \"shop_sub\" REFRESH PUBLICATION WITH (copy_data = false);"
        );
    }
}
