//! `docker-compose.yml`, the `Dockerfile` and the Prometheus and Grafana files they use,
//! checked against the repository — there is no Docker engine on the build machines, so this
//! is what keeps them from rotting silently: every service a `depends_on` names exists, every
//! mounted host path exists, ports are published on 127.0.0.1 only, the config mounted into
//! pgshift loads with `Config::load` and agrees with the ports, hosts and volumes around it,
//! the image builds and runs the `pgshift` binary, Prometheus scrapes pgshift's metrics port,
//! and the dashboard only queries metrics pgshift exports (CONTRACT.md, "Metrics").

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use pgshift::config::Config;
use serde_json::Value;

/// Every metric named in CONTRACT.md, section "Metrics".
const CONTRACT_METRICS: [&str; 14] = [
    "pgshift_green_weight_ratio",
    "pgshift_rollout_state",
    "pgshift_client_sessions",
    "pgshift_client_sessions_opened_total",
    "pgshift_backend_connect_errors_total",
    "pgshift_requests_total",
    "pgshift_request_errors_total",
    "pgshift_request_duration_seconds",
    "pgshift_bytes_total",
    "pgshift_rollout_decisions_total",
    "pgshift_cancel_requests_total",
    "pgshift_clients_rejected_total",
    "pgshift_draining_sessions",
    "pgshift_replication_lag",
];
/// The contract's histograms, exposed as `_bucket`, `_sum` and `_count` series.
const CONTRACT_HISTOGRAMS: [&str; 1] = ["pgshift_request_duration_seconds"];
/// What the dashboard must show at least.
const DASHBOARD_METRICS: [&str; 6] = [
    "pgshift_requests_total",
    "pgshift_request_errors_total",
    "pgshift_request_duration_seconds_bucket",
    "pgshift_green_weight_ratio",
    "pgshift_rollout_state",
    "pgshift_client_sessions",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path))
        .unwrap_or_else(|error| panic!("{path} is not valid YAML: {error}"))
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"]
        .as_object()
        .expect("docker-compose.yml has services")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
}

/// A string or a list of strings (`command`, `entrypoint`, `healthcheck.test`).
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::String(text) => text.split_whitespace().map(str::to_string).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| item.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// One mount of a service: a host path (bind) or a named volume, and where it lands.
#[derive(Debug, Clone)]
struct Mount {
    source: String,
    target: String,
}

impl Mount {
    fn is_bind(&self) -> bool {
        self.source.starts_with('.') || self.source.starts_with('/')
    }
}

fn mounts(service: &Value) -> Vec<Mount> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| match entry {
            Value::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap_or_default().to_string();
                let target = parts
                    .next()
                    .unwrap_or_else(|| panic!("volume {short:?} has no target"));
                Mount {
                    source,
                    target: target.to_string(),
                }
            }
            long => Mount {
                source: long["source"].as_str().expect("volume source").to_string(),
                target: long["target"].as_str().expect("volume target").to_string(),
            },
        })
        .collect()
}

/// The host path mounted at `target` in `service`.
fn mounted_at<'a>(mounts: &'a [Mount], target: &str) -> Option<&'a Mount> {
    mounts.iter().find(|mount| mount.target == target)
}

/// Which mount holds `path` (the longest target that is a parent of it).
fn mount_holding<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|mount| path.starts_with(&mount.target))
        .max_by_key(|mount| mount.target.len())
}

fn depends_on(service: &Value) -> Vec<(String, Option<String>)> {
    match &service["depends_on"] {
        Value::Array(names) => names
            .iter()
            .map(|name| (name.as_str().expect("depends_on name").to_string(), None))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(name, spec)| (name.clone(), spec["condition"].as_str().map(str::to_string)))
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("depends_on must be a list or a map, found {other}"),
    }
}

fn ports(service: &Value) -> Vec<String> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|port| {
            port.as_str()
                .unwrap_or_else(|| panic!("ports must be quoted strings (YAML reads 9090:9090 as a number), found {port}"))
                .to_string()
        })
        .collect()
}

/// `host:port` → port.
fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{address:?} has no port"))
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------------

/// One Dockerfile instruction, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    arguments: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, arguments) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        instructions.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            arguments: arguments.trim().to_string(),
        });
        pending.clear();
    }
    instructions
}

