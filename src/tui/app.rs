//! Dashboard state and key handling. Pure: telemetry in, commands out, no terminal and no
//! libtorch, so it is tested with synthetic keys and recorded telemetry.

use crate::config::KeysConfig;
use crate::engine::protocol::{
    Command, EventKind, LiveField, Phase, Preview, StepReport, Telemetry,
};
use crate::engine::protocol::{LiveSettingError, LiveSettings};
use crate::telemetry::SystemSample;
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use std::collections::VecDeque;

/// Why the parameters popup cannot send what was typed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormError {
    #[error("{field} `{text}` is not a number")]
    NotANumber { field: &'static str, text: String },
    #[error("{field} `{text}` is not a whole number")]
    NotAWholeNumber { field: &'static str, text: String },
    #[error(transparent)]
    OutOfRange(#[from] LiveSettingError),
}
/// How images and colours are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Palette {
    TrueColor,
    Indexed256,
    /// No colour at all (NO_COLOR): ASCII ramp for images, bold/reverse for selection.
    Mono,
}

impl Palette {
    /// From the environment: NO_COLOR wins, then COLORTERM=truecolor|24bit, else 256 colours.
    pub fn detect() -> Palette {
        if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            Palette::Mono
        } else if std::env::var("COLORTERM")
            .is_ok_and(|v| v.contains("truecolor") || v.contains("24bit"))
        {
            Palette::TrueColor
        } else {
            Palette::Indexed256
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamsForm {
    /// 0 outer lr, 1 inner lr, 2 K.
    pub field: usize,
    pub values: [String; 3],
    pub original: [String; 3],
    pub error: Option<String>,
}

/// The export menu's parts, in order: (label, `--format` name).
pub const EXPORT_PARTS: [(&str, &str); 4] = [
    ("npz: poisoned_train.npz, test.npz", "npz"),
    ("native: IDX / CIFAR files", "native"),
    ("png: images + contact sheet", "png"),
    ("curves: csv + svg", "curves"),
];

pub const QUIT_CHOICES: [&str; 3] = ["checkpoint and quit", "quit without checkpoint", "cancel"];
/// The quit dialog of a dashboard attached to a run in another process.
pub const DETACH_CHOICES: [&str; 3] = [
    "detach: crafting goes on",
    "checkpoint and stop the run",
    "cancel",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Popup {
    Help,
    Quit { selected: usize },
    Params(ParamsForm),
    Export(ExportForm),
}

/// The export menu: which parts to write (poisons.npz and the manifest always are), which
/// step's poisons, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportForm {
    /// Rows 0-3: the parts; 4: the step; 5: the destination.
    pub selected: usize,
    pub parts: [bool; 4],
    /// A checkpointed step, or None for the current one.
    pub step: Option<usize>,
    /// Typed destination; empty = RUN_DIR/export-step-NNNN.
    pub dest: String,
}

/// Rows of the export menu.
pub const EXPORT_ROWS: usize = 6;

/// What a key on the main screen does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Params,
    Checkpoint,
    Export,
    Evaluate,
    Help,
    LogScale,
    Ascii,
    NextPoison,
    PrevPoison,
    Quit,
}

/// The main screen's key bindings (config section `[keys]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Keymap {
    bindings: Vec<(char, Action)>,
}

impl Keymap {
    /// From a validated config section (an unusable binding falls back to its default).
    pub fn from_config(k: &KeysConfig) -> Keymap {
        use Action::*;
        let defaults = KeysConfig::default();
        let actions = [
            Pause, Params, Checkpoint, Export, Evaluate, Help, LogScale, Ascii, NextPoison,
            PrevPoison, Quit,
        ];
        let bindings = k
            .bindings()
            .iter()
            .zip(defaults.bindings())
            .zip(actions)
            .map(|(((_, b), (_, d)), a)| {
                let c = KeysConfig::key_char(b)
                    .or_else(|| KeysConfig::key_char(d))
                    .unwrap_or(' ');
                (c, a)
            })
            .collect();
        Keymap { bindings }
    }

    pub fn action(&self, c: char) -> Option<Action> {
        self.bindings.iter().find(|(k, _)| *k == c).map(|(_, a)| *a)
    }

    /// How the key of `action` is shown ("Space" for the space bar).
    pub fn label(&self, action: Action) -> String {
        match self.bindings.iter().find(|(_, a)| *a == action) {
            Some((' ', _)) => "Space".into(),
            Some((c, _)) => c.to_string(),
            None => "-".into(),
        }
    }
}

impl Default for Keymap {
    fn default() -> Self {
        Keymap::from_config(&KeysConfig::default())
    }
}

/// The result of the last victim evaluation, for the header.
#[derive(Debug, Clone, PartialEq)]
pub struct VictimResult {
    pub flipped: usize,
    pub trials: usize,
    pub control_flipped: usize,
    pub control_trials: usize,
    pub accuracy: f64,
    pub control_accuracy: f64,
    /// Logits the poisons moved the target toward the adversarial class (against controls).
    pub margin_shift: Option<f64>,
}

/// The engine's live settings as last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub outer_lr: f64,
    pub inner_lr: f64,
    pub unroll_steps: usize,
}

