//! The probe's sessions: `--clients` tasks, each on its own connection (no pool), each
//! throttled to `--rate` operations per second by a tokio interval, each drawing a write or a
//! read per tick by `--write-ratio`.
//!
//! A write is `BEGIN`, an INSERT of `(run_id, client, seq, payload, created_at)` and `COMMIT`,
//! sent as three requests so the session really sits inside a transaction between them. It is
//! acknowledged only when COMMIT succeeded on a connection that had not changed backend (see
//! [`super::connection`] for how a COMMIT outside a transaction is caught without its command
//! tag). A read looks up the session's latest acknowledged row. A session whose connection is
//! lost counts as dropped and reconnects at its next tick; failed connection attempts back off
//! from 50 ms to 1 s. Every `seq` is used once, so a write in doubt never collides with a later
//! one.
//!
//! What happens is written into the session's [`ClientTally`] (pure bookkeeping, in
//! [`super::report`]) and into [`LiveCounters`] for the live view.

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout_at};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Error, SimpleQueryMessage, Statement};

use super::connection::{ConnectionWatch, OpenConnection, Target, is_connection_lost, open};
use super::live::LiveCounters;
use super::report::{ClientTally, WriteEnd, WriteStep, classify_write_failure, judge_read};
use super::table::TableName;

/// How long operations still in flight when the duration ends may take to finish.
const FINISH_GRACE: Duration = Duration::from_secs(5);
/// The first pause after a failed connection attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a request that failed on a closed connection waits to learn the SQLSTATE that
/// closed it.
const ENDING_WAIT: Duration = Duration::from_millis(100);
/// The SQLSTATE of the warning "there is no transaction in progress".
const NO_TRANSACTION_SQLSTATE: &str = "25P01";

/// How statements travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Simple Query messages with the values written into the SQL.
    Simple,
    /// Extended protocol with the unnamed statement (Parse/Bind/Execute/Sync each time).
    Extended,
    /// Statements prepared once per connection, then Bind/Execute.
    Prepared,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

/// What every session does.
pub struct LoadPlan {
    pub target: Target,
    pub table: TableName,
    pub run_id: String,
    pub clients: u32,
    pub rate: f64,
    pub write_ratio: f64,
    pub protocol: Protocol,
    pub duration: Duration,
    /// SQL text, built once.
    insert_sql: String,
    read_sql: String,
}

impl LoadPlan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        target: Target,
        table: TableName,
        run_id: String,
        clients: u32,
        rate: f64,
        write_ratio: f64,
        protocol: Protocol,
        duration: Duration,
    ) -> LoadPlan {
        LoadPlan {
            insert_sql: table.insert_statement(),
            read_sql: table.read_statement(),
            target,
            table,
            run_id,
            clients,
            rate,
            write_ratio,
            protocol,
            duration,
        }
    }
}

/// Runs every session from `started` until the duration ends or `stop` turns true; returns
/// their tallies, in client order.
pub async fn run_load(
    plan: Arc<LoadPlan>,
    counters: Arc<LiveCounters>,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Vec<ClientTally> {
    let tasks: Vec<_> = (0..plan.clients)
        .map(|client| {
            let plan = Arc::clone(&plan);
            let counters = Arc::clone(&counters);
            let stop = stop.clone();
            tokio::spawn(async move { run_client(client, &plan, &counters, started, stop).await })
        })
        .collect();
    let mut tallies = Vec::with_capacity(tasks.len());
    for (client, task) in tasks.into_iter().enumerate() {
        tallies.push(task.await.unwrap_or_else(|_| {
            let mut tally = ClientTally::new(client as u32, Duration::ZERO);
            tally.record_error(None);
            tally.finish(started.elapsed());
            tally
        }));
    }
    tallies
}

/// Statements prepared on one connection (`--protocol prepared`).
struct PreparedStatements {
    begin: Statement,
    insert: Statement,
    read: Statement,
    commit: Statement,
    rollback: Statement,
}

/// Transaction control statements.
#[derive(Clone, Copy)]
enum Control {
    Begin,
    Commit,
    Rollback,
}

impl Control {
    fn sql(self) -> &'static str {
        match self {
            Control::Begin => "BEGIN",
            Control::Commit => "COMMIT",
            Control::Rollback => "ROLLBACK",
        }
    }
}

