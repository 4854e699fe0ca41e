//! Self-test of the integration-test harness in `tests/support`: the shared
//! blue/green pair starts, every auth method works, and a private pair can be
//! stopped, killed and restarted.

mod support;

use std::process::Command;
use std::time::Instant;

use support::{
    APP_DB, BULK_USER, ClusterPair, MD5_PASSWORD, MD5_USER, OTHER_DB, PLAIN_PASSWORD, PLAIN_USER,
    SUPERUSER, TENANT_DB, TEST_PASSWORD, TEST_USER, shared_pair,
};

async fn server_port(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_pair_is_two_distinct_clusters() {
    let t = Instant::now();
    let pair = shared_pair();
    eprintln!("shared_pair() returned after {:.2?}", t.elapsed());
    assert_ne!(pair.blue.port(), pair.green.port());
    for cluster in pair.both() {
        let client = cluster.connect_app().await;
        assert_eq!(server_port(&client).await, i32::from(cluster.port()));
        let row = client
            .query_one(
                "SELECT current_setting('cluster_name'), current_user, current_database(), \
                 current_setting('wal_level')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), cluster.color_name());
        assert_eq!(row.get::<_, String>(1), TEST_USER);
        assert_eq!(row.get::<_, String>(2), APP_DB);
        assert_eq!(row.get::<_, String>(3), "logical");
        // The test user may create objects in its database.
        client
            .batch_execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
    }
    assert_eq!(pair.blue.color_name(), "blue");
    assert_eq!(pair.green.color_name(), "green");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_auth_method_logs_in() {
    let pair = shared_pair();
    for cluster in pair.both() {
        // SCRAM with a wrong password is rejected.
        assert!(
            cluster
                .connect(TEST_USER, Some("wrong"), APP_DB)
                .await
                .is_err()
        );
        // trust
        let bulk = cluster.connect(BULK_USER, None, APP_DB).await.unwrap();
        assert_eq!(server_port(&bulk).await, i32::from(cluster.port()));
        // md5 and cleartext password
        for (user, pw) in [(MD5_USER, MD5_PASSWORD), (PLAIN_USER, PLAIN_PASSWORD)] {
            let c = cluster
                .connect(user, Some(pw), APP_DB)
                .await
                .unwrap_or_else(|e| panic!("{user} on {}: {e}", cluster.color_name()));
            let who: String = c
                .query_one("SELECT current_user", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(who, user);
            assert!(cluster.connect(user, Some("nope"), APP_DB).await.is_err());
        }
        // superuser over TCP (trust)
        let su = cluster.connect(SUPERUSER, None, "postgres").await.unwrap();
        let is_su: bool = su
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(is_su);
        // Stored password formats.
        assert_eq!(
            cluster.psql(
                "SELECT rolname, split_part(rolpassword, '$', 1) ~ '^(md5[0-9a-f]{32}|SCRAM-SHA-256)$', \
                 left(rolpassword, 3) FROM pg_authid \
                 WHERE rolname IN ('pgshift_test', 'md5_user', 'plain_user') ORDER BY 1"
            ),
            "md5_user|t|md5\npgshift_test|t|SCR\nplain_user|t|SCR"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn databases_and_roles_exist() {
    let pair = shared_pair();
    for cluster in pair.both() {
        assert_eq!(
            cluster.psql(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database \
                 WHERE datname IN ('app', 'tenant_42', 'other_db') ORDER BY 1"
            ),
            "app|pgshift_test\nother_db|pgshift_test\ntenant_42|pgshift_test"
        );
        assert_eq!(
            cluster.psql(
                "SELECT rolname, rolcanlogin, rolcreatedb, rolreplication FROM pg_roles \
                 WHERE rolname IN ('pgshift_test', 'bulk') ORDER BY 1"
            ),
            "bulk|t|t|f\npgshift_test|t|t|t"
        );
        for db in [TENANT_DB, OTHER_DB] {
            let c = cluster
                .connect(TEST_USER, Some(TEST_PASSWORD), db)
                .await
                .unwrap();
            let name: String = c
                .query_one("SELECT current_database()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(name, db);
            cluster.connect(BULK_USER, None, db).await.unwrap();
        }
        assert_eq!(cluster.psql_db(APP_DB, "SELECT 1; SELECT 2"), "1\n2");
        assert_eq!(
            cluster.psql("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"),
            "0"
        );
    }
}

/// `replication` pg_hba entries: physical walsender for pgshift_test (SCRAM)
/// and postgres (trust), through psql as a client running as root.
#[test]
fn replication_connections_are_allowed() {
    let pair = shared_pair();
    for cluster in pair.both() {
        for (user, pw) in [(TEST_USER, Some(TEST_PASSWORD)), (SUPERUSER, None)] {
            let dsn = format!("{} replication=true", cluster.dsn(user, pw, "postgres"));
            let out = Command::new(cluster.bin("psql"))
                .args(["-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM", &dsn])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "IDENTIFY_SYSTEM as {user} on {}: {}",
                cluster.color_name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn private_pair_stop_start_and_kill() {
    let t = Instant::now();
    let pair = ClusterPair::start_private();
    eprintln!("private pair started in {:.2?}", t.elapsed());
    let green = &pair.green;
    let port = green.port();

    let c = green.connect_app().await;
    c.batch_execute("CREATE TABLE survives (x int); INSERT INTO survives VALUES (42)")
        .await
        .unwrap();

    // Clean stop + start on the same port.
    green.stop();
    assert!(!green.is_running());
    assert!(
        green
            .connect(TEST_USER, Some(TEST_PASSWORD), APP_DB)
            .await
            .is_err()
    );
    green.start();
    assert_eq!(green.port(), port);
    let c = green.connect_app().await;
    assert_eq!(server_port(&c).await, i32::from(port));
    let x: i32 = c
        .query_one("SELECT x FROM survives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);

    // Crash (SIGKILL of the postmaster with a live backend) + restart.
    let pid = green.postmaster_pid().unwrap();
    green.kill_postmaster(libc::SIGKILL);
    assert!(green.wait_stopped());
    assert!(green.postmaster_pid().is_none());
    green.start();
    assert_ne!(green.postmaster_pid().unwrap(), pid);
    let c = green.connect_app().await;
    assert_eq!(server_port(&c).await, i32::from(port));

    // Blue is unaffected.
    let b = pair.blue.connect_app().await;
    assert_eq!(server_port(&b).await, i32::from(pair.blue.port()));
    drop((b, c));

    // Drop stops both clusters and removes their dirs.
    let dirs = [pair.blue.root_dir().to_owned(), green.root_dir().to_owned()];
    let pids = [
        pair.blue.postmaster_pid().unwrap(),
        green.postmaster_pid().unwrap(),
    ];
    drop(pair);
    for dir in &dirs {
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
    for pid in pids {
        // Stopped and reaped by Drop (a recycled pid is not ours).
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !cmdline.contains("pgshift-test-"),
            "postmaster {pid} still alive"
        );
    }
}
