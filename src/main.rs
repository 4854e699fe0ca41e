//! The `pgshift` command line: `run` the proxy, steer it with `ctl`, `check` a config.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgshift::admin::client::{CtlArgs, run_ctl};
use pgshift::config::Config;
use pgshift::controller::{Actor, Command as ControllerCommand};
use pgshift::server::{Server, ServerOptions, state_store};

#[derive(Parser)]
#[command(
    name = "pgshift",
    version,
    about = "A Postgres proxy for blue-green database cutovers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground (logs to stderr; SIGTERM/SIGINT = graceful shutdown).
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=pgshift=debug).
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "PGSHIFT_LOG_FORMAT")]
        log_format: LogFormat,
        /// Discard the saved routing state ([rollout] state_file) and start from the config.
        #[arg(long)]
        reset_state: bool,
    },
    /// Send one admin command to a running pgshift and print the reply.
    Ctl(CtlArgs),
    /// Validate a config file and print what it would do; every problem is listed.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rehearse a migration: many sessions writing and reading; errors, stalls and missing
    /// acknowledged writes reported.
    Probe(pgshift::probe::ProbeArgs),
    /// Create (or print) what a transparent cutover needs on both colors: the marker table,
    /// its publication membership, the subscription refresh.
    CutoverSetup(pgshift::cutover::SetupArgs),
    /// Run a one-command demo on this machine: two throwaway clusters, a broken rollout rolled
    /// back, a healthy one promoted.
    Demo(pgshift::demo::DemoArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Config sections this build puts to work; the others are accepted and reported as inactive.
const ACTIVE_SECTIONS: &[&str] = &[
    "listen", "admin", "metrics", "blue", "green", "routing", "rollout", "auth", "cutover",
];

/// `pgshift ctl`'s exit code for a usage error (sysexits' EX_USAGE).
const CTL_USAGE_ERROR: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let under_ctl = std::env::args().nth(1).as_deref() == Some("ctl");
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ if under_ctl => ExitCode::from(CTL_USAGE_ERROR),
                _ => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            log_format,
            reset_state,
        } => run(&config, log_format, reset_state),
        Command::Ctl(args) => run_ctl(args),
        Command::Probe(args) => pgshift::probe::run_probe(args),
        Command::Demo(args) => pgshift::demo::run_demo(args),
        Command::CutoverSetup(args) => pgshift::cutover::run_setup(args),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} problem(s); nothing was started",
                path.display(),
                errors.0.len()
            );
            return ExitCode::FAILURE;
        }
    };
    // TLS: every certificate, key and CA file read and checked as `run` would.
    let tls = match pgshift::tls::TlsConfigs::build(&config) {
        Ok(tls) => tls,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} TLS problem(s); nothing was started",
                path.display(),
                errors.0.len()
            );
            return ExitCode::FAILURE;
        }
    };
    for line in config.describe(ACTIVE_SECTIONS) {
        println!("{line}");
    }
    for line in &tls.loaded {
        println!("[tls] {line}");
    }
    // [auth]: the userlist read, the mock exchange's secret file.
    match pgshift::auth::check(&config) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
        }
        Err(error) => {
            eprintln!("{error}");
            eprintln!("{}: an [auth] problem; nothing was started", path.display());
            return ExitCode::FAILURE;
        }
    }
    let store = state_store(&config);
    match store.load() {
        Ok(Some(saved)) => println!(
            "[rollout] the state file {} holds green weight {} (state {}): it wins over [routing] green_weight at start (run --reset-state discards it)",
            store.describe(),
            pgshift::config::format_percent(saved.green_weight_bp),
            saved.state.as_str()
        ),
        Ok(None) => println!(
            "[rollout] no saved state in {}: pgshift starts from [routing] green_weight",
            store.describe()
        ),
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    }
    // [cutover] transparent: replication and the marker table, read from both colors.
    if config.cutover.mode == pgshift::config::CutoverMode::Transparent {
        let backends = tls.backends.clone();
        let config = std::sync::Arc::new(config.clone());
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => {
                for line in runtime.block_on(pgshift::cutover::readiness(config, backends)) {
                    println!("{line}");
                }
            }
            Err(error) => println!("warning: [cutover] cannot check replication: {error}"),
        }
    }
    for warning in config.warnings().iter().chain(&tls.warnings) {
        println!("warning: {warning}");
    }
    if let Some(warning) = file_limit_warning(config.listen.max_clients) {
        println!("warning: {warning}");
    }
    println!("{}: OK", path.display());
    ExitCode::SUCCESS
}

/// File descriptors one client session needs: its own socket and its backend's.
const FDS_PER_SESSION: u64 = 2;
/// Descriptors kept for listeners, the admin socket, logs and the runtime.
const FDS_RESERVED: u64 = 64;

fn file_limit_needed(max_clients: usize) -> u64 {
    max_clients as u64 * FDS_PER_SESSION + FDS_RESERVED
}

/// A warning when even the hard open-file limit cannot hold `max_clients` sessions.
fn file_limit_warning(max_clients: usize) -> Option<String> {
    let (_, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let needed = file_limit_needed(max_clients);
    (hard < needed).then(|| {
        format!(
            "the open-file limit ({hard}) cannot hold [listen] max_clients = {max_clients} ({needed} descriptors needed); raise it (ulimit -n, LimitNOFILE=) or lower max_clients"
        )
    })
}

fn run(path: &std::path::Path, log_format: LogFormat, reset_state: bool) -> ExitCode {
    init_tracing(log_format);
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            for problem in &errors.0 {
                tracing::error!("{problem}");
            }
            return ExitCode::from(2);
        }
    };
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised to the hard limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    if let Some(warning) = file_limit_warning(config.listen.max_clients) {
        tracing::warn!("{warning}");
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, path.to_path_buf(), reset_state))
}

async fn serve(config: Config, path: PathBuf, reset_state: bool) -> ExitCode {
    let options = ServerOptions {
        reset_state,
        ..ServerOptions::default()
    };
    let server = match Server::start(config, path, options).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!("{error:#}");
            return ExitCode::FAILURE;
        }
    };
    let controller = server.controller().clone();
    let reloads = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match controller
                    .execute(ControllerCommand::Reload, Actor::Signal)
                    .await
                {
                    Ok(_) => {}
                    Err(error) => tracing::error!("SIGHUP: {error}"),
                }
            }
        }),
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP");
            return ExitCode::FAILURE;
        }
    };
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot listen for signals");
            return ExitCode::FAILURE;
        }
    };
    let name = signals.next().await;
    tracing::info!(
        signal = name,
        "graceful shutdown started (send it again to exit at once)"
    );
    reloads.abort();
    let shutdown = server.shutdown();
    tokio::select! {
        _ = shutdown => ExitCode::SUCCESS,
        name = signals.next() => {
            tracing::warn!(signal = name, "second signal: exiting at once");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT, as one stream.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
