//! `pgshift ctl`: send one admin command to a running proxy and print its reply.
//!
//! The command is checked locally with [`parse_command`] first, so a typo is a usage error
//! (exit 64) and never reaches the proxy. The socket is found from `--socket`, else the
//! `--config` file's `[admin] socket`, else `$PGSHIFT_SOCKET`, else `./pgshift.sock`. The reply
//! is printed as is with `--json`, else as text ([`super::render`]). Exit codes: 0 done, 1 the
//! proxy refused, 3 the proxy cannot be reached (or did not answer), 64 usage error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::command::parse_command;
use super::render::render_success;
use crate::config::Config;
use crate::controller::Command;

/// The environment variable naming the socket when neither `--socket` nor `--config` is given.
pub const SOCKET_ENV: &str = "PGSHIFT_SOCKET";

/// The socket when nothing else names one (relative to the current directory).
pub const DEFAULT_SOCKET: &str = "./pgshift.sock";

/// How long to wait for the proxy's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest reply read, in bytes (a `status` with many pins is still far below this).
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// Exit status: the proxy refused the command (`ok: false`).
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: the socket cannot be reached, or no usable reply came back.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status: a usage error (unknown or malformed command, bad config file).
pub const EXIT_USAGE: u8 = 64;

/// `pgshift ctl`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct CtlArgs {
    /// The proxy's admin socket.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Find the socket from this config file's `[admin] socket`.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the proxy's raw JSON reply instead of text.
    #[arg(long)]
    pub json: bool,
    /// The admin command, e.g. `status`, `weight 25`, `pin database=app green`, `rollback slow`
    /// (options go before it: everything after the command's first word belongs to it).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// Why `ctl` stops early, with its exit status.
#[derive(Debug)]
struct CtlFailure {
    exit_status: u8,
    message: String,
}

impl CtlFailure {
    fn usage(message: impl Into<String>) -> CtlFailure {
        CtlFailure {
            exit_status: EXIT_USAGE,
            message: message.into(),
        }
    }

    fn unreachable(message: impl Into<String>) -> CtlFailure {
        CtlFailure {
            exit_status: EXIT_UNREACHABLE,
            message: message.into(),
        }
    }
}

/// Runs `pgshift ctl` to the end; synchronous: it builds its own current-thread runtime.
pub fn run_ctl(args: CtlArgs) -> ExitCode {
    match ctl(&args) {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            eprintln!("pgshift ctl: {}", failure.message);
            ExitCode::from(failure.exit_status)
        }
    }
}

fn ctl(args: &CtlArgs) -> Result<u8, CtlFailure> {
    let line = args.command.join(" ");
    let command = parse_command(&line).map_err(|error| {
        CtlFailure::usage(format!("{error}{}", misplaced_option_hint(&args.command)))
    })?;
    let socket = socket_path(args, std::env::var_os(SOCKET_ENV))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            CtlFailure::unreachable(format!("cannot start the async runtime: {error}"))
        })?;
    let reply_line = runtime.block_on(exchange(&socket, &line))?;
    let reply = parse_reply(&reply_line).map_err(|why| {
        CtlFailure::unreachable(format!(
            "unexpected reply from {}: {why}: {}",
            socket.display(),
            reply_line.trim_end()
        ))
    })?;
    Ok(print_reply(args.json, &command, &reply_line, reply))
}

/// A hint when ctl's own options were written after the command, where they belong to it.
fn misplaced_option_hint(words: &[String]) -> &'static str {
    let options = ["--json", "--socket", "--config", "-c"];
    let misplaced = words.iter().skip(1).any(|word| {
        options
            .iter()
            .any(|option| word == option || word.starts_with(&format!("{option}=")))
    });
    if misplaced {
        " (ctl's options go before the command, e.g. `pgshift ctl --json status`)"
    } else {
        ""
    }
}

