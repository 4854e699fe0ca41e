//! `pgshift demo`: the whole product on this machine, in one command, in about a minute.
//!
//! 1. Two throwaway PostgreSQL clusters, blue and green, in a temp dir on free ports
//!    ([`clusters`]): the same role (same SCRAM verifier) and schema on both, data loaded into
//!    blue, logical replication blue → green, green caught up. Logical replication copies
//!    neither sequences nor roles: the keys are UUIDs and the role is created on both, and the
//!    output says so.
//! 2. pgshift started in-process ([`Server::start`]) on a generated config ([`settings`]), and
//!    an application load through it ([`load`]): several instances and tenants, reads and
//!    writes, sessions replaced every second or so, so new sessions follow the weight.
//! 3. Green broken on purpose (the load's INSERT privilege revoked on green only), `rollout
//!    start`, and pgshift rolling back on its own; its decision and reason are printed.
//! 4. Green repaired, `rollout start` again, and the climb to promotion shown live ([`ui`]).
//! 5. A summary (requests per color, errors the application saw, the decisions), then
//!    everything stopped by PID and the temp dir removed — on Ctrl-C too.
//!
//! Commands reach the controller as an operator's would, through
//! [`ControllerHandle::execute`]. `--keep` leaves everything running (connection string, admin
//! socket and metrics URL printed) until Ctrl-C. Exit status: 0 when both the automatic
//! rollback and the promotion were seen, 1 when the demo failed, 2 when it cannot run here (no
//! PostgreSQL server binaries, root without a `postgres` user), 130 when interrupted.

pub mod clusters;
pub mod load;
pub mod settings;
pub mod ui;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Map, Value};
use tokio::time::Instant;

use self::clusters::{Cluster, OsUser, Workdir};
use self::load::{Load, LoadCounters};
use self::settings::{Ports, STEPS, Timing};
use self::ui::{Frame, LiveView};
use crate::color::Color;
use crate::config::Config;
use crate::controller::{Actor, Command, ControllerHandle};
use crate::server::{Server, ServerOptions};

/// Exit status when the demo cannot run on this machine.
const EXIT_CANNOT_RUN: u8 = 2;
/// Exit status after Ctrl-C or SIGTERM (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;
/// How often the live view asks the controller for `status`.
const POLL: Duration = Duration::from_millis(250);

/// `pgshift demo`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Leave everything running at the end (clusters, pgshift, the load) and print the
    /// connection string, the admin socket and the metrics URL; Ctrl-C stops it all.
    #[arg(long)]
    pub keep: bool,
    /// About how long the whole demo takes; the rollout's dwell and window are sized to fit.
    /// Below ~30s the steps cannot shrink further and the demo runs longer than asked.
    #[arg(long, value_name = "D", default_value = "75s", value_parser = parse_duration)]
    pub duration: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration.is_zero() {
        return Err("must be more than 0s".into());
    }
    Ok(duration)
}

/// Runs the demo; the exit status says how it went (see the module doc).
pub fn run_demo(args: DemoArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pgshift demo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let status = runtime.block_on(demo(args));
    // Whatever is left (a stuck task) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    status
}

