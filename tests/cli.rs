//! The `pgshift` command line: `check` on the shipped example and on broken configs, and
//! `run` refusing a broken config.

use std::process::Command;

fn pgshift(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .output()
        .expect("pgshift runs")
}

fn example_config() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgshift.toml").to_string()
}

#[test]
fn check_accepts_the_example_and_says_what_each_section_does() {
    let output = pgshift(&["check", "--config", &example_config()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("127.0.0.1:7432"), "{stdout}");
    assert!(
        stdout.contains("[cutover] drain: promote / rollback close the losing color's sessions")
            && !stdout.contains("not active yet"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[blue]") && stdout.contains("[green]"),
        "{stdout}"
    );
}

#[test]
fn check_lists_every_problem_with_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[listen]
addr = "127.0.0.1:7432"
colour = "blue"
[blue]
host = "127.0.0.1"
port = 0
[green]
host = "127.0.0.1"
port = 5433
[routing]
green_weight = 140
[rollout]
steps = [10, 5]
[[rollout.trigger]]
metric = "error_rate"
above = 1.5
action = "pause"
"#,
    )
    .expect("write");
    let output = pgshift(&["check", "--config", path.to_str().expect("utf-8 path")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "listen.colour",
        "blue.port",
        "routing.green_weight",
        "rollout.steps",
        "rollout.trigger[0].above",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    assert!(
        stderr.contains(path.to_str().expect("utf-8 path")),
        "the file is named:\n{stderr}"
    );

    let run = pgshift(&["run", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(run.status.code(), Some(2), "run refuses a broken config");
}

#[test]
fn missing_files_and_usage_errors() {
    let output = pgshift(&["check", "--config", "/nonexistent/pgshift.toml"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/pgshift.toml"));
    let usage = pgshift(&["check"]);
    assert_eq!(usage.status.code(), Some(2), "clap's usage error");
}
