//! What the crafter reports: one record per craft step and the events of a run, kept in its
//! checkpoint and sent to whoever watches the engine.

use super::perturbation::Norms;
use serde::{Deserialize, Serialize};

/// One craft step's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 0-based craft step just finished.
    pub step: usize,
    pub steps: usize,
    /// Adversarial loss averaged over surrogates (mean over their meta batches); `None` when
    /// no surrogate met a poison-holding batch chosen for a meta step.
    pub adv_loss: Option<f64>,
    /// Per surrogate; `None` for one that took no meta step this epoch.
    pub adv_loss_per_surrogate: Vec<Option<f64>>,
    /// Ensemble-averaged class probabilities of each target (eval mode), after the step.
    pub target_probs: Vec<Vec<f64>>,
    /// Fraction of surrogates classifying each target as its adversarial class.
    pub target_fooled: Vec<f64>,
    pub norms: Norms,
    pub outer_lr: f64,
    pub inner_lr: f64,
    pub unroll_steps: usize,
    /// Surrogate epochs during this step.
    pub epochs: Vec<usize>,
    /// Meta batches (unrolled graphs) evaluated this step, over all surrogates.
    pub meta_batches: usize,
    pub seconds: f64,
    pub eta_seconds: f64,
    /// True when the meta-gradient was not finite and the update was skipped.
    pub skipped: bool,
    /// Gradient matching: (restart, restarts), 1-based. `adv_loss` is then the matching loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<(usize, usize)>,
    /// MPI ranks: seconds of this step spent in collective calls (summing the meta-gradient
    /// and the report's numbers, waiting for the slowest rank included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

/// Something that happened, recorded with the step it applied at and saved with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub step: usize,
    pub kind: EventKind,
    /// For the human reader; programs read `kind` and `change`.
    pub message: String,
    /// A live setting changed (kinds `set_outer_lr`, `set_inner_lr`, `set_unroll_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<LiveChange>,
}

impl Event {
    pub fn new(step: usize, kind: EventKind, message: impl Into<String>) -> Event {
        Event {
            step,
            kind,
            message: message.into(),
            change: None,
        }
    }
}

/// What an event is about. Serialised as snake_case text, as checkpoints and JSON lines have
/// always stored it; a kind this build does not know (from a newer one) reads as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An `auto` field settled for this machine.
    Auto,
    Pause,
    Resume,
    Stop,
    Abort,
    SetOuterLr,
    SetInnerLr,
    SetUnrollSteps,
    /// A command that could not be applied, and why.
    Rejected,
    Export,
    ExportFailed,
    /// Victims' progress and result.
    Evaluation,
    EvaluationFailed,
    /// A termination signal (Ctrl-c, SIGTERM, SIGHUP).
    Signal,
    /// The perturbation re-initialised, or a gradient-matching restart ended or was kept.
    Restart,
    /// A non-finite gradient: the update was skipped.
    Nonfinite,
    /// The GPU ran out of memory and the group of surrogates was made smaller.
    Memory,
    #[serde(other)]
    Other,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Auto => "auto",
            EventKind::Pause => "pause",
            EventKind::Resume => "resume",
            EventKind::Stop => "stop",
            EventKind::Abort => "abort",
            EventKind::SetOuterLr => "set_outer_lr",
            EventKind::SetInnerLr => "set_inner_lr",
            EventKind::SetUnrollSteps => "set_unroll_steps",
            EventKind::Rejected => "rejected",
            EventKind::Export => "export",
            EventKind::ExportFailed => "export_failed",
            EventKind::Evaluation => "evaluation",
            EventKind::EvaluationFailed => "evaluation_failed",
            EventKind::Signal => "signal",
            EventKind::Restart => "restart",
            EventKind::Nonfinite => "nonfinite",
            EventKind::Memory => "memory",
            EventKind::Other => "other",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A live setting's change, as applied at the event's step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiveChange {
    pub field: LiveField,
    pub old: f64,
    pub new: f64,
}

/// The settings a user may change while a run crafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveField {
    OuterLr,
    InnerLr,
    UnrollSteps,
}
