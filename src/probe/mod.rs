//! `pgshift probe`: rehearse a migration and measure what applications would see.
//!
//! Many sessions, each on its own connection, write (`BEGIN` / INSERT / `COMMIT`) and read
//! their own latest acknowledged row at a throttled rate while the operator moves traffic
//! (through pgshift, or by hand); at the end the probe reports errors by SQLSTATE, dropped
//! sessions, stalls, latency, read-your-writes violations, writes in doubt, and — with
//! `--verify` — every acknowledged write looked up in each given database.
//!
//! The pieces: [`table`] (the table's SQL, pure), [`connection`] (DSNs and connections),
//! [`setup`] (`--setup` and the checks before a run), [`load`] (the sessions), [`live`] (the
//! view while it runs), [`verify`] (the lookup afterwards) and [`report`] (the pure
//! aggregation, verdict and text). Exit status: 0 passed, 1 a check failed, 2 a usage or setup
//! error (nothing measured).

pub mod connection;
pub mod live;
pub mod load;
pub mod report;
pub mod setup;
pub mod table;
pub mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use self::connection::Target;
use self::live::{LiveCounters, run_live_view};
use self::load::{LoadPlan, Protocol, run_load};
use self::report::{EXIT_FAILED, EXIT_USAGE, Limits, RunFacts, render_text, summarize};
use self::table::{DEFAULT_TABLE, TableName, parse_table_argument};

/// `pgshift probe`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Where the sessions connect: pgshift, or a database directly (libpq key=value DSN or
    /// postgresql:// URL; no TLS). Required unless only --setup is run.
    #[arg(long, value_name = "DSN", required_unless_present = "setup")]
    pub dsn: Option<String>,
    /// Sessions, each on its own connection.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub clients: u32,
    /// How long the sessions run (e.g. 60s, 5m).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Operations per second per session.
    #[arg(long, value_name = "OPS", default_value_t = 20.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Share of operations that are writes (BEGIN / INSERT / COMMIT), 0 to 1; the rest read.
    #[arg(long, value_name = "RATIO", default_value_t = 0.5, value_parser = parse_ratio)]
    pub write_ratio: f64,
    /// How statements travel.
    #[arg(long, value_enum, default_value_t = Protocol::Extended)]
    pub protocol: Protocol,
    /// The probe's table (create it with --setup).
    #[arg(long, value_name = "SCHEMA.NAME", default_value = DEFAULT_TABLE,
          value_parser = parse_table_argument)]
    pub table: TableName,
    /// Also write the whole report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// After the run, look up every acknowledged write in these databases (comma-separated or
    /// repeated; multi-host DSNs are not supported here).
    #[arg(long, value_name = "DSN[,DSN]", value_delimiter = ',')]
    pub verify: Vec<String>,
    /// How long --verify polls for replication to deliver the last rows.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = humantime::parse_duration)]
    pub verify_timeout: Duration,
    /// Fail (exit 1) when more errors than this were seen.
    #[arg(long, value_name = "N")]
    pub max_errors: Option<u64>,
    /// Fail (exit 1) when more sessions than this were dropped.
    #[arg(long, value_name = "N")]
    pub max_dropped: Option<u64>,
    /// Fail (exit 1) when a session stalled longer than this (e.g. 2s).
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    pub max_stall: Option<Duration>,
    /// Create the table on green, then blue, and check that logical replication carries it
    /// (exit 2 with the commands to run until it does); without --dsn, only this.
    #[arg(long, value_name = "BLUE_DSN,GREEN_DSN", value_parser = parse_setup_pair)]
    pub setup: Option<SetupPair>,
}

/// `--setup`'s two DSNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupPair {
    pub blue: String,
    pub green: String,
}

fn parse_setup_pair(text: &str) -> Result<SetupPair, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [blue, green] if !blue.is_empty() && !green.is_empty() => Ok(SetupPair {
            blue: blue.to_string(),
            green: green.to_string(),
        }),
        _ => Err("expected two DSNs separated by a comma: BLUE_DSN,GREEN_DSN".to_string()),
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_string());
    }
    Ok(duration)
}

