//! README.md is the source of this test: every command it shows — each line of its ```sh
//! blocks, and each inline code span that starts with a program (`pgshift …`, `cargo …`,
//! `docker …`, `psql …`) — must either be run here, as written, or be listed in [`COVERAGE`]
//! with the test (or the CI step) that runs it. A command added to the README without an
//! entry fails [`every_readme_command_is_covered`], naming its line.
//!
//! [`readme_commands_work_as_written`] runs the README's own text, in the README's order,
//! through `sh` with the test build's `pgshift` and the PostgreSQL binaries on `PATH`, after
//! the substitutions in [`Rig::substitute`] (the example config's copy, the test clusters'
//! ports, the admin socket, a password, a shorter probe duration). One `pgshift run` serves
//! every `ctl` line; after each `ctl` line its effect is checked in `status`.
//!
//! The Docker Compose lines cannot run here (no Docker engine, no compose plugin): the files
//! they use are checked by `tests/compose.rs`, and the README's own compose lines (services,
//! socket, credentials) by [`compose_commands_agree_with_the_compose_files`].

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::ClusterPair;

// ---------------------------------------------------------------------------------------------
// Reading the commands out of README.md (pure parsing)
// ---------------------------------------------------------------------------------------------

/// One command the README shows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadmeCommand {
    /// The line (1-based) where it starts.
    line: usize,
    /// Its text: comment removed, continuation lines joined, whitespace collapsed.
    text: String,
    /// The fenced block (numbered from 0) holding it; `None` for inline code.
    block: Option<usize>,
}

/// Fenced block languages whose lines are commands.
const SHELL_LANGUAGES: &[&str] = &["sh", "bash", "shell", "console"];

/// Programs: inline code whose first word (after `NAME=value` words) is one of them is a
/// command, and a line of a non-shell block that starts with one is an error.
const PROGRAMS: &[&str] = &[
    "pgshift", "cargo", "docker", "psql", "pg_ctl", "pgbench", "sudo", "apt-get", "dnf", "brew",
    "curl", "kill", "sh", "bash",
];

/// Inline code that names a subcommand rather than running it.
const MENTIONS: &[&str] = &[
    "pgshift ctl",
    "pgshift run",
    "pgshift check",
    "pgshift probe",
    "pgshift cutover-setup",
];

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `NAME=value`, as a shell reads a variable assignment.
fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The program a command runs: its first word after any `NAME=value` words.
fn program_of(text: &str) -> Option<&str> {
    text.split_whitespace().find(|word| !is_assignment(word))
}

/// `line` without its shell comment (a `#` outside quotes, at the start or after a blank).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut escaped) = (false, false, false);
    let mut previous = ' ';
    for (at, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' && !single {
            escaped = true;
        } else if c == '\'' && !double {
            single = !single;
        } else if c == '"' && !single {
            double = !double;
        } else if c == '#' && !single && !double && previous.is_whitespace() {
            return line[..at].trim_end();
        }
        previous = c;
    }
    line.trim_end()
}

/// Inline code spans of `text` (fenced blocks already blanked out), with their lines. A span
/// closes with a backtick run as long as the one that opened it and never crosses a blank line.
fn inline_spans(text: &str) -> Vec<(usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let run_at = |at: usize| chars[at..].iter().take_while(|&&c| c == '`').count();
    let blank_line_after = |at: usize| {
        chars[at + 1..]
            .iter()
            .take_while(|&&c| c != '\n')
            .all(|c| c.is_whitespace())
    };
    let mut spans = Vec::new();
    let (mut at, mut line) = (0, 1);
    while at < chars.len() {
        match chars[at] {
            '\n' => {
                line += 1;
                at += 1;
            }
            '`' => {
                let run = run_at(at);
                let start = at + run;
                let mut end = start;
                let mut close = None;
                while end < chars.len() {
                    if chars[end] == '`' {
                        let found = run_at(end);
                        if found == run {
                            close = Some(end);
                            break;
                        }
                        end += found;
                    } else if chars[end] == '\n' && blank_line_after(end) {
                        break;
                    } else {
                        end += 1;
                    }
                }
                match close {
                    Some(close) => {
                        let content: String = chars[start..close].iter().collect();
                        spans.push((line, content.clone()));
                        line += content.matches('\n').count();
                        at = close + run;
                    }
                    None => at = start,
                }
            }
            _ => at += 1,
        }
    }
    spans
}

/// Every command `markdown` shows, in order; or every problem found (a command in a block that
/// is not a shell block, an unterminated block or continuation line).
fn readme_commands(markdown: &str) -> Result<Vec<ReadmeCommand>, Vec<String>> {
    let mut commands = Vec::new();
    let mut problems = Vec::new();
    // (line it opened on, language, block number)
    let mut fence: Option<(usize, String, usize)> = None;
    let mut blocks = 0;
    // (line it started on, text so far) of a line continued with a backslash
    let mut continued: Option<(usize, String)> = None;
    let mut prose = Vec::new();
    for (index, raw) in markdown.lines().enumerate() {
        let number = index + 1;
        if raw.trim_start().starts_with("```") {
            match fence.take() {
                None => {
                    let language = raw.trim_start().trim_start_matches('`').trim().to_string();
                    fence = Some((number, language, blocks));
                    blocks += 1;
                }
                Some((opened, _, _)) => {
                    if let Some((from, _)) = continued.take() {
                        problems.push(format!(
                            "README.md:{from}: the block opened on line {opened} ends inside a continued line"
                        ));
                    }
                }
            }
            prose.push("");
            continue;
        }
        let Some((_, language, block)) = &fence else {
            prose.push(raw);
            continue;
        };
        prose.push("");
        if !SHELL_LANGUAGES.contains(&language.as_str()) {
            if program_of(raw).is_some_and(|program| PROGRAMS.contains(&program)) {
                problems.push(format!(
                    "README.md:{number}: a ```{language} block shows a command (`{}`): make it a ```sh block so that tests/readme.rs checks it",
                    raw.trim()
                ));
            }
            continue;
        }
        let code = strip_comment(raw);
        let (from, mut text) = continued.take().unwrap_or((number, String::new()));
        match code.strip_suffix('\\') {
            Some(head) => {
                text.push_str(head);
                text.push(' ');
                continued = Some((from, text));
            }
            None => {
                text.push_str(code);
                let text = collapse(&text);
                if !text.is_empty() {
                    commands.push(ReadmeCommand {
                        line: from,
                        text,
                        block: Some(*block),
                    });
                }
            }
        }
    }
    if let Some((opened, language, _)) = fence {
        problems.push(format!(
            "README.md:{opened}: the ```{language} block never closes"
        ));
    }
    for (line, content) in inline_spans(&prose.join("\n")) {
        let text = collapse(&content);
        let is_command = text.split_whitespace().count() >= 2
            && program_of(&text).is_some_and(|program| PROGRAMS.contains(&program))
            && !MENTIONS.contains(&text.as_str());
        if is_command {
            commands.push(ReadmeCommand {
                line,
                text,
                block: None,
            });
        }
    }
    commands.sort_by_key(|command| command.line);
    if problems.is_empty() {
        Ok(commands)
    } else {
        Err(problems)
    }
}

