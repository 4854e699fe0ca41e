//! Steering a running pgshift through its admin socket, against real blue and green clusters:
//! weight changes under load, state that survives restarts, drains at idle points, and a
//! storm of concurrent admin commands that never tears or loses an update.

mod support;

use std::time::{Duration, Instant};

use support::pgshift::{TestServer, connect_with_outcome, expect_ended_with, server_port};
use support::shared_pair;

fn weight_of(reply: &serde_json::Value) -> f64 {
    reply["green_weight"].as_f64().expect("green_weight")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_under_load_move_new_sessions_only() {
    let pair = shared_pair();
    let server = TestServer::start(pair, "", "green_weight = 0", Some(7)).await;
    // A steady load on sessions opened before the change.
    let mut load = Vec::new();
    for _ in 0..4 {
        let client = server.server().proxy().local_addr();
        let dsn = format!("host=127.0.0.1 port={} user=bulk dbname=app", client.port());
        load.push(tokio::spawn(async move {
            let (client, _) = connect_with_outcome(&dsn).await;
            let port = server_port(&client).await;
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut queries = 0u32;
            while Instant::now() < deadline {
                client
                    .query_one("SELECT pg_sleep(0.001), 1", &[])
                    .await
                    .expect("in-flight query");
                assert_eq!(server_port(&client).await, port, "a session never moves");
                queries += 1;
            }
            queries
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = server.admin("weight 40").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let status = server.admin("status").await;
    assert_eq!(weight_of(&status), 40.0);
    assert_eq!(status["state"], "manual");

    let sessions = 1000u32;
    let mut green = 0;
    for _ in 0..sessions {
        let (client, _) = connect_with_outcome(&server.bulk_dsn()).await;
        if server_port(&client).await == pair.green.port() {
            green += 1;
        }
    }
    let mean = f64::from(sessions) * 0.4;
    let sd = (f64::from(sessions) * 0.4 * 0.6).sqrt();
    assert!(
        (f64::from(green) - mean).abs() <= 6.11 * sd,
        "{green} of {sessions} went green at 40 %"
    );
    for task in load {
        assert!(task.await.expect("load task") > 10);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restarts_and_a_corrupt_state_file_stops_the_start() {
    let pair = shared_pair();
    let mut server = TestServer::start(pair, "", "green_weight = 10", None).await;
    assert_eq!(server.admin("weight 60.5").await["ok"], true);
    assert_eq!(server.admin("pin tenant=acme blue").await["ok"], true);
    assert_eq!(server.admin("drain blue").await["ok"], true);
    server.restart(None).await.expect("restart");
    let status = server.admin("status").await;
    assert_eq!(
        weight_of(&status),
        60.5,
        "the state file wins over green_weight = 10"
    );
    assert_eq!(status["draining"]["blue"], true);
    let pins = status["pins"].as_array().expect("pins");
    assert!(
        pins.iter().any(|pin| pin["tenant"] == "acme"
            && pin["color"] == "blue"
            && pin["source"] == "admin"),
        "{status}"
    );
    // Routing follows the restored state: blue is drained, so even the blue pin goes green.
    let (client, _) = connect_with_outcome(&format!(
        "{} options='-c pgshift.tenant=acme'",
        server.bulk_dsn()
    ))
    .await;
    assert_eq!(server_port(&client).await, pair.green.port());
    drop(client);

    std::fs::write(server.state_path(), "{ this is not json").expect("corrupt the state file");
    let error = server
        .restart(None)
        .await
        .expect_err("a corrupt state file stops the start");
    let text = format!("{error:#}");
    assert!(
        text.contains(&server.state_path().display().to_string()),
        "{text}"
    );
    assert!(text.contains("--reset-state"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_transactions_and_closes_idle_sessions_at_once() {
    let pair = shared_pair();
    let server = TestServer::start(pair, "", "green_weight = 0", None).await;
    let (busy, mut busy_end) = connect_with_outcome(&server.app_dsn()).await;
    let (_idle, idle_end) = connect_with_outcome(&server.app_dsn()).await;
    let table = format!("drained_{}", std::process::id());
    busy.batch_execute(&format!(
        "CREATE TEMP TABLE {table} (id int); BEGIN; INSERT INTO {table} VALUES (1)"
    ))
    .await
    .expect("begin");
    let reply = server.admin("drain blue").await;
    assert_eq!(reply["ok"], true, "{reply}");
    expect_ended_with(
        idle_end,
        Duration::from_secs(2),
        "57P01",
        "the idle session closes at once",
    )
    .await;
    // The closed idle session leaves the registry a moment after its client saw the error.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = server.admin("status").await;
        if status["blue"]["draining_sessions"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New sessions go green while blue drains.
    let (fresh, _) = connect_with_outcome(&server.app_dsn()).await;
    assert_eq!(server_port(&fresh).await, pair.green.port());
    // The transaction goes on and commits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(busy_end.try_recv().is_err(), "cut inside a transaction");
    busy.batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT"))
        .await
        .expect("commit");
    expect_ended_with(
        busy_end,
        Duration::from_secs(2),
        "57P01",
        "closed after its commit",
    )
    .await;
    assert_eq!(
        server.admin("drain green").await["ok"],
        false,
        "draining both colors is refused"
    );
    assert_eq!(server.admin("undrain blue").await["ok"], true);
    let (back, _) = connect_with_outcome(&server.app_dsn()).await;
    assert_eq!(server_port(&back).await, pair.blue.port());
    server.stop().await;
}

/// One acknowledged `weight` command: when it was sent, when it was answered, its decision.
struct Acknowledged {
    sent: Instant,
    answered: Instant,
    weight: f64,
    decision: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_clients_never_tear_or_lose_an_update() {
    let pair = shared_pair();
    let server = TestServer::start(pair, "", "green_weight = 0", None).await;
    let socket = server.socket_path();
    let mut admins = Vec::new();
    for client in 0..20u32 {
        let socket = socket.clone();
        admins.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for round in 0..4u32 {
                let weight = if (client + round) % 2 == 0 {
                    0.0
                } else {
                    100.0
                };
                let sent = Instant::now();
                let reply =
                    support::pgshift::admin_command(&socket, &format!("weight {weight}")).await;
                let answered = Instant::now();
                assert_eq!(reply["ok"], true, "{reply}");
                acknowledged.push(Acknowledged {
                    sent,
                    answered,
                    weight,
                    decision: reply["decision"].as_u64().expect("decision id"),
                });
            }
            acknowledged
        }));
    }
    let mut sessions = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let (client, _) = connect_with_outcome(&server.bulk_dsn()).await;
        let connected = Instant::now();
        sessions.push((started, connected, server_port(&client).await));
    }
    let mut commands: Vec<Acknowledged> = Vec::new();
    for admin in admins {
        commands.extend(admin.await.expect("admin client"));
    }
    commands.sort_by_key(|command| command.decision);

    let status = server.admin("status").await;
    let mut decided: Vec<u64> = status["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|decision| decision["action"] == "weight")
        .map(|decision| decision["id"].as_u64().expect("id"))
        .collect();
    decided.sort_unstable();
    let acknowledged_ids: Vec<u64> = commands.iter().map(|command| command.decision).collect();
    assert_eq!(
        decided, acknowledged_ids,
        "every acknowledged command is decided exactly once"
    );
    assert_eq!(
        weight_of(&status),
        commands.last().expect("commands").weight,
        "the last decision wins"
    );

    // Each session's color matches a weight that may have been in force while it connected:
    // commands apply in decision order, each between its sending and its answer.
    for (started, connected, port) in sessions {
        let first = commands
            .iter()
            .rposition(|command| command.answered < started);
        let last = commands
            .iter()
            .rposition(|command| command.sent < connected);
        let mut possible: Vec<f64> = Vec::new();
        if first.is_none() {
            possible.push(0.0);
        }
        if let Some(last) = last {
            possible.extend(
                commands[first.unwrap_or(0)..=last]
                    .iter()
                    .map(|command| command.weight),
            );
        }
        let color_weight = if port == pair.green.port() {
            100.0
        } else {
            0.0
        };
        assert!(
            possible.contains(&color_weight),
            "a session went to the {port} color while no such weight was in force"
        );
    }
    server.stop().await;
}
