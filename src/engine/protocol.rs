//! The engine's only interface: commands in, telemetry out. Both are plain data, serialisable,
//! so a UI (or a test, or a recording) can stand on either side.
//!
//! The crafter's step reports, events, live settings, plan and norms travel as they are (re-exported
//! here, so that a controller needs only this module); protocol-owned, versioned types are the
//! redesign's next step (docs/architecture.md).

pub use crate::craft::crafter::LiveSettings;
pub use crate::craft::perturbation::Norms;
pub use crate::craft::plan::Plan;
pub use crate::craft::report::{Event, EventKind, LiveChange, LiveField, StepReport};
use serde::{Deserialize, Serialize};

/// The layout of commands and telemetry this build speaks, sent in `Started`. Raised whenever
/// a message changes in a way an older reader would misread; records without it (written
/// before it existed) read as 0.
pub const PROTOCOL_VERSION: u32 = 1;

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
        plan: Plan,
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
    Evaluation(Box<crate::victim::eval::EvalReport>),
}
