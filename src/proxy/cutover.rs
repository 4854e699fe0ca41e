//! The sessions' side of a transparent cutover: one phase all sessions watch, the gate that
//! holds new logins while it runs, and what each frozen session reports.
//!
//! The orchestrator ([`crate::cutover::procedure`]) moves the phase `Idle → Holding → Commit |
//! Abort → Idle`. In `Holding`, new logins wait at the gate (before a backend is chosen), and
//! each session on the old color freezes at its next idle point: nothing more is forwarded,
//! it reads its state, logs in to the new color and reports. `Commit` moves the movable ones to
//! their new backend and closes the others with 57P01; `Abort` resumes everyone on the old
//! color with nothing lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::color::Color;

/// Where a cutover stands, as every session sees it.
#[derive(Debug, Clone, Default)]
pub enum CutoverPhase {
    #[default]
    Idle,
    /// Sessions on `to.other()` log in to `to` ahead of the freeze (still running on their
    /// color) and say so on `prepared` with their id.
    Preparing {
        to: Color,
        prepared: mpsc::UnboundedSender<u64>,
    },
    /// Sessions on `to.other()` freeze at their idle points and report on `reports`.
    Holding {
        to: Color,
        reports: mpsc::UnboundedSender<FreezeReport>,
    },
    /// Frozen sessions move to `to` (or close, when unmovable) and resume.
    Commit { to: Color },
    /// Frozen sessions resume on their old color.
    Abort,
}

impl CutoverPhase {
    /// The color whose sessions freeze now, if any.
    pub fn freezing(&self) -> Option<Color> {
        match self {
            CutoverPhase::Holding { to, .. } => Some(to.other()),
            _ => None,
        }
    }

    /// The color whose sessions log in ahead now, and where to.
    pub fn preparing(&self) -> Option<(Color, Color)> {
        match self {
            CutoverPhase::Preparing { to, .. } => Some((to.other(), *to)),
            _ => None,
        }
    }

    /// New logins wait while a cutover holds or commits.
    fn holds_logins(&self) -> bool {
        matches!(
            self,
            CutoverPhase::Holding { .. } | CutoverPhase::Commit { .. }
        )
    }
}

/// A session's frozen flag and its cancel doorbell: while frozen, a CancelRequest for it is
/// answered by the session itself (its held request is dropped), not sent to its idle backend.
#[derive(Debug, Default)]
pub struct HeldCancel {
    frozen: AtomicBool,
    rung: Notify,
}

impl HeldCancel {
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// A CancelRequest arrived for the frozen session.
    pub fn ring(&self) {
        self.rung.notify_one();
    }

    /// Waits for a CancelRequest.
    pub async fn rung(&self) {
        self.rung.notified().await;
    }
}

/// Why a frozen session cannot move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmovable(pub String);

/// A frozen session's report.
#[derive(Debug)]
pub struct FreezeReport {
    pub session_id: u64,
    /// `Ok`: a backend on the new color is logged in and waiting; `Err`: why it cannot move.
    pub movable: Result<(), Unmovable>,
}

/// The phase, the logins between the gate and their registration, and the cutover running
/// now (for the admin socket, which answers `cutover abort` and refuses other changes while
/// the controller is busy with it).
#[derive(Debug)]
pub struct CutoverCoordinator {
    phase: watch::Sender<CutoverPhase>,
    logins_in_flight: AtomicUsize,
    running: std::sync::Mutex<Option<RunningCutover>>,
}

/// A cutover under way: where to, which step, and an abort asked for.
#[derive(Debug, Clone)]
pub struct RunningCutover {
    pub to: Color,
    pub step: &'static str,
    pub started: std::time::Instant,
    /// Who asked to abort it, once someone did.
    pub abort: Option<String>,
    /// The steps done so far and how long each took.
    pub steps: Vec<(&'static str, Duration)>,
    step_started: std::time::Instant,
}

impl Default for CutoverCoordinator {
    fn default() -> Self {
        CutoverCoordinator {
            phase: watch::channel(CutoverPhase::Idle).0,
            logins_in_flight: AtomicUsize::new(0),
            running: std::sync::Mutex::new(None),
        }
    }
}

/// Marks a cutover as running until dropped.
pub struct CutoverRun<'a> {
    coordinator: &'a CutoverCoordinator,
}

impl Drop for CutoverRun<'_> {
    fn drop(&mut self) {
        *self.coordinator.running() = None;
    }
}

