//! `--verify`: every acknowledged write looked up in each given database, polling up to
//! `--verify-timeout` for replication to deliver the last rows.
//!
//! Each database is checked on its own connection, all at once (retried until the timeout
//! when it cannot be reached). A pass reads, per session,
//! the `seq`s of this run present in the table (`ORDER BY seq`, one session at a time so
//! memory stays bounded) and compares them with the session's acknowledged ranges
//! ([`compare_client`], pure). Later passes look again only at sessions that still miss rows.
//! Writes in doubt are not acknowledged, so they are never counted missing; rows present
//! without an acknowledgement are counted apart.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::connection::{Target, error_text, open};
use super::report::{AcknowledgedSeqs, MISSING_SAMPLE, RowKey, VerifyResult};
use super::table::TableName;

/// Pause between passes while rows are still missing.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The `application_name` of verification connections.
const VERIFY_APPLICATION_NAME: &str = "pgshift-probe-verify";

/// How one session's acknowledged writes compare with the rows a database has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientComparison {
    pub missing: u64,
    /// The first missing `seq`s (at most [`MISSING_SAMPLE`]).
    pub missing_sample: Vec<i64>,
    pub unacknowledged_present: u64,
}

/// Compares acknowledged `seq`s with the `seq`s `present` (ascending, no duplicates).
pub fn compare_client(acknowledged: &AcknowledgedSeqs, present: &[i64]) -> ClientComparison {
    let mut comparison = ClientComparison::default();
    let mut present_and_acknowledged = 0u64;
    for &(low, high) in acknowledged.ranges() {
        let from = present.partition_point(|&seq| seq < low);
        let to = present.partition_point(|&seq| seq <= high);
        let found = &present[from..to];
        present_and_acknowledged += found.len() as u64;
        let expected = (high - low + 1) as u64;
        let missing = expected - found.len() as u64;
        comparison.missing += missing;
        if missing > 0 && comparison.missing_sample.len() < MISSING_SAMPLE {
            let mut found_seqs = found.iter().peekable();
            for seq in low..=high {
                if comparison.missing_sample.len() >= MISSING_SAMPLE {
                    break;
                }
                if found_seqs.peek() == Some(&&seq) {
                    found_seqs.next();
                } else {
                    comparison.missing_sample.push(seq);
                }
            }
        }
    }
    comparison.unacknowledged_present = present.len() as u64 - present_and_acknowledged;
    comparison
}

/// Adds up the sessions' comparisons into one database's result.
pub fn combine(
    database: &str,
    acknowledged: &[(u32, AcknowledgedSeqs)],
    comparisons: &[ClientComparison],
    waited: Duration,
) -> VerifyResult {
    let mut result = VerifyResult {
        database: database.to_string(),
        checked: acknowledged.iter().map(|(_, seqs)| seqs.len()).sum(),
        missing: Some(0),
        waited_s: (waited.as_secs_f64() * 1000.0).round() / 1000.0,
        ..VerifyResult::default()
    };
    let mut missing = 0;
    for ((client, _), comparison) in acknowledged.iter().zip(comparisons) {
        missing += comparison.missing;
        result.unacknowledged_present += comparison.unacknowledged_present;
        for &seq in &comparison.missing_sample {
            if result.missing_sample.len() < MISSING_SAMPLE {
                result.missing_sample.push(RowKey {
                    client: *client,
                    seq,
                });
            }
        }
    }
    result.missing = Some(missing);
    result
}

