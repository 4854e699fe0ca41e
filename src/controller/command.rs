//! What can be asked of the controller, and who asked: the vocabulary shared by the admin
//! socket, signals and the rollout monitor.

use crate::color::Color;

/// A routing-pin key an operator may pin by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinKey {
    Database,
    User,
    ApplicationName,
    Tenant,
}

impl PinKey {
    pub const ALL: [PinKey; 4] = [
        PinKey::Database,
        PinKey::User,
        PinKey::ApplicationName,
        PinKey::Tenant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinKey::Database => "database",
            PinKey::User => "user",
            PinKey::ApplicationName => "application_name",
            PinKey::Tenant => "tenant",
        }
    }

    pub fn parse(text: &str) -> Option<PinKey> {
        PinKey::ALL.into_iter().find(|key| key.as_str() == text)
    }
}

/// One change or question for the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    /// Set green's share now, in basis points (0..=10000).
    Weight {
        basis_points: u16,
    },
    RolloutStart,
    RolloutNext,
    RolloutPause,
    RolloutResume,
    /// Evaluate the triggers now and act on the verdict, as the periodic evaluation would.
    RolloutEvaluate,
    /// Green takes 100 %; `check_only` runs the guardrails and changes nothing; `force` lets
    /// the transparent cutover through with client backends on blue that pgshift does not own.
    Promote {
        check_only: bool,
        force: bool,
    },
    CutoverAbort,
    /// Green takes 0 %.
    Rollback {
        reason: Option<String>,
    },
    Pin {
        key: PinKey,
        value: String,
        color: Color,
    },
    Unpin {
        key: PinKey,
        value: String,
    },
    Drain(Color),
    Undrain(Color),
    Reload,
}

impl Command {
    /// The command's verb as the admin socket spells it, for logs and decisions.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Weight { .. } => "weight",
            Command::RolloutStart => "rollout start",
            Command::RolloutNext => "rollout next",
            Command::RolloutPause => "rollout pause",
            Command::RolloutResume => "rollout resume",
            Command::RolloutEvaluate => "rollout evaluate",
            Command::Promote { .. } => "promote",
            Command::CutoverAbort => "cutover abort",
            Command::Rollback { .. } => "rollback",
            Command::Pin { .. } => "pin",
            Command::Unpin { .. } => "unpin",
            Command::Drain(_) => "drain",
            Command::Undrain(_) => "undrain",
            Command::Reload => "reload",
        }
    }
}

/// Who asked for a change: kept with every decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A peer on the admin socket, with its uid from SO_PEERCRED when known.
    AdminSocket { uid: Option<u32> },
    /// SIGHUP.
    Signal,
    /// The rollout monitor.
    Monitor,
    /// Code embedding pgshift (tests).
    Internal,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::AdminSocket { uid: Some(uid) } => write!(f, "admin socket (uid {uid})"),
            Actor::AdminSocket { uid: None } => write!(f, "admin socket"),
            Actor::Signal => write!(f, "signal"),
            Actor::Monitor => write!(f, "monitor"),
            Actor::Internal => write!(f, "internal"),
        }
    }
}

/// The controller's answer: the reply's fields (besides `ok`), or why it refused.
pub type Reply = Result<serde_json::Map<String, serde_json::Value>, String>;
