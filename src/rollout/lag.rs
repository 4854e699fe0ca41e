//! The replication-lag guardrail: `[rollout] lag_query` run on `lag_dsn` in its own task, its
//! latest reading published for the controller. While the lag is above `max_lag` (or cannot be
//! read) the rollout does not advance and `promote` refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::proxy::Shared;

/// The latest result of the lag query.
#[derive(Debug, Clone, PartialEq)]
pub enum LagReading {
    /// No lag query is configured.
    Off,
    /// Configured, no result yet.
    Pending,
    Value {
        lag: f64,
        at: Instant,
    },
    Failed {
        error: String,
        at: Instant,
    },
}

impl LagReading {
    /// Why the guardrail holds the rollout now, if it does. A reading older than
    /// `stale_after` holds it too: an unknown lag is not a small one.
    pub fn blocks(
        &self,
        max_lag: Option<f64>,
        now: Instant,
        stale_after: Duration,
    ) -> Option<String> {
        let max_lag = max_lag?;
        match self {
            LagReading::Off => None,
            LagReading::Pending => Some("replication lag not measured yet (lag_query)".into()),
            LagReading::Failed { error, .. } => Some(format!("the lag query failed: {error}")),
            LagReading::Value { at, .. } if now.saturating_duration_since(*at) > stale_after => {
                Some("the last replication lag reading is stale".into())
            }
            LagReading::Value { lag, .. } if *lag > max_lag => {
                Some(format!("replication lag {lag} is above max_lag {max_lag}"))
            }
            LagReading::Value { .. } => None,
        }
    }

    /// The lag for `status` and the gauge.
    pub fn value(&self) -> Option<f64> {
        match self {
            LagReading::Value { lag, .. } => Some(*lag),
            _ => None,
        }
    }
}

/// How often the lag query runs: every evaluation, at most every 5 s.
pub fn poll_interval(config: &Config) -> Duration {
    config.rollout.evaluate_every.min(Duration::from_secs(5))
}

/// Runs the lag query in a loop (reading the config anew each time, so reloads apply) and
/// publishes each reading. Ends when every receiver is gone.
pub fn spawn(shared: Arc<Shared>) -> watch::Receiver<LagReading> {
    let (publish, readings) = watch::channel(LagReading::Off);
    tokio::spawn(async move {
        let mut connection: Option<(String, tokio_postgres::Client)> = None;
        loop {
            let current = shared.config.load_full();
            let reading = match (&current.rollout.lag_query, &current.rollout.lag_dsn) {
                (Some(query), Some(dsn)) => Some(read_lag(&mut connection, dsn, query).await),
                _ => {
                    connection = None;
                    None
                }
            };
            let reading = reading.unwrap_or(LagReading::Off);
            // NaN says "not measured": a failed or disabled query must not leave an old value.
            metrics::gauge!("pgshift_replication_lag").set(reading.value().unwrap_or(f64::NAN));
            if publish.send(reading).is_err() {
                return;
            }
            tokio::time::sleep(poll_interval(&current)).await;
        }
    });
    readings
}

async fn read_lag(
    connection: &mut Option<(String, tokio_postgres::Client)>,
    dsn: &str,
    query: &str,
) -> LagReading {
    let failed = |error: String| LagReading::Failed {
        error,
        at: Instant::now(),
    };
    if connection
        .as_ref()
        .is_none_or(|(used, client)| used != dsn || client.is_closed())
    {
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(dsn, tokio_postgres::NoTls),
        )
        .await
        {
            Ok(Ok((client, driver))) => {
                tokio::spawn(async move {
                    let _ = driver.await;
                });
                *connection = Some((dsn.to_string(), client));
            }
            Ok(Err(error)) => return failed(format!("cannot connect with lag_dsn: {error}")),
            Err(_) => return failed("cannot connect with lag_dsn: timed out".into()),
        }
    }
    let Some((_, client)) = connection.as_ref() else {
        return failed("no connection".into());
    };
    let rows = match tokio::time::timeout(Duration::from_secs(5), client.simple_query(query)).await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => return failed(error.to_string()),
        Err(_) => return failed("timed out after 5s".into()),
    };
    let value = rows.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
        _ => None,
    });
    match value {
        Some(Some(text)) => match parse_lag(&text) {
            Some(lag) => LagReading::Value {
                lag,
                at: Instant::now(),
            },
            None => failed(format!("lag_query returned {text:?}, not a number")),
        },
        Some(None) => failed("lag_query returned NULL".into()),
        None => failed("lag_query returned no row".into()),
    }
}

/// The query's one value as a number (any numeric type arrives as text here).
pub fn parse_lag(text: &str) -> Option<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|lag| lag.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_block_as_they_should() {
        let now = Instant::now();
        let stale = Duration::from_secs(15);
        assert_eq!(LagReading::Off.blocks(Some(1.0), now, stale), None);
        assert_eq!(
            LagReading::Value { lag: 5.0, at: now }.blocks(None, now, stale),
            None
        );
        assert!(LagReading::Pending.blocks(Some(1.0), now, stale).is_some());
        assert!(
            LagReading::Value { lag: 5.0, at: now }
                .blocks(Some(1.0), now, stale)
                .is_some()
        );
        assert_eq!(
            LagReading::Value { lag: 0.5, at: now }.blocks(Some(1.0), now, stale),
            None
        );
        let old = now.checked_sub(Duration::from_secs(60)).unwrap_or(now);
        if old < now {
            assert!(
                LagReading::Value { lag: 0.5, at: old }
                    .blocks(Some(1.0), now, stale)
                    .is_some()
            );
        }
        assert_eq!(parse_lag(" 1048576 "), Some(1_048_576.0));
        assert_eq!(parse_lag("0.25"), Some(0.25));
        assert_eq!(parse_lag("NaN"), None);
        assert_eq!(parse_lag("abc"), None);
    }
}