/// One connection of a session.
struct Session {
    client: Client,
    watch: Arc<ConnectionWatch>,
    /// Numbered from 1 within the session: a read on another number is "after a reconnect".
    number: u64,
    prepared: Option<PreparedStatements>,
}

/// How a write that reached its end ended.
enum WriteAck {
    Committed,
    /// COMMIT was answered, but with "there is no transaction in progress".
    OutsideTransaction,
}

impl Session {
    async fn start(
        connection: OpenConnection,
        number: u64,
        plan: &LoadPlan,
    ) -> Result<Session, (Session, Error)> {
        let mut session = Session {
            client: connection.client,
            watch: connection.watch,
            number,
            prepared: None,
        };
        if plan.protocol == Protocol::Prepared {
            match session.prepare(plan).await {
                Ok(prepared) => session.prepared = Some(prepared),
                Err(error) => return Err((session, error)),
            }
        }
        Ok(session)
    }

    async fn prepare(&self, plan: &LoadPlan) -> Result<PreparedStatements, Error> {
        let client = &self.client;
        Ok(PreparedStatements {
            begin: client.prepare(Control::Begin.sql()).await?,
            insert: client
                .prepare_typed(
                    &plan.insert_sql,
                    &[Type::TEXT, Type::INT4, Type::INT8, Type::TEXT],
                )
                .await?,
            read: client
                .prepare_typed(&plan.read_sql, &[Type::TEXT, Type::INT4, Type::INT8])
                .await?,
            commit: client.prepare(Control::Commit.sql()).await?,
            rollback: client.prepare(Control::Rollback.sql()).await?,
        })
    }

    async fn control(&self, protocol: Protocol, control: Control) -> Result<(), Error> {
        match (protocol, &self.prepared) {
            (Protocol::Prepared, Some(prepared)) => {
                let statement = match control {
                    Control::Begin => &prepared.begin,
                    Control::Commit => &prepared.commit,
                    Control::Rollback => &prepared.rollback,
                };
                self.client.execute(statement, &[]).await.map(drop)
            }
            (Protocol::Extended, _) => self
                .client
                .execute_typed(control.sql(), &[])
                .await
                .map(drop),
            _ => self.client.simple_query(control.sql()).await.map(drop),
        }
    }

    async fn insert(&self, plan: &LoadPlan, client: i32, seq: i64) -> Result<(), Error> {
        let payload = format!("pgshift probe {} client {client} seq {seq}", plan.run_id);
        match (plan.protocol, &self.prepared) {
            (Protocol::Prepared, Some(prepared)) => self
                .client
                .execute(&prepared.insert, &[&plan.run_id, &client, &seq, &payload])
                .await
                .map(drop),
            (Protocol::Extended, _) => self
                .client
                .execute_typed(
                    &plan.insert_sql,
                    &[
                        (&plan.run_id, Type::TEXT),
                        (&client, Type::INT4),
                        (&seq, Type::INT8),
                        (&payload, Type::TEXT),
                    ],
                )
                .await
                .map(drop),
            _ => self
                .client
                .simple_query(
                    &plan
                        .table
                        .insert_literal(&plan.run_id, client, seq, &payload),
                )
                .await
                .map(drop),
        }
    }

    /// Whether the row `(run_id, client, seq)` is visible to this connection.
    async fn read(&self, plan: &LoadPlan, client: i32, seq: i64) -> Result<bool, Error> {
        match (plan.protocol, &self.prepared) {
            (Protocol::Prepared, Some(prepared)) => self
                .client
                .query(&prepared.read, &[&plan.run_id, &client, &seq])
                .await
                .map(|rows| !rows.is_empty()),
            (Protocol::Extended, _) => self
                .client
                .query_typed(
                    &plan.read_sql,
                    &[
                        (&plan.run_id, Type::TEXT),
                        (&client, Type::INT4),
                        (&seq, Type::INT8),
                    ],
                )
                .await
                .map(|rows| !rows.is_empty()),
            _ => self
                .client
                .simple_query(&plan.table.read_literal(&plan.run_id, client, seq))
                .await
                .map(|messages| {
                    messages
                        .iter()
                        .any(|message| matches!(message, SimpleQueryMessage::Row(_)))
                }),
        }
    }