pub struct App {
    pub run_dir: String,
    pub device: String,
    pub summary: String,
    pub phase: Phase,
    pub pretrain: Option<(usize, usize, usize, usize)>,
    pub steps: Vec<StepReport>,
    pub total_steps: usize,
    pub events: VecDeque<String>,
    pub preview: Option<Preview>,
    pub slot: usize,
    pub poison_count: usize,
    pub system: Option<SystemSample>,
    pub class_names: Vec<String>,
    pub target_class: usize,
    pub adv_class: usize,
    pub live: Live,
    pub log_scale: bool,
    pub ascii: bool,
    pub palette: Palette,
    pub popup: Option<Popup>,
    /// The UI should close (after the engine has stopped, when it was asked to).
    pub quit: bool,
    /// Elapsed seconds of crafting (sum of step times) for the header.
    pub elapsed: f64,
    pub dirty: bool,
    pub keys: Keymap,
    /// A victim evaluation asked for from here is running.
    pub evaluating: bool,
    /// Steps with a saved checkpoint (and poison snapshot) in this session: what the export
    /// menu offers besides the current step.
    pub checkpoint_steps: Vec<usize>,
    /// The engine reported a termination signal (SIGHUP, SIGTERM, SIGINT): leave when it stops.
    pub signalled: bool,
    pub victims: Option<VictimResult>,
    /// The run crafts by gradient matching: the chart shows the matching loss and the outer
    /// rate is its step (a fraction of eps).
    pub matching: bool,
    /// The dashboard views a run in another process (`attach`): quitting detaches.
    pub attached: bool,
    /// The user chose to detach: leave now, the run goes on.
    pub detach: bool,
}

const EVENT_LINES: usize = 200;

impl App {
    /// An empty dashboard; the engine's `Started` message fills in the run.
    pub fn new(palette: Palette) -> App {
        App {
            run_dir: String::new(),
            device: String::new(),
            summary: String::new(),
            phase: Phase::Preparing,
            pretrain: None,
            steps: Vec::new(),
            total_steps: 0,
            events: VecDeque::new(),
            preview: None,
            slot: 0,
            poison_count: 0,
            system: None,
            class_names: Vec::new(),
            target_class: 0,
            adv_class: 0,
            live: Live {
                outer_lr: 0.0,
                inner_lr: 0.0,
                unroll_steps: 0,
            },
            log_scale: false,
            ascii: palette == Palette::Mono,
            palette,
            popup: None,
            quit: false,
            elapsed: 0.0,
            dirty: true,
            keys: Keymap::default(),
            evaluating: false,
            signalled: false,
            checkpoint_steps: Vec::new(),
            victims: None,
            matching: false,
            attached: false,
            detach: false,
        }
    }

