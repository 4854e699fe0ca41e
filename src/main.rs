//! The `pgshift` command line: `run` the proxy, `check` a config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgshift::config::Config;
use pgshift::proxy::{Proxy, ProxyOptions};

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
    },
    /// Validate a config file and print what it would do; every problem is listed.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Config sections this build puts to work; the others are accepted and reported as inactive.
const ACTIVE_SECTIONS: &[&str] = &["listen", "blue", "green", "routing"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, log_format } => run(&config, log_format),
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
    for line in config.describe(ACTIVE_SECTIONS) {
        println!("{line}");
    }
    for warning in config.warnings() {
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

fn run(path: &std::path::Path, log_format: LogFormat) -> ExitCode {
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
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let proxy = match Proxy::start(config, ProxyOptions::default()).await {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!("{error:#}");
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
    let shutdown = proxy.shutdown();
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