/// The highest `--rate` accepted (operations per second per session).
const MAX_RATE: f64 = 100_000.0;

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !(rate > 0.0 && rate <= MAX_RATE) {
        return Err(format!(
            "must be above 0 and at most {MAX_RATE} operations per second per session"
        ));
    }
    Ok(rate)
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    let ratio: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err("must be between 0 and 1 (0.25 = a quarter of the operations write)".into());
    }
    Ok(ratio)
}

/// A reason to stop before measuring anything (exit 2).
#[derive(Debug)]
struct Refusal(String);

impl From<setup::SetupError> for Refusal {
    fn from(error: setup::SetupError) -> Refusal {
        Refusal(error.0)
    }
}

/// Runs `pgshift probe` on its own runtime; returns its exit status.
pub fn run_probe(args: ProbeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pgshift probe: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let status = runtime.block_on(async {
        match probe(args).await {
            Ok(status) => status,
            Err(Refusal(message)) => {
                eprintln!("pgshift probe: {message}");
                EXIT_USAGE
            }
        }
    });
    // Connections still closing must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(status)
}

fn parse_target(dsn: &str, role: &str) -> Result<Target, Refusal> {
    if dsn.trim().is_empty() {
        return Err(Refusal(format!("{role}: the DSN is empty")));
    }
    Target::parse(dsn, role).map_err(Refusal)
}

async fn probe(args: ProbeArgs) -> Result<u8, Refusal> {
    let target = args
        .dsn
        .as_deref()
        .map(|dsn| parse_target(dsn, "--dsn"))
        .transpose()?;
    let verify_targets = args
        .verify
        .iter()
        .map(|dsn| parse_target(dsn, "--verify"))
        .collect::<Result<Vec<Target>, Refusal>>()?;
    if let Some(path) = &args.json {
        check_json_destination(path)?;
    }

    if let Some(pair) = &args.setup {
        let blue = parse_target(&pair.blue, "--setup (blue)")?;
        let green = parse_target(&pair.green, "--setup (green)")?;
        setup::set_up(&blue, &green, &args.table, args.verify_timeout, |line| {
            println!("setup: {line}")
        })
        .await?;
    }
    let Some(target) = target else {
        return Ok(report::EXIT_PASSED);
    };

    let main_client = setup::connect_checked("--dsn", &target).await?;
    setup::check_table(&main_client, "--dsn", &target, &args.table, true).await?;
    drop(main_client);
    for verify_target in &verify_targets {
        let client = setup::connect_checked("--verify", verify_target).await?;
        setup::check_table(&client, "--verify", verify_target, &args.table, false).await?;
    }

    let run_id = format!("{:016x}", rand::random::<u64>());
    eprintln!(
        "pgshift probe: run {run_id}: {} session(s) against {} for {}, {} ops/s each",
        args.clients,
        target.label,
        humantime::format_duration(args.duration),
        args.rate
    );
    let plan = Arc::new(LoadPlan::new(
        target.clone(),
        args.table.clone(),
        run_id.clone(),
        args.clients,
        args.rate,
        args.write_ratio,
        args.protocol,
        args.duration,
    ));
    let counters = Arc::new(LiveCounters::new(args.clients as usize));
    let (stop_sender, stop) = watch::channel(false);
    let interrupted = Arc::new(AtomicBool::new(false));
    let interrupt_watch = {
        let interrupted = Arc::clone(&interrupted);
        let stop_sender = stop_sender.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            interrupted.store(true, Ordering::SeqCst);
            stop_sender.send_replace(true);
            eprintln!("pgshift probe: interrupted; finishing (interrupt again to exit at once)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(i32::from(EXIT_FAILED));
            }
        })
    };
    let started = Instant::now();
    let started_at = SystemTime::now();
    let view = tokio::spawn(run_live_view(
        Arc::clone(&counters),
        started,
        args.duration,
        stop.clone(),
    ));
    let tallies = run_load(Arc::clone(&plan), counters, started, stop).await;
    let elapsed = started.elapsed();
    stop_sender.send_replace(true);
    let _ = view.await;

    let verify_results = if verify_targets.is_empty() {
        Vec::new()
    } else {
        let acknowledged: Vec<_> = tallies
            .iter()
            .map(|tally| (tally.client, tally.acknowledged.clone()))
            .collect();
        let count: u64 = acknowledged.iter().map(|(_, seqs)| seqs.len()).sum();
        eprintln!(
            "pgshift probe: looking up {count} acknowledged write(s) in {} database(s), polling up to {}",
            verify_targets.len(),
            humantime::format_duration(args.verify_timeout)
        );
        verify::verify_all(
            &verify_targets,
            &args.table,
            &run_id,
            acknowledged,
            args.verify_timeout,
        )
        .await
    };

    let facts = RunFacts {
        run_id,
        target: target.label.clone(),
        table: args.table.to_string(),
        protocol: args.protocol.name().to_string(),
        clients: args.clients,
        rate_per_client: args.rate,
        write_ratio: args.write_ratio,
        started_at,
        planned_duration: args.duration,
        elapsed,
        interrupted: interrupted.load(Ordering::SeqCst),
    };
    let limits = Limits {
        max_errors: args.max_errors,
        max_dropped: args.max_dropped,
        max_stall: args.max_stall,
    };
    interrupt_watch.abort();
    let report = summarize(&facts, &tallies, verify_results, limits);
    print!("{}", render_text(&report));
    let mut status = report.verdict.exit_status;
    if let Some(path) = &args.json
        && let Err(error) = write_json(path, &report)
    {
        eprintln!("pgshift probe: --json {}: {error}", path.display());
        status = EXIT_FAILED;
    }
    Ok(status)
}

