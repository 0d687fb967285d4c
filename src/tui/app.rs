//! Dashboard state and key handling. Pure: telemetry in, commands out, no terminal and no
//! libtorch, so it is tested with synthetic keys and recorded telemetry.

use crate::craft::crafter::LiveSettings;
use crate::craft::messages::{Command, Phase, Preview, StepReport, Telemetry};
use crate::telemetry::SystemSample;
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use std::collections::VecDeque;

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

#[derive(Debug, Clone, PartialEq)]
pub enum Popup {
    Help,
    Quit {
        selected: usize,
    },
    Params(ParamsForm),
    /// Export menu: which parts to write (poisons.npz and the manifest always are).
    Export {
        selected: usize,
        parts: [bool; 4],
    },
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
        }
    }

    pub fn log(&mut self, line: String) {
        if self.events.len() == EVENT_LINES {
            self.events.pop_front();
        }
        self.events.push_back(line);
    }

    /// Folds one telemetry message into the state.
    pub fn on_telemetry(&mut self, t: Telemetry) {
        self.dirty = true;
        match t {
            Telemetry::Started {
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
                if e.kind == "set_outer_lr" {
                    if let Some(v) = e
                        .message
                        .rsplit("-> ")
                        .next()
                        .and_then(|v| v.trim().parse().ok())
                    {
                        self.live.outer_lr = v;
                    }
                }
                self.log(format!("[{}] {}: {}", e.step, e.kind, e.message));
            }
            Telemetry::Preview(p) => {
                if p.slot == self.slot {
                    self.preview = Some(p);
                }
            }
            Telemetry::Checkpoint { step, path } => {
                self.log(format!("checkpoint at step {step}: {path}"))
            }
            Telemetry::Finished {
                steps_done,
                run_dir,
            } => self.log(format!("finished {steps_done} steps: {run_dir}")),
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
            Some(Popup::Export {
                selected,
                mut parts,
            }) => match key.code {
                KeyCode::Esc | KeyCode::Char('q') => vec![],
                KeyCode::Up | KeyCode::Char('k') | KeyCode::BackTab => {
                    self.popup = Some(Popup::Export {
                        selected: (selected + 3) % 4,
                        parts,
                    });
                    vec![]
                }
                KeyCode::Down | KeyCode::Char('j') | KeyCode::Tab => {
                    self.popup = Some(Popup::Export {
                        selected: (selected + 1) % 4,
                        parts,
                    });
                    vec![]
                }
                KeyCode::Char(' ') | KeyCode::Char('x') => {
                    parts[selected] = !parts[selected];
                    self.popup = Some(Popup::Export { selected, parts });
                    vec![]
                }
                KeyCode::Enter => {
                    let formats: Vec<&str> = EXPORT_PARTS
                        .iter()
                        .zip(parts)
                        .filter(|(_, on)| *on)
                        .map(|((_, f), _)| *f)
                        .collect();
                    self.log(format!(
                        "exporting ({})...",
                        if formats.is_empty() {
                            "poisons.npz only".into()
                        } else {
                            formats.join(", ")
                        }
                    ));
                    vec![Command::ExportNow {
                        formats: formats.join(","),
                    }]
                }
                _ => {
                    self.popup = Some(Popup::Export { selected, parts });
                    vec![]
                }
            },
            None => {
                let finished = matches!(self.phase, Phase::Done | Phase::Failed { .. });
                if finished && (ctrl_c || key.code == KeyCode::Char('q')) {
                    self.quit = true;
                    return vec![];
                }
                if ctrl_c || key.code == KeyCode::Char('q') {
                    self.popup = Some(Popup::Quit { selected: 0 });
                    return vec![];
                }
                match key.code {
                    KeyCode::Char(' ') => match self.phase {
                        Phase::Paused => vec![Command::Resume],
                        Phase::Done | Phase::Failed { .. } => vec![],
                        _ => vec![Command::Pause],
                    },
                    KeyCode::Char('p') => {
                        self.popup = Some(Popup::Params(self.params_form()));
                        vec![]
                    }
                    KeyCode::Char('c') => vec![Command::CheckpointNow],
                    KeyCode::Char('e') => {
                        self.popup = Some(Popup::Export {
                            selected: 0,
                            parts: [true; 4],
                        });
                        vec![]
                    }
                    KeyCode::Char('?') => {
                        self.popup = Some(Popup::Help);
                        vec![]
                    }
                    KeyCode::Char('g') => {
                        self.log_scale = !self.log_scale;
                        vec![]
                    }
                    KeyCode::Char('a') => {
                        self.ascii = !self.ascii;
                        vec![]
                    }
                    KeyCode::Right | KeyCode::Char(']') | KeyCode::Char('l')
                        if self.poison_count > 0 =>
                    {
                        self.select_slot((self.slot + 1) % self.poison_count)
                    }
                    KeyCode::Left | KeyCode::Char('[') | KeyCode::Char('h')
                        if self.poison_count > 0 =>
                    {
                        self.select_slot((self.slot + self.poison_count - 1) % self.poison_count)
                    }
                    _ => vec![],
                }
            }
        }
    }

    fn on_quit_key(&mut self, key: KeyEvent, selected: usize, ctrl_c: bool) -> Vec<Command> {
        let choose = |app: &mut App, choice: usize| -> Vec<Command> {
            match choice {
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
            _ if ctrl_c => choose(self, 1),
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
                Err(e) => form.error = Some(e),
            },
            _ => {}
        }
        self.popup = Some(Popup::Params(form));
        vec![]
    }

    /// The same ranges the engine enforces, checked before anything is sent.
    pub fn validate(form: &ParamsForm) -> Result<(f64, f64, usize), String> {
        let outer: f64 = form.values[0]
            .parse()
            .map_err(|_| format!("outer lr `{}` is not a number", form.values[0]))?;
        let outer = LiveSettings::check_outer_lr(outer)?;
        let inner: f64 = form.values[1]
            .parse()
            .map_err(|_| format!("inner lr `{}` is not a number", form.values[1]))?;
        let inner = LiveSettings::check_inner_lr(inner)?;
        let k: usize = form.values[2]
            .parse()
            .map_err(|_| format!("K `{}` is not a whole number", form.values[2]))?;
        let k = LiveSettings::check_unroll_steps(k)?;
        Ok((outer, inner, k))
    }

    /// The keys valid now, for the footer.
    pub fn footer(&self) -> &'static str {
        match &self.popup {
            Some(Popup::Help) => "any key: close help",
            Some(Popup::Quit { .. }) => {
                "arrows choose  Enter confirm  c checkpoint+quit  q quit  Esc/n cancel"
            }
            Some(Popup::Export { .. }) => "arrows choose  Space toggle  Enter export  Esc/q cancel",
            Some(Popup::Params(_)) => {
                "Tab/arrows field  +/- adjust  digits type  Enter apply  Esc/q cancel"
            }
            None => match self.phase {
                Phase::Paused => {
                    "Space resume  p params  c checkpoint  e export  [ ] poison  ? help  q quit"
                }
                Phase::Done | Phase::Failed { .. } => "[ ] poison  a ascii  g log  ? help  q quit",
                _ => "Space pause  p params  c checkpoint  e export  [ ] poison  ? help  q quit",
            },
        }
    }
}