/// The JSON (exec) form of ENTRYPOINT / CMD.
fn exec_form(instruction: &Instruction) -> Vec<String> {
    serde_json::from_str(&instruction.arguments).unwrap_or_else(|_| {
        panic!(
            "{} must use the exec form (a JSON array): {}",
            instruction.keyword, instruction.arguments
        )
    })
}

fn last<'a>(instructions: &'a [Instruction], keyword: &str) -> &'a Instruction {
    instructions
        .iter()
        .rev()
        .find(|instruction| instruction.keyword == keyword)
        .unwrap_or_else(|| panic!("the Dockerfile has no {keyword}"))
}

/// The config path the image's CMD runs pgshift with.
fn image_config_path() -> String {
    let cmd = exec_form(last(&dockerfile(), "CMD"));
    assert_eq!(cmd.first().map(String::as_str), Some("run"), "CMD {cmd:?}");
    let at = cmd
        .iter()
        .position(|word| word == "--config")
        .expect("CMD has --config");
    cmd.get(at + 1).expect("a path after --config").clone()
}

/// The config file compose mounts into pgshift, and the loaded config.
fn pgshift_config(compose: &Value) -> (PathBuf, Config) {
    let mounts = mounts(service(compose, "pgshift"));
    let target = image_config_path();
    let mount = mounted_at(&mounts, &target).unwrap_or_else(|| {
        panic!(
            "the pgshift service mounts nothing at {target}, where the image's CMD reads its config"
        )
    });
    let path = repo().join(&mount.source);
    let config = Config::load(&path)
        .unwrap_or_else(|errors| panic!("{} does not load:\n{errors}", mount.source));
    (path, config)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_dependency_names_a_service_and_waits_on_what_it_can() {
    let compose = compose();
    let services = services(&compose);
    for name in [
        "blue",
        "green",
        "replication",
        "pgshift",
        "load",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "no service {name:?}");
    }
    for (name, spec) in services {
        for (dependency, condition) in depends_on(spec) {
            let Some(target) = services.get(&dependency) else {
                panic!("{name} depends on {dependency:?}, which is not a service");
            };
            match condition.as_deref() {
                None | Some("service_started" | "service_completed_successfully") => {}
                Some("service_healthy") => assert!(
                    target["healthcheck"]["test"].is_array()
                        || target["healthcheck"]["test"].is_string(),
                    "{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
                ),
                Some(other) => panic!("{name}: unknown depends_on condition {other:?}"),
            }
        }
    }
    for name in ["blue", "green", "pgshift", "prometheus", "grafana"] {
        let test = words(&service(&compose, name)["healthcheck"]["test"]);
        assert!(test.len() >= 2, "{name} has no healthcheck");
    }
}

#[test]
fn every_mount_exists_and_every_named_volume_is_declared() {
    let compose = compose();
    let declared: BTreeSet<String> = compose["volumes"]
        .as_object()
        .map(|volumes| volumes.keys().cloned().collect())
        .unwrap_or_default();
    for (name, spec) in services(&compose) {
        for mount in mounts(spec) {
            if mount.is_bind() {
                assert!(
                    mount.source.starts_with("./"),
                    "{name} mounts {:?}: host paths must be relative to the repository",
                    mount.source
                );
                assert!(
                    repo().join(&mount.source).exists(),
                    "{name} mounts {:?}, which is not in the repository",
                    mount.source
                );
            } else {
                assert!(
                    declared.contains(&mount.source),
                    "{name} uses the volume {:?}, not declared under volumes:",
                    mount.source
                );
            }
        }
    }
}

#[test]
fn every_port_is_published_on_localhost_only() {
    let compose = compose();
    let mut published = 0;
    for (name, spec) in services(&compose) {
        for port in ports(spec) {
            published += 1;
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port:?} beyond 127.0.0.1"
            );
            assert_eq!(
                port.split(':').count(),
                3,
                "{name}: {port:?} is not 127.0.0.1:HOST:CONTAINER"
            );
        }
    }
    assert!(
        published >= 5,
        "blue, green, pgshift, prometheus and grafana are reachable"
    );
}

