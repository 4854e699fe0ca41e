//! Transparent cutover (`[cutover] mode = "transparent"`): `promote` moves the old color's
//! sessions to the new one live (docs/CUTOVER.md).
//!
//! - [`setup`]: the marker table and replication a cutover needs, judged from catalog facts;
//!   the exact SQL still missing (pure).
//! - [`guardrails`]: the refusals before a promote (pure judgment, and the gathering of facts).
//! - [`procedure`]: freeze, catch-up, then commit (sessions move) or abort (they resume).
//! - [`sequences`]: `sync_sequences`, the new color's sequences set past the old color's.
//! - [`session_state`]: what a frozen session carries, read from its backend and replayed on
//!   the new one.
//! - [`catalog`]: every query on the colors' catalogs, through `[cutover] dsn`.
//!
//! The sessions' side (the phase they watch, the login gate, a frozen session's hold and move)
//! is in [`crate::proxy::cutover`] and [`crate::proxy::freeze`].
//!
//! Entry points: [`run_setup`] (`pgshift cutover-setup`), [`readiness`] (`pgshift check`),
//! [`cutover_guardrails`] and [`procedure::freeze_and_catch_up`] (the controller's `promote`).

pub mod catalog;
pub mod guardrails;
pub mod procedure;
pub mod sequences;
pub mod session_state;
pub mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use catalog::Connections;
use guardrails::{GuardOptions, GuardReport};
use setup::{Direction, SetupPlan, plan_setup};

use crate::color::Color;
use crate::config::Config;
use crate::proxy::Shared;
use crate::tls::TlsConfigs;

/// Pause between looks at the subscriber while `cutover-setup` waits for the marker's copy.
const SETUP_POLL: Duration = Duration::from_millis(250);

/// The longest `pgshift check` spends reading the colors' catalogs.
const READINESS_TIMEOUT: Duration = Duration::from_secs(15);

/// `pgshift cutover-setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// The TOML config file (its [cutover] dsn, [blue] and [green] are used).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Print the SQL that is missing and change nothing.
    #[arg(long)]
    pub print: bool,
    /// How long to wait for the subscriptions to copy the marker table (state r).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Set up the reverse direction, green → blue (after a promotion, for a transparent
    /// rollback): the marker in green's publications, blue's subscriptions refreshed.
    #[arg(long)]
    pub reverse: bool,
}

/// Runs `pgshift cutover-setup`: exit 0 when replication is ready for a transparent cutover,
/// 1 when something is left (said on stderr), 2 for a bad config or an unreachable color.
pub fn run_setup(args: SetupArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(config) => Arc::new(config),
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let connections = match TlsConfigs::build(&config)
        .map_err(|errors| errors.to_string())
        .and_then(|tls| Connections::new(config.clone(), tls.backends))
    {
        Ok(connections) => connections,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let direction = if args.reverse {
        Direction {
            publisher: Color::Green,
            subscriber: Color::Blue,
        }
    } else {
        Direction::FORWARD
    };
    match runtime.block_on(set_up(&connections, direction, args.print, args.wait)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(2)
        }
    }
}

async fn plan_for(connections: &Connections, direction: Direction) -> Result<SetupPlan, String> {
    let databases = catalog::read_replication(connections, direction).await?;
    Ok(plan_setup(direction, &databases))
}

/// Applies (or prints) the missing steps, then waits for the marker's copy. `Ok(true)`: ready.
async fn set_up(
    connections: &Connections,
    direction: Direction,
    print_only: bool,
    wait: Duration,
) -> Result<bool, String> {
    let plan = plan_for(connections, direction).await?;
    if print_only {
        if plan.steps.is_empty() {
            println!("-- nothing to create: the marker table is set up everywhere");
        } else {
            print!("{}", plan.script());
        }
        report_left(&plan);
        return Ok(plan.is_ready());
    }
    for step in &plan.steps {
        catalog::apply(connections, step).await?;
        println!(
            "applied on {}, database {}: {}",
            step.color, step.database, step.sql
        );
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut plan = plan_for(connections, direction).await?;
    while !plan.copying_marker.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(SETUP_POLL).await;
        plan = plan_for(connections, direction).await?;
    }
    if plan.is_ready() {
        println!(
            "ready: the marker table is on blue and green in every replicated database and {}'s subscriptions have every table in state r",
            direction.subscriber
        );
        return Ok(true);
    }
    report_left(&plan);
    Ok(false)
}

fn report_left(plan: &SetupPlan) {
    for line in plan.problems.iter().chain(&plan.copying_marker) {
        eprintln!("not ready: {line}");
    }
}

/// Pause between looks at the new color while waiting for the catch-up markers.
const CATCHUP_POLL: Duration = Duration::from_millis(2);

