//! Request accounting for one session, from the message types seen in each direction.
//!
//! A request is one Simple Query, one FunctionCall, or one extended-protocol batch ending in
//! Sync (a Sync sent during COPY IN is not a boundary). The backend ignores Syncs while COPY IN
//! runs, and clients (libpq, tokio-postgres) send one right after the Execute that starts the
//! COPY — before they can know it starts one — and another after CopyDone: when a batch turns
//! out to be a COPY IN, the Syncs already counted after it are dropped, and the next Sync after
//! the COPY ends it. Requests complete in order, one per
//! ReadyForQuery; a request is an error when the backend answered it with an ErrorResponse.
//! Its latency is the ReadyForQuery time minus the later of its first byte and the previous
//! ReadyForQuery; COPY requests give no latency sample. The tracker also knows whether the
//! session sits at an idle point (status `I`, nothing forwarded since, no COPY under way).
//!
//! Pure state: the relay feeds it tags and timestamps and records what it returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Requests tracked at once per session; beyond this (a client pipelining without reading),
/// further requests are forwarded but not measured.
const MAX_TRACKED_REQUESTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct PendingRequest {
    started: Instant,
    error: Option<[u8; 5]>,
    copy: bool,
    /// Ended by a Sync (an extended-protocol batch), not by its own message.
    extended: bool,
}

/// A request the backend has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletedRequest {
    pub latency: Option<Duration>,
    pub error: Option<[u8; 5]>,
}

/// What the relay must do after a backend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEvent {
    Nothing,
    /// The first ReadyForQuery: login is over.
    LoggedIn,
    /// An ErrorResponse before the first ReadyForQuery: a connect error.
    LoginError([u8; 5]),
    Completed(CompletedRequest),
}

/// Per-session request state.
#[derive(Debug, Default)]
pub struct RequestTracker {
    pending: VecDeque<PendingRequest>,
    untracked: usize,
    batch_started: Option<Instant>,
    /// The open batch (no Sync yet) started a COPY.
    batch_copy: bool,
    copy_in: bool,
    /// The next Sync after a COPY IN ends the COPY's request instead of starting a new one.
    sync_ends_copy: bool,
    last_ready: Option<Instant>,
    transaction_status: u8,
    logged_in: bool,
    login_failed: bool,
}

impl RequestTracker {
    pub fn new() -> RequestTracker {
        RequestTracker::default()
    }

    pub fn logged_in(&self) -> bool {
        self.logged_in
    }

    /// The status of the last ReadyForQuery (`I`, `T`, `E`), or 0 before the first.
    pub fn transaction_status(&self) -> u8 {
        self.transaction_status
    }

    /// Logged in, status `I`, nothing forwarded since the last ReadyForQuery, no COPY.
    pub fn at_idle_point(&self) -> bool {
        self.logged_in
            && self.transaction_status == b'I'
            && self.pending.is_empty()
            && self.untracked == 0
            && self.batch_started.is_none()
            && !self.copy_in
    }

    /// A message from the client, read at `now`.
    pub fn on_client_message(&mut self, tag: u8, now: Instant) {
        if !self.logged_in {
            return;
        }
        match tag {
            b'Q' | b'F' => self.push(now, false, false),
            b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => {
                self.batch_started.get_or_insert(now);
            }
            b'S' if self.copy_in => {}
            b'S' if self.sync_ends_copy => self.sync_ends_copy = false,
            b'S' => {
                let started = self.batch_started.take().unwrap_or(now);
                let copy = std::mem::take(&mut self.batch_copy);
                self.push(started, true, copy);
            }
            b'c' | b'f' => self.copy_in = false,
            _ => {}
        }
    }

    fn push(&mut self, started: Instant, extended: bool, copy: bool) {
        if self.pending.len() < MAX_TRACKED_REQUESTS {
            self.pending.push_back(PendingRequest {
                started,
                error: None,
                copy,
                extended,
            });
        } else {
            self.untracked += 1;
        }
    }

    /// A message from the backend, read at `now`; `body` is present for inspected types.
    pub fn on_backend_message(
        &mut self,
        tag: u8,
        body: Option<&[u8]>,
        now: Instant,
    ) -> BackendEvent {
        match tag {
            b'E' => {
                let sqlstate = body
                    .and_then(crate::protocol::messages::error_sqlstate)
                    .unwrap_or(*b"XX000");
                self.copy_in = false;
                if !self.logged_in {
                    if self.login_failed {
                        return BackendEvent::Nothing;
                    }
                    self.login_failed = true;
                    return BackendEvent::LoginError(sqlstate);
                }
                if let Some(front) = self.pending.front_mut() {
                    front.error.get_or_insert(sqlstate);
                }
                BackendEvent::Nothing
            }
            b'G' | b'H' | b'W' => {
                let copy_in = tag == b'G' || tag == b'W';
                self.copy_in |= copy_in;
                match self.pending.front_mut() {
                    Some(front) => {
                        front.copy = true;
                        if copy_in && front.extended {
                            // The Syncs counted after this batch went to a COPY that ignores them.
                            self.pending.truncate(1);
                            self.untracked = 0;
                            self.sync_ends_copy = true;
                        }
                    }
                    None => self.batch_copy = self.batch_started.is_some(),
                }
                BackendEvent::Nothing
            }
            b'Z' => {
                self.copy_in = false;
                if let Some(status) = body.and_then(crate::protocol::messages::ready_status) {
                    self.transaction_status = status;
                }
                let previous_ready = self.last_ready.replace(now);
                if !self.logged_in {
                    self.logged_in = true;
                    return BackendEvent::LoggedIn;
                }
                match self.pending.pop_front() {
                    Some(request) => {
                        let started = match previous_ready {
                            Some(ready) if ready > request.started => ready,
                            _ => request.started,
                        };
                        BackendEvent::Completed(CompletedRequest {
                            latency: (!request.copy)
                                .then(|| now.saturating_duration_since(started)),
                            error: request.error,
                        })
                    }
                    None if self.untracked > 0 => {
                        self.untracked -= 1;
                        BackendEvent::Nothing
                    }
                    None => BackendEvent::Nothing,
                }
            }
            _ => BackendEvent::Nothing,
        }
    }