    /// BEGIN, INSERT, COMMIT. `commit_sent` turns true just before COMMIT goes out, so a
    /// caller that gives up on the future still knows whether the write is in doubt.
    async fn write(
        &self,
        plan: &LoadPlan,
        client: i32,
        seq: i64,
        commit_sent: &mut bool,
    ) -> Result<WriteAck, (WriteStep, Error)> {
        self.control(plan.protocol, Control::Begin)
            .await
            .map_err(|error| (WriteStep::Begin, error))?;
        self.insert(plan, client, seq)
            .await
            .map_err(|error| (WriteStep::Insert, error))?;
        let warnings_before = self.watch.no_transaction_warnings();
        *commit_sent = true;
        self.control(plan.protocol, Control::Commit)
            .await
            .map_err(|error| (WriteStep::Commit, error))?;
        if self.watch.no_transaction_warnings() > warnings_before {
            Ok(WriteAck::OutsideTransaction)
        } else {
            Ok(WriteAck::Committed)
        }
    }

    /// The SQLSTATE to report for a failed request, and whether the connection is gone.
    async fn failure(&self, error: &Error) -> (Option<String>, bool) {
        let lost = is_connection_lost(error, &self.client);
        let sqlstate = match error.code() {
            Some(code) => Some(code.code().to_string()),
            None if lost => self.watch.ending_sqlstate_after_close(ENDING_WAIT).await,
            None => None,
        };
        (sqlstate, lost)
    }
}

/// One session's state between operations.
struct SessionLoop<'a> {
    index: u32,
    plan: &'a LoadPlan,
    counters: &'a LiveCounters,
    started: Instant,
    tally: ClientTally,
    session: Option<Session>,
    connections: u64,
    backoff: Duration,
    next_seq: i64,
}

