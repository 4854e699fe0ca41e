//! What a probe run saw, as pure data: each session's tally while it runs, then the whole
//! run's report (operations, errors by SQLSTATE, drops, stalls, latency percentiles,
//! read-your-writes, writes in doubt, verification), its verdict and exit status, and its text.
//!
//! No I/O here: the sessions ([`super::load`]) feed a [`ClientTally`] each, verification
//! ([`super::verify`]) fills [`VerifyResult`]s, and [`summarize`] turns them into a
//! [`ProbeReport`] that is printed with [`render_text`] or written as JSON.
//!
//! Definitions:
//! - A **stall** is the gap between two successful operations of one session (the first gap
//!   starts when the session starts, the last one ends when the run ends, so a session that
//!   never recovers shows its whole outage).
//! - A write is **acknowledged** when its COMMIT succeeded; **in doubt** when its COMMIT was
//!   sent and the connection was lost before an answer (it may or may not have committed, so
//!   verification never counts it missing); **failed** otherwise.
//! - A read that misses the session's latest acknowledged row is a **read-your-writes
//!   violation** when the write was made on the same connection, and a **stale read after
//!   reconnect** when it was made on an earlier one.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::stats::{LatencyHistogram, quantile};

/// Exit status: the run completed and every check held.
pub const EXIT_PASSED: u8 = 0;
/// Exit status: the run completed but a check failed (or it did not complete).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: a usage or setup error; nothing was measured.
pub const EXIT_USAGE: u8 = 2;

/// How many stalls the text report lists (the JSON has every session's).
const STALLS_LISTED: usize = 10;
/// How many missing rows a verification result names.
pub const MISSING_SAMPLE: usize = 10;

/// The sequence numbers of one session's acknowledged writes, as ascending inclusive ranges
/// (writes are acknowledged in increasing `seq` order, mostly without gaps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcknowledgedSeqs {
    ranges: Vec<(i64, i64)>,
    count: u64,
}

impl AcknowledgedSeqs {
    /// Adds `seq`, which must be above every `seq` added before (others are ignored).
    pub fn push(&mut self, seq: i64) {
        match self.ranges.last_mut() {
            Some((_, high)) if seq == *high + 1 => *high = seq,
            Some((_, high)) if seq <= *high => return,
            _ => self.ranges.push((seq, seq)),
        }
        self.count += 1;
    }

    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Latency samples in the proxy's log-linear histogram (within 1 %), plus the exact maximum.
#[derive(Debug, Clone, Default)]
pub struct LatencyTally {
    counts: Vec<u64>,
    max: Duration,
}

impl LatencyTally {
    pub fn record(&mut self, latency: Duration) {
        let index = LatencyHistogram::bucket_index(latency);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.max = self.max.max(latency);
    }