    /// The quit dialog's choices.
    pub fn quit_choices(&self) -> [&'static str; 3] {
        if self.attached {
            DETACH_CHOICES
        } else {
            QUIT_CHOICES
        }
    }

    /// An empty dashboard with these key bindings.
    pub fn with_keys(palette: Palette, keys: Keymap) -> App {
        App {
            keys,
            ..App::new(palette)
        }
    }

    pub fn log(&mut self, line: String) {
        if self.events.len() == EVENT_LINES {
            self.events.pop_front();
        }
        self.events.push_back(line);
        self.dirty = true;
    }

    /// Folds one telemetry message into the state.
    pub fn on_telemetry(&mut self, t: Telemetry) {
        self.dirty = true;
        match t {
            Telemetry::Started {
                protocol: _,
                run_dir,
                device,
                config_summary,
                resumed_at,
                class_names,
                plan,
                live,
                steps,
            } => {
                self.run_dir = run_dir;
                self.device = device;
                self.summary = config_summary;
                self.class_names = class_names;
                self.target_class = plan.target_class as usize;
                self.adv_class = plan.adv_class as usize;
                self.poison_count = plan.poison_indices.len();
                self.matching = plan.recipe == crate::config::CraftRecipe::GradientMatching;
                self.total_steps = steps;
                self.live = Live {
                    outer_lr: live.outer_lr,
                    inner_lr: live.inner_lr,
                    unroll_steps: live.unroll_steps,
                };
                if let Some(s) = resumed_at {
                    self.log(format!("resumed at step {s}"));
                }
            }
            Telemetry::Phase(p) => {
                if let Phase::Failed { message } = &p {
                    self.log(format!("FAILED: {message}"));
                }
                self.phase = p;
            }
            Telemetry::PretrainProgress {
                surrogate,
                of,
                epoch,
                epochs,
            } => self.pretrain = Some((surrogate, of, epoch, epochs)),
            Telemetry::Step(r) => {
                self.elapsed += r.seconds;
                self.total_steps = r.steps;
                self.live = Live {
                    outer_lr: self.live.outer_lr,
                    inner_lr: r.inner_lr,
                    unroll_steps: r.unroll_steps,
                };
                if r.skipped {
                    self.log(format!(
                        "step {}: non-finite meta-gradient, update skipped",
                        r.step
                    ));
                }
                self.steps.push(r);
            }
            Telemetry::Event(e) => {
                match (e.kind, e.change) {
                    (_, Some(c)) if c.field == LiveField::OuterLr => self.live.outer_lr = c.new,
                    (EventKind::EvaluationFailed, _) => self.evaluating = false,
                    (EventKind::Signal, _) => self.signalled = true,
                    _ => {}
                }
                self.log(format!("[{}] {}: {}", e.step, e.kind, e.message));
            }
            Telemetry::Preview(p) => {
                if p.slot == self.slot {
                    self.preview = Some(p);
                }
            }
            Telemetry::Checkpoint { step, path } => {
                if !self.checkpoint_steps.contains(&step) {
                    self.checkpoint_steps.push(step);
                    self.checkpoint_steps.sort_unstable();
                }
                self.log(format!("checkpoint at step {step}: {path}"))
            }
            Telemetry::Finished {
                steps_done,
                run_dir,
            } => self.log(format!("finished {steps_done} steps: {run_dir}")),
            Telemetry::Evaluation(r) => {
                self.evaluating = false;
                self.victims = Some(VictimResult {
                    flipped: r.poisoned.successes,
                    trials: r.poisoned.trials,
                    control_flipped: r.control.successes,
                    control_trials: r.control.trials,
                    accuracy: r.poisoned.accuracy_mean,
                    control_accuracy: r.control.accuracy_mean,
                    margin_shift: r.margin_shift,
                });
            }
        }
    }