/// The words `sh` would split `text` into (quotes and backslashes; no expansion).
fn shell_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated ' in {text}")),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err(format!("unterminated \" in {text}")),
                        },
                        Some(c) => current.push(c),
                        None => return Err(format!("unterminated \" in {text}")),
                    }
                }
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    word.get_or_insert_with(String::new).push(c);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn commands_of_the_readme() -> Vec<ReadmeCommand> {
    readme_commands(&readme()).unwrap_or_else(|problems| panic!("{}", problems.join("\n")))
}

// ---------------------------------------------------------------------------------------------
// What covers each command
// ---------------------------------------------------------------------------------------------

/// How a README command is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// Run by [`readme_commands_work_as_written`], from the README's text.
    Here,
    /// Run by another test or by CI: the file, its test functions, and strings the file must
    /// hold (the command's distinguishing words as that file writes them).
    Run {
        file: &'static str,
        tests: &'static [&'static str],
        shows: &'static [&'static str],
    },
    /// Cannot run on a test machine; what it relies on is checked by these tests instead.
    Checked {
        file: &'static str,
        tests: &'static [&'static str],
        shows: &'static [&'static str],
    },
    /// Names a command the README shows in full elsewhere (that command's text).
    SeeAlso(&'static str),
}

struct Covered {
    /// The command as [`readme_commands`] reads it.
    command: &'static str,
    by: Cover,
    /// What is substituted when it runs here, or why it runs elsewhere or not at all.
    why: &'static str,
}