    pub fn merge(&mut self, other: &LatencyTally) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.max = self.max.max(other.max);
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1), never above the exact maximum; `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.counts, q).map(|value| value.min(self.max))
    }

    pub fn max(&self) -> Option<Duration> {
        (self.samples() > 0).then_some(self.max)
    }
}

/// A gap between successful operations, in offsets from the start of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stall {
    pub length: Duration,
    pub began_at: Duration,
}

/// One session's longest stall so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct StallTracker {
    last_success: Duration,
    longest: Stall,
}

impl StallTracker {
    /// A tracker whose first gap starts at `started` (offset from the start of the run).
    pub fn starting_at(started: Duration) -> StallTracker {
        StallTracker {
            last_success: started,
            longest: Stall {
                length: Duration::ZERO,
                began_at: started,
            },
        }
    }

    /// A success at offset `at` ends the current gap.
    pub fn success(&mut self, at: Duration) {
        self.close_gap(at);
        self.last_success = self.last_success.max(at);
    }

    /// The run ended at `at`: the gap still open counts too.
    pub fn finish(&mut self, at: Duration) {
        self.close_gap(at);
    }

    fn close_gap(&mut self, at: Duration) {
        let gap = at.saturating_sub(self.last_success);
        if gap > self.longest.length {
            self.longest = Stall {
                length: gap,
                began_at: self.last_success,
            };
        }
    }

    pub fn longest(&self) -> Stall {
        self.longest
    }

    pub fn last_success(&self) -> Duration {
        self.last_success
    }
}

/// Errors by SQLSTATE, and those that came without one (a lost connection, a timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErrorTally {
    pub by_sqlstate: BTreeMap<String, u64>,
    pub without_sqlstate: u64,
}

impl ErrorTally {
    pub fn record(&mut self, sqlstate: Option<&str>) {
        match sqlstate {
            Some(code) => *self.by_sqlstate.entry(code.to_string()).or_default() += 1,
            None => self.without_sqlstate += 1,
        }
    }

    pub fn merge(&mut self, other: &ErrorTally) {
        for (code, count) in &other.by_sqlstate {
            *self.by_sqlstate.entry(code.clone()).or_default() += count;
        }
        self.without_sqlstate += other.without_sqlstate;
    }

    pub fn total(&self) -> u64 {
        self.by_sqlstate.values().sum::<u64>() + self.without_sqlstate
    }
}

/// Where a write that did not succeed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEnd {
    /// Rolled back for sure: nothing to look for.
    Failed,
    /// COMMIT was sent and no answer came back: it may have committed.
    InDoubt,
}

/// The step of a write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    Begin,
    Insert,
    Commit,
}

/// A failed write is in doubt only when its COMMIT was sent and the connection was lost
/// before the answer; an ERROR answering COMMIT means Postgres rolled the transaction back.
pub fn classify_write_failure(step: WriteStep, connection_lost: bool) -> WriteEnd {
    if step == WriteStep::Commit && connection_lost {
        WriteEnd::InDoubt
    } else {
        WriteEnd::Failed
    }
}

/// The latest acknowledged write of a session, and the connection (numbered from 1 per
/// session) that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastWrite {
    pub seq: i64,
    pub connection: u64,
}

/// What a read of the latest acknowledged write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFinding {
    /// The row was there (or there was nothing to look for yet).
    Consistent,
    /// The connection that acknowledged the write does not see it.
    ReadYourWritesViolation,
    /// A later connection does not see it yet.
    StaleAfterReconnect,
}

/// Judges a read of `expected` made on `connection`.
pub fn judge_read(expected: Option<LastWrite>, found: bool, connection: u64) -> ReadFinding {
    match expected {
        Some(_) if found => ReadFinding::Consistent,
        None => ReadFinding::Consistent,
        Some(write) if write.connection == connection => ReadFinding::ReadYourWritesViolation,
        Some(_) => ReadFinding::StaleAfterReconnect,
    }
}

/// Everything one session saw.
#[derive(Debug, Clone, Default)]
pub struct ClientTally {
    pub client: u32,
    pub reads: u64,
    pub reads_failed: u64,
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub writes_in_doubt: u64,
    pub commits_outside_transaction: u64,
    pub errors: ErrorTally,
    pub connect_failures: u64,
    pub connections_opened: u64,
    pub sessions_dropped: u64,
    pub read_your_writes_violations: u64,
    pub stale_reads_after_reconnect: u64,
    pub latency: LatencyTally,
    pub stalls: StallTracker,
    pub acknowledged: AcknowledgedSeqs,
    last_acknowledged: Option<LastWrite>,
}

impl ClientTally {
    pub fn new(client: u32, started: Duration) -> ClientTally {
        ClientTally {
            client,
            stalls: StallTracker::starting_at(started),
            ..ClientTally::default()
        }
    }

    /// An operation (a whole write, or a read) succeeded at offset `at` after `latency`.
    pub fn record_success(&mut self, at: Duration, latency: Duration) {
        self.latency.record(latency);
        self.stalls.success(at);
    }

    pub fn record_error(&mut self, sqlstate: Option<&str>) {
        self.errors.record(sqlstate);
    }

    pub fn acknowledge(&mut self, seq: i64, connection: u64) {
        self.writes_acknowledged += 1;
        self.acknowledged.push(seq);
        self.last_acknowledged = Some(LastWrite { seq, connection });
    }

    pub fn last_acknowledged(&self) -> Option<LastWrite> {
        self.last_acknowledged
    }

    /// Counts a successful read and what it found.
    pub fn record_read(&mut self, finding: ReadFinding) {
        self.reads += 1;
        match finding {
            ReadFinding::Consistent => {}
            ReadFinding::ReadYourWritesViolation => self.read_your_writes_violations += 1,
            ReadFinding::StaleAfterReconnect => self.stale_reads_after_reconnect += 1,
        }
    }

    pub fn record_write_end(&mut self, end: WriteEnd) {
        match end {
            WriteEnd::Failed => self.writes_failed += 1,
            WriteEnd::InDoubt => self.writes_in_doubt += 1,
        }
    }

    /// The run ended at offset `at`.
    pub fn finish(&mut self, at: Duration) {
        self.stalls.finish(at);
    }

    pub fn operations_succeeded(&self) -> u64 {
        self.reads + self.writes_acknowledged
    }

    pub fn operations_failed(&self) -> u64 {
        self.reads_failed + self.writes_failed + self.writes_in_doubt
    }
}

/// One row (a session's write) named by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RowKey {
    pub client: u32,
    pub seq: i64,
}

/// The acknowledged writes looked up in one database.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyResult {
    /// `user@host:port/dbname`.
    pub database: String,
    /// Acknowledged writes looked up.
    pub checked: u64,
    /// Acknowledged writes not found when polling stopped; `None` when it could not check.
    pub missing: Option<u64>,
    /// A few of the missing rows.
    pub missing_sample: Vec<RowKey>,
    /// Rows of this run present without an acknowledgement (writes in doubt that did commit).
    pub unacknowledged_present: u64,
    /// How long it polled, in seconds.
    pub waited_s: f64,
    /// Why it could not check, when it could not.
    pub error: Option<String>,
}

/// The `--max-*` limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Limits {
    pub max_errors: Option<u64>,
    pub max_dropped: Option<u64>,
    #[serde(serialize_with = "serialize_optional_millis", rename = "max_stall_ms")]
    pub max_stall: Option<Duration>,
}

/// How the run was set up and how long it ran.
#[derive(Debug, Clone)]
pub struct RunFacts {
    pub run_id: String,
    pub target: String,
    pub table: String,
    pub protocol: String,
    pub clients: u32,
    pub rate_per_client: f64,
    pub write_ratio: f64,
    pub started_at: SystemTime,
    pub planned_duration: Duration,
    pub elapsed: Duration,
    pub interrupted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OperationCounts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub reads: u64,
    pub reads_failed: u64,
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub per_second: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorSummary {
    /// Every error a session saw: failed requests and failed connection attempts.
    pub total: u64,
    pub by_sqlstate: BTreeMap<String, u64>,
    pub without_sqlstate: u64,
    /// Of the total, connection attempts that failed.
    pub connect_failures: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StallRow {
    pub client: u32,
    pub longest_ms: f64,
    /// Seconds from the start of the run to the last success before the gap.
    pub began_after_s: f64,
    /// The same instant, as wall-clock time.
    pub began_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub passed: bool,
    pub exit_status: u8,
    pub failures: Vec<String>,
}

/// The whole run, as printed and as written by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub run_id: String,
    pub target: String,
    pub table: String,
    pub protocol: String,
    pub clients: u32,
    pub rate_per_client: f64,
    pub write_ratio: f64,
    pub started_at: String,
    pub planned_duration_s: f64,
    pub duration_s: f64,
    pub interrupted: bool,
    pub operations: OperationCounts,
    pub errors: ErrorSummary,
    pub sessions_dropped: u64,
    pub connections_opened: u64,
    pub latency_ms: LatencySummary,
    pub longest_stall: Option<StallRow>,
    /// Every session's longest stall, longest first.
    pub stalls: Vec<StallRow>,
    pub read_your_writes_violations: u64,
    pub stale_reads_after_reconnect: u64,
    pub writes_in_doubt: u64,
    /// COMMITs answered with "there is no transaction in progress": the session's backend
    /// changed under it; those writes are not acknowledged.
    pub commits_outside_transaction: u64,
    pub verify: Vec<VerifyResult>,
    pub limits: Limits,
    pub verdict: Verdict,
}

/// Adds up the sessions' tallies and judges the run.
pub fn summarize(
    facts: &RunFacts,
    tallies: &[ClientTally],
    verify: Vec<VerifyResult>,
    limits: Limits,
) -> ProbeReport {
    let mut operations = OperationCounts::default();
    let mut errors = ErrorTally::default();
    let mut latency = LatencyTally::default();
    let mut connect_failures = 0;
    let mut sessions_dropped = 0;
    let mut connections_opened = 0;
    let mut read_your_writes_violations = 0;
    let mut stale_reads_after_reconnect = 0;
    let mut writes_in_doubt = 0;
    let mut commits_outside_transaction = 0;
    for tally in tallies {
        operations.succeeded += tally.operations_succeeded();
        operations.failed += tally.operations_failed();
        operations.reads += tally.reads;
        operations.reads_failed += tally.reads_failed;
        operations.writes_acknowledged += tally.writes_acknowledged;
        operations.writes_failed += tally.writes_failed;
        errors.merge(&tally.errors);
        latency.merge(&tally.latency);
        connect_failures += tally.connect_failures;
        sessions_dropped += tally.sessions_dropped;
        connections_opened += tally.connections_opened;
        read_your_writes_violations += tally.read_your_writes_violations;
        stale_reads_after_reconnect += tally.stale_reads_after_reconnect;
        writes_in_doubt += tally.writes_in_doubt;
        commits_outside_transaction += tally.commits_outside_transaction;
    }
    operations.total = operations.succeeded + operations.failed;
    let seconds = facts.elapsed.as_secs_f64();
    operations.per_second = if seconds > 0.0 {
        round_to(operations.succeeded as f64 / seconds, 1)
    } else {
        0.0
    };

    let mut stalls: Vec<StallRow> = tallies
        .iter()
        .map(|tally| stall_row(tally.client, tally.stalls.longest(), facts.started_at))
        .collect();
    stalls.sort_by(|a, b| {
        b.longest_ms
            .total_cmp(&a.longest_ms)
            .then(a.client.cmp(&b.client))
    });
    let longest_stall_length = tallies
        .iter()
        .map(|tally| tally.stalls.longest().length)
        .max()
        .unwrap_or_default();

    let error_summary = ErrorSummary {
        total: errors.total(),
        by_sqlstate: errors.by_sqlstate,
        without_sqlstate: errors.without_sqlstate,
        connect_failures,
    };
    let mut report = ProbeReport {
        run_id: facts.run_id.clone(),
        target: facts.target.clone(),
        table: facts.table.clone(),
        protocol: facts.protocol.clone(),
        clients: facts.clients,
        rate_per_client: facts.rate_per_client,
        write_ratio: facts.write_ratio,
        started_at: humantime::format_rfc3339_millis(facts.started_at).to_string(),
        planned_duration_s: round_to(facts.planned_duration.as_secs_f64(), 3),
        duration_s: round_to(seconds, 3),
        interrupted: facts.interrupted,
        operations,
        errors: error_summary,
        sessions_dropped,
        connections_opened,
        latency_ms: LatencySummary {
            samples: latency.samples(),
            p50: latency.quantile(0.50).map(millis),
            p99: latency.quantile(0.99).map(millis),
            max: latency.max().map(millis),
        },
        longest_stall: stalls.first().cloned(),
        stalls,
        read_your_writes_violations,
        stale_reads_after_reconnect,
        writes_in_doubt,
        commits_outside_transaction,
        verify,
        limits,
        verdict: Verdict {
            passed: true,
            exit_status: EXIT_PASSED,
            failures: Vec::new(),
        },
    };
    report.verdict = judge(&report, longest_stall_length);
    report
}

/// Exit 0 when the run completed, something succeeded, nothing acknowledged is missing, no
/// read-your-writes violation happened and the `--max-*` limits held; exit 1 otherwise.
fn judge(report: &ProbeReport, longest_stall: Duration) -> Verdict {
    let mut failures = Vec::new();
    if report.interrupted {
        failures.push("the run was interrupted before its duration ended".to_string());
    }
    if report.operations.succeeded == 0 {
        failures.push("no operation succeeded".to_string());
    }
    if report.read_your_writes_violations > 0 {
        failures.push(format!(
            "{} read-your-writes violation(s): a connection did not see its own acknowledged write",
            report.read_your_writes_violations
        ));
    }
    for result in &report.verify {
        match (result.missing, &result.error) {
            (Some(0), _) => {}
            (Some(missing), _) => failures.push(format!(
                "{}: acknowledged writes missing: {missing}",
                result.database
            )),
            (None, error) => failures.push(format!(
                "{}: could not verify ({})",
                result.database,
                error.as_deref().unwrap_or("no answer")
            )),
        }
    }
    if let Some(max) = report.limits.max_errors
        && report.errors.total > max
    {
        failures.push(format!(
            "{} error(s), more than --max-errors {max}",
            report.errors.total
        ));
    }
    if let Some(max) = report.limits.max_dropped
        && report.sessions_dropped > max
    {
        failures.push(format!(
            "{} session(s) dropped, more than --max-dropped {max}",
            report.sessions_dropped
        ));
    }
    if let Some(max) = report.limits.max_stall
        && longest_stall > max
    {
        failures.push(format!(
            "longest stall {}, more than --max-stall {}",
            format_seconds(longest_stall),
            humantime::format_duration(max)
        ));
    }
    let passed = failures.is_empty();
    Verdict {
        passed,
        exit_status: if passed { EXIT_PASSED } else { EXIT_FAILED },
        failures,
    }
}

/// The report as text, for a terminal or a log.
pub fn render_text(report: &ProbeReport) -> String {
    let mut lines = Vec::new();
    lines.push(format!(
        "pgshift probe run {} against {}: {} client(s) at {} ops/s each, {}% writes, {} protocol, table {}",
        report.run_id,
        report.target,
        report.clients,
        report.rate_per_client,
        round_to(report.write_ratio * 100.0, 1),
        report.protocol,
        report.table
    ));
    lines.push(format!(
        "ran {:.1}s of {:.1}s from {}{}",
        report.duration_s,
        report.planned_duration_s,
        report.started_at,
        if report.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    ));
    let operations = &report.operations;
    lines.push(format!(
        "operations: {} ({} succeeded, {} failed; {} reads, {} reads failed, {} writes acknowledged, {} writes failed, {} in doubt), {} ops/s",
        operations.total,
        operations.succeeded,
        operations.failed,
        operations.reads,
        operations.reads_failed,
        operations.writes_acknowledged,
        operations.writes_failed,
        report.writes_in_doubt,
        operations.per_second
    ));
    let mut by_code: Vec<String> = report
        .errors
        .by_sqlstate
        .iter()
        .map(|(code, count)| format!("{code}: {count}"))
        .collect();
    by_code.push(format!(
        "without SQLSTATE: {}",
        report.errors.without_sqlstate
    ));
    lines.push(format!(
        "errors: {} ({}); {} of them failed connection attempts",
        report.errors.total,
        by_code.join(", "),
        report.errors.connect_failures
    ));
    lines.push(format!(
        "sessions dropped: {} ({} connections opened)",
        report.sessions_dropped, report.connections_opened
    ));
    let latency = &report.latency_ms;
    lines.push(match (latency.p50, latency.p99, latency.max) {
        (Some(p50), Some(p99), Some(max)) => format!(
            "latency per operation: p50 {p50} ms, p99 {p99} ms, max {max} ms ({} samples)",
            latency.samples
        ),
        _ => "latency per operation: no successful operation".to_string(),
    });
    match &report.longest_stall {
        Some(stall) => lines.push(format!(
            "longest stall: {} (client {}, from {}, {} s into the run)",
            format_stall(stall.longest_ms),
            stall.client,
            stall.began_at,
            stall.began_after_s
        )),
        None => lines.push("longest stall: none".to_string()),
    }
    let listed = report.stalls.len().min(STALLS_LISTED);
    if listed > 0 {
        let heading = if listed < report.stalls.len() {
            format!(
                "longest stall per client (the {listed} longest of {}; --json has all):",
                report.stalls.len()
            )
        } else {
            "longest stall per client:".to_string()
        };
        lines.push(heading);
        for stall in &report.stalls[..listed] {
            lines.push(format!(
                "  client {}: {} from {} (+{} s)",
                stall.client,
                format_stall(stall.longest_ms),
                stall.began_at,
                stall.began_after_s
            ));
        }
    }
    lines.push(format!(
        "read-your-writes violations: {}",
        report.read_your_writes_violations
    ));
    lines.push(format!(
        "stale reads after reconnect: {}",
        report.stale_reads_after_reconnect
    ));
    lines.push(format!(
        "writes in doubt (COMMIT sent, no answer; never counted missing): {}",
        report.writes_in_doubt
    ));
    if report.commits_outside_transaction > 0 {
        lines.push(format!(
            "COMMITs outside a transaction (the session's backend changed; not acknowledged): {}",
            report.commits_outside_transaction
        ));
    }
    for result in &report.verify {
        lines.push(match (result.missing, &result.error) {
            (Some(missing), _) => {
                let mut line = format!(
                    "verify {}: acknowledged writes missing: {missing} (of {} checked, polled {} s)",
                    result.database, result.checked, result.waited_s
                );
                if !result.missing_sample.is_empty() {
                    let sample: Vec<String> = result
                        .missing_sample
                        .iter()
                        .map(|key| format!("client {} seq {}", key.client, key.seq))
                        .collect();
                    line.push_str(&format!("; e.g. {}", sample.join(", ")));
                }
                if result.unacknowledged_present > 0 {
                    line.push_str(&format!(
                        "; {} unacknowledged row(s) present",
                        result.unacknowledged_present
                    ));
                }
                line
            }
            (None, error) => format!(
                "verify {}: could not verify: {}",
                result.database,
                error.as_deref().unwrap_or("no answer")
            ),
        });
    }
    if report.verdict.passed {
        lines.push("verdict: passed (exit 0)".to_string());
    } else {
        lines.push(format!(
            "verdict: FAILED (exit {}): {}",
            report.verdict.exit_status,
            report.verdict.failures.join("; ")
        ));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn stall_row(client: u32, stall: Stall, started_at: SystemTime) -> StallRow {
    StallRow {
        client,
        longest_ms: millis(stall.length),
        began_after_s: round_to(stall.began_at.as_secs_f64(), 3),
        began_at: humantime::format_rfc3339_millis(started_at + stall.began_at).to_string(),
    }
}

/// A duration in milliseconds, to the microsecond.
fn millis(duration: Duration) -> f64 {
    round_to(duration.as_secs_f64() * 1000.0, 3)
}

/// A stall for people: milliseconds below a second, seconds above.
fn format_stall(milliseconds: f64) -> String {
    if milliseconds >= 1000.0 {
        format!("{:.2} s", milliseconds / 1000.0)
    } else {
        format!("{milliseconds:.1} ms")
    }
}

fn format_seconds(duration: Duration) -> String {
    format!("{}s", round_to(duration.as_secs_f64(), 3))
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn serialize_optional_millis<S: serde::Serializer>(
    value: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(duration) => serializer.serialize_some(&millis(*duration)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn facts() -> RunFacts {
        RunFacts {
            run_id: "r1".to_string(),
            target: "app@h:5432/app".to_string(),
            table: "public.pgshift_probe".to_string(),
            protocol: "extended".to_string(),
            clients: 2,
            rate_per_client: 10.0,
            write_ratio: 0.5,
            started_at: SystemTime::UNIX_EPOCH,
            planned_duration: Duration::from_secs(10),
            elapsed: Duration::from_secs(10),
            interrupted: false,
        }
    }

    fn quiet_client(client: u32) -> ClientTally {
        let mut tally = ClientTally::new(client, Duration::ZERO);
        tally.connections_opened = 1;
        for step in 1..=100u64 {
            tally.record_success(ms(step * 100), ms(2));
            if step % 2 == 0 {
                tally.acknowledge(step as i64, 1);
            } else {
                tally.record_read(ReadFinding::Consistent);
            }
        }
        tally.finish(Duration::from_secs(10));
        tally
    }

    #[test]
    fn acknowledged_seqs_collapse_into_ranges() {
        let mut seqs = AcknowledgedSeqs::default();
        for seq in [1, 2, 3, 5, 6, 9] {
            seqs.push(seq);
        }
        seqs.push(9); // not above the last: ignored
        seqs.push(4);
        assert_eq!(seqs.ranges(), &[(1, 3), (5, 6), (9, 9)]);
        assert_eq!(seqs.len(), 6);
        assert!(!seqs.is_empty());
    }

    #[test]
    fn the_longest_stall_is_the_largest_gap_between_successes_and_when_it_began() {
        let mut stalls = StallTracker::starting_at(ms(0));
        for at in [50, 100, 150, 1_150, 1_200] {
            stalls.success(ms(at));
        }
        stalls.finish(ms(1_300));
        assert_eq!(
            stalls.longest(),
            Stall {
                length: ms(1_000),
                began_at: ms(150)
            }
        );
    }

    #[test]
    fn a_session_that_never_recovers_stalls_until_the_end_of_the_run() {
        let mut stalls = StallTracker::starting_at(ms(0));
        stalls.success(ms(100));
        stalls.finish(ms(5_000));
        assert_eq!(
            stalls.longest(),
            Stall {
                length: ms(4_900),
                began_at: ms(100)
            }
        );
        let mut never = StallTracker::starting_at(ms(20));
        never.finish(ms(3_020));
        assert_eq!(never.longest().length, ms(3_000));
    }

    #[test]
    fn latency_percentiles_come_within_one_percent_and_never_exceed_the_maximum() {
        let mut latency = LatencyTally::default();
        for value in 1..=1000u64 {
            latency.record(Duration::from_micros(value * 100)); // 0.1 ms .. 100 ms
        }
        let p50 = latency.quantile(0.5).expect("samples").as_secs_f64();
        let p99 = latency.quantile(0.99).expect("samples").as_secs_f64();
        assert!((p50 - 0.050).abs() / 0.050 < 0.01, "p50 {p50}");
        assert!((p99 - 0.099).abs() / 0.099 < 0.01, "p99 {p99}");
        assert_eq!(latency.max(), Some(ms(100)));
        let mut single = LatencyTally::default();
        single.record(Duration::from_micros(1234));
        assert_eq!(single.quantile(0.99), Some(Duration::from_micros(1234)));
        assert_eq!(LatencyTally::default().quantile(0.5), None);
    }

    #[test]
    fn merged_latencies_cover_every_session() {
        let mut fast = LatencyTally::default();
        let mut slow = LatencyTally::default();
        for _ in 0..99 {
            fast.record(ms(1));
        }
        slow.record(ms(500));
        fast.merge(&slow);
        assert_eq!(fast.samples(), 100);
        assert_eq!(fast.max(), Some(ms(500)));
        assert!(fast.quantile(0.5).expect("samples") < ms(2));
    }

    #[test]
    fn errors_are_counted_by_sqlstate_and_without_one() {
        let mut errors = ErrorTally::default();
        errors.record(Some("57P01"));
        errors.record(Some("57P01"));
        errors.record(None);
        let mut other = ErrorTally::default();
        other.record(Some("08006"));
        errors.merge(&other);
        assert_eq!(errors.total(), 4);
        assert_eq!(errors.by_sqlstate.get("57P01"), Some(&2));
        assert_eq!(errors.by_sqlstate.get("08006"), Some(&1));
        assert_eq!(errors.without_sqlstate, 1);
    }

    #[test]
    fn only_an_unanswered_commit_is_in_doubt() {
        assert_eq!(
            classify_write_failure(WriteStep::Commit, true),
            WriteEnd::InDoubt
        );
        assert_eq!(
            classify_write_failure(WriteStep::Commit, false),
            WriteEnd::Failed
        );
        assert_eq!(
            classify_write_failure(WriteStep::Insert, true),
            WriteEnd::Failed
        );
        assert_eq!(
            classify_write_failure(WriteStep::Begin, true),
            WriteEnd::Failed
        );
    }

    #[test]
    fn a_miss_on_the_writing_connection_violates_read_your_writes_and_later_ones_are_stale() {
        let write = Some(LastWrite {
            seq: 7,
            connection: 2,
        });
        assert_eq!(judge_read(write, true, 2), ReadFinding::Consistent);
        assert_eq!(
            judge_read(write, false, 2),
            ReadFinding::ReadYourWritesViolation
        );
        assert_eq!(
            judge_read(write, false, 3),
            ReadFinding::StaleAfterReconnect
        );
        assert_eq!(judge_read(None, false, 1), ReadFinding::Consistent);
    }

    #[test]
    fn a_quiet_run_passes() {
        let tallies = [quiet_client(0), quiet_client(1)];
        let verify = vec![VerifyResult {
            database: "app@h:5432/app".to_string(),
            checked: 100,
            missing: Some(0),
            ..VerifyResult::default()
        }];
        let report = summarize(&facts(), &tallies, verify, Limits::default());
        assert_eq!(report.operations.total, 200);
        assert_eq!(report.operations.succeeded, 200);
        assert_eq!(report.operations.writes_acknowledged, 100);
        assert_eq!(report.operations.per_second, 20.0);
        assert_eq!(report.errors.total, 0);
        assert_eq!(report.latency_ms.samples, 200);
        assert_eq!(report.latency_ms.max, Some(2.0));
        assert_eq!(report.stalls.len(), 2);
        assert_eq!(
            report.longest_stall.as_ref().map(|stall| stall.longest_ms),
            Some(100.0)
        );
        assert!(report.verdict.passed, "{:?}", report.verdict);
        assert_eq!(report.verdict.exit_status, EXIT_PASSED);
        let text = render_text(&report);
        assert!(
            text.contains("acknowledged writes missing: 0 (of 100 checked"),
            "{text}"
        );
        assert!(text.contains("verdict: passed (exit 0)"), "{text}");
    }

    #[test]
    fn missing_writes_violations_and_limits_fail_the_run_with_every_reason() {
        let mut troubled = quiet_client(0);
        troubled.record_error(Some("57P01"));
        troubled.record_error(None);
        troubled.sessions_dropped = 2;
        troubled.read_your_writes_violations = 1;
        troubled.record_write_end(WriteEnd::InDoubt);
        troubled.stalls = StallTracker::starting_at(Duration::ZERO);
        troubled.stalls.success(ms(100));
        troubled.stalls.success(ms(3_100));
        let verify = vec![
            VerifyResult {
                database: "blue".to_string(),
                checked: 50,
                missing: Some(0),
                ..VerifyResult::default()
            },
            VerifyResult {
                database: "green".to_string(),
                checked: 50,
                missing: Some(50),
                missing_sample: vec![RowKey { client: 0, seq: 2 }],
                ..VerifyResult::default()
            },
            VerifyResult {
                database: "gone".to_string(),
                error: Some("connection refused".to_string()),
                ..VerifyResult::default()
            },
        ];
        let limits = Limits {
            max_errors: Some(0),
            max_dropped: Some(1),
            max_stall: Some(Duration::from_secs(1)),
        };
        let report = summarize(&facts(), &[troubled], verify, limits);
        assert_eq!(report.errors.total, 2);
        assert_eq!(report.errors.without_sqlstate, 1);
        assert_eq!(report.writes_in_doubt, 1);
        assert_eq!(report.operations.failed, 1);
        assert_eq!(report.verdict.exit_status, EXIT_FAILED);
        let failures = report.verdict.failures.join("\n");
        for expected in [
            "read-your-writes",
            "green: acknowledged writes missing: 50",
            "gone: could not verify (connection refused)",
            "more than --max-errors 0",
            "more than --max-dropped 1",
            "longest stall 3s, more than --max-stall 1s",
        ] {
            assert!(failures.contains(expected), "{expected} in:\n{failures}");
        }
        assert!(!failures.contains("blue"), "{failures}");
        let text = render_text(&report);
        assert!(text.contains("e.g. client 0 seq 2"), "{text}");
        assert!(
            text.contains("errors: 2 (57P01: 1, without SQLSTATE: 1)"),
            "{text}"
        );
    }

    #[test]
    fn limits_that_held_do_not_fail_the_run() {
        let mut tally = quiet_client(0);
        tally.record_error(Some("57P01"));
        let limits = Limits {
            max_errors: Some(1),
            max_dropped: Some(0),
            max_stall: Some(Duration::from_secs(1)),
        };
        let report = summarize(&facts(), &[tally], Vec::new(), limits);
        assert!(report.verdict.passed, "{:?}", report.verdict);
    }

    #[test]
    fn an_interrupted_run_or_one_without_any_success_fails() {
        let mut interrupted = facts();
        interrupted.interrupted = true;
        let report = summarize(
            &interrupted,
            &[quiet_client(0)],
            Vec::new(),
            Limits::default(),
        );
        assert!(!report.verdict.passed);
        let idle = ClientTally::new(0, Duration::ZERO);
        let report = summarize(&facts(), &[idle], Vec::new(), Limits::default());
        assert_eq!(report.verdict.failures, vec!["no operation succeeded"]);
        assert!(render_text(&report).contains("latency per operation: no successful operation"));
    }

    #[test]
    fn stalls_read_in_milliseconds_below_a_second_and_seconds_above() {
        assert_eq!(format_stall(75.236), "75.2 ms");
        assert_eq!(format_stall(2_345.0), "2.35 s");
    }

    #[test]
    fn the_json_names_every_figure() {
        let report = summarize(
            &facts(),
            &[quiet_client(0)],
            Vec::new(),
            Limits {
                max_stall: Some(ms(1500)),
                ..Limits::default()
            },
        );
        let json = serde_json::to_value(&report).expect("serializes");
        for key in [
            "operations",
            "errors",
            "sessions_dropped",
            "latency_ms",
            "longest_stall",
            "stalls",
            "read_your_writes_violations",
            "stale_reads_after_reconnect",
            "writes_in_doubt",
            "verify",
            "verdict",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["limits"]["max_stall_ms"], 1500.0);
        assert_eq!(json["stalls"][0]["began_at"], "1970-01-01T00:00:00.000Z");
    }
}