    /// Requests still waiting for their ReadyForQuery; the connection was lost under them.
    pub fn abandon(&mut self) -> usize {
        let lost = self.pending.len() + self.untracked;
        self.pending.clear();
        self.untracked = 0;
        self.batch_started = None;
        self.batch_copy = false;
        self.sync_ends_copy = false;
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged_in(now: Instant) -> RequestTracker {
        let mut tracker = RequestTracker::new();
        assert_eq!(
            tracker.on_backend_message(b'Z', Some(b"I"), now),
            BackendEvent::LoggedIn
        );
        tracker
    }

    #[test]
    fn simple_query_latency_and_error() {
        let t0 = Instant::now();
        let mut tracker = logged_in(t0);
        assert!(tracker.at_idle_point());
        tracker.on_client_message(b'Q', t0 + Duration::from_millis(10));
        assert!(!tracker.at_idle_point());
        tracker.on_backend_message(b'E', Some(b"SERROR\0C42P01\0\0"), t0);
        let event = tracker.on_backend_message(b'Z', Some(b"I"), t0 + Duration::from_millis(15));
        assert_eq!(
            event,
            BackendEvent::Completed(CompletedRequest {
                latency: Some(Duration::from_millis(5)),
                error: Some(*b"42P01"),
            })
        );
        assert!(tracker.at_idle_point());
    }

    #[test]
    fn pipelined_batches_measure_from_previous_ready() {
        let t0 = Instant::now();
        let mut tracker = logged_in(t0);
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            tracker.on_client_message(tag, t0);
        }
        let first = tracker.on_backend_message(b'Z', Some(b"T"), t0 + Duration::from_millis(3));
        let second = tracker.on_backend_message(b'Z', Some(b"T"), t0 + Duration::from_millis(4));
        let latency = |event| match event {
            BackendEvent::Completed(done) => done.latency,
            _ => None,
        };
        assert_eq!(latency(first), Some(Duration::from_millis(3)));
        assert_eq!(latency(second), Some(Duration::from_millis(1)));
        assert!(!tracker.at_idle_point(), "status T is not idle");
    }

    #[test]
    fn sync_during_copy_in_is_not_a_boundary() {
        let t0 = Instant::now();
        let mut tracker = logged_in(t0);
        tracker.on_client_message(b'Q', t0);
        tracker.on_backend_message(b'G', None, t0);
        tracker.on_client_message(b'd', t0);
        tracker.on_client_message(b'S', t0);
        tracker.on_client_message(b'c', t0);
        let event = tracker.on_backend_message(b'Z', Some(b"I"), t0);
        assert_eq!(
            event,
            BackendEvent::Completed(CompletedRequest {
                latency: None,
                error: None
            })
        );
        assert!(tracker.at_idle_point());
    }

    /// tokio-postgres and libpq: Bind, Execute, Sync; CopyInResponse; data; CopyDone, Sync.
    #[test]
    fn extended_copy_in_with_a_sync_before_and_after() {
        let t0 = Instant::now();
        let mut tracker = logged_in(t0);
        for tag in [b'B', b'E', b'S'] {
            tracker.on_client_message(tag, t0);
        }
        tracker.on_backend_message(b'2', None, t0);
        tracker.on_backend_message(b'G', None, t0);
        for tag in [b'd', b'd', b'c', b'S'] {
            tracker.on_client_message(tag, t0);
        }
        tracker.on_backend_message(b'C', None, t0);
        let event = tracker.on_backend_message(b'Z', Some(b"I"), t0);
        assert_eq!(
            event,
            BackendEvent::Completed(CompletedRequest {
                latency: None,
                error: None
            })
        );
        assert!(tracker.at_idle_point(), "no phantom request is left behind");
        // The next request is measured normally.
        tracker.on_client_message(b'Q', t0);
        let next = tracker.on_backend_message(b'Z', Some(b"I"), t0 + Duration::from_millis(2));
        assert!(matches!(
            next,
            BackendEvent::Completed(CompletedRequest {
                latency: Some(_),
                ..
            })
        ));
        assert!(tracker.at_idle_point());
    }

    /// A client that waits for CopyInResponse before sending any Sync.
    #[test]
    fn extended_copy_in_with_its_sync_after_copy_done() {
        let t0 = Instant::now();
        let mut tracker = logged_in(t0);
        for tag in [b'P', b'B', b'E', b'H'] {
            tracker.on_client_message(tag, t0);
        }
        tracker.on_backend_message(b'G', None, t0);
        for tag in [b'd', b'c', b'S'] {
            tracker.on_client_message(tag, t0);
        }
        let event = tracker.on_backend_message(b'Z', Some(b"I"), t0);
        assert_eq!(
            event,
            BackendEvent::Completed(CompletedRequest {
                latency: None,
                error: None
            })
        );
        assert!(tracker.at_idle_point());
    }

    #[test]
    fn login_errors_count_once() {
        let mut tracker = RequestTracker::new();
        let now = Instant::now();
        assert_eq!(
            tracker.on_backend_message(b'E', Some(b"SFATAL\0C28P01\0\0"), now),
            BackendEvent::LoginError(*b"28P01")
        );
        assert_eq!(
            tracker.on_backend_message(b'E', None, now),
            BackendEvent::Nothing
        );
        assert!(!tracker.at_idle_point());
    }
}