#[test]
fn blue_and_green_are_official_postgres_images_of_one_major_with_logical_replication() {
    let compose = compose();
    let major = |name: &str| -> u32 {
        let image = service(&compose, name)["image"]
            .as_str()
            .expect("image")
            .to_string();
        let tag = image
            .strip_prefix("postgres:")
            .unwrap_or_else(|| panic!("{name} runs {image:?}, not the official postgres image"));
        tag.split(['.', '-'])
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or_else(|| panic!("{name}: tag {tag:?} has no major version"))
    };
    assert!(
        major("blue").abs_diff(major("green")) <= 1,
        "blue and green are more than one major apart"
    );
    let blue_command = words(&service(&compose, "blue")["command"]).join(" ");
    assert!(
        blue_command.contains("wal_level=logical"),
        "blue must publish: {blue_command}"
    );
    // Blue publishes what green's subscription asks for, on a host compose knows.
    let blue_sql = read("config/compose/20-blue.sql");
    let subscribe = read("config/compose/subscribe.sql");
    assert!(
        blue_sql.contains("CREATE PUBLICATION shop_pub"),
        "{blue_sql}"
    );
    assert!(
        subscribe.contains("PUBLICATION shop_pub") && subscribe.contains("host=blue port=5432"),
        "{subscribe}"
    );
    let replication = service(&compose, "replication");
    let entrypoint = words(&replication["entrypoint"]);
    let host = entrypoint
        .iter()
        .position(|word| word == "-h")
        .and_then(|at| entrypoint.get(at + 1))
        .expect("psql -h");
    assert_eq!(host, "green", "the subscription is created on green");
    let script = entrypoint.last().expect("psql -f SCRIPT");
    assert!(
        mounted_at(&mounts(replication), script).is_some(),
        "{script} is not mounted into the replication service"
    );
}

#[test]
fn the_image_builds_and_runs_the_pgshift_binary() {
    // The binary cargo builds for this package is called pgshift.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_pgshift"));
    assert_eq!(
        built.file_name().and_then(|name| name.to_str()),
        Some("pgshift")
    );
    let instructions = dockerfile();
    let stages: Vec<&Instruction> = instructions
        .iter()
        .filter(|instruction| instruction.keyword == "FROM")
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    assert!(
        stages[0].arguments.starts_with("rust:") && stages[0].arguments.ends_with(" AS builder"),
        "{:?}",
        stages[0]
    );
    let runtime = &stages[stages.len() - 1].arguments;
    assert!(
        runtime.starts_with("debian:") && runtime.contains("slim"),
        "runtime image {runtime}"
    );
    let build = instructions
        .iter()
        .find(|instruction| {
            instruction.keyword == "RUN" && instruction.arguments.contains("cargo build")
        })
        .expect("a RUN with cargo build");
    assert!(
        build.arguments.contains("--release")
            && build.arguments.contains("--locked")
            && build.arguments.contains("--bin pgshift"),
        "{build:?}"
    );
    assert!(
        build
            .arguments
            .contains("target/release/pgshift /usr/local/bin/pgshift"),
        "{build:?}"
    );
    // Every path copied from the build context exists and is not in .dockerignore.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect();
    let mut copied_binary = false;
    for copy in instructions
        .iter()
        .filter(|instruction| instruction.keyword == "COPY")
    {
        let words: Vec<&str> = copy.arguments.split_whitespace().collect();
        let from_stage = words.iter().any(|word| word.starts_with("--from="));
        let paths: Vec<&str> = words
            .into_iter()
            .filter(|word| !word.starts_with("--"))
            .collect();
        let (destination, sources) = paths.split_last().expect("COPY source destination");
        if from_stage {
            copied_binary |=
                sources == ["/usr/local/bin/pgshift"] && *destination == "/usr/local/bin/pgshift";
            continue;
        }
        for source in sources {
            assert!(
                repo().join(source).exists(),
                "the Dockerfile copies {source}, which is not in the repository"
            );
            assert!(
                !ignored.iter().any(|pattern| pattern == source),
                "{source} is copied but .dockerignore leaves it out"
            );
        }
    }
    assert!(
        copied_binary,
        "the runtime stage copies /usr/local/bin/pgshift from the builder"
    );
    let entrypoint = exec_form(last(&instructions, "ENTRYPOINT"));
    assert_eq!(entrypoint, ["/usr/local/bin/pgshift"]);
    // The build context compose uses is this repository, with this Dockerfile.
    let compose = compose();
    let build = &service(&compose, "pgshift")["build"];
    assert_eq!(build["context"], ".");
    assert!(
        repo()
            .join(build["dockerfile"].as_str().unwrap_or("Dockerfile"))
            .is_file()
    );
    // Both ports pgshift listens on are exposed.
    let (_, config) = pgshift_config(&compose);
    let exposed = last(&instructions, "EXPOSE").arguments.clone();
    for port in [
        port_of(&config.listen.addr),
        port_of(config.metrics.addr.as_deref().expect("metrics")),
    ] {
        assert!(
            exposed
                .split_whitespace()
                .any(|word| word == port.to_string()),
            "EXPOSE {exposed} lacks {port}"
        );
    }
}