impl SessionLoop<'_> {
    fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.started)
    }

    fn succeeded(&mut self, operation_started: Instant) {
        let now = Instant::now();
        let at = self.offset(now);
        let gap = at.saturating_sub(self.tally.stalls.last_success());
        self.tally
            .record_success(at, now.saturating_duration_since(operation_started));
        self.counters.success(
            self.index as usize,
            at.as_millis() as u64,
            gap.as_millis() as u64,
        );
    }

    fn errored(&mut self, sqlstate: Option<&str>) {
        self.tally.record_error(sqlstate);
        self.counters.error();
    }

    fn lost_session(&mut self) {
        self.session = None;
        self.tally.sessions_dropped += 1;
        self.counters.dropped();
    }

    /// Opens a connection; on failure, counts it and returns the pause before the next try.
    async fn connect(&mut self) -> Result<(), Duration> {
        match open(&self.plan.target).await {
            Ok(connection) => {
                self.connections += 1;
                self.tally.connections_opened += 1;
                match Session::start(connection, self.connections, self.plan).await {
                    Ok(session) => {
                        self.session = Some(session);
                        self.backoff = FIRST_BACKOFF;
                        Ok(())
                    }
                    Err((session, error)) => {
                        let (sqlstate, lost) = session.failure(&error).await;
                        self.errored(sqlstate.as_deref());
                        if lost {
                            self.tally.sessions_dropped += 1;
                            self.counters.dropped();
                        }
                        Err(self.next_backoff())
                    }
                }
            }
            Err(failure) => {
                self.tally.connect_failures += 1;
                self.errored(failure.sqlstate.as_deref());
                Err(self.next_backoff())
            }
        }
    }

    fn next_backoff(&mut self) -> Duration {
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        pause
    }

    /// One write; `false` when the run must stop (cut at the hard stop).
    async fn write(&mut self, hard_stop: Instant) -> bool {
        let Some(session) = self.session.take() else {
            return true;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let client = self.index as i32;
        let operation_started = Instant::now();
        let mut commit_sent = false;
        let outcome = timeout_at(
            hard_stop,
            session.write(self.plan, client, seq, &mut commit_sent),
        )
        .await;
        match outcome {
            Ok(Ok(WriteAck::Committed)) => {
                self.tally.acknowledge(seq, session.number);
                self.succeeded(operation_started);
                self.session = Some(session);
            }
            Ok(Ok(WriteAck::OutsideTransaction)) => {
                self.tally.commits_outside_transaction += 1;
                self.tally.record_write_end(WriteEnd::Failed);
                self.errored(Some(NO_TRANSACTION_SQLSTATE));
                self.session = Some(session);
            }
            Ok(Err((step, error))) => {
                let (sqlstate, lost) = session.failure(&error).await;
                self.errored(sqlstate.as_deref());
                self.tally
                    .record_write_end(classify_write_failure(step, lost));
                if lost {
                    self.lost_session();
                } else if step == WriteStep::Commit {
                    // An ERROR answering COMMIT ended the transaction.
                    self.session = Some(session);
                } else {
                    self.roll_back(session, hard_stop).await;
                }
            }
            Err(_) => {
                self.tally.record_write_end(if commit_sent {
                    WriteEnd::InDoubt
                } else {
                    WriteEnd::Failed
                });
                return false;
            }
        }
        true
    }

    /// Ends the aborted transaction of a write that failed before COMMIT.
    async fn roll_back(&mut self, session: Session, hard_stop: Instant) {
        let rollback = timeout_at(
            hard_stop,
            session.control(self.plan.protocol, Control::Rollback),
        )
        .await;
        match rollback {
            Ok(Ok(())) => self.session = Some(session),
            Ok(Err(error)) => {
                let (sqlstate, lost) = session.failure(&error).await;
                self.errored(sqlstate.as_deref());
                if lost {
                    self.lost_session();
                } else {
                    self.session = Some(session);
                }
            }
            Err(_) => {}
        }
    }

    /// One read of the latest acknowledged row; `false` when the run must stop.
    async fn read(&mut self, hard_stop: Instant) -> bool {
        let Some(session) = self.session.take() else {
            return true;
        };
        let expected = self.tally.last_acknowledged();
        let seq = expected.map(|write| write.seq).unwrap_or(0);
        let operation_started = Instant::now();
        let outcome = timeout_at(hard_stop, session.read(self.plan, self.index as i32, seq)).await;
        match outcome {
            Ok(Ok(found)) => {
                self.tally
                    .record_read(judge_read(expected, found, session.number));
                self.succeeded(operation_started);
                self.session = Some(session);
            }
            Ok(Err(error)) => {
                let (sqlstate, lost) = session.failure(&error).await;
                self.errored(sqlstate.as_deref());
                self.tally.reads_failed += 1;
                if lost {
                    self.lost_session();
                } else {
                    self.session = Some(session);
                }
            }
            Err(_) => return false,
        }
        true
    }
}

async fn run_client(
    index: u32,
    plan: &LoadPlan,
    counters: &LiveCounters,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> ClientTally {
    let deadline = started + plan.duration;
    let hard_stop = deadline + FINISH_GRACE;
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    // Spread the sessions' ticks over one period so they do not all fire at once.
    let first_tick = started + period.mul_f64(f64::from(index) / f64::from(plan.clients.max(1)));
    let mut ticker = tokio::time::interval_at(first_tick, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut state = SessionLoop {
        index,
        plan,
        counters,
        started,
        tally: ClientTally::new(index, Duration::ZERO),
        session: None,
        connections: 0,
        backoff: FIRST_BACKOFF,
        next_seq: 1,
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = sleep_until(deadline) => break,
            _ = ticker.tick() => {}
        }
        if state.session.is_none() {
            let connected = timeout_at(hard_stop, state.connect()).await;
            match connected {
                Ok(Ok(())) => {}
                Ok(Err(pause)) => {
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|stopped| *stopped) => break,
                        _ = sleep_until(deadline) => break,
                        _ = sleep(pause) => continue,
                    }
                }
                Err(_) => break,
            }
        }
        let keep_going = if rand::random::<f64>() < plan.write_ratio {
            state.write(hard_stop).await
        } else {
            state.read(hard_stop).await
        };
        if !keep_going {
            break;
        }
    }
    let ended = state.offset(Instant::now());
    drop(state.session.take());
    state.tally.finish(ended);
    state.tally
}
