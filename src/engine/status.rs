//! `RUN_DIR/status.json`: where a run stands, for whoever looks from outside the process
//! (`metapoison runs`, `metapoison stop`). Written atomically by the engine at every phase
//! change and craft step; a run whose process is gone while its file still says it works is
//! reported as stale.

use super::protocol::{Phase, Telemetry};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "status.json";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Preparing,
    Pretraining,
    Crafting,
    Paused,
    /// Every step done (a dashboard may still be serving exports and victims).
    Finished,
    /// Ended before the last step, with a checkpoint (a signal, a stop command).
    Stopped,
    Failed,
}

impl RunState {
    /// Whether a process is (or should be) working on the run.
    pub fn active(self) -> bool {
        matches!(
            self,
            RunState::Preparing | RunState::Pretraining | RunState::Crafting | RunState::Paused
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            RunState::Preparing => "preparing",
            RunState::Pretraining => "pretraining",
            RunState::Crafting => "crafting",
            RunState::Paused => "paused",
            RunState::Finished => "finished",
            RunState::Stopped => "stopped",
            RunState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub format: u32,
    /// The process running the engine.
    pub pid: u32,
    pub state: RunState,
    /// Craft steps done.
    pub step: usize,
    pub steps: usize,
    #[serde(default)]
    pub eta_seconds: Option<f64>,
    #[serde(default)]
    pub device: String,
    /// Seconds since the Unix epoch of the last write.
    pub updated: f64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The Unix socket viewers attach to (`metapoison attach`), while the process lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// A status file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("{path} is not a metapoison run status: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The status of the run in `run_dir`; `None` when it has none (a run from before the file
/// existed, or one that never started).
pub fn read(run_dir: &Path) -> Result<Option<RunStatus>, StatusError> {
    let path = run_dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(crate::base::fs::failed("read", &path)(source).into()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| StatusError::Parse { path, source })
}

/// Whether process `pid` exists (signal 0: delivery checked, nothing sent).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Follows the engine's telemetry and keeps the status file in step with it.
pub struct StatusTracker {
    path: PathBuf,
    status: RunStatus,
}

impl StatusTracker {
    pub fn new(run_dir: &Path) -> StatusTracker {
        StatusTracker {
            path: run_dir.join(FILE_NAME),
            status: RunStatus {
                format: FORMAT,
                pid: std::process::id(),
                state: RunState::Preparing,
                step: 0,
                steps: 0,
                eta_seconds: None,
                device: String::new(),
                updated: now(),
                message: None,
                socket: None,
            },
        }
    }

    /// Where viewers attach.
    pub fn set_socket(&mut self, socket: &Path) {
        self.status.socket = Some(socket.to_path_buf());
    }

    /// Takes one message into account; writes the file when the status changed in a way an
    /// outside reader cares about.
    pub fn observe(&mut self, t: &Telemetry) {
        let s = &mut self.status;
        match t {
            Telemetry::Started {
                device,
                steps,
                resumed_at,
                ..
            } => {
                s.device = device.clone();
                s.steps = *steps;
                s.step = resumed_at.unwrap_or(0);
            }
            Telemetry::Phase(phase) => {
                s.state = match phase {
                    Phase::Preparing => RunState::Preparing,
                    Phase::Pretraining { .. } => RunState::Pretraining,
                    Phase::Crafting => RunState::Crafting,
                    Phase::Paused => RunState::Paused,
                    Phase::Done => RunState::Finished,
                    Phase::Failed { message } => {
                        s.message = Some(message.clone());
                        RunState::Failed
                    }
                };
                if !s.state.active() {
                    s.eta_seconds = None;
                }
            }
            Telemetry::Step(r) => {
                s.step = r.step + 1;
                s.steps = r.steps;
                s.eta_seconds = Some(r.eta_seconds);
            }
            _ => return,
        }
        self.write();
    }

    /// The engine is gone: a run that was still working stopped before its last step.
    pub fn closed(&mut self) {
        if self.status.state.active() {
            self.status.state = RunState::Stopped;
            self.status.eta_seconds = None;
        }
        // No viewer can attach any more (the socket goes with the engine).
        self.status.socket = None;
        self.write();
    }

    fn write(&mut self) {
        self.status.updated = now();
        let Ok(json) = serde_json::to_string_pretty(&self.status) else {
            return;
        };
        // Best effort: a status that cannot be written costs the outside view, not the run.
        if let Err(e) = crate::base::tensor_file::write_atomic(&self.path, json.as_bytes()) {
            tracing::warn!("cannot write {}: {e}", self.path.display());
        }
    }

    pub fn status(&self) -> &RunStatus {
        &self.status
    }
}