/// Refuses a `--json` path whose directory does not exist (before anything is measured).
fn check_json_destination(path: &Path) -> Result<(), Refusal> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if directory.is_dir() && !path.is_dir() {
        Ok(())
    } else {
        Err(Refusal(format!(
            "--json {}: not a file in an existing directory",
            path.display()
        )))
    }
}

fn write_json(path: &Path, report: &report::ProbeReport) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(report).map_err(std::io::Error::from)?;
    text.push('\n');
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        probe: ProbeArgs,
    }

    fn parse(args: &[&str]) -> Result<ProbeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("probe").chain(args.iter().copied()))
            .map(|cli| cli.probe)
    }

    #[test]
    fn defaults_fill_everything_but_the_dsn() {
        let args = parse(&["--dsn", "host=h user=u"]).expect("valid");
        assert_eq!(args.clients, 10);
        assert_eq!(args.duration, Duration::from_secs(60));
        assert_eq!(args.rate, 20.0);
        assert_eq!(args.write_ratio, 0.5);
        assert_eq!(args.protocol, Protocol::Extended);
        assert_eq!(args.table.to_string(), DEFAULT_TABLE);
        assert_eq!(args.verify_timeout, Duration::from_secs(30));
        assert!(args.verify.is_empty());
    }

    #[test]
    fn every_flag_parses() {
        let args = parse(&[
            "--dsn",
            "host=h user=u",
            "--clients",
            "3",
            "--duration",
            "2s",
            "--rate",
            "0.5",
            "--write-ratio",
            "1",
            "--protocol",
            "prepared",
            "--table",
            "ops.probe",
            "--json",
            "out.json",
            "--verify",
            "host=a user=u,host=b user=u",
            "--verify",
            "host=c user=u",
            "--verify-timeout",
            "5s",
            "--max-errors",
            "0",
            "--max-dropped",
            "2",
            "--max-stall",
            "1500ms",
            "--setup",
            "host=blue user=u, host=green user=u",
        ])
        .expect("valid");
        assert_eq!(args.verify.len(), 3);
        assert_eq!(args.max_stall, Some(Duration::from_millis(1500)));
        assert_eq!(
            args.setup,
            Some(SetupPair {
                blue: "host=blue user=u".to_string(),
                green: "host=green user=u".to_string()
            })
        );
        assert_eq!(args.protocol, Protocol::Prepared);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for bad in [
            vec![],
            vec!["--dsn", "h", "--write-ratio", "1.5"],
            vec!["--dsn", "h", "--write-ratio", "-0.1"],
            vec!["--dsn", "h", "--rate", "0"],
            vec!["--dsn", "h", "--rate", "fast"],
            vec!["--dsn", "h", "--clients", "0"],
            vec!["--dsn", "h", "--duration", "0s"],
            vec!["--dsn", "h", "--protocol", "copy"],
            vec!["--dsn", "h", "--table", "a.b.c"],
            vec!["--setup", "only-one"],
            vec!["--setup", "a,b,c"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse(&["--setup", "host=a,host=b"]).is_ok());
    }
}