#[test]
fn the_config_mounted_into_pgshift_loads_and_matches_the_services_around_it() {
    let compose = compose();
    // Loading resolves no host name: "blue" and "green" exist only inside compose's network.
    let (path, config) = pgshift_config(&compose);
    assert!(path.ends_with("config/compose.toml"), "{}", path.display());
    for (color, backend) in [("blue", &config.blue), ("green", &config.green)] {
        assert_eq!(backend.host, color, "[{color}] host is the compose service");
        assert!(services(&compose).contains_key(&backend.host));
        assert_eq!(backend.port, 5432, "[{color}] port is the container's");
    }
    let pgshift = service(&compose, "pgshift");
    let published = ports(pgshift);
    for (what, address) in [
        ("[listen] addr", config.listen.addr.clone()),
        (
            "[metrics] addr",
            config.metrics.addr.clone().expect("metrics on"),
        ),
    ] {
        assert!(
            address.starts_with("0.0.0.0:"),
            "{what} {address}: listen on every interface inside the container"
        );
        let port = port_of(&address);
        assert!(
            published
                .iter()
                .any(|entry| entry.ends_with(&format!(":{port}"))),
            "{what} port {port} is not published: {published:?}"
        );
    }
    // The admin socket and the state live in named volumes.
    let pgshift_mounts = mounts(pgshift);
    for (what, path) in [
        ("[admin] socket", config.admin.socket.clone()),
        (
            "[rollout] state_file",
            config.rollout.state_file.clone().expect("state file"),
        ),
    ] {
        let mount = mount_holding(&pgshift_mounts, &path)
            .unwrap_or_else(|| panic!("{what} {} is in no volume", path.display()));
        assert!(!mount.is_bind(), "{what} is in a bind mount: {mount:?}");
    }
    // The healthcheck asks that socket.
    let test = words(&pgshift["healthcheck"]["test"]);
    let socket = test
        .iter()
        .position(|word| word == "--socket")
        .and_then(|at| test.get(at + 1))
        .expect("healthcheck --socket");
    assert_eq!(Path::new(socket), config.admin.socket.as_path());
    // The load goes through pgshift's listen port with scripts that are mounted.
    let load = service(&compose, "load");
    let command = words(&load["command"]);
    let argument = |flag: &str| {
        command
            .iter()
            .position(|word| word == flag)
            .and_then(|at| command.get(at + 1))
            .cloned()
    };
    assert_eq!(argument("-h").as_deref(), Some("pgshift"));
    assert_eq!(
        argument("-p").map(|port| port_of(&format!("x:{port}"))),
        Some(port_of(&config.listen.addr))
    );
    let load_mounts = mounts(load);
    for (at, word) in command.iter().enumerate() {
        if word == "-f" {
            let script = command[at + 1].split('@').next().expect("script");
            assert!(
                mounted_at(&load_mounts, script).is_some(),
                "pgbench script {script} is not mounted"
            );
        }
    }
}