/// Catch-up: writes one marker per (database, publication) on the old color and waits until
/// the new color shows every one (a subscription applies its changes in commit order, so
/// everything committed before the marker is there too). Returns how long it took; past
/// `timeout` (the writes and reads included: a lock can stall either) the error names the
/// publications still behind.
pub async fn catch_up(
    links: &mut catalog::MarkerLinks,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let direction = links.direction();
    let behind = |missing: &[catalog::MarkerWrite]| {
        let which = if missing.is_empty() {
            "(the markers could not even be written)".to_string()
        } else {
            let names: Vec<String> = missing
                .iter()
                .map(|marker| format!("{} (database {})", marker.publication, marker.database))
                .collect();
            format!("for publication(s) {}", names.join(", "))
        };
        format!(
            "{} did not show the catch-up marker within {timeout:?} {which}: replication {} → {} is behind or stopped",
            direction.subscriber, direction.publisher, direction.subscriber
        )
    };
    let token = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // Each step is bounded by the deadline: a lock can stall a write or a read.
    let mut missing = tokio::time::timeout_at(deadline, links.write(&token))
        .await
        .map_err(|_| behind(&[]))??;
    loop {
        missing = tokio::time::timeout_at(deadline, links.missing(&missing))
            .await
            .map_err(|_| behind(&missing))??;
        if missing.is_empty() {
            return Ok(started.elapsed());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(behind(&missing));
        }
        tokio::time::sleep(CATCHUP_POLL).await;
    }
}

/// `pgshift check`'s lines on the transparent cutover's setup: ready, or what is missing (each
/// line a warning: the config is valid either way).
pub async fn readiness(
    config: Arc<Config>,
    tls: [Option<Arc<rustls::ClientConfig>>; 2],
) -> Vec<String> {
    let look = async {
        let connections = Connections::new(config.clone(), tls)?;
        let databases = catalog::read_replication(&connections, Direction::FORWARD).await?;
        let plan = plan_setup(Direction::FORWARD, &databases);
        let privileges = guardrails::missing_privileges(
            &connections,
            Direction::FORWARD,
            &databases,
            config.cutover.sync_sequences,
            config.cutover.reverse_slot.is_some(),
        )
        .await?;
        Ok::<_, String>((databases, plan, privileges))
    };
    let (databases, plan, privileges) = match tokio::time::timeout(READINESS_TIMEOUT, look).await {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            return vec![format!(
                "warning: [cutover] cannot check replication: {error}"
            )];
        }
        Err(_) => {
            return vec![format!(
                "warning: [cutover] cannot check replication: no answer within {READINESS_TIMEOUT:?}"
            )];
        }
    };
    let mut lines = Vec::new();
    if plan.is_ready() {
        let names: Vec<&str> = databases.iter().map(|d| d.database.as_str()).collect();
        lines.push(format!(
            "[cutover] replication blue → green ready for a transparent cutover in database(s) {}",
            names.join(", ")
        ));
    } else {
        lines.push(
            "warning: [cutover] replication is not ready for a transparent cutover:".to_string(),
        );
        lines.extend(plan.describe().into_iter().map(|line| format!("  {line}")));
    }
    lines.extend(
        privileges
            .into_iter()
            .map(|line| format!("warning: [cutover] dsn privileges: {line}")),
    );
    lines
}

/// The guardrails before promoting (`Color::Green` as the new color) or rolling back to blue,
/// read from the running pgshift's sessions and both colors.
pub async fn cutover_guardrails(shared: &Shared, new: Color, force: bool) -> GuardReport {
    let config = shared.config.load_full();
    let direction = Direction {
        publisher: new.other(),
        subscriber: new,
    };
    let gathered = async {
        let connections = Connections::of_proxy(shared)?;
        guardrails::gather(
            &connections,
            direction,
            shared.sessions.count(Some(direction.publisher)),
            config.cutover.sync_sequences,
            // The reverse slot is created at promote only (green publishes back to blue).
            config
                .cutover
                .reverse_slot
                .as_deref()
                .filter(|_| new == Color::Green),
            || shared.cancels.backend_pids(direction.publisher),
        )
        .await
    };
    let limit = config.backend(new).connect_timeout * 4 + READINESS_TIMEOUT;
    let facts = match tokio::time::timeout(limit, gathered).await {
        Ok(Ok(facts)) => facts,
        Ok(Err(error)) => {
            return GuardReport {
                refusals: vec![format!("cannot run the cutover guardrails: {error}")],
                ..GuardReport::default()
            };
        }
        Err(_) => {
            return GuardReport {
                refusals: vec![format!(
                    "cannot run the cutover guardrails: the colors did not answer within {limit:?}"
                )],
                ..GuardReport::default()
            };
        }
    };
    guardrails::judge(
        &facts,
        GuardOptions {
            max_txn_age: config.cutover.max_txn_age,
            force,
        },
    )
}
