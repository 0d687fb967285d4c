//! The engine's only interface: commands in, telemetry out. Both are plain data, serialisable,
//! so a UI (or a test, or a recording) can stand on either side.
//!
//! What a run knows internally (its full plan, a victim evaluation's every trial) reaches a
//! controller as the protocol's own summaries ([`RunInfo`], [`EvaluationSummary`]). The
//! records a run also keeps in its checkpoints (step reports with their norms, events, the
//! live settings) travel as they are stored, so their serialised form is the checkpoint's and
//! changes only together with [`PROTOCOL_VERSION`]; they are re-exported here, so that a
//! controller needs only this module.

use crate::config::CraftRecipe;
pub use crate::craft::crafter::{LiveSettingError, LiveSettings};
pub use crate::craft::perturbation::Norms;
pub use crate::craft::report::{Event, EventKind, LiveChange, LiveField, StepReport};
use serde::{Deserialize, Serialize};

/// The layout of commands and telemetry this build speaks, sent in `Started`. Raised whenever
/// a message changes in a way an older reader would misread; records without it (written
/// before it existed) read as 0. 1: typed events; 2: `Started` carries [`RunInfo`] and
/// `Evaluation` an [`EvaluationSummary`] (older records of both still read).
pub const PROTOCOL_VERSION: u32 = 2;

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
        /// [`PROTOCOL_VERSION`] of the engine that sent it.
        #[serde(default)]
        protocol: u32,
        run_dir: String,
        device: String,
        config_summary: String,
        resumed_at: Option<usize>,
        /// What a display needs to label things: classes, the resolved plan, settings.
        class_names: Vec<String>,
        plan: RunInfo,
        live: LiveSettings,
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
    Evaluation(EvaluationSummary),
}

/// What a viewer needs of a run's plan. The field names are the crafter's plan's, so records
/// written when `Started` carried the whole plan still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The attack (records from before there was a choice are MetaPoison).
    #[serde(default = "metapoison")]
    pub recipe: CraftRecipe,
    pub target_class: i64,
    /// Indices among the target class's test images.
    pub target_ids: Vec<usize>,
    pub adv_class: i64,
    pub poison_class: i64,
    /// Training-split indices of the poisons, slot by slot.
    pub poison_indices: Vec<usize>,
    pub ensemble_size: usize,
    /// Why each `auto` value came out as it did.
    #[serde(default)]
    pub notes: Vec<String>,
}

fn metapoison() -> CraftRecipe {
    CraftRecipe::Metapoison
}

impl From<&crate::craft::plan::Plan> for RunInfo {
    fn from(p: &crate::craft::plan::Plan) -> RunInfo {
        RunInfo {
            recipe: p.recipe,
            target_class: p.target_class,
            target_ids: p.target_ids.clone(),
            adv_class: p.adv_class,
            poison_class: p.poison_class,
            poison_indices: p.poison_indices.clone(),
            ensemble_size: p.ensemble_size,
            notes: p.notes.clone(),
        }
    }
}

/// A victim evaluation's result as a viewer shows it; the whole report, every victim
/// included, is the export's `eval.json`. Field names as the report's, so records written
/// when this message carried the whole report still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSummary {
    /// The export folder judged.
    pub export: String,
    pub victim_net: String,
    pub poisoned: ArmCounts,
    pub control: ArmCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<ArmCounts>,
    /// How far the poisons moved the target toward its adversarial class, in logits: the mean
    /// over poisoned victims of the margin shift against the control twin
    /// (`EvalReport::seeded_margin_shifts`); absent without controls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin_shift: Option<f64>,
}

/// One arm's victims: how many classified a target as its adversarial class, of how many,
/// and their mean clean accuracy (0-1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArmCounts {
    pub successes: usize,
    pub trials: usize,
    pub accuracy_mean: f64,
}

impl From<&crate::victim::eval::ArmSummary> for ArmCounts {
    fn from(a: &crate::victim::eval::ArmSummary) -> ArmCounts {
        ArmCounts {
            successes: a.successes,
            trials: a.trials,
            accuracy_mean: a.accuracy_mean,
        }
    }
}

impl From<&crate::victim::eval::EvalReport> for EvaluationSummary {
    fn from(r: &crate::victim::eval::EvalReport) -> EvaluationSummary {
        EvaluationSummary {
            export: r.export.clone(),
            victim_net: r.victim_net.clone(),
            poisoned: (&r.poisoned).into(),
            control: (&r.control).into(),
            noise: r.noise.as_ref().map(Into::into),
            margin_shift: r.margin_shift("poisoned"),
        }
    }
}
