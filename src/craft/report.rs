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
}

/// Something that happened, recorded with the step it applied at and saved with the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub step: usize,
    pub kind: String,
    pub message: String,
}