/// SIGINT (Ctrl-C) and SIGTERM, registered before anything starts.
struct Interrupts {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> std::io::Result<Interrupts> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Interrupts {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    let mut interrupts = match Interrupts::new() {
        Ok(interrupts) => interrupts,
        Err(error) => {
            eprintln!("pgshift demo: cannot listen for Ctrl-C: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "pgshift demo: two throwaway PostgreSQL clusters, a broken rollout rolled back, a healthy one promoted (about {}).",
        humantime::format_duration(args.duration)
    );
    let bin = match clusters::find_pg_bin() {
        Ok(bin) => bin,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    let owner = match clusters::server_os_user() {
        Ok(owner) => owner,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    let workdir = match Workdir::create(owner.as_ref()) {
        Ok(workdir) => workdir,
        Err(error) => {
            eprintln!("pgshift demo: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("temp dir: {}", workdir.path().display());
    let mut demo = Demo::new(args, bin, owner, workdir);
    let outcome = tokio::select! {
        outcome = demo.run() => outcome.map_err(Stop::Failed),
        name = interrupts.next() => Err(Stop::Interrupted(name)),
    };
    let status = match &outcome {
        Ok(()) => {
            demo.summary(!demo.args.keep).await;
            if demo.args.keep {
                demo.keep(&mut interrupts).await;
            }
            ExitCode::SUCCESS
        }
        Err(Stop::Failed(error)) => {
            demo.view
                .message(&format!("\npgshift demo failed: {error:#}"));
            demo.summary(true).await;
            ExitCode::FAILURE
        }
        Err(Stop::Interrupted(name)) => {
            demo.view
                .message(&format!("\n{name}: stopping the demo and cleaning up"));
            demo.summary(true).await;
            ExitCode::from(EXIT_INTERRUPTED)
        }
    };
    demo.shutdown().await;
    status
}

/// Why the demo's run ended early.
enum Stop {
    Failed(anyhow::Error),
    Interrupted(&'static str),
}

/// Everything one run started, so that whatever exists is stopped however the run ends.
/// Fields drop in order: the clusters (killed if still running) before the temp dir.
struct Demo {
    args: DemoArgs,
    started: Instant,
    view: LiveView,
    bin: PathBuf,
    owner: Option<OsUser>,
    blue: Option<Cluster>,
    green: Option<Cluster>,
    server: Option<Server>,
    metrics_addr: Option<SocketAddr>,
    load: Option<Load>,
    /// What the application saw; kept after the load stops.
    app: Option<Arc<LoadCounters>>,
    proxy_port: u16,
    /// Every decision seen in `status`, by id.
    decisions: BTreeMap<u64, Value>,
    rollback_reason: Option<String>,
    promoted: bool,
    /// Orders the clusters held after the setup (for the summary).
    orders_loaded: i64,
    workdir: Workdir,
}

impl Demo {
    fn new(args: DemoArgs, bin: PathBuf, owner: Option<OsUser>, workdir: Workdir) -> Demo {
        Demo {
            args,
            started: Instant::now(),
            view: LiveView::new(),
            bin,
            owner,
            blue: None,
            green: None,
            server: None,
            metrics_addr: None,
            load: None,
            app: None,
            proxy_port: 0,
            decisions: BTreeMap::new(),
            rollback_reason: None,
            promoted: false,
            orders_loaded: 0,
            workdir,
        }
    }

    fn note(&mut self, text: &str) {
        self.view.message(&format!("  {text}"));
    }

    fn blue(&self) -> anyhow::Result<&Cluster> {
        self.blue
            .as_ref()
            .ok_or_else(|| anyhow!("blue is not running"))
    }

    fn green(&self) -> anyhow::Result<&Cluster> {
        self.green
            .as_ref()
            .ok_or_else(|| anyhow!("green is not running"))
    }

    fn controller(&self) -> anyhow::Result<ControllerHandle> {
        self.server
            .as_ref()
            .map(|server| server.controller().clone())
            .ok_or_else(|| anyhow!("pgshift is not running"))
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        self.start_clusters().await?;
        self.replicate().await?;
        let timing = self.start_pgshift_and_load().await?;
        self.broken_rollout(&timing).await?;
        self.healthy_rollout(&timing).await
    }

    async fn start_clusters(&mut self) -> anyhow::Result<()> {
        self.view
            .section("1/5", "Two throwaway PostgreSQL clusters");
        let owner = self.owner.clone();
        let as_user = owner
            .as_ref()
            .map(|user| format!(", run as the `{}` OS user", user.name))
            .unwrap_or_default();
        self.note(&format!("server binaries: {}{as_user}", self.bin.display()));
        let blue = Cluster::prepare(&self.workdir, Color::Blue, &self.bin, owner.as_ref())?;
        let green = Cluster::prepare(&self.workdir, Color::Green, &self.bin, owner.as_ref())?;
        let (blue_init, green_init) = tokio::join!(blue.initdb(), green.initdb());
        blue_init?;
        green_init?;
        self.blue = Some(blue);
        self.green = Some(green);
        if let (Some(blue), Some(green)) = (self.blue.as_mut(), self.green.as_mut()) {
            let (blue_started, green_started) = tokio::join!(blue.start(true), green.start(false));
            blue_started?;
            green_started?;
        }
        let version: String = self
            .blue()?
            .connect("postgres")
            .await?
            .query_one("SHOW server_version", &[])
            .await?
            .get(0);
        let (blue, green) = (self.blue()?, self.green()?);
        let lines = [
            format!(
                "blue   PostgreSQL {version} on 127.0.0.1:{} (wal_level = logical), pid {}",
                blue.port,
                blue.pid().unwrap_or(0)
            ),
            format!(
                "green  PostgreSQL {version} on 127.0.0.1:{}, pid {}",
                green.port,
                green.pid().unwrap_or(0)
            ),
        ];
        for line in lines {
            self.note(&line);
        }
        Ok(())
    }

    async fn replicate(&mut self) -> anyhow::Result<()> {
        self.view.section(
            "2/5",
            "Same role, same schema, data on blue, logical replication blue → green",
        );
        let (blue, green) = (self.blue()?, self.green()?);
        clusters::create_roles_and_databases(blue, green).await?;
        clusters::create_schema_data_and_replication(blue, green).await?;
        let rows = clusters::wait_caught_up(blue, green).await?;
        self.orders_loaded = rows;
        let user = clusters::APP_USER;
        for line in [
            format!("role {user}: created on blue, then on green with blue's SCRAM verifier (ALTER ROLE {user} PASSWORD 'SCRAM-SHA-256$4096:…'), so one password logs in on both"),
            format!("tables tenants and orders on both; {} orders for {} tenants loaded into blue", clusters::ORDERS_LOADED, clusters::TENANTS.len()),
            format!("publication shop_pub on blue, subscription shop_sub on green (copy_data = true): green caught up, {rows} orders on each"),
            "note: logical replication copies neither sequences nor roles. The keys here are UUIDs (gen_random_uuid()), not serials, and the role was created on both by hand.".to_string(),
        ] {
            self.note(&line);
        }
        Ok(())
    }

    async fn start_pgshift_and_load(&mut self) -> anyhow::Result<Timing> {
        self.view
            .section("3/5", "pgshift in front of them, and an application");
        let deadline = self.started + self.args.duration;
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(settings::CLEANUP_ALLOWANCE);
        let timing = Timing::for_budget(budget);
        let ports = Ports {
            proxy: clusters::free_port()?,
            metrics: clusters::free_port()?,
            blue: self.blue()?.port,
            green: self.green()?.port,
        };
        let config_path = self.workdir.path().join("pgshift.toml");
        std::fs::write(&config_path, settings::pgshift_config(ports, &timing))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let config = Config::load(&config_path)
            .map_err(|errors| anyhow!("the demo's config is invalid:\n{errors}"))?;
        let server = Server::start(config, config_path.clone(), ServerOptions::default()).await?;
        let admin_socket = server.admin_socket().to_path_buf();
        self.proxy_port = server.proxy().local_addr().port();
        self.metrics_addr = server.metrics_addr();
        self.server = Some(server);
        let steps: Vec<String> = STEPS.iter().map(|step| format!("{step}%")).collect();
        let metrics = self
            .metrics_addr
            .map(|addr| format!(", metrics http://{addr}/metrics"))
            .unwrap_or_default();
        for line in [
            format!(
                "pgshift on 127.0.0.1:{} (admin socket {}{metrics}); config {}",
                self.proxy_port,
                admin_socket.display(),
                config_path.display()
            ),
            format!(
                "rollout plan: {}, each step held {}, triggers evaluated every {} over a {} window",
                steps.join(" → "),
                humantime::format_duration(timing.step_dwell),
                humantime::format_duration(timing.evaluate_every),
                humantime::format_duration(timing.window)
            ),
            format!(
                "triggers: green's error_rate above {} → rollback; green's latency_p95_ms above {} → pause (2 and 3 evaluations in a row)",
                settings::ERROR_RATE_ROLLBACK,
                settings::LATENCY_P95_PAUSE_MS
            ),
        ] {
            self.note(&line);
        }
        let load = Load::start(load::Target {
            host: "127.0.0.1".into(),
            port: self.proxy_port,
            user: clusters::APP_USER.into(),
            password: clusters::APP_PASSWORD.into(),
            database: clusters::DATABASE.into(),
        });
        self.app = Some(load.counters.clone());
        self.load = Some(load);
        self.note(&format!(
            "application: {} instances ({}), tenants {}; 30% inserts, 70% reads; each session replaced about every second, so new sessions follow the weight",
            load::INSTANCES.len(),
            load::INSTANCES.join(", "),
            clusters::TENANTS.join(", ")
        ));
        self.watch(timing.warm_up(), "the warm-up", |_| false, |_| None)
            .await
            .ok();
        Ok(timing)
    }

    async fn broken_rollout(&mut self, timing: &Timing) -> anyhow::Result<()> {
        self.view
            .section("4/5", "A broken green: the rollout rolls itself back");
        clusters::execute(self.green()?, clusters::BREAK_GREEN_SQL).await?;
        self.note(&format!(
            "on green only: {}; the application's inserts will fail there (42501)",
            clusters::BREAK_GREEN_SQL
        ));
        self.command(Command::RolloutStart).await?;
        let status = self
            .watch(
                timing.rollback_limit(),
                "the automatic rollback",
                |status| field(status, "state") == "rolled_back",
                |status| {
                    (field(status, "state") == "promoted")
                        .then(|| "the broken green was promoted".to_string())
                },
            )
            .await?;
        let reason = status
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("(no reason given)")
            .to_string();
        self.view.settle();
        self.note(&format!("pgshift rolled back on its own: {reason}"));
        self.note("green is at 0% and draining: its sessions close at their next idle point (57P01), no transaction is cut; new sessions go to blue");
        self.rollback_reason = Some(reason);
        Ok(())
    }

    async fn healthy_rollout(&mut self, timing: &Timing) -> anyhow::Result<()> {
        self.view
            .section("5/5", "Green repaired: the rollout climbs to promotion");
        clusters::execute(self.green()?, clusters::REPAIR_GREEN_SQL).await?;
        self.note(&format!("on green: {}", clusters::REPAIR_GREEN_SQL));
        self.command(Command::Undrain(Color::Green)).await?;
        self.note(&format!(
            "waiting one window ({}) so the triggers no longer see the broken minutes",
            humantime::format_duration(timing.window)
        ));
        self.watch(
            timing.window + timing.evaluate_every,
            "the window",
            |_| false,
            |_| None,
        )
        .await
        .ok();
        self.command(Command::RolloutStart).await?;
        self.watch(
            timing.promotion_limit(),
            "the promotion",
            |status| field(status, "state") == "promoted",
            |status| {
                (field(status, "state") == "rolled_back").then(|| {
                    format!(
                        "the repaired green was rolled back: {}",
                        field(status, "reason")
                            .as_str()
                            .unwrap_or("no reason given")
                    )
                })
            },
        )
        .await?;
        self.promoted = true;
        self.view.settle();
        self.note("promoted: green takes 100% of new sessions; blue is drained after drain_grace, its sessions closed at idle points");
        // Show blue emptying.
        self.watch(
            timing.drain_grace + Duration::from_secs(2),
            "blue's drain",
            |status| field(status, "blue")["sessions"].as_i64() == Some(0),
            |_| None,
        )
        .await
        .ok();
        self.view.settle();
        Ok(())
    }

    /// Sends one command to the controller as the demo, printing the decision it records.
    async fn command(&mut self, command: Command) -> anyhow::Result<Map<String, Value>> {
        let verb = command.verb();
        self.note(&format!("» {verb}"));
        let reply = self
            .controller()?
            .execute(command, Actor::Internal)
            .await
            .map_err(|error| anyhow!("`{verb}` was refused: {error}"))?;
        self.status().await?;
        Ok(reply)
    }

    /// `status`, printing the decisions not seen yet.
    async fn status(&mut self) -> anyhow::Result<Map<String, Value>> {
        let status = self
            .controller()?
            .execute(Command::Status, Actor::Internal)
            .await
            .map_err(|error| anyhow!("status: {error}"))?;
        let mut fresh: Vec<(u64, Value)> = status
            .get("decisions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|decision| Some((decision["id"].as_u64()?, decision.clone())))
            .filter(|(id, _)| !self.decisions.contains_key(id))
            .collect();
        fresh.sort_by_key(|(id, _)| *id);
        for (id, decision) in fresh {
            let line = describe_decision(&decision);
            self.decisions.insert(id, decision);
            self.view.message(&format!("  {line}"));
        }
        Ok(status)
    }

    /// Shows the live view until `done` says so (`Ok`), `failed` says why not (`Err`), or
    /// `limit` passes (`Err`).
    async fn watch(
        &mut self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Map<String, Value>) -> bool,
        failed: impl Fn(&Map<String, Value>) -> Option<String>,
    ) -> anyhow::Result<Map<String, Value>> {
        let until = Instant::now() + limit;
        loop {
            let status = self.status().await?;
            let mut frame = Frame::from_status(&status, &STEPS, SystemTime::now());
            frame.elapsed = self.started.elapsed();
            if let Some(app) = &self.app {
                frame.app_operations = app.operations();
                frame.app_errors = app.error_count();
            }
            self.view.update(&frame);
            if done(&status) {
                return Ok(status);
            }
            if let Some(why) = failed(&status) {
                bail!("{why}");
            }
            if Instant::now() >= until {
                bail!(
                    "{what} did not happen within {}; the rollout is {} at {}%",
                    humantime::format_duration(Duration::from_secs(limit.as_secs())),
                    field(&status, "state").as_str().unwrap_or("unknown"),
                    field(&status, "green_weight")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The summary: what pgshift served, what the application saw, what was decided. With
    /// `stop_load`, the application stops first, so the figures are final.
    async fn summary(&mut self, stop_load: bool) {
        if stop_load && let Some(load) = self.load.take() {
            load.stop().await;
        }
        if self.server.is_some() {
            let _ = self.status().await;
        }
        self.view.settle();
        let mut lines = vec![String::new(), "Summary".to_string()];
        if let Some(server) = &self.server {
            let stats = &server.proxy().shared().stats;
            let served: Vec<String> = Color::ALL
                .iter()
                .map(|color| {
                    let snapshot = stats.color(*color).snapshot();
                    format!(
                        "{color} {} ({} errors)",
                        snapshot.requests, snapshot.request_errors
                    )
                })
                .collect();
            lines.push(format!("  requests pgshift served:  {}", served.join(", ")));
        }
        let mut green_inserts = 0;
        if let Some(counters) = &self.app {
            let per_color: Vec<String> = Color::ALL
                .iter()
                .map(|color| {
                    format!(
                        "{color} {} reads + {} inserts in {} sessions",
                        counters.reads[color.index()].load(Ordering::Relaxed),
                        counters.writes[color.index()].load(Ordering::Relaxed),
                        counters.sessions[color.index()].load(Ordering::Relaxed)
                    )
                })
                .collect();
            lines.push(format!(
                "  the application:          {} operations ok: {}",
                counters.operations(),
                per_color.join("; ")
            ));
            let errors = counters.errors();
            if errors.is_empty() {
                lines.push("  errors it saw:            none".to_string());
            } else {
                lines.push(format!(
                    "  errors it saw:            {}",
                    counters.error_count()
                ));
                for ((place, what), count) in &errors {
                    lines.push(format!("      {count:>6}  on {place}: {what}"));
                }
            }
            lines.push(format!(
                "  sessions pgshift closed at an idle point (57P01, drains): {}; the application reconnected",
                counters.closed_by_pgshift.load(Ordering::Relaxed)
            ));
            green_inserts = counters.writes[Color::Green.index()].load(Ordering::Relaxed);
        }
        if let (Some(blue), Some(green)) = (&self.blue, &self.green)
            && let Ok((blue_rows, green_rows)) = order_counts(blue, green, green_inserts).await
        {
            lines.push(format!(
                "  orders now:               blue {blue_rows}, green {green_rows} ({} loaded before the start)",
                self.orders_loaded
            ));
            if green_inserts > 0 && green_rows == blue_rows + green_inserts as i64 {
                lines.push(format!(
                    "      green = blue's {blue_rows}, replicated, + the {green_inserts} inserted through green, which blue does not have:"
                ));
                lines.push("      replication runs blue → green only (README: \"Splitting write traffic between two databases\")".to_string());
            }
        }
        if self.decisions.is_empty() {
            lines.push("  decisions:                none".to_string());
        } else {
            lines.push("  decisions:".to_string());
            for decision in self.decisions.values() {
                lines.push(format!("      {}", describe_decision(decision)));
            }
        }
        let seen = |seen: bool| if seen { "seen" } else { "NOT seen" };
        lines.push(format!(
            "  automatic rollback: {}{}; promotion: {}",
            seen(self.rollback_reason.is_some()),
            self.rollback_reason
                .as_ref()
                .map(|reason| format!(" ({reason})"))
                .unwrap_or_default(),
            seen(self.promoted)
        ));
        self.view.message(&lines.join("\n"));
    }

    /// `--keep`: everything stays up until Ctrl-C.
    async fn keep(&mut self, interrupts: &mut Interrupts) {
        let exe = std::env::current_exe()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|_| "pgshift".into());
        let socket = self
            .server
            .as_ref()
            .map(|server| server.admin_socket().display().to_string())
            .unwrap_or_default();
        let mut lines = vec![
            String::new(),
            "Everything keeps running (the application too). Try, from another terminal:"
                .to_string(),
            format!(
                "  psql \"host=127.0.0.1 port={} user={} password={} dbname={}\"",
                self.proxy_port,
                clusters::APP_USER,
                clusters::APP_PASSWORD,
                clusters::DATABASE
            ),
            format!("  {exe} ctl --socket {socket} status"),
            format!("  {exe} ctl --socket {socket} rollback \"trying it\""),
            format!("  {exe} ctl --socket {socket} pin tenant=acme blue"),
        ];
        if let Some(addr) = self.metrics_addr {
            lines.push(format!("  curl -s http://{addr}/metrics | grep ^pgshift_"));
        }
        for cluster in [&self.blue, &self.green].into_iter().flatten() {
            lines.push(format!(
                "  {} as superuser: {}",
                cluster.color,
                cluster.psql_command()
            ));
        }
        lines.push("Ctrl-C stops everything and removes the temp dir.".to_string());
        self.view.message(&lines.join("\n"));
        let name = interrupts.next().await;
        self.view.message(&format!("{name}: cleaning up"));
    }

    /// Stops everything that was started, in order, and removes the temp dir.
    async fn shutdown(&mut self) {
        if let Some(load) = self.load.take() {
            load.stop().await;
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), server.shutdown()).await;
        }
        let (blue, green) = (self.blue.as_mut(), self.green.as_mut());
        match (blue, green) {
            (Some(blue), Some(green)) => {
                // The subscriber first: it holds a connection to blue.
                green.stop().await;
                blue.stop().await;
            }
            (Some(cluster), None) | (None, Some(cluster)) => cluster.stop().await,
            (None, None) => {}
        }
        self.blue = None;
        self.green = None;
        let path = self.workdir.path().display().to_string();
        match self.workdir.remove() {
            Ok(()) => println!("stopped pgshift and both clusters; removed {path}"),
            Err(error) => eprintln!("could not remove {path}: {error}"),
        }
    }
}

/// A field of a reply (`null` when absent: indexing a `Map` would panic).
fn field<'a>(reply: &'a Map<String, Value>, key: &str) -> &'a Value {
    reply.get(key).unwrap_or(&Value::Null)
}

/// Orders on blue and on green, once green has caught up (it holds blue's rows plus the
/// `green_inserts` made on green itself), or after a few seconds.
async fn order_counts(
    blue: &Cluster,
    green: &Cluster,
    green_inserts: u64,
) -> anyhow::Result<(i64, i64)> {
    let blue_db = blue.connect(clusters::DATABASE).await?;
    let green_db = green.connect(clusters::DATABASE).await?;
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let blue_rows = clusters::count_orders(&blue_db).await?;
        let green_rows = clusters::count_orders(&green_db).await?;
        if green_rows == blue_rows + green_inserts as i64 || Instant::now() >= until {
            return Ok((blue_rows, green_rows));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "decision #2 by the monitor: rollback — rolled back: …".
pub fn describe_decision(decision: &Value) -> String {
    let actor = match decision["actor"].as_str().unwrap_or("?") {
        "internal" => "the demo",
        "monitor" => "the monitor",
        other => other,
    };
    format!(
        "decision #{} by {actor}: {} — {}",
        decision["id"],
        decision["action"].as_str().unwrap_or("?"),
        decision["reason"].as_str().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decisions_read_as_sentences() {
        let decision = json!({"id": 2, "action": "rollback", "reason": "rolled back: green weight 10% → 0%: error_rate 0.3 above 0.05", "actor": "monitor"});
        assert_eq!(
            describe_decision(&decision),
            "decision #2 by the monitor: rollback — rolled back: green weight 10% → 0%: error_rate 0.3 above 0.05"
        );
    }

    #[test]
    fn durations_must_be_positive() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
