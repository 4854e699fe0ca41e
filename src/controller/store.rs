//! Where the controller's state survives restarts: weight, rollout position, admin pins and
//! drains, behind a small [`StateStore`] interface.
//!
//! [`FileStore`] is the first implementation (`[rollout] state_file`): every change is written
//! atomically — a temporary file in the same directory, fsync, rename over the state file,
//! fsync the directory — so a crash leaves either the old state or the new one, never half of
//! each. A state file that cannot be read or parsed is an error naming the file: pgshift never
//! silently falls back to 0 %. [`MemoryStore`] keeps nothing (no `state_file`, and tests).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::color::Color;
use crate::routing::Pin;

/// The rollout's state, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Manual,
    Running,
    Paused,
    Stalled,
    Promoted,
    RolledBack,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Manual,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Stalled,
        RolloutState::Promoted,
        RolloutState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Manual => "manual",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Stalled => "stalled",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// Everything that must survive a restart.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    /// Format version of this file.
    pub version: u32,
    pub green_weight_bp: u16,
    pub state: RolloutState,
    /// Index into `[rollout] steps` while a rollout runs.
    #[serde(default)]
    pub step: Option<usize>,
    /// When the current step began (Unix time, milliseconds), so that a restart continues the
    /// dwell clock instead of restarting it.
    #[serde(default)]
    pub step_started_unix_ms: Option<u64>,
    /// Why the rollout is paused, stalled or rolled back.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub admin_pins: Vec<Pin>,
    #[serde(default)]
    pub draining: Vec<Color>,
    /// RFC 3339 time of the change that wrote this.
    pub updated_at: String,
}

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is corrupt ({reason}); fix it, or start with --reset-state to discard it"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state store refused the write: {0}")]
    Refused(String),
}

/// Where the controller's state lives between runs.
pub trait StateStore: Send {
    /// The saved state; `None` when nothing was saved yet.
    fn load(&self) -> Result<Option<PersistedState>, StoreError>;
    /// Saves `state` durably before returning.
    fn save(&mut self, state: &PersistedState) -> Result<(), StoreError>;
    /// Forgets the saved state (`run --reset-state`).
    fn reset(&mut self) -> Result<(), StoreError>;
    /// Where the state lives, for logs and `status`.
    fn describe(&self) -> String;
}

/// The state in a JSON file, written atomically.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let state: PersistedState =
            serde_json::from_str(&text).map_err(|error| corrupt(error.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(corrupt(format!(
                "format version {} is not {STATE_VERSION}",
                state.version
            )));
        }
        if state.green_weight_bp > 10_000 {
            return Err(corrupt(format!(
                "green_weight_bp {} is above 10000",
                state.green_weight_bp
            )));
        }
        if state.draining.len() > 1 {
            return Err(corrupt("both colors are marked draining".into()));
        }
        Ok(Some(state))
    }

    fn save(&mut self, state: &PersistedState) -> Result<(), StoreError> {
        let write_error = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let directory = match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut text =
            serde_json::to_string_pretty(state).map_err(|error| write_error(error.into()))?;
        text.push('\n');
        let mut temporary = tempfile::NamedTempFile::new_in(&directory).map_err(write_error)?;
        temporary.write_all(text.as_bytes()).map_err(write_error)?;
        temporary.as_file().sync_all().map_err(write_error)?;
        temporary
            .persist(&self.path)
            .map_err(|error| write_error(error.error))?;
        fs::File::open(&directory)
            .and_then(|dir| dir.sync_all())
            .map_err(write_error)?;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), StoreError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Keeps the state in memory only: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    saved: Option<PersistedState>,
}

impl StateStore for MemoryStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        Ok(self.saved.clone())
    }

    fn save(&mut self, state: &PersistedState) -> Result<(), StoreError> {
        self.saved = Some(state.clone());
        Ok(())
    }

    fn reset(&mut self) -> Result<(), StoreError> {
        self.saved = None;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory (no [rollout] state_file: nothing survives a restart)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PersistedState {
        PersistedState {
            version: STATE_VERSION,
            green_weight_bp: 2500,
            state: RolloutState::Manual,
            step: None,
            step_started_unix_ms: None,
            reason: None,
            admin_pins: vec![Pin {
                database: Some("tenant_42".into()),
                user: None,
                application_name: None,
                tenant: None,
                color: Color::Green,
            }],
            draining: vec![Color::Blue],
            updated_at: "2026-11-29T00:00:00Z".into(),
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = FileStore::new(dir.path().join("state.json"));
        assert!(store.load().expect("load").is_none());
        store.save(&sample()).expect("save");
        assert_eq!(store.load().expect("load"), Some(sample()));
        store.reset().expect("reset");
        assert!(store.load().expect("load").is_none());
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.json");
        for text in [
            "{not json",
            "{\"version\": 1}",
            "{\"version\": 9, \"green_weight_bp\": 1, \"state\": \"manual\", \"updated_at\": \"x\"}",
        ] {
            fs::write(&path, text).expect("write");
            let error = FileStore::new(&path).load().expect_err("corrupt");
            assert!(
                error.to_string().contains(&path.display().to_string()),
                "{error}"
            );
        }
    }
}
