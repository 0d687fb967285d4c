//! The engine's only interface: commands in, telemetry out. Both are plain data, serialisable,
//! so a UI (or a test, or a recording) can stand on either side.

use super::perturbation::Norms;
use serde::{Deserialize, Serialize};

/// What a controller can ask of a running engine. Applied between craft steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    /// Checkpoint and stop.
    Stop,
    /// Stop without a new checkpoint (the last periodic one stays).
    Abort,
    CheckpointNow,
    /// Set the base outer (Adam) learning rate, 0-255 scale; schedules still apply on top.
    SetOuterLr {
        value: f64,
    },
    /// Set the surrogates' peak SGD learning rate; their warm-up and drops still apply.
    SetInnerLr {
        value: f64,
    },
    /// Set K, the number of unrolled steps.
    SetUnrollSteps {
        value: usize,
    },
    /// Ask for preview images of one poison slot.
    Preview {
        slot: usize,
    },
    /// Checkpoint, then export poisons (see `export`): `formats` as for `export --format`;
    /// `step` a checkpointed step (default: the current one); `out` the destination (default
    /// RUN_DIR/export-step-NNNN, replaced if present; a given destination is never overwritten).
    /// The outcome comes back as an event.
    ExportNow {
        formats: String,
        #[serde(default)]
        step: Option<usize>,
        #[serde(default)]
        out: Option<String>,
    },
    /// Train victims on the latest export of this session (exporting poisons.npz first if
    /// there is none) on a background thread, with the config's victim protocol; `trials`
    /// overrides victim.trials. Progress comes back as events, the result as `Evaluation`.
    Evaluate {
        trials: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Pretraining { surrogate: usize, of: usize },
    Crafting,
    Paused,
    Done,
    Failed { message: String },
}

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

/// Preview of one poison as 8-bit images (HWC), for display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    pub slot: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub base: Vec<u8>,
    pub poison: Vec<u8>,
    /// (poison - base) amplified x10 around mid-grey.
    pub delta: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Telemetry {
    Started {
        run_dir: String,
        device: String,
        config_summary: String,
        resumed_at: Option<usize>,
        /// What a display needs to label things: classes, the resolved plan, settings.
        class_names: Vec<String>,
        plan: super::plan::Plan,
        live: super::crafter::LiveSettings,
        steps: usize,
    },
    Phase(Phase),
    PretrainProgress {
        surrogate: usize,
        of: usize,
        epoch: usize,
        epochs: usize,
    },
    Step(StepReport),
    Event(Event),
    Preview(Preview),
    Checkpoint {
        step: usize,
        path: String,
    },
    Finished {
        steps_done: usize,
        run_dir: String,
    },
    /// A victim evaluation asked for with `Command::Evaluate` has finished (also written to
    /// EXPORT/eval.json).
    Evaluation(Box<crate::victim::eval::EvalReport>),
}