/// Verifies every target at once; results in the targets' order.
pub async fn verify_all(
    targets: &[Target],
    table: &TableName,
    run_id: &str,
    acknowledged: Vec<(u32, AcknowledgedSeqs)>,
    timeout: Duration,
) -> Vec<VerifyResult> {
    let acknowledged = Arc::new(acknowledged);
    let tasks: Vec<_> = targets
        .iter()
        .map(|target| {
            let target = target.with_application_name(VERIFY_APPLICATION_NAME);
            let table = table.clone();
            let run_id = run_id.to_string();
            let acknowledged = Arc::clone(&acknowledged);
            tokio::spawn(async move {
                verify_one(&target, &table, &run_id, &acknowledged, timeout).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for (task, target) in tasks.into_iter().zip(targets) {
        results.push(task.await.unwrap_or_else(|error| VerifyResult {
            database: target.label.clone(),
            error: Some(format!("verification task failed: {error}")),
            ..VerifyResult::default()
        }));
    }
    results
}

async fn verify_one(
    target: &Target,
    table: &TableName,
    run_id: &str,
    acknowledged: &[(u32, AcknowledgedSeqs)],
    timeout: Duration,
) -> VerifyResult {
    let started = Instant::now();
    let failed = |error: String| VerifyResult {
        database: target.label.clone(),
        checked: acknowledged.iter().map(|(_, seqs)| seqs.len()).sum(),
        error: Some(error),
        ..VerifyResult::default()
    };
    // A database still starting up (or briefly unreachable) gets until the timeout.
    let connection = loop {
        match open(target).await {
            Ok(connection) => break connection,
            Err(failure) if started.elapsed() + POLL_INTERVAL > timeout => {
                return failed(format!("cannot connect: {}", failure.message));
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    };
    let client = connection.client;
    let query = match client.prepare(&table.client_rows_query()).await {
        Ok(statement) => statement,
        Err(error) => return failed(error_text(&error)),
    };
    let mut comparisons = vec![ClientComparison::default(); acknowledged.len()];
    let mut pending: Vec<usize> = (0..acknowledged.len()).collect();
    loop {
        for &index in &pending {
            let (client_id, seqs) = &acknowledged[index];
            let client_param = *client_id as i32;
            let rows = match client.query(&query, &[&run_id, &client_param]).await {
                Ok(rows) => rows,
                Err(error) => return failed(error_text(&error)),
            };
            let mut present = Vec::with_capacity(rows.len());
            for row in &rows {
                match row.try_get::<_, i64>(0) {
                    Ok(seq) => present.push(seq),
                    Err(error) => return failed(error_text(&error)),
                }
            }
            comparisons[index] = compare_client(seqs, &present);
        }
        pending.retain(|&index| comparisons[index].missing > 0);
        if pending.is_empty() || started.elapsed() + POLL_INTERVAL > timeout {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    combine(&target.label, acknowledged, &comparisons, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acknowledged(seqs: &[i64]) -> AcknowledgedSeqs {
        let mut acknowledged = AcknowledgedSeqs::default();
        for &seq in seqs {
            acknowledged.push(seq);
        }
        acknowledged
    }

    #[test]
    fn every_acknowledged_row_present_means_nothing_missing() {
        let comparison = compare_client(&acknowledged(&[1, 2, 3, 5]), &[1, 2, 3, 5]);
        assert_eq!(comparison, ClientComparison::default());
    }

    #[test]
    fn missing_rows_are_counted_and_named_and_extra_rows_counted_apart() {
        // 4 was in doubt and committed; 6 was acknowledged and is missing; 7 is missing too.
        let comparison = compare_client(&acknowledged(&[1, 2, 3, 5, 6, 7]), &[1, 2, 3, 4, 5]);
        assert_eq!(comparison.missing, 2);
        assert_eq!(comparison.missing_sample, vec![6, 7]);
        assert_eq!(comparison.unacknowledged_present, 1);
    }

    #[test]
    fn a_database_without_the_rows_misses_all_of_them_and_names_only_a_few() {
        let seqs: Vec<i64> = (1..=100).collect();
        let comparison = compare_client(&acknowledged(&seqs), &[]);
        assert_eq!(comparison.missing, 100);
        assert_eq!(comparison.missing_sample, (1..=10).collect::<Vec<i64>>());
    }

    #[test]
    fn results_add_up_across_sessions() {
        let sessions = vec![(0, acknowledged(&[1, 2])), (1, acknowledged(&[1, 2, 3]))];
        let comparisons = vec![
            compare_client(&sessions[0].1, &[1, 2]),
            compare_client(&sessions[1].1, &[2, 9]),
        ];
        let result = combine(
            "green",
            &sessions,
            &comparisons,
            Duration::from_millis(1500),
        );
        assert_eq!(result.checked, 5);
        assert_eq!(result.missing, Some(2));
        assert_eq!(
            result.missing_sample,
            vec![RowKey { client: 1, seq: 1 }, RowKey { client: 1, seq: 3 }]
        );
        assert_eq!(result.unacknowledged_present, 1);
        assert_eq!(result.waited_s, 1.5);
        assert_eq!(result.error, None);
    }
}