/// Where the socket is: `--socket`, else `--config`'s `[admin] socket`, else `$PGSHIFT_SOCKET`
/// (`from_environment`), else `./pgshift.sock`.
fn socket_path(args: &CtlArgs, from_environment: Option<OsString>) -> Result<PathBuf, CtlFailure> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    if let Some(config_path) = &args.config {
        return match Config::load(config_path) {
            Ok(config) => Ok(config.admin.socket),
            Err(errors) => Err(CtlFailure::usage(format!(
                "cannot find the admin socket: {} has {} problem(s):\n{errors}",
                config_path.display(),
                errors.0.len()
            ))),
        };
    }
    match from_environment {
        Some(socket) if !socket.is_empty() => Ok(PathBuf::from(socket)),
        _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// Sends `line` and reads one reply line, all within [`REPLY_TIMEOUT`].
async fn exchange(socket: &Path, line: &str) -> Result<String, CtlFailure> {
    let mut stream = UnixStream::connect(socket).await.map_err(|error| {
        CtlFailure::unreachable(format!(
            "cannot reach pgshift at {}: {error}\nis pgshift running, and is that its [admin] socket? (choose it with --socket PATH, --config FILE or ${SOCKET_ENV})",
            socket.display()
        ))
    })?;
    let conversation = async {
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        BufReader::new(&mut stream)
            .take(MAX_REPLY_BYTES)
            .read_until(b'\n', &mut reply)
            .await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = match tokio::time::timeout(REPLY_TIMEOUT, conversation).await {
        Err(_elapsed) => {
            return Err(CtlFailure::unreachable(format!(
                "no reply from pgshift at {} within {}",
                socket.display(),
                humantime::format_duration(REPLY_TIMEOUT)
            )));
        }
        Ok(Err(error)) => {
            return Err(CtlFailure::unreachable(format!(
                "lost the connection to pgshift at {}: {error}",
                socket.display()
            )));
        }
        Ok(Ok(reply)) => reply,
    };
    if reply.last() != Some(&b'\n') {
        return Err(CtlFailure::unreachable(format!(
            "no reply from pgshift at {}: the connection closed before a whole reply line came",
            socket.display()
        )));
    }
    String::from_utf8(reply).map_err(|_| {
        CtlFailure::unreachable(format!(
            "unexpected reply from {}: not UTF-8",
            socket.display()
        ))
    })
}

/// A reply line as its JSON object; it must have a boolean `ok`.
fn parse_reply(line: &str) -> Result<Map<String, Value>, String> {
    let value: Value = serde_json::from_str(line).map_err(|error| format!("not JSON ({error})"))?;
    let Value::Object(reply) = value else {
        return Err("not a JSON object".to_string());
    };
    if !reply.get("ok").is_some_and(Value::is_boolean) {
        return Err("no boolean \"ok\" field".to_string());
    }
    Ok(reply)
}

/// Prints the reply and returns the exit status: 0 when `ok`, 1 when refused.
fn print_reply(json: bool, command: &Command, raw_line: &str, mut reply: Map<String, Value>) -> u8 {
    let ok = reply
        .remove("ok")
        .and_then(|ok| ok.as_bool())
        .unwrap_or(false);
    if json {
        println!("{}", raw_line.trim_end());
    }
    if !ok {
        let error = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("(no reason given)");
        eprintln!("pgshift refused: {error}");
        return EXIT_REFUSED;
    }
    if !json {
        print!("{}", render_success(command, &reply));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn args(words: &[&str]) -> CtlArgs {
        let mut argv = vec!["ctl"];
        argv.extend_from_slice(words);
        match TestCli::try_parse_from(argv) {
            Ok(cli) => cli.ctl,
            Err(error) => panic!("{words:?}: {error}"),
        }
    }

    #[test]
    fn command_words_may_look_like_options() {
        assert_eq!(
            args(&["promote", "--check"]).command,
            ["promote", "--check"]
        );
        assert_eq!(args(&["weight", "-1"]).command, ["weight", "-1"]);
        let parsed = args(&["--json", "--socket", "/s", "rollback", "too", "slow"]);
        assert!(parsed.json);
        assert_eq!(parsed.socket, Some(PathBuf::from("/s")));
        assert_eq!(parsed.command, ["rollback", "too", "slow"]);
    }

    #[test]
    fn a_command_is_required_and_socket_excludes_config() {
        assert!(TestCli::try_parse_from(["ctl"]).is_err());
        assert!(TestCli::try_parse_from(["ctl", "--json"]).is_err());
        assert!(
            TestCli::try_parse_from(["ctl", "--socket", "/s", "--config", "c.toml", "status"])
                .is_err()
        );
    }

    #[test]
    fn options_after_the_command_get_a_hint() {
        let words = |list: &[&str]| list.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert!(
            misplaced_option_hint(&words(&["status", "--json"])).contains("before the command")
        );
        assert!(misplaced_option_hint(&words(&["status", "--socket=/x"])).contains("before"));
        assert_eq!(misplaced_option_hint(&words(&["promote", "--check"])), "");
        assert_eq!(misplaced_option_hint(&words(&["--json"])), "");
    }

    #[test]
    fn socket_discovery_order() {
        let from_env = Some(OsString::from("/run/env.sock"));
        assert_eq!(
            socket_path(
                &args(&["--socket", "/run/flag.sock", "status"]),
                from_env.clone()
            )
            .map_err(|failure| failure.message)
            .ok(),
            Some(PathBuf::from("/run/flag.sock"))
        );
        assert_eq!(
            socket_path(&args(&["status"]), from_env).ok(),
            Some(PathBuf::from("/run/env.sock"))
        );
        assert_eq!(
            socket_path(&args(&["status"]), Some(OsString::new())).ok(),
            Some(PathBuf::from("./pgshift.sock"))
        );
        assert_eq!(
            socket_path(&args(&["status"]), None).ok(),
            Some(PathBuf::from("./pgshift.sock"))
        );
    }

    #[test]
    fn a_broken_config_is_a_usage_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[admin]\nsocket_mode = \"999\"\n").expect("write");
        let failure = socket_path(
            &args(&["--config", &path.display().to_string(), "status"]),
            None,
        )
        .expect_err("a broken config");
        assert_eq!(failure.exit_status, EXIT_USAGE);
        assert!(
            failure.message.contains("admin.socket_mode"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn replies_need_a_boolean_ok() {
        assert!(parse_reply("{\"ok\":true,\"x\":1}\n").is_ok());
        assert!(parse_reply("{\"ok\":false,\"error\":\"no\"}").is_ok());
        assert!(parse_reply("{\"ok\":\"yes\"}").is_err());
        assert!(parse_reply("[1]").is_err());
        assert!(parse_reply("hello").is_err());
    }
}