const DEMO_TEST: Cover = Cover::Run {
    file: "tests/demo.rs",
    tests: &["the_demo_rolls_back_a_broken_green_promotes_a_healthy_one_and_cleans_up"],
    shows: &[r#".args(["demo", "--duration", "40s"])"#],
};

const COMPOSE_FILES: &[&str] = &[
    "every_dependency_names_a_service_and_waits_on_what_it_can",
    "every_mount_exists_and_every_named_volume_is_declared",
    "every_port_is_published_on_localhost_only",
    "blue_and_green_are_official_postgres_images_of_one_major_with_logical_replication",
    "the_image_builds_and_runs_the_pgshift_binary",
    "the_config_mounted_into_pgshift_loads_and_matches_the_services_around_it",
    "prometheus_scrapes_pgshifts_metrics_port",
    "the_dashboard_is_provisioned_and_queries_only_exported_metrics",
];

const NO_DOCKER: &str = "no Docker engine and no compose plugin on the test machines";

/// Every command README.md shows and what covers it.
const COVERAGE: &[Covered] = &[
    Covered {
        command: "pgshift cutover-setup --config config/pgshift.toml --print",
        by: Cover::Run {
            file: "tests/cutover.rs",
            tests: &["cutover_setup_prints_applies_and_reports_ready"],
            shows: &["\"cutover-setup\"", "\"--print\""],
        },
        why: "needs logical replication between the clusters; tests/cutover.rs runs it on a replicated pair, checks the SQL's order and that nothing changed",
    },
    Covered {
        command: "pgshift cutover-setup --config config/pgshift.toml",
        by: Cover::Run {
            file: "tests/cutover.rs",
            tests: &[
                "cutover_setup_prints_applies_and_reports_ready",
                "cutover_setup_names_what_it_cannot_fix",
            ],
            shows: &["\"cutover-setup\""],
        },
        why: "needs logical replication between the clusters; tests/cutover.rs applies it and sees the marker replicate",
    },
    Covered {
        command: "pgshift cutover-setup --config config/pgshift.toml --reverse",
        by: Cover::Run {
            file: "tests/cutover.rs",
            tests: &["rollback_after_promotion_rides_the_reverse_slot_back_to_blue"],
            shows: &["\"--reverse\""],
        },
        why: "needs a promoted pair with replication green → blue; tests/cutover.rs runs it between a promote and a rollback",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml promote --check",
        by: Cover::Run {
            file: "tests/cutover.rs",
            tests: &["guardrails_refuse_with_their_reasons_until_clear"],
            shows: &["promote --check"],
        },
        why: "the guardrails need transparent mode and a replicated pair; tests/cutover.rs produces each refusal and the pass through the admin socket",
    },
    Covered {
        command: "cargo run --release -- demo",
        by: DEMO_TEST,
        why: "the test build's `pgshift demo --duration 40s` (the 75 s default shortened), with no process or temp dir left behind; not again here (~35 s)",
    },
    Covered {
        command: "cargo test",
        by: Cover::Run {
            file: ".ci/run",
            tests: &[],
            shows: &["cargo test --locked"],
        },
        why: "the test suite this file belongs to; .ci/run runs it",
    },
    Covered {
        command: "cargo run --release -- run --config config/pgshift.toml",
        by: Cover::Here,
        why: "the test build's pgshift on a copy of config/pgshift.toml with the test clusters' ports in [blue]/[green] and free [listen]/[metrics] ports; stopped with SIGTERM, exit 0",
    },
    Covered {
        command: r#"psql "host=127.0.0.1 port=7432 user=app dbname=app""#,
        by: Cover::Here,
        why: "pgshift's port substituted; role `app` created on both clusters, its password in PGPASSWORD; lands on blue",
    },
    Covered {
        command: "pgshift check --config config/pgshift.toml",
        by: Cover::Here,
        why: "verbatim, in the repository root: exit 0, the listen address, nothing written to config/",
    },
    Covered {
        command: "sudo apt-get install -y postgresql",
        by: Cover::Checked {
            file: "src/demo/clusters.rs",
            tests: &["the_install_instructions_name_each_platform"],
            shows: &["sudo apt-get install -y postgresql"],
        },
        why: "installs system packages; `pgshift demo` prints it when no server binaries are found (.ci/run installs the same package with apt-get)",
    },
    Covered {
        command: "sudo dnf install -y postgresql-server",
        by: Cover::Checked {
            file: "src/demo/clusters.rs",
            tests: &["the_install_instructions_name_each_platform"],
            shows: &["sudo dnf install -y postgresql-server"],
        },
        why: "installs system packages on Fedora; `pgshift demo` prints it when no server binaries are found",
    },
    Covered {
        command: "brew install postgresql@16",
        by: Cover::Checked {
            file: "src/demo/clusters.rs",
            tests: &["the_install_instructions_name_each_platform"],
            shows: &["brew install postgresql@16"],
        },
        why: "installs packages on macOS; `pgshift demo` prints it when no server binaries are found",
    },
    Covered {
        command: "cargo fmt --check",
        by: Cover::Run {
            file: ".ci/run",
            tests: &[],
            shows: &["cargo fmt --check"],
        },
        why: "a CI step",
    },
    Covered {
        command: "cargo clippy",
        by: Cover::Run {
            file: ".ci/run",
            tests: &[],
            shows: &["cargo clippy --all-targets"],
        },
        why: "a CI step (with --all-targets --locked -- -D warnings)",
    },
    Covered {
        command: "pgshift demo",
        by: DEMO_TEST,
        why: "with --duration 40s; not again here (~35 s)",
    },
    Covered {
        command: "pgshift demo --duration 40s",
        by: DEMO_TEST,
        why: "exactly this",
    },
    Covered {
        command: "docker compose up -d --build",
        by: Cover::Checked {
            file: "tests/compose.rs",
            tests: COMPOSE_FILES,
            shows: &[],
        },
        why: NO_DOCKER,
    },
    Covered {
        command: "docker compose ps",
        by: Cover::Checked {
            file: "tests/compose.rs",
            tests: &["every_dependency_names_a_service_and_waits_on_what_it_can"],
            shows: &["service_completed_successfully", "service_healthy"],
        },
        why: NO_DOCKER,
    },
    Covered {
        command: "docker compose exec pgshift pgshift ctl --socket /run/pgshift/pgshift.sock status",
        by: Cover::Here,
        why: "the `pgshift ctl …` part, with the test socket for /run/pgshift/pgshift.sock (no Docker here); the service and the socket path are checked against the compose files by compose_commands_agree_with_the_compose_files",
    },
    Covered {
        command: "docker compose exec pgshift pgshift ctl --socket /run/pgshift/pgshift.sock rollout start",
        by: Cover::Here,
        why: "as the line above",
    },
    Covered {
        command: r#"psql "host=127.0.0.1 port=7432 user=shop_app password=shop-demo-password dbname=shop""#,
        by: Cover::Checked {
            file: "tests/readme.rs",
            tests: &["compose_commands_agree_with_the_compose_files"],
            shows: &[],
        },
        why: "needs the compose stack (no Docker here): the published port, the role, its verifier against this password and the database are checked against the compose files",
    },
    Covered {
        command: "docker compose down -v",
        by: Cover::Checked {
            file: "tests/compose.rs",
            tests: &["every_mount_exists_and_every_named_volume_is_declared"],
            shows: &[],
        },
        why: NO_DOCKER,
    },
    Covered {
        command: r#"docker compose exec green psql -U postgres -d shop -c "REVOKE INSERT ON orders FROM shop_app""#,
        by: Cover::Checked {
            file: "tests/readme.rs",
            tests: &["compose_commands_agree_with_the_compose_files"],
            shows: &[],
        },
        why: "needs the compose stack (no Docker here): the service, database, table and role are checked against the compose files; tests/demo.rs runs the same REVOKE on its own green",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml status",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml weight 25",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml pin tenant=acme green",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml drain blue",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml promote",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: r#"pgshift ctl --config config/pgshift.toml rollback "green is slow""#,
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift ctl --config config/pgshift.toml reload",
        by: Cover::Here,
        why: "config/pgshift.toml → the running copy",
    },
    Covered {
        command: "pgshift run --config FILE --reset-state",
        by: Cover::Here,
        why: "FILE → the copy, after the running pgshift is stopped and its state file corrupted (a plain start must refuse it, naming the file)",
    },
    Covered {
        command: "pgshift ctl rollout start",
        by: Cover::Here,
        why: "in the config's directory, so that ./pgshift.sock is the admin socket",
    },
    Covered {
        command: "pgshift probe --setup",
        by: Cover::SeeAlso(r#"pgshift probe --setup "$BLUE,$GREEN""#),
        why: "a reference to the probe section",
    },
    Covered {
        command: "pgshift ctl pin application_name=reports green",
        by: Cover::Here,
        why: "in the config's directory (./pgshift.sock)",
    },
    Covered {
        command: "pgshift ctl pin tenant=acme green",
        by: Cover::Here,
        why: "in the config's directory (./pgshift.sock)",
    },
    Covered {
        command: r#"BLUE="host=blue.db user=app password=... dbname=app""#,
        by: Cover::Here,
        why: "set before the block's other lines; host=blue.db → the blue cluster, password=... → app's",
    },
    Covered {
        command: r#"GREEN="host=green.db user=app password=... dbname=app""#,
        by: Cover::Here,
        why: "as BLUE, for the green cluster",
    },
    Covered {
        command: r#"pgshift probe --setup "$BLUE,$GREEN""#,
        by: Cover::Here,
        why: "run twice, as the README says (\"repeat until it exits 0\"): without a publication, then once blue publishes the table to green's subscription (state r)",
    },
    Covered {
        command: r#"pgshift probe --dsn "host=127.0.0.1 port=7432 user=app password=... dbname=app" --clients 20 --duration 10m --rate 20 --write-ratio 0.5 --verify "$BLUE,$GREEN" --verify-timeout 30s --max-stall 2s --max-dropped 20 --json rehearsal.json"#,
        by: Cover::Here,
        why: "--duration 10m → 2s, pgshift's port and app's password substituted; green weight 0 first, so every write reaches green through the replication and verifies on both",
    },
    Covered {
        command: "pgshift ctl reload",
        by: Cover::Here,
        why: "in the config's directory (./pgshift.sock)",
    },
    Covered {
        command: r#"psql -At -h blue -c "SELECT format('ALTER ROLE %I PASSWORD %L;', rolname, rolpassword) FROM pg_authid WHERE rolcanlogin AND rolpassword IS NOT NULL" | psql -h green"#,
        by: Cover::Here,
        why: "-h blue / -h green → each test cluster's address as its superuser; app's verifier differs before and is blue's after",
    },
];

fn coverage_of(text: &str) -> Option<&'static Covered> {
    COVERAGE.iter().find(|covered| covered.command == text)
}

/// Problems with [`COVERAGE`] for `commands`: uncovered commands, entries the README no longer
/// shows, and references to files, tests or strings that do not exist.
fn coverage_problems(
    commands: &[ReadmeCommand],
    read: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for command in commands {
        if coverage_of(&command.text).is_none() {
            problems.push(format!(
                "README.md:{}: `{}` is not covered: run it in readme_commands_work_as_written, or add it to COVERAGE in tests/readme.rs with the test that runs it",
                command.line, command.text
            ));
        }
    }
    for covered in COVERAGE {
        if !commands
            .iter()
            .any(|command| command.text == covered.command)
        {
            problems.push(format!(
                "COVERAGE in tests/readme.rs lists `{}`, which README.md does not show (any more)",
                covered.command
            ));
        }
        if covered.why.trim().is_empty() {
            problems.push(format!("`{}`: say why in COVERAGE", covered.command));
        }
        match covered.by {
            Cover::Here => {}
            Cover::SeeAlso(target) => {
                let shown = commands.iter().any(|command| command.text == target);
                let full =
                    coverage_of(target).is_some_and(|other| !matches!(other.by, Cover::SeeAlso(_)));
                if !shown || !full {
                    problems.push(format!(
                        "`{}` refers to `{target}`, which the README must show in full and COVERAGE must cover",
                        covered.command
                    ));
                }
            }
            Cover::Run { file, tests, shows } | Cover::Checked { file, tests, shows } => {
                let Some(source) = read(file) else {
                    problems.push(format!("`{}`: {file} does not exist", covered.command));
                    continue;
                };
                for test in tests {
                    if !source.contains(&format!("fn {test}(")) {
                        problems.push(format!("`{}`: {file} has no test {test}", covered.command));
                    }
                }
                for shown in shows {
                    if !source.contains(shown) {
                        problems.push(format!(
                            "`{}`: {file} no longer contains {shown:?}",
                            covered.command
                        ));
                    }
                }
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Tests of the parsing and of the table (no cluster)
// ---------------------------------------------------------------------------------------------

#[test]
fn commands_are_read_from_shell_blocks_and_inline_code() {
    let markdown = "\
Try `pgshift check --config a.toml`; `pgshift ctl` and `psql` are names.

```sh
# a comment line
pgshift ctl status        # a trailing comment
BLUE=\"host=b # not a comment\"
pgshift probe --dsn \"$BLUE\" \\
    --clients 2
```

```toml
addr = \"127.0.0.1:7432\"
```
An unclosed ` here.

Then `pgshift ctl pin
tenant=acme  green` over two lines, ``cargo test`` and `RUST_LOG=debug pgshift run -c x`.
";
    let commands = readme_commands(markdown).expect("no problem");
    let found: Vec<(usize, &str, Option<usize>)> = commands
        .iter()
        .map(|command| (command.line, command.text.as_str(), command.block))
        .collect();
    assert_eq!(
        found,
        vec![
            (1, "pgshift check --config a.toml", None),
            (5, "pgshift ctl status", Some(0)),
            (6, "BLUE=\"host=b # not a comment\"", Some(0)),
            (7, "pgshift probe --dsn \"$BLUE\" --clients 2", Some(0)),
            (16, "pgshift ctl pin tenant=acme green", None),
            (17, "cargo test", None),
            (17, "RUST_LOG=debug pgshift run -c x", None),
        ]
    );
}

#[test]
fn a_command_outside_a_shell_block_or_an_open_block_is_a_problem() {
    let problems = readme_commands("```\npgshift ctl status\n```\n\n```sh\nls \\\n```\n")
        .expect_err("two problems");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("README.md:2"), "{problems:?}");
    assert!(problems[1].contains("continued line"), "{problems:?}");
    let problems = readme_commands("```sh\npgshift demo\n").expect_err("open block");
    assert!(problems[0].contains("never closes"), "{problems:?}");
}

#[test]
fn shell_words_follow_the_shell_quoting_rules() {
    assert_eq!(
        shell_words(r#"pgshift ctl rollback "green is slow" 'a "b"' c\ d "x\"y" "$A,$B""#)
            .expect("words"),
        vec![
            "pgshift",
            "ctl",
            "rollback",
            "green is slow",
            "a \"b\"",
            "c d",
            "x\"y",
            "$A,$B"
        ]
    );
    assert!(shell_words("psql \"open").is_err());
    assert!(
        is_assignment("BLUE=\"x y\"") && !is_assignment("--config=x") && !is_assignment("1A=b")
    );
}

#[test]
fn every_readme_command_is_covered() {
    let commands = commands_of_the_readme();
    let problems = coverage_problems(&commands, |file| {
        std::fs::read_to_string(repo().join(file)).ok()
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_new_command_and_a_stale_entry_are_both_reported() {
    let read = |file: &str| std::fs::read_to_string(repo().join(file)).ok();
    let baseline = coverage_problems(&commands_of_the_readme(), read);
    let mut commands = commands_of_the_readme();
    commands.retain(|command| command.text != "docker compose ps");
    commands.push(ReadmeCommand {
        line: 999,
        text: "pgshift ctl frobnicate".into(),
        block: None,
    });
    let problems: Vec<String> = coverage_problems(&commands, read)
        .into_iter()
        .filter(|problem| !baseline.contains(problem))
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with("README.md:999: `pgshift ctl frobnicate` is not covered"),
        "{problems:?}"
    );
    assert!(problems[1].contains("`docker compose ps`"), "{problems:?}");
    let problems = coverage_problems(&commands_of_the_readme(), |_| None);
    assert!(
        problems
            .iter()
            .any(|problem| problem.contains("tests/demo.rs does not exist")),
        "{problems:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The compose lines, against the compose files
// ---------------------------------------------------------------------------------------------

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    serde_norway::from_str(&text).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The `CREATE ROLE name … PASSWORD '<verifier>'` of `sql`.
fn verifier_in(sql: &str, role: &str) -> Option<String> {
    let statement = sql
        .split(';')
        .map(|statement| {
            let code: Vec<&str> = statement
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect();
            collapse(&code.join(" "))
        })
        .find(|statement| statement.starts_with(&format!("CREATE ROLE {role} ")))?;
    let (_, rest) = statement.split_once("PASSWORD '")?;
    Some(rest.split('\'').next()?.to_string())
}

#[test]
fn compose_commands_agree_with_the_compose_files() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    let config = pgshift::config::Config::load(&repo().join("config/compose.toml"))
        .unwrap_or_else(|errors| panic!("config/compose.toml: {errors}"));
    let schema =
        std::fs::read_to_string(repo().join("config/compose/10-schema.sql")).expect("schema");
    let database_of = |service: &str| services[service]["environment"]["POSTGRES_DB"].clone();
    let mut seen = 0;
    for command in commands_of_the_readme() {
        let words = shell_words(&command.text).expect("words");
        let at = format!("README.md:{}: {}", command.line, command.text);
        let dsn: BTreeMap<&str, &str> = match words.as_slice() {
            [docker, compose_word, ..] if docker == "docker" && compose_word == "compose" => {
                seen += 1;
                if words[2] != "exec" {
                    continue;
                }
                let service = words[3].as_str();
                assert!(services.contains_key(service), "{at}: no service {service}");
                let rest = &words[4..];
                if let Some(socket) = rest.iter().position(|word| word == "--socket") {
                    assert_eq!(
                        Path::new(&rest[socket + 1]),
                        config.admin.socket,
                        "{at}: config/compose.toml's [admin] socket"
                    );
                }
                if rest[0] == "psql" {
                    let flag = |name: &str| {
                        rest.iter()
                            .position(|word| word == name)
                            .map(|at| rest[at + 1].as_str())
                    };
                    assert_eq!(
                        Some(Value::from(flag("-d").expect("-d"))),
                        Some(database_of(service)),
                        "{at}"
                    );
                    assert_eq!(flag("-U"), Some("postgres"), "{at}: the image's superuser");
                    let sql = collapse(flag("-c").expect("-c"));
                    let sql_words: Vec<&str> = sql.split(' ').collect();
                    let after = |keyword: &str| {
                        sql_words
                            .iter()
                            .position(|word| *word == keyword)
                            .map(|at| sql_words[at + 1])
                    };
                    let table = after("ON").expect("a table");
                    assert!(schema.contains(&format!("CREATE TABLE {table} ")), "{at}");
                    let role = after("FROM").or(after("TO")).expect("a role");
                    assert!(schema.contains(&format!("CREATE ROLE {role} ")), "{at}");
                }
                continue;
            }
            [psql, dsn] if psql == "psql" && dsn.contains("dbname=shop") => dsn
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .collect(),
            _ => continue,
        };
        seen += 1;
        // A client of the compose stack: pgshift's published port, the demo role and database.
        let port = dsn["port"];
        let published = services["pgshift"]["ports"]
            .as_array()
            .expect("pgshift ports")
            .iter()
            .filter_map(Value::as_str)
            .any(|entry| entry.starts_with(&format!("{}:{port}:", dsn["host"])));
        assert!(
            published,
            "{command:?}: pgshift publishes no {}:{port}",
            dsn["host"]
        );
        assert_eq!(
            port.parse::<u16>().ok(),
            config
                .listen
                .addr
                .rsplit(':')
                .next()
                .and_then(|port| port.parse().ok()),
            "{command:?}: [listen] addr of config/compose.toml"
        );
        for service in ["blue", "green"] {
            assert_eq!(
                database_of(service),
                Value::from(dsn["dbname"]),
                "{command:?}"
            );
        }
        let text = verifier_in(&schema, dsn["user"]).expect("the role's verifier");
        let verifier = pgshift::auth::scram::ScramVerifier::parse(&text).expect("a SCRAM verifier");
        // SaltedPassword = Hi(password, salt, i), PBKDF2 with HMAC-SHA-256 (RFC 5802).
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(verifier.iterations).expect("iterations"),
            &verifier.salt,
            dsn["password"].as_bytes(),
            &mut salted,
        );
        assert!(
            pgshift::auth::scram::ScramVerifier::from_salted_password(
                &salted,
                &verifier.salt,
                verifier.iterations
            ) == verifier,
            "{command:?}: config/compose/10-schema.sql's verifier for {} is not that of {}",
            dsn["user"],
            dsn["password"]
        );
    }
    assert!(
        seen >= 6,
        "the README's compose lines were not found ({seen})"
    );
}

// ---------------------------------------------------------------------------------------------
// Running the README's commands
// ---------------------------------------------------------------------------------------------

/// The password of the role `app` the README's DSNs use, created on both clusters.
const APP_PASSWORD: &str = "readme-app-pw";

const PGSHIFT: &str = env!("CARGO_BIN_EXE_pgshift");

/// How long a started `pgshift run` may take to answer on its admin socket, or to exit.
const PROCESS_WAIT: Duration = Duration::from_secs(20);

fn text_of(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `pgshift run` started by the test; killed if the test fails before stopping it.
struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to [`PROCESS_WAIT`] for the process to exit.
    fn wait(&mut self) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < PROCESS_WAIT {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, as the README says; a graceful shutdown exits 0.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = self.wait();
        assert!(
            exit.is_some_and(|exit| exit.success()),
            "pgshift run after SIGTERM: {exit:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The test's side of the README: the clusters, a copy of the example config, the running
/// pgshift, and the block-level variables set so far.
struct Rig {
    pair: &'static ClusterPair,
    /// The copy of config/pgshift.toml, its admin socket, state file and the probe's report.
    conf: tempfile::TempDir,
    logs: tempfile::TempDir,
    config_path: PathBuf,
    port: u16,
    running: Option<Running>,
    starts: usize,
    assignments: BTreeMap<usize, Vec<String>>,
    probe_setups: usize,
}

impl Rig {
    fn new(pair: &'static ClusterPair) -> Rig {
        let conf = tempfile::tempdir().expect("temp dir");
        let port = support::free_port();
        let metrics_port = support::free_port();
        let mut text = std::fs::read_to_string(repo().join("config/pgshift.toml"))
            .expect("config/pgshift.toml");
        for (from, to) in [
            (
                "addr = \"127.0.0.1:7432\"",
                format!("addr = \"127.0.0.1:{port}\""),
            ),
            (
                "addr = \"127.0.0.1:9930\"",
                format!("addr = \"127.0.0.1:{metrics_port}\""),
            ),
            ("port = 5432 ", format!("port = {} ", pair.blue.port())),
            ("port = 5433\n", format!("port = {}\n", pair.green.port())),
        ] {
            assert_eq!(
                text.matches(from).count(),
                1,
                "config/pgshift.toml should hold {from:?} once"
            );
            text = text.replace(from, &to);
        }
        let config_path = conf.path().join("pgshift.toml");
        std::fs::write(&config_path, text).expect("write the config copy");
        for cluster in pair.both() {
            cluster.psql(&format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"));
        }
        Rig {
            pair,
            conf,
            logs: tempfile::tempdir().expect("temp dir"),
            config_path,
            port,
            running: None,
            starts: 0,
            assignments: BTreeMap::new(),
            probe_setups: 0,
        }
    }

    fn socket(&self) -> PathBuf {
        self.conf.path().join("pgshift.sock")
    }

    /// The README's text with the test's setup in place of what only a reader has.
    fn substitute(&self, text: &str) -> String {
        let config = self.config_path.display().to_string();
        let (blue, green) = (self.pair.blue.port(), self.pair.green.port());
        let replacements = [
            ("cargo run --release -- ", "pgshift ".to_string()),
            (
                "docker compose exec pgshift pgshift ",
                "pgshift ".to_string(),
            ),
            (
                "/run/pgshift/pgshift.sock",
                self.socket().display().to_string(),
            ),
            ("--config config/pgshift.toml", format!("--config {config}")),
            ("--config FILE", format!("--config {config}")),
            ("port=7432", format!("port={}", self.port)),
            ("host=blue.db", format!("host=127.0.0.1 port={blue}")),
            ("host=green.db", format!("host=127.0.0.1 port={green}")),
            ("password=...", format!("password={APP_PASSWORD}")),
            ("--duration 10m", "--duration 2s".to_string()),
            (
                "psql -At -h blue ",
                format!("psql -At -h 127.0.0.1 -p {blue} -U postgres "),
            ),
            (
                "| psql -h green",
                format!("| psql -h 127.0.0.1 -p {green} -U postgres"),
            ),
        ];
        let mut text = text.to_string();
        for (from, to) in replacements {
            text = text.replace(from, &to);
        }
        text
    }

    /// `sh -c SCRIPT` in `cwd` with pgshift and the PostgreSQL binaries first on PATH.
    fn shell(&self, script: &str, cwd: &Path) -> Command {
        let pgshift_dir = Path::new(PGSHIFT).parent().expect("bin dir");
        let path = format!(
            "{}:{}:{}",
            pgshift_dir.display(),
            support::pg_bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .env("PATH", path)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PSQLRC", "/dev/null")
            .stdin(Stdio::null());
        for name in [
            "PGSHIFT_SOCKET",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
            "PGSERVICE",
        ] {
            command.env_remove(name);
        }
        command
    }

    /// The variables the command's block set, then the command.
    fn script(&self, command: &ReadmeCommand, text: &str) -> String {
        let mut lines = command
            .block
            .and_then(|block| self.assignments.get(&block))
            .cloned()
            .unwrap_or_default();
        lines.push(text.to_string());
        lines.join("\n")
    }

    fn output(&self, command: &ReadmeCommand, text: &str, cwd: &Path) -> Output {
        self.shell(&self.script(command, text), cwd)
            .output()
            .expect("sh runs")
    }

    /// `status`, as JSON, from the running pgshift.
    fn status(&self) -> Value {
        let output = Command::new(PGSHIFT)
            .args(["ctl", "--json", "--socket"])
            .arg(self.socket())
            .arg("status")
            .output()
            .expect("pgshift ctl");
        assert!(output.status.success(), "status: {}", text_of(&output));
        serde_json::from_slice(&output.stdout).expect("JSON status")
    }

    /// An admin command of the test's own (not a README line).
    fn admin(&self, line: &[&str]) {
        let output = Command::new(PGSHIFT)
            .args(["ctl", "--socket"])
            .arg(self.socket())
            .args(line)
            .output()
            .expect("pgshift ctl");
        assert!(output.status.success(), "{line:?}: {}", text_of(&output));
    }

    /// Starts `text` (a `pgshift run` line) and waits until it answers `status`.
    fn start(&mut self, command: &ReadmeCommand, text: &str) -> Running {
        self.starts += 1;
        let stderr = self.logs.path().join(format!("run-{}.log", self.starts));
        let child = self
            .shell(
                &self.script(command, &format!("exec {text}")),
                self.conf.path(),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .expect("pgshift run starts");
        let mut running = Running { child, stderr };
        let started = Instant::now();
        loop {
            if let Some(exit) = running.child.try_wait().expect("try_wait") {
                panic!(
                    "README.md:{}: `{text}` exited ({exit}):\n{}",
                    command.line,
                    running.log()
                );
            }
            let ready = Command::new(PGSHIFT)
                .args(["ctl", "--socket"])
                .arg(self.socket())
                .arg("status")
                .output()
                .is_ok_and(|output| output.status.success());
            if ready {
                return running;
            }
            assert!(
                started.elapsed() < PROCESS_WAIT,
                "README.md:{}: `{text}` does not answer on {}:\n{}",
                command.line,
                self.socket().display(),
                running.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one README command and checks what it did.
    fn run(&mut self, command: &ReadmeCommand) {
        let text = self.substitute(&command.text);
        let words = shell_words(&text).expect("shell words");
        let at = format!(
            "README.md:{}: `{}` (run as `{text}`)",
            command.line, command.text
        );
        match words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [assignment] if is_assignment(assignment) => {
                let block = command.block.expect("an assignment in a block");
                self.assignments
                    .entry(block)
                    .or_default()
                    .push(text.clone());
            }
            ["pgshift", "check", ..] => self.check(command, &at),
            ["pgshift", "run", rest @ ..] => {
                if rest.contains(&"--reset-state") {
                    self.reset_state(command, &text, &at);
                } else {
                    assert!(self.running.is_none(), "{at}: pgshift runs already");
                    let running = self.start(command, &text);
                    self.running = Some(running);
                    let status = self.status();
                    assert_eq!(status["state"], "manual", "{at}: {status}");
                    assert_eq!(status["green_weight"], 0.0, "{at}: {status}");
                }
            }
            ["pgshift", "ctl", rest @ ..] => self.ctl(command, &text, rest, &at),
            ["pgshift", "probe", rest @ ..] if rest.contains(&"--setup") => {
                self.probe_setup(command, &text, &at)
            }
            ["pgshift", "probe", ..] => self.probe(command, &text, &at),
            ["psql", ..] if text.contains(" | psql ") => self.copy_verifiers(command, &text, &at),
            ["psql", _dsn] => {
                let mut child = self
                    .shell(&text, self.conf.path())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("psql");
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"SELECT current_user, current_setting('cluster_name');\n")
                    .expect("write to psql");
                let output = child.wait_with_output().expect("psql");
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(output.status.success(), "{at}: {}", text_of(&output));
                assert!(
                    stdout.contains(" app ") && stdout.contains("blue"),
                    "{at}: app, on blue: {}",
                    text_of(&output)
                );
            }
            _ => panic!("{at}: tests/readme.rs does not know how to run this; teach Rig::run"),
        }
    }

    fn check(&self, command: &ReadmeCommand, at: &str) {
        let listing = || {
            let mut names: Vec<_> = std::fs::read_dir(repo().join("config"))
                .expect("config/")
                .map(|entry| entry.expect("entry").file_name())
                .collect();
            names.sort();
            names
        };
        let before = listing();
        // Verbatim, where the README's reader would type it.
        let output = self.output(command, &command.text, &repo());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{at}: {}", text_of(&output));
        assert!(
            stdout.contains("127.0.0.1:7432") && stdout.contains("config/pgshift.toml: OK"),
            "{at}: {}",
            text_of(&output)
        );
        assert_eq!(listing(), before, "{at}: check wrote into config/");
    }

    /// A `pgshift ctl` line: exit 0, then its effect in `status`.
    fn ctl(&mut self, command: &ReadmeCommand, text: &str, rest: &[&str], at: &str) {
        let mut verb = rest;
        while let [flag, tail @ ..] = verb {
            verb = match *flag {
                "--config" | "--socket" => &tail[1..],
                "--json" => tail,
                _ => break,
            };
        }
        let before = self.status();
        let output = self.output(command, text, self.conf.path());
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{at}: {}", text_of(&output));
        let after = self.status();
        let weight = |status: &Value| status["green_weight"].as_f64().expect("green_weight");
        let context = format!(
            "{at}\nbefore: {before}\nafter: {after}\n{}",
            text_of(&output)
        );
        match verb {
            ["status"] => assert!(
                stdout.contains("green weight") && stdout.contains("state"),
                "{context}"
            ),
            ["weight", percent] => {
                let percent: f64 = percent.parse().expect("a weight");
                assert_eq!(weight(&after), percent, "{context}");
                assert_eq!(after["state"], "manual", "{context}");
            }
            ["pin", pin, color] => {
                let (key, value) = pin.split_once('=').expect("KEY=VALUE");
                let pins = after["pins"].as_array().expect("pins");
                assert!(
                    pins.iter().any(|pin| pin[key] == *value
                        && pin["color"] == *color
                        && pin["source"] == "admin"),
                    "{context}"
                );
            }
            ["drain", color] => assert_eq!(after["draining"][color], true, "{context}"),
            ["undrain", color] => assert_eq!(after["draining"][color], false, "{context}"),
            ["promote"] => {
                assert_eq!(after["state"], "promoted", "{context}");
                assert_eq!(weight(&after), 100.0, "{context}");
            }
            ["rollback", reason @ ..] => {
                assert_eq!(after["state"], "rolled_back", "{context}");
                assert_eq!(weight(&after), 0.0, "{context}");
                assert_eq!(after["draining"]["blue"], false, "{context}");
                let decision = after["decisions"][0]["reason"].as_str().unwrap_or_default();
                assert!(
                    reason.iter().all(|reason| decision.contains(reason)),
                    "{context}"
                );
            }
            ["reload"] => assert!(stdout.contains("config reloaded"), "{context}"),
            ["rollout", "start"] => {
                assert_eq!(after["state"], "running", "{context}");
                assert!(weight(&after) > weight(&before), "{context}");
            }
            other => panic!("{at}: no check for `ctl {other:?}`: add one to Rig::ctl"),
        }
    }

    /// `pgshift run --config FILE --reset-state`: a corrupt state file stops a plain start,
    /// naming the file; this line discards it and starts from the config.
    fn reset_state(&mut self, command: &ReadmeCommand, text: &str, at: &str) {
        let running = self.running.take().expect("pgshift runs");
        let status = self.status();
        assert!(
            status["pins"]
                .as_array()
                .is_some_and(|pins| pins.iter().any(|pin| pin["source"] == "admin")),
            "{at}: the README's earlier lines left an admin pin: {status}"
        );
        running.stop();
        let state_file = self.conf.path().join("pgshift-state.json");
        assert!(state_file.is_file(), "{at}: no state file was written");
        std::fs::write(&state_file, "{ not json").expect("corrupt the state file");
        let plain = text.replace(" --reset-state", "");
        let mut refused = Running {
            child: self
                .shell(&format!("exec {plain}"), self.conf.path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.logs.path().join("refused.log")).expect("log"))
                .spawn()
                .expect("pgshift run"),
            stderr: self.logs.path().join("refused.log"),
        };
        let exit = refused.wait();
        assert!(
            exit.is_some_and(|exit| !exit.success()),
            "{at}: a corrupt state file must stop `{plain}`: {exit:?}\n{}",
            refused.log()
        );
        assert!(
            refused.log().contains(&state_file.display().to_string()),
            "{at}: the message names the state file:\n{}",
            refused.log()
        );
        let running = self.start(command, text);
        self.running = Some(running);
        let status = self.status();
        assert_eq!(status["state"], "manual", "{at}: {status}");
        assert_eq!(status["green_weight"], 0.0, "{at}: {status}");
        assert_eq!(
            status["draining"],
            serde_json::json!({"blue": false, "green": false}),
            "{at}: {status}"
        );
        assert!(
            status["pins"]
                .as_array()
                .is_some_and(|pins| pins.iter().all(|pin| pin["source"] == "config")),
            "{at}: the admin pins are gone: {status}"
        );
    }

    /// `pgshift probe --setup`: as the README says, repeated until it exits 0 — first without
    /// replication, then once blue publishes the table to a subscription on green.
    fn probe_setup(&mut self, command: &ReadmeCommand, text: &str, at: &str) {
        self.probe_setups += 1;
        let output = self.output(command, text, self.conf.path());
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{at}: {}", text_of(&output));
        assert!(
            stdout.contains("ready on green") && stdout.contains("blue has no publication"),
            "{at}: {}",
            text_of(&output)
        );
        let (blue, green) = (&self.pair.blue, &self.pair.green);
        blue.psql_db(
            "app",
            "CREATE PUBLICATION readme_probe FOR TABLE public.pgshift_probe",
        );
        green.psql_db(
            "app",
            &format!(
                "CREATE SUBSCRIPTION readme_probe CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=app' PUBLICATION readme_probe",
                blue.port()
            ),
        );
        let output = self.output(command, text, self.conf.path());
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{at}, again: {}", text_of(&output));
        assert!(
            stdout.contains("replicates from blue to green") && stdout.contains("state r"),
            "{at}, again: {}",
            text_of(&output)
        );
    }

    /// The rehearsal: every session through pgshift, every acknowledged write found on both.
    fn probe(&mut self, command: &ReadmeCommand, text: &str, at: &str) {
        assert!(self.probe_setups > 0, "{at}: setup first");
        // Every write to blue (which replicates to green), so that both verify.
        self.admin(&["weight", "0"]);
        let report = self.conf.path().join("rehearsal.json");
        let output = self.output(command, text, self.conf.path());
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{at}: {}", text_of(&output));
        assert!(
            stdout.contains("verdict: passed")
                && stdout.matches("acknowledged writes missing: 0").count() >= 2
                && !stdout.contains("FAILED"),
            "{at}: {}",
            text_of(&output)
        );
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("--json"))
            .expect("rehearsal.json is JSON");
        assert!(
            json["operations"]["writes_acknowledged"].as_u64() > Some(0),
            "{at}: {json}"
        );
        let verify = json["verify"].as_array().expect("verify");
        assert_eq!(verify.len(), 2, "{at}: {json}");
        assert!(
            verify.iter().all(|result| result["missing"] == 0),
            "{at}: {json}"
        );
    }

    /// The README's verifier copy, blue → green: app's verifier differs before, is blue's after.
    fn copy_verifiers(&self, command: &ReadmeCommand, text: &str, at: &str) {
        let verifier = |cluster: &support::Cluster| {
            cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
        };
        let (blue, green) = (&self.pair.blue, &self.pair.green);
        assert_ne!(verifier(blue), verifier(green), "{at}: two salts before");
        let output = self.output(command, text, self.conf.path());
        assert!(output.status.success(), "{at}: {}", text_of(&output));
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("ALTER ROLE"),
            "{at}: {}",
            text_of(&output)
        );
        assert_eq!(verifier(blue), verifier(green), "{at}");
    }
}

#[test]
fn readme_commands_work_as_written() {
    let commands = commands_of_the_readme();
    let mut rig = Rig::new(support::shared_pair());
    let started = Instant::now();
    let mut ran = 0;
    for command in &commands {
        if coverage_of(&command.text).is_some_and(|covered| covered.by == Cover::Here) {
            rig.run(command);
            ran += 1;
        }
    }
    assert!(ran >= 20, "only {ran} README commands ran");
    rig.running.take().expect("pgshift runs").stop();
    eprintln!("{ran} README commands ran in {:.1?}", started.elapsed());
}