impl CutoverRun<'_> {
    /// The step the cutover is at now (the one before it is timed as done).
    pub fn step(&self, step: &'static str) {
        if let Some(running) = self.coordinator.running().as_mut() {
            let now = std::time::Instant::now();
            let previous = running.step;
            running
                .steps
                .push((previous, now.duration_since(running.step_started)));
            running.step = step;
            running.step_started = now;
        }
    }

    /// The steps timed so far, the current one included (up to now).
    pub fn timings(&self) -> Vec<(&'static str, Duration)> {
        self.coordinator
            .running()
            .as_ref()
            .map(|running| {
                let mut steps = running.steps.clone();
                steps.push((running.step, running.step_started.elapsed()));
                steps
            })
            .unwrap_or_default()
    }

    /// The step the cutover is at.
    pub fn current_step(&self) -> &'static str {
        self.coordinator
            .running()
            .as_ref()
            .map_or("guardrails", |running| running.step)
    }

    /// Who asked to abort, if anyone did.
    pub fn abort_requested(&self) -> Option<String> {
        self.coordinator
            .running()
            .as_ref()
            .and_then(|running| running.abort.clone())
    }
}

/// A login past the gate; dropped once its session is registered (or gave up).
pub struct LoginPass<'a> {
    coordinator: &'a CutoverCoordinator,
}

impl Drop for LoginPass<'_> {
    fn drop(&mut self) {
        self.coordinator
            .logins_in_flight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl CutoverCoordinator {
    fn running(&self) -> std::sync::MutexGuard<'_, Option<RunningCutover>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a cutover to `to`; `None` when one is running already.
    pub fn begin(&self, to: Color) -> Option<CutoverRun<'_>> {
        let mut running = self.running();
        if running.is_some() {
            return None;
        }
        let now = std::time::Instant::now();
        *running = Some(RunningCutover {
            to,
            step: "guardrails",
            started: now,
            abort: None,
            steps: Vec::new(),
            step_started: now,
        });
        Some(CutoverRun { coordinator: self })
    }

    /// The cutover running now, if any.
    pub fn running_now(&self) -> Option<RunningCutover> {
        self.running().clone()
    }

    /// Asks the running cutover to abort (it stops at its next check and every session
    /// resumes on the old color); the cutover as it was, or `None` when none runs.
    pub fn request_abort(&self, by: &str) -> Option<RunningCutover> {
        let mut running = self.running();
        let cutover = running.as_mut()?;
        cutover.abort.get_or_insert_with(|| by.to_string());
        Some(cutover.clone())
    }

    /// A receiver of the phase, for a session's relay.
    pub fn watch(&self) -> watch::Receiver<CutoverPhase> {
        self.phase.subscribe()
    }

    pub fn phase(&self) -> CutoverPhase {
        self.phase.borrow().clone()
    }

    pub fn set(&self, phase: CutoverPhase) {
        self.phase.send_replace(phase);
    }

    /// Waits while a cutover holds logins, then counts this login as in flight until the
    /// returned pass is dropped (after the session registered). Counting before looking at
    /// the phase means a cutover that starts meanwhile waits for this login.
    pub async fn pass_gate(&self) -> LoginPass<'_> {
        let mut phase = self.phase.subscribe();
        loop {
            self.logins_in_flight.fetch_add(1, Ordering::AcqRel);
            let pass = LoginPass { coordinator: self };
            if !phase.borrow_and_update().holds_logins() {
                return pass;
            }
            drop(pass);
            if phase.changed().await.is_err() {
                return LoginPass::counted(self);
            }
        }
    }

    /// Waits up to `timeout` for the logins already past the gate to register or give up.
    pub async fn wait_for_logins(&self, timeout: Duration) -> Result<(), usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let in_flight = self.logins_in_flight.load(Ordering::Acquire);
            if in_flight == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(in_flight);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl<'a> LoginPass<'a> {
    fn counted(coordinator: &'a CutoverCoordinator) -> LoginPass<'a> {
        coordinator.logins_in_flight.fetch_add(1, Ordering::AcqRel);
        LoginPass { coordinator }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logins_wait_while_a_cutover_holds_and_are_waited_for() {
        let coordinator = std::sync::Arc::new(CutoverCoordinator::default());
        let pass = coordinator.pass_gate().await;
        assert_eq!(
            coordinator.wait_for_logins(Duration::from_millis(10)).await,
            Err(1)
        );
        drop(pass);
        assert_eq!(
            coordinator.wait_for_logins(Duration::from_millis(10)).await,
            Ok(())
        );

        let (reports, _receiver) = mpsc::unbounded_channel();
        coordinator.set(CutoverPhase::Holding {
            to: Color::Green,
            reports,
        });
        assert_eq!(coordinator.phase().freezing(), Some(Color::Blue));
        let waiting = {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                let _pass = coordinator.pass_gate().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "held while the cutover holds");
        assert_eq!(
            coordinator.wait_for_logins(Duration::from_millis(10)).await,
            Ok(()),
            "a held login is not in flight"
        );
        coordinator.set(CutoverPhase::Commit { to: Color::Green });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "still held while committing");
        coordinator.set(CutoverPhase::Idle);
        waiting.await.expect("released");
    }
}
