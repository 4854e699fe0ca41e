//! `[cutover] sync_sequences`: logical replication copies rows but not sequences, so a new
//! color's sequences lag the old one's, and the first inserts after a cutover would reuse keys.
//! During the freeze, after catch-up (nothing writes to the old color any more), every
//! sequence of the new color is set to greatest(its value, the old color's + `sequence_margin`)
//! — mirrored for descending sequences, clamped to the sequence's bounds, never moved
//! backwards. [`target`] is the pure rule; [`sync`] reads both colors and applies it.

use super::catalog::{Connections, query_error};
use super::setup::{DatabaseFacts, Direction};
use crate::auth::dsn::error_text;
use crate::probe::table::quote_identifier;

/// A sequence as `pg_sequences` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceFacts {
    pub schema: String,
    pub name: String,
    /// `None`: never used (or not readable by the DSN's role).
    pub last_value: Option<i64>,
    pub increment: i64,
    pub min_value: i64,
    pub max_value: i64,
}

impl SequenceFacts {
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.name)
        )
    }
}

/// The value to `setval` the new color's sequence to, or `None` to leave it.
pub fn target(old: &SequenceFacts, new: &SequenceFacts, margin: u64) -> Option<i64> {
    let old_last = old.last_value?;
    let margin = i64::try_from(margin).unwrap_or(i64::MAX);
    if new.increment >= 0 {
        let wanted = old_last.saturating_add(margin).min(new.max_value);
        (new.last_value.is_none_or(|last| last < wanted)).then_some(wanted)
    } else {
        let wanted = old_last.saturating_sub(margin).max(new.min_value);
        (new.last_value.is_none_or(|last| last > wanted)).then_some(wanted)
    }
}

const SEQUENCES_QUERY: &str = "SELECT schemaname::text, sequencename::text, last_value, \
    increment_by, min_value, max_value FROM pg_catalog.pg_sequences ORDER BY 1, 2";

async fn read(
    client: &tokio_postgres::Client,
    color: crate::color::Color,
) -> Result<Vec<SequenceFacts>, String> {
    let rows = client
        .query(SEQUENCES_QUERY, &[])
        .await
        .map_err(|error| query_error(color, "pg_sequences", &error))?;
    Ok(rows
        .into_iter()
        .map(|row| SequenceFacts {
            schema: row.get(0),
            name: row.get(1),
            last_value: row.get(2),
            increment: row.get(3),
            min_value: row.get(4),
            max_value: row.get(5),
        })
        .collect())
}

/// Sets the new color's sequences in every replicated database; one line per sequence moved
/// or missing on the new color.
pub async fn sync(
    connections: &Connections,
    direction: Direction,
    databases: &[DatabaseFacts],
    margin: u64,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for facts in databases {
        let database = &facts.database;
        let old_client = connections
            .connect(direction.publisher, Some(database))
            .await?;
        let new_client = connections
            .connect(direction.subscriber, Some(database))
            .await?;
        let old = read(&old_client, direction.publisher).await?;
        let new = read(&new_client, direction.subscriber).await?;
        for old_sequence in &old {
            let Some(new_sequence) = new
                .iter()
                .find(|s| s.schema == old_sequence.schema && s.name == old_sequence.name)
            else {
                lines.push(format!(
                    "{} (database {database}) is missing on {}",
                    old_sequence.qualified(),
                    direction.subscriber
                ));
                continue;
            };
            let Some(value) = target(old_sequence, new_sequence, margin) else {
                continue;
            };
            new_client
                .execute(
                    "SELECT pg_catalog.setval($1::pg_catalog.text::pg_catalog.regclass, $2, true)",
                    &[&new_sequence.qualified(), &value],
                )
                .await
                .map_err(|error| {
                    format!(
                        "cannot set {} to {value} on {}: {}",
                        new_sequence.qualified(),
                        direction.subscriber,
                        error_text(&error)
                    )
                })?;
            lines.push(format!(
                "{} (database {database}) set to {value}",
                new_sequence.qualified()
            ));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(last: Option<i64>, increment: i64) -> SequenceFacts {
        SequenceFacts {
            schema: "public".into(),
            name: "invoice_no".into(),
            last_value: last,
            increment,
            min_value: if increment > 0 { 1 } else { -1_000_000 },
            max_value: if increment > 0 { 1_000_000 } else { -1 },
        }
    }

    #[test]
    fn ascending_sequences_move_past_the_old_value_by_the_margin() {
        assert_eq!(
            target(&sequence(Some(5), 1), &sequence(None, 1), 1000),
            Some(1005)
        );
        assert_eq!(
            target(&sequence(Some(5), 1), &sequence(Some(2), 1), 1000),
            Some(1005)
        );
        assert_eq!(
            target(&sequence(Some(5), 1), &sequence(Some(5000), 1), 1000),
            None
        );
        assert_eq!(
            target(&sequence(None, 1), &sequence(Some(2), 1), 1000),
            None
        );
        assert_eq!(
            target(&sequence(Some(999_990), 1), &sequence(Some(1), 1), 1000),
            Some(1_000_000),
            "clamped to max_value"
        );
    }

    #[test]
    fn descending_sequences_are_mirrored() {
        assert_eq!(
            target(&sequence(Some(-5), -1), &sequence(None, -1), 1000),
            Some(-1005)
        );
        assert_eq!(
            target(&sequence(Some(-5), -1), &sequence(Some(-9000), -1), 1000),
            None
        );
        assert_eq!(
            target(&sequence(Some(-999_990), -1), &sequence(Some(-1), -1), 1000),
            Some(-1_000_000),
            "clamped to min_value"
        );
    }

    #[test]
    fn an_enormous_margin_saturates() {
        assert_eq!(
            target(&sequence(Some(5), 1), &sequence(None, 1), u64::MAX),
            Some(1_000_000)
        );
    }
}