    pub fn on_system(&mut self, s: SystemSample) {
        self.system = Some(s);
        self.dirty = true;
    }

    fn params_form(&self) -> ParamsForm {
        let values = [
            format!("{}", self.live.outer_lr),
            format!("{}", self.live.inner_lr),
            format!("{}", self.live.unroll_steps),
        ];
        ParamsForm {
            field: 0,
            original: values.clone(),
            values,
            error: None,
        }
    }

    fn select_slot(&mut self, slot: usize) -> Vec<Command> {
        self.slot = slot;
        self.preview = None;
        vec![Command::Preview { slot }]
    }

    /// Handles a key; returns the commands for the engine.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Command> {
        if key.kind != KeyEventKind::Press {
            return vec![];
        }
        self.dirty = true;
        let ctrl_c =
            key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
        match self.popup.take() {
            Some(Popup::Help) => {
                // Any key closes help (so Esc is never the only way out).
                vec![]
            }
            Some(Popup::Quit { selected }) => self.on_quit_key(key, selected, ctrl_c),
            Some(Popup::Params(form)) => self.on_params_key(key, form),
            Some(Popup::Export(form)) => self.on_export_key(key, form),
            None => {
                let finished = matches!(self.phase, Phase::Done | Phase::Failed { .. });
                let action = match key.code {
                    KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => self
                        .keys
                        .action(c)
                        // vim-style aliases where they are not bound to something else
                        .or(match c {
                            'l' => Some(Action::NextPoison),
                            'h' => Some(Action::PrevPoison),
                            _ => None,
                        }),
                    KeyCode::Right => Some(Action::NextPoison),
                    KeyCode::Left => Some(Action::PrevPoison),
                    _ => None,
                };
                if self.attached && (ctrl_c || (finished && action == Some(Action::Quit))) {
                    // Leaving a view never touches the run.
                    self.quit = true;
                    self.detach = true;
                    return vec![];
                }
                if ctrl_c || action == Some(Action::Quit) {
                    if finished {
                        // Nothing left to checkpoint: let a lingering engine go, and leave.
                        self.quit = true;
                        return vec![Command::Abort];
                    }
                    self.popup = Some(Popup::Quit { selected: 0 });
                    return vec![];
                }
                let Some(action) = action else {
                    return vec![];
                };
                match action {
                    Action::Pause => match self.phase {
                        Phase::Paused => vec![Command::Resume],
                        Phase::Done | Phase::Failed { .. } => vec![],
                        _ => vec![Command::Pause],
                    },
                    Action::Params if !finished => {
                        self.popup = Some(Popup::Params(self.params_form()));
                        vec![]
                    }
                    Action::Checkpoint if !finished => vec![Command::CheckpointNow],
                    Action::Export if !matches!(self.phase, Phase::Failed { .. }) => {
                        self.popup = Some(Popup::Export(ExportForm {
                            selected: 0,
                            parts: [true; 4],
                            step: None,
                            dest: String::new(),
                        }));
                        vec![]
                    }
                    Action::Evaluate => {
                        if matches!(self.phase, Phase::Failed { .. }) {
                            vec![]
                        } else if self.evaluating {
                            self.log("an evaluation is already running".into());
                            vec![]
                        } else {
                            self.evaluating = true;
                            self.log("evaluating: training victims on the latest export...".into());
                            vec![Command::Evaluate { trials: None }]
                        }
                    }
                    Action::Help => {
                        self.popup = Some(Popup::Help);
                        vec![]
                    }
                    Action::LogScale => {
                        self.log_scale = !self.log_scale;
                        vec![]
                    }
                    Action::Ascii => {
                        self.ascii = !self.ascii;
                        vec![]
                    }
                    Action::NextPoison if self.poison_count > 0 => {
                        self.select_slot((self.slot + 1) % self.poison_count)
                    }
                    Action::PrevPoison if self.poison_count > 0 => {
                        self.select_slot((self.slot + self.poison_count - 1) % self.poison_count)
                    }
                    _ => vec![],
                }
            }
        }
    }

    fn on_export_key(&mut self, key: KeyEvent, mut form: ExportForm) -> Vec<Command> {
        let typing = form.selected == 5;
        match key.code {
            KeyCode::Esc => return vec![],
            KeyCode::Char('q') if !typing => return vec![],
            KeyCode::Up | KeyCode::BackTab => {
                form.selected = (form.selected + EXPORT_ROWS - 1) % EXPORT_ROWS
            }
            KeyCode::Down | KeyCode::Tab => form.selected = (form.selected + 1) % EXPORT_ROWS,
            KeyCode::Char('k') if !typing => {
                form.selected = (form.selected + EXPORT_ROWS - 1) % EXPORT_ROWS
            }
            KeyCode::Char('j') if !typing => form.selected = (form.selected + 1) % EXPORT_ROWS,
            KeyCode::Char(' ') | KeyCode::Char('x') if form.selected < 4 => {
                form.parts[form.selected] = !form.parts[form.selected]
            }
            KeyCode::Left | KeyCode::Right if form.selected == 4 => {
                // Cycle: now, then the checkpointed steps from the newest back.
                let mut choices: Vec<Option<usize>> = vec![None];
                choices.extend(self.checkpoint_steps.iter().rev().map(|&s| Some(s)));
                let i = choices.iter().position(|c| *c == form.step).unwrap_or(0);
                let n = choices.len();
                let j = if key.code == KeyCode::Right {
                    (i + 1) % n
                } else {
                    (i + n - 1) % n
                };
                form.step = choices[j];
            }
            KeyCode::Backspace if typing => {
                form.dest.pop();
            }
            KeyCode::Char(c) if typing => form.dest.push(c),
            KeyCode::Enter => {
                let formats: Vec<&str> = EXPORT_PARTS
                    .iter()
                    .zip(form.parts)
                    .filter(|(_, on)| *on)
                    .map(|((_, f), _)| *f)
                    .collect();
                let dest = form.dest.trim().to_string();
                self.log(format!(
                    "exporting {} ({}) to {}...",
                    form.step
                        .map_or("the current step".to_string(), |s| format!("step {s}")),
                    if formats.is_empty() {
                        "poisons.npz only".into()
                    } else {
                        formats.join(", ")
                    },
                    if dest.is_empty() {
                        "RUN_DIR/export-step-NNNN"
                    } else {
                        &dest
                    }
                ));
                return vec![Command::ExportNow {
                    formats: formats.join(","),
                    step: form.step,
                    out: (!dest.is_empty()).then_some(dest),
                }];
            }
            _ => {}
        }
        self.popup = Some(Popup::Export(form));
        vec![]
    }

    fn on_quit_key(&mut self, key: KeyEvent, selected: usize, ctrl_c: bool) -> Vec<Command> {
        let choose = |app: &mut App, choice: usize| -> Vec<Command> {
            match choice {
                0 if app.attached => {
                    app.quit = true;
                    app.detach = true;
                    vec![]
                }
                1 if app.attached => {
                    app.quit = true;
                    app.log("checkpointing and stopping the run".into());
                    vec![Command::Stop]
                }
                0 => {
                    app.quit = true;
                    app.log("checkpointing and quitting".into());
                    vec![Command::Stop]
                }
                1 => {
                    app.quit = true;
                    vec![Command::Abort]
                }
                _ => vec![],
            }
        };
        match key.code {
            _ if ctrl_c && self.attached => choose(self, 0),
            _ if ctrl_c => choose(self, 1),
            KeyCode::Char('d') if self.attached => choose(self, 0),
            KeyCode::Char('c') if self.attached => choose(self, 1),
            KeyCode::Char('q') if self.attached => choose(self, 0),
            KeyCode::Up | KeyCode::Left | KeyCode::Char('k') | KeyCode::BackTab => {
                self.popup = Some(Popup::Quit {
                    selected: (selected + 2) % 3,
                });
                vec![]
            }
            KeyCode::Down | KeyCode::Right | KeyCode::Char('j') | KeyCode::Tab => {
                self.popup = Some(Popup::Quit {
                    selected: (selected + 1) % 3,
                });
                vec![]
            }
            KeyCode::Enter => choose(self, selected),
            KeyCode::Char('c') => choose(self, 0),
            KeyCode::Char('q') => choose(self, 1),
            KeyCode::Esc | KeyCode::Char('n') => vec![],
            _ => {
                self.popup = Some(Popup::Quit { selected });
                vec![]
            }
        }
    }

    fn on_params_key(&mut self, key: KeyEvent, mut form: ParamsForm) -> Vec<Command> {
        match key.code {
            KeyCode::Esc | KeyCode::Char('q') => return vec![],
            KeyCode::Up | KeyCode::BackTab => form.field = (form.field + 2) % 3,
            KeyCode::Down | KeyCode::Tab => form.field = (form.field + 1) % 3,
            KeyCode::Char('+') | KeyCode::Char('=') | KeyCode::Char('-') => {
                let up = key.code != KeyCode::Char('-');
                let f = form.field;
                if f == 2 {
                    let k: i64 = form.values[2]
                        .parse()
                        .unwrap_or(self.live.unroll_steps as i64);
                    form.values[2] = (k + if up { 1 } else { -1 }).clamp(1, 16).to_string();
                } else if let Ok(v) = form.values[f].parse::<f64>() {
                    let v = if up { v * 1.25 } else { v / 1.25 };
                    form.values[f] = format!("{}", (v * 1e6).round() / 1e6);
                }
                form.error = None;
            }
            KeyCode::Backspace => {
                form.values[form.field].pop();
            }
            KeyCode::Char(ch) if ch.is_ascii_digit() || ch == '.' || ch == 'e' => {
                form.values[form.field].push(ch);
                form.error = None;
            }
            KeyCode::Enter => match Self::validate(&form) {
                Ok((outer, inner, k)) => {
                    let mut cmds = Vec::new();
                    if form.values[0] != form.original[0] {
                        cmds.push(Command::SetOuterLr { value: outer });
                    }
                    if form.values[1] != form.original[1] {
                        cmds.push(Command::SetInnerLr { value: inner });
                    }
                    if form.values[2] != form.original[2] {
                        cmds.push(Command::SetUnrollSteps { value: k });
                    }
                    return cmds;
                }
                Err(e) => form.error = Some(e.to_string()),
            },
            _ => {}
        }
        self.popup = Some(Popup::Params(form));
        vec![]
    }

    /// The same ranges the engine enforces, checked before anything is sent.
    pub fn validate(form: &ParamsForm) -> Result<(f64, f64, usize), FormError> {
        let number = |i: usize, what: &'static str| {
            form.values[i]
                .parse::<f64>()
                .map_err(|_| FormError::NotANumber {
                    field: what,
                    text: form.values[i].clone(),
                })
        };
        let outer = LiveSettings::check_outer_lr(number(0, "outer lr")?)?;
        let inner = LiveSettings::check_inner_lr(number(1, "inner lr")?)?;
        let k: usize = form.values[2]
            .parse()
            .map_err(|_| FormError::NotAWholeNumber {
                field: "K",
                text: form.values[2].clone(),
            })?;
        let k = LiveSettings::check_unroll_steps(k)?;
        Ok((outer, inner, k))
    }

    /// The keys valid now, for the footer.
    pub fn footer(&self) -> String {
        let k = |a: Action| self.keys.label(a);
        match &self.popup {
            Some(Popup::Help) => "any key: close help".into(),
            Some(Popup::Quit { .. }) if self.attached => {
                "arrows choose  Enter confirm  d/q detach  c checkpoint+stop  Esc/n cancel".into()
            }
            Some(Popup::Quit { .. }) => {
                "arrows choose  Enter confirm  c checkpoint+quit  q quit  Esc/n cancel".into()
            }
            Some(Popup::Export(f)) if f.selected == 5 => {
                "type the destination (empty: RUN_DIR/export-step-NNNN)  Backspace  Enter export  Esc cancel".into()
            }
            Some(Popup::Export(f)) if f.selected == 4 => {
                "left/right: now or a checkpointed step  up/down rows  Enter export  Esc cancel".into()
            }
            Some(Popup::Export(_)) => {
                "arrows choose  Space toggle  Enter export  Esc/q cancel".into()
            }
            Some(Popup::Params(_)) => {
                "Tab/arrows field  +/- adjust  digits type  Enter apply  Esc/q cancel".into()
            }
            None => {
                let parts: &[(Action, &str)] = match self.phase {
                    Phase::Done => &[
                        (Action::Export, "export"),
                        (Action::Evaluate, "victims"),
                        (Action::PrevPoison, ""),
                        (Action::NextPoison, "poison"),
                        (Action::Ascii, "ascii"),
                        (Action::LogScale, "log"),
                        (Action::Help, "help"),
                        (Action::Quit, "quit"),
                    ],
                    Phase::Failed { .. } => &[
                        (Action::PrevPoison, ""),
                        (Action::NextPoison, "poison"),
                        (Action::Ascii, "ascii"),
                        (Action::LogScale, "log"),
                        (Action::Help, "help"),
                        (Action::Quit, "quit"),
                    ],
                    _ => &[
                        (Action::Pause, ""),
                        (Action::Params, "params"),
                        (Action::Checkpoint, "ckpt"),
                        (Action::Export, "export"),
                        (Action::Evaluate, "victims"),
                        (Action::PrevPoison, ""),
                        (Action::NextPoison, "poison"),
                        (Action::Help, "help"),
                        (Action::Quit, "quit"),
                    ],
                };
                // "[ ] poison": a key with an empty label joins the next one (Pause says
                // pause or resume).
                let mut out = String::new();
                for (action, label) in parts {
                    out += &k(*action);
                    if *action == Action::Pause {
                        let verb = if self.phase == Phase::Paused {
                            "resume"
                        } else {
                            "pause"
                        };
                        out += &format!(" {verb}  ");
                    } else if label.is_empty() {
                        out.push(' ');
                    } else {
                        out += &format!(" {label}  ");
                    }
                }
                out.trim_end().to_string()
            }
        }
    }

    /// The help overlay's lines, with the configured keys.
    pub fn help_lines(&self) -> Vec<String> {
        let k = |a: Action| self.keys.label(a);
        vec![
            format!(
                "{:<10} pause / resume (between craft steps)",
                k(Action::Pause)
            ),
            format!(
                "{:<10} parameters: outer lr, inner lr, K",
                k(Action::Params)
            ),
            format!("{:<10} checkpoint now", k(Action::Checkpoint)),
            format!(
                "{:<10} export menu (into RUN_DIR/export-step-NNNN)",
                k(Action::Export)
            ),
            format!(
                "{:<10} victims: train on the latest export, show the result",
                k(Action::Evaluate)
            ),
            format!(
                "{:<10} previous / next poison (also arrows, h l)",
                format!("{} {}", k(Action::PrevPoison), k(Action::NextPoison))
            ),
            format!("{:<10} ASCII images on/off", k(Action::Ascii)),
            format!("{:<10} loss chart: linear / symlog", k(Action::LogScale)),
            if self.attached {
                format!(
                    "{:<10} leave (asks: detach / checkpoint and stop / cancel); Ctrl-c detaches",
                    k(Action::Quit)
                )
            } else {
                format!(
                    "{:<10} quit (asks: checkpoint and quit / quit / cancel)",
                    format!("{}, Ctrl-c", k(Action::Quit))
                )
            },
            format!("{:<10} this help; any key closes it", k(Action::Help)),
        ]
    }
}