#[test]
fn prometheus_scrapes_pgshifts_metrics_port() {
    let compose = compose();
    let (_, config) = pgshift_config(&compose);
    let metrics_port = port_of(config.metrics.addr.as_deref().expect("metrics on"));
    let prometheus = service(&compose, "prometheus");
    let flag = words(&prometheus["command"])
        .into_iter()
        .find_map(|word| word.strip_prefix("--config.file=").map(str::to_string))
        .expect("--config.file=");
    let prometheus_mounts = mounts(prometheus);
    let mount = mounted_at(&prometheus_mounts, &flag).expect("the prometheus config is mounted");
    let scrape = yaml(mount.source.trim_start_matches("./"));
    let targets: Vec<String> = scrape["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|group| words(&group["targets"]))
        .collect();
    assert!(
        targets.contains(&format!("pgshift:{metrics_port}")),
        "no pgshift:{metrics_port} in {targets:?}"
    );
    for target in &targets {
        let host = target.split(':').next().unwrap_or_default();
        assert!(
            services(&compose).contains_key(host),
            "scrape target {target} is not a service"
        );
    }
}

/// Every `expr` in a JSON document.
fn expressions(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => expressions(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| expressions(item, found)),
        _ => {}
    }
}

/// The `pgshift_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut at = 0;
    while let Some(offset) = expr[at..].find("pgshift_") {
        let start = at + offset;
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|byte| byte.is_ascii_alphanumeric() || **byte == b'_')
                .count();
        names.push(expr[start..end].to_string());
        at = end;
    }
    names
}

#[test]
fn the_dashboard_is_provisioned_and_queries_only_exported_metrics() {
    let compose = compose();
    let grafana = service(&compose, "grafana");
    let mounts = mounts(grafana);
    let provisioning =
        mounted_at(&mounts, "/etc/grafana/provisioning").expect("provisioning mounted");
    let provisioning = provisioning.source.trim_start_matches("./").to_string();
    // The data source: the prometheus service, on its container port.
    let datasources = yaml(&format!("{provisioning}/datasources/prometheus.yml"));
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"], "prometheus");
    let url = source["url"].as_str().expect("url");
    assert_eq!(url, "http://prometheus:9090");
    assert!(
        ports(service(&compose, "prometheus"))
            .iter()
            .any(|port| port.ends_with(":9090"))
    );
    let uid = source["uid"].as_str().expect("data source uid").to_string();
    // The dashboards: where the provider looks is where compose mounts them.
    let providers = yaml(&format!("{provisioning}/dashboards/pgshift.yml"));
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    let dashboards =
        mounted_at(&mounts, path).unwrap_or_else(|| panic!("nothing mounted at {path}"));
    let dir = repo().join(&dashboards.source);
    let mut used = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("dashboards dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("json") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert!(
            dashboard["title"].is_string() && dashboard["uid"].is_string(),
            "{}",
            path.display()
        );
        assert!(
            !text.contains("${DS_"),
            "{}: an exported dashboard with unresolved inputs",
            path.display()
        );
        let mut found = Vec::new();
        expressions(&dashboard, &mut found);
        assert!(!found.is_empty(), "{} has no queries", path.display());
        for expr in found {
            for name in metric_names(&expr) {
                let histogram = CONTRACT_HISTOGRAMS.iter().any(|histogram| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name == format!("{histogram}{suffix}"))
                });
                let plain = CONTRACT_METRICS.contains(&name.as_str())
                    && !CONTRACT_HISTOGRAMS.contains(&name.as_str());
                assert!(
                    plain || histogram,
                    "{}: {name} (in {expr}) is not a metric pgshift exports",
                    path.display()
                );
                used.insert(name);
            }
        }
        // Every panel's data source is the provisioned one.
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            assert_eq!(
                panel["datasource"]["uid"],
                uid.as_str(),
                "panel {}",
                panel["title"]
            );
        }
    }
    assert!(files >= 1, "no dashboard in {}", dir.display());
    for metric in DASHBOARD_METRICS {
        assert!(
            used.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
    let home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .expect("home dashboard");
    let home = home
        .strip_prefix(&format!("{path}/"))
        .expect("the home dashboard is a provisioned one");
    assert!(dir.join(home).is_file(), "{home}");
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names("sum by (color) (rate(pgshift_requests_total[1m])) / pgshift_x"),
        ["pgshift_requests_total", "pgshift_x"]
    );
    assert!(metric_names("up").is_empty());
}
