//! Routing through a running pgshift against real blue and green clusters: weights, the
//! seeded split, sticky keys, monotonic raises and pins.

mod support;

use std::collections::HashMap;

use pgshift::routing::RoutingTable;
use support::pgshift::TestProxy;
use support::shared_pair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_is_all_blue_and_hundred_all_green() {
    let pair = shared_pair();
    let blue_only = TestProxy::start(pair, "", "green_weight = 0", None).await;
    let green_only = TestProxy::start(pair, "", "green_weight = 100", None).await;
    for _ in 0..20 {
        assert_eq!(
            blue_only.served_port(&blue_only.app_dsn()).await,
            pair.blue.port()
        );
        assert_eq!(
            green_only.served_port(&green_only.app_dsn()).await,
            pair.green.port()
        );
    }
    blue_only.stop().await;
    green_only.stop().await;
}

/// Weight 30 over 2,000 seeded draws: green's share stays inside a 1e-9 binomial bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_matches_the_weight() {
    let pair = shared_pair();
    let proxy = TestProxy::start(
        pair,
        "",
        "green_weight = 30\nsticky = \"none\"",
        Some(20261129),
    )
    .await;
    let sessions = 2000u32;
    let mut green = 0u32;
    for _ in 0..sessions {
        if proxy.served_port(&proxy.bulk_dsn()).await == pair.green.port() {
            green += 1;
        }
    }
    // P(|X - np| > 6.11 sd) < 1e-9 for a binomial this large (normal tail bound).
    let mean = f64::from(sessions) * 0.3;
    let sd = (f64::from(sessions) * 0.3 * 0.7).sqrt();
    assert!(
        (f64::from(green) - mean).abs() <= 6.11 * sd,
        "green got {green} of {sessions} sessions at weight 30"
    );
    let stats = proxy
        .proxy()
        .shared()
        .stats
        .color(pgshift::color::Color::Green)
        .snapshot();
    assert_eq!(stats.sessions_opened, u64::from(green));
    proxy.stop().await;
}

/// For each sticky mode, the same key always lands on the same color, and raising the weight
/// never moves a key from green back to blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_are_stable_and_monotonic() {
    let pair = shared_pair();
    let keys: Vec<String> = (0..12).map(|i| format!("key{i}")).collect();
    for mode in [
        "user",
        "database",
        "tenant",
        "application_name",
        "client_addr",
    ] {
        let proxy = TestProxy::start(
            pair,
            "",
            &format!("green_weight = 0\nsticky = \"{mode}\""),
            None,
        )
        .await;
        let dsn_for = |key: &str| -> String {
            match mode {
                // Sticky by database: three real databases stand in for keys.
                "database" => proxy.dsn("bulk", None, key),
                "tenant" => format!("{} options='-c pgshift.tenant={key}'", proxy.bulk_dsn()),
                "application_name" => format!("{} application_name={key}", proxy.bulk_dsn()),
                "user" => {
                    let password = support::pgshift::password_of(key);
                    proxy.dsn(key, password, "app")
                }
                _ => proxy.bulk_dsn(),
            }
        };
        let mode_keys: Vec<String> = match mode {
            "database" => vec!["app".into(), "tenant_42".into(), "other_db".into()],
            "client_addr" => vec!["127.0.0.1".into()],
            "user" => vec![
                "bulk".into(),
                "pgshift_test".into(),
                "md5_user".into(),
                "plain_user".into(),
            ],
            _ => keys.clone(),
        };
        let mut previous: HashMap<String, u16> = HashMap::new();
        for weight_bp in [0u16, 1000, 2500, 5000, 7500, 9000, 10_000] {
            let mut table: RoutingTable = (*proxy.proxy().shared().router.table()).clone();
            table.green_weight_bp = weight_bp;
            proxy.proxy().shared().router.publish(table);
            for key in &mode_keys {
                let first = proxy.served_port(&dsn_for(key)).await;
                for _ in 0..3 {
                    assert_eq!(
                        proxy.served_port(&dsn_for(key)).await,
                        first,
                        "{mode} key {key} moved at {weight_bp} bp"
                    );
                }
                if let Some(before) = previous.insert(key.clone(), first) {
                    assert!(
                        !(before == pair.green.port() && first == pair.blue.port()),
                        "{mode} key {key} moved from green back to blue at {weight_bp} bp"
                    );
                }
                if weight_bp == 0 {
                    assert_eq!(first, pair.blue.port());
                }
                if weight_bp == 10_000 {
                    assert_eq!(first, pair.green.port());
                }
            }
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_win_over_the_weight() {
    let pair = shared_pair();
    let routing = r#"
green_weight = 100
[[routing.pin]]
database = "tenant_42"
color = "blue"
[[routing.pin]]
user = "bulk"
database = "other_db"
color = "blue"
[[routing.pin]]
tenant = "acme"
color = "blue"
"#;
    let proxy = TestProxy::start(pair, "", routing, None).await;
    let blue = pair.blue.port();
    let green = pair.green.port();
    assert_eq!(
        proxy
            .served_port(&proxy.dsn("bulk", None, "tenant_42"))
            .await,
        blue
    );
    // A two-key pin needs both keys.
    assert_eq!(
        proxy
            .served_port(&proxy.dsn("bulk", None, "other_db"))
            .await,
        blue
    );
    assert_eq!(
        proxy
            .served_port(&proxy.dsn("pgshift_test", Some("pgshift_test_pw"), "other_db"))
            .await,
        green
    );
    let tenant = format!("{} options='-c pgshift.tenant=acme'", proxy.bulk_dsn());
    assert_eq!(proxy.served_port(&tenant).await, blue);
    let escaped = format!(
        "{} options='--pgshift.tenant=acme -c search_path=public'",
        proxy.bulk_dsn()
    );
    assert_eq!(proxy.served_port(&escaped).await, blue);
    assert_eq!(proxy.served_port(&proxy.bulk_dsn()).await, green);
    // A drained color loses its pins too.
    let mut table: RoutingTable = (*proxy.proxy().shared().router.table()).clone();
    table.draining = [true, false];
    proxy.proxy().shared().router.publish(table);
    assert_eq!(
        proxy
            .served_port(&proxy.dsn("bulk", None, "tenant_42"))
            .await,
        green
    );
    proxy.stop().await;
}
