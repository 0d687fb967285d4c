//! The crafting thread. It owns libtorch and the job; the outside world talks to it only
//! through [`Command`]s in and [`Telemetry`] out.

pub mod client;
pub mod protocol;
pub mod server;
pub mod status;
pub mod wire;

use crate::config::Config;
use crate::craft::checkpoint;
use crate::craft::crafter::{Crafter, LiveSettings};
use crate::craft::parallel;
use crate::craft::plan::Plan;
use crate::data::Dataset;
use protocol::{Command, Event, EventKind, LiveChange, LiveField, Phase, Preview, Telemetry};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Kind};

/// What the engine needs to start.
pub struct EngineSetup {
    pub config: Config,
    pub data: Dataset,
    pub device: Device,
    /// Float64 is for tests; runs use float32.
    pub kind: Kind,
    pub run_dir: PathBuf,
    /// Continue from the checkpoint in `run_dir`.
    pub resume: bool,
    /// Set by signal handlers: checkpoint at the next step boundary and stop.
    pub stop: Arc<AtomicBool>,
    /// After the last step, keep serving export and evaluation commands until told to stop
    /// (or the controller goes away): what a dashboard wants. Headless runs end instead.
    pub linger: bool,
    /// Accept viewers from other processes (`metapoison attach`) on a Unix socket.
    pub serve: bool,
    /// With `linger` and `serve`: also leave once no viewer has been attached for this long
    /// (a detached run, which has no controller of its own).
    pub linger_idle: Option<std::time::Duration>,
    /// The job's processes: one, or the ranks of an MPI job (rank 0 writes the run folder).
    pub ranks: crate::ranks::Ranks,
}

pub struct EngineHandle {
    pub commands: Sender<Command>,
    pub telemetry: Receiver<Telemetry>,
    pub thread: EngineThread,
}

impl EngineHandle {
    /// Waits for the thread; its error (one line) if it failed.
    pub fn join(self) -> Result<(), EngineError> {
        self.thread.join()
    }
}

/// The crafting thread apart from its channels (a controller may hand those to threads of
/// its own): what is left to wait for.
pub struct EngineThread(JoinHandle<Result<(), EngineError>>);

impl EngineThread {
    /// Waits for the thread; its error (one line) if it failed.
    pub fn join(self) -> Result<(), EngineError> {
        self.0.join().unwrap_or(Err(EngineError::Panicked))
    }
}

/// Why a crafting job ended early. Every variant reads as one line; checkpoints already
/// written stay usable.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Restore(#[from] checkpoint::RestoreError),
    #[error(transparent)]
    Plan(#[from] crate::craft::plan::PlanError),
    #[error("run.surrogate_devices: {0}")]
    SurrogateDevice(crate::device::DeviceError),
    #[error("{steps} craft steps in a row had a non-finite meta-gradient; stopped. Lower craft.outer_lr or surrogate.lr and resume from {run_dir}")]
    NonFinite { steps: usize, run_dir: PathBuf },
    /// An error raised inside libtorch (a panic in tch), as `failure::message` words it.
    #[error("{0}")]
    Libtorch(String),
    #[error("the crafting thread panicked (see the log file)")]
    Panicked,
    #[error("{0}")]
    Ranks(String),
}

/// The engine's side of the telemetry channel: every message also updates the run's
/// status file (status.rs), so that processes outside this one see where the run stands.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<Telemetry>,
    /// None on the ranks of an MPI job but rank 0, which alone writes the run folder.
    status: Option<Arc<std::sync::Mutex<status::StatusTracker>>>,
    /// The socket viewers attach to, when the run serves them.
    server: Option<Arc<server::Server>>,
}

impl Outbox {
    /// Whether a controller was still there to receive it.
    pub fn send(&self, t: Telemetry) -> bool {
        if let Some(Ok(mut s)) = self.status.as_ref().map(|s| s.lock()) {
            s.observe(&t);
        }
        if let Some(server) = &self.server {
            server.publish(&t);
        }
        self.tx.send(t).is_ok()
    }

    /// The engine returned: a run still marked as working stopped early.
    fn closed(&self) {
        if let Some(Ok(mut s)) = self.status.as_ref().map(|s| s.lock()) {
            s.closed();
        }
    }
}

pub fn spawn(setup: EngineSetup) -> EngineHandle {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (tel_tx, tel_rx) = mpsc::channel();
    // Viewers are a convenience: a run that cannot serve them crafts on, and says why.
    let root = setup.ranks.is_root();
    let server = (setup.serve && root).then(|| {
        let _ = std::fs::create_dir_all(&setup.run_dir);
        server::Server::start(&setup.run_dir, cmd_tx.clone())
            .map_err(|e| tracing::warn!("viewers cannot attach to this run: {e}"))
            .ok()
            .map(Arc::new)
    });
    let mut tracker = status::StatusTracker::new(&setup.run_dir);
    if let Some(Some(s)) = &server {
        tracker.set_socket(s.socket());
    }
    let tel_tx = Outbox {
        tx: tel_tx,
        status: root.then(|| Arc::new(std::sync::Mutex::new(tracker))),
        server: server.flatten(),
    };
    let thread = std::thread::Builder::new()
        .name("crafting".into())
        .spawn(move || {
            // A libtorch error (a panic in tch) ends the job with a one-line message, like any
            // other failure; checkpoints already written stay.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(setup, cmd_rx, &tel_tx)
            }))
            .unwrap_or_else(|payload| {
                Err(EngineError::Libtorch(crate::failure::message(&*payload)))
            });
            if let Err(e) = &result {
                tracing::error!("crafting failed: {e}");
                let _ = tel_tx.send(Telemetry::Phase(Phase::Failed {
                    message: e.to_string(),
                }));
            }
            tel_tx.closed();
            result
        })
        .expect("spawn crafting thread");
    EngineHandle {
        commands: cmd_tx,
        telemetry: tel_rx,
        thread: EngineThread(thread),
    }
}

struct Session<'a> {
    crafter: Crafter,
    setup: &'a EngineSetup,
    out: &'a Outbox,
    paused: bool,
    /// Events already sent out.
    events_sent: usize,
    /// The folder of the last successful export of this session.
    latest_export: Option<PathBuf>,
    /// Set while a victim evaluation runs on its own thread.
    evaluating: Arc<AtomicBool>,
    /// Several ranks: a checkpoint asked for between steps, taken by all ranks together at
    /// the step boundary.
    checkpoint_due: bool,
    /// Several ranks: exports and evaluations asked for, which wait for that checkpoint.
    deferred: Vec<Command>,
    /// Several ranks: the checkpoint on disk is of this step boundary (set after the
    /// boundary's collective checkpoint, until the next step).
    fresh_checkpoint: bool,
}

/// What rank 0 tells the other ranks of an MPI job at each step boundary.
#[derive(serde::Serialize, serde::Deserialize)]
struct Boundary {
    go_on: bool,
    checkpoint: bool,
    live: LiveSettings,
    /// Every few steps, rank 0's perturbation digest, for every rank to compare with its own.
    digest: Option<String>,
}

/// How often (in craft steps) the ranks check that they hold the same perturbation.
const RANK_CHECK_EVERY: usize = 5;

impl Session<'_> {
    fn send(&self, t: Telemetry) {
        // A controller that went away is no reason to stop crafting: results still land on disk.
        let _ = self.out.send(t);
    }

    fn event(&mut self, kind: EventKind, message: String) {
        self.record(Event::new(self.crafter.step, kind, message));
    }

    /// A live setting changed: the event carries the change itself, not only its text.
    fn changed(&mut self, kind: EventKind, field: LiveField, old: f64, new: f64, text: String) {
        let mut event = Event::new(self.crafter.step, kind, text);
        event.change = Some(LiveChange { field, old, new });
        self.record(event);
    }

    fn record(&mut self, event: Event) {
        tracing::info!(
            "event at step {}: {}: {}",
            event.step,
            event.kind,
            event.message
        );
        self.crafter.events.push(event);
        self.flush_events();
    }

    fn flush_events(&mut self) {
        while self.events_sent < self.crafter.events.len() {
            self.send(Telemetry::Event(
                self.crafter.events[self.events_sent].clone(),
            ));
            self.events_sent += 1;
        }
    }

    /// A checkpoint asked for between steps (a command, a signal): at once in a one-process
    /// job; with several ranks at the step boundary, where all of them take part.
    fn checkpoint(&mut self) -> Result<(), EngineError> {
        if self.crafter.ranks().several() {
            if !self.fresh_checkpoint {
                self.checkpoint_due = true;
            }
            return Ok(());
        }
        self.checkpoint_now()
    }

    /// A checkpoint every rank takes at the same point (a collective call with several
    /// ranks: rank 0 gathers the others' surrogates and writes it).
    fn checkpoint_now(&mut self) -> Result<(), EngineError> {
        self.checkpoint_due = false;
        self.crafter.gather_surrogates();
        if !self.crafter.ranks().is_root() {
            return Ok(());
        }
        let path = checkpoint::save(&self.crafter, &self.setup.run_dir)?;
        checkpoint::save_poison_snapshot(&self.crafter, &self.setup.run_dir)?;
        tracing::info!(
            "checkpoint at step {} -> {}",
            self.crafter.step,
            path.display()
        );
        self.send(Telemetry::Checkpoint {
            step: self.crafter.step,
            path: path.display().to_string(),
        });
        Ok(())
    }

    fn preview(&self, slot: usize) {
        let p = &self.crafter.perturbation;
        let n = p.base.size()[0] as usize;
        if slot >= n {
            return;
        }
        let _guard = tch::no_grad_guard();
        let to_u8 = |t: tch::Tensor| -> Vec<u8> {
            let t = t
                .clamp(0.0, 255.0)
                .round()
                .to_kind(Kind::Uint8)
                .permute([1, 2, 0])
                .contiguous()
                .to_device(Device::Cpu);
            Vec::<u8>::try_from(t.flatten(0, -1)).unwrap_or_default()
        };
        let s = slot as i64;
        let base = p.base.get(s);
        let poison = p.quantised().get(s);
        let delta = (&poison - &base) * 10.0 + 127.5;
        let (c, h, w) = base.size3().expect("[C, H, W]");
        self.send(Telemetry::Preview(Preview {
            slot,
            height: h as usize,
            width: w as usize,
            channels: c as usize,
            base: to_u8(base),
            poison: to_u8(poison),
            delta: to_u8(delta),
        }));
    }

    /// Applies one command. Returns false when the engine should stop.
    fn apply(&mut self, cmd: Command) -> Result<bool, EngineError> {
        match cmd {
            Command::Pause if !self.paused => {
                self.paused = true;
                self.send(Telemetry::Phase(Phase::Paused));
                self.event(EventKind::Pause, "paused between steps".into());
            }
            Command::Resume if self.paused => {
                self.paused = false;
                self.send(Telemetry::Phase(Phase::Crafting));
                self.event(EventKind::Resume, "resumed".into());
            }
            Command::Pause | Command::Resume => {}
            Command::Stop => {
                self.event(EventKind::Stop, "stop requested: checkpointing".into());
                self.checkpoint()?;
                return Ok(false);
            }
            Command::Abort => {
                self.event(EventKind::Abort, "stopped without a new checkpoint".into());
                return Ok(false);
            }
            Command::CheckpointNow => self.checkpoint()?,
            Command::SetOuterLr { value } => match LiveSettings::check_outer_lr(value) {
                Ok(v) => {
                    let old = std::mem::replace(&mut self.crafter.live.outer_lr, v);
                    self.changed(
                        EventKind::SetOuterLr,
                        LiveField::OuterLr,
                        old,
                        v,
                        format!("outer lr {old} -> {v}"),
                    );
                }
                Err(e) => self.event(EventKind::Rejected, format!("{e}: refused")),
            },
            Command::SetInnerLr { .. } | Command::SetUnrollSteps { .. }
                if self.crafter.plan.recipe == crate::config::CraftRecipe::GradientMatching =>
            {
                self.event(
                    EventKind::Rejected,
                    "the inner lr and K are MetaPoison's; gradient matching has neither: refused"
                        .into(),
                );
            }
            Command::SetInnerLr { value } => match LiveSettings::check_inner_lr(value) {
                Ok(v) => {
                    let old = std::mem::replace(&mut self.crafter.live.inner_lr, v);
                    self.changed(
                        EventKind::SetInnerLr,
                        LiveField::InnerLr,
                        old,
                        v,
                        format!("inner lr {old} -> {v}"),
                    );
                }
                Err(e) => self.event(EventKind::Rejected, format!("{e}: refused")),
            },
            Command::SetUnrollSteps { value } => match LiveSettings::check_unroll_steps(value) {
                Ok(k) => {
                    let old = std::mem::replace(&mut self.crafter.live.unroll_steps, k);
                    self.changed(
                        EventKind::SetUnrollSteps,
                        LiveField::UnrollSteps,
                        old as f64,
                        k as f64,
                        format!("K {old} -> {k}"),
                    );
                }
                Err(e) => self.event(EventKind::Rejected, format!("{e}: refused")),
            },
            Command::Preview { slot } => self.preview(slot),
            // With several ranks an export reads a checkpoint all ranks take together: it
            // waits for the one at this step boundary.
            Command::ExportNow { .. } | Command::Evaluate { .. }
                if self.crafter.ranks().several() && !self.fresh_checkpoint =>
            {
                self.checkpoint_due = true;
                self.deferred.push(cmd);
            }
            Command::ExportNow { formats, step, out } => {
                self.export(&formats, step, out.map(PathBuf::from))?;
            }
            Command::Evaluate { trials } => self.start_evaluation(trials)?,
        }
        Ok(true)
    }

    /// Checkpoints, then exports the poisons of `step` (default: now) to `out` (default:
    /// RUN_DIR/export-step-NNNN); the folder, or None if it failed (the failure is reported as
    /// an event).
    fn export(
        &mut self,
        formats: &str,
        step: Option<usize>,
        out: Option<PathBuf>,
    ) -> Result<Option<PathBuf>, EngineError> {
        self.checkpoint()?;
        let shown = step.unwrap_or(self.crafter.step);
        // The default folder of a step may be replaced (e.g. exporting again before an
        // evaluation); a destination the user typed is never overwritten.
        let force = out.is_none();
        let out = out.unwrap_or_else(|| self.setup.run_dir.join(format!("export-step-{shown:04}")));
        let outcome = crate::export::Formats::parse(formats).and_then(|formats| {
            crate::export::export(&crate::export::ExportRequest {
                run_dir: self.setup.run_dir.clone(),
                step: step.filter(|&s| s != self.crafter.step),
                out: Some(out),
                formats,
                force,
            })
        });
        match outcome {
            Ok(dir) => {
                self.event(EventKind::Export, format!("exported to {}", dir.display()));
                self.latest_export = Some(dir.clone());
                Ok(Some(dir))
            }
            Err(e) => {
                self.event(EventKind::ExportFailed, e.to_string());
                Ok(None)
            }
        }
    }

    /// Starts victims training on the latest export (made now if there is none) on a
    /// thread of their own; crafting goes on meanwhile.
    fn start_evaluation(&mut self, trials: Option<usize>) -> Result<(), EngineError> {
        if self.evaluating.load(Ordering::SeqCst) {
            self.event(
                EventKind::Rejected,
                "an evaluation is already running: wait for its result".into(),
            );
            return Ok(());
        }
        let dir = match self
            .latest_export
            .clone()
            .filter(|d| d.join("poisons.npz").exists())
        {
            Some(d) => d,
            None => match self.export("npz", None, None)? {
                Some(d) => d,
                None => return Ok(()),
            },
        };
        let victim = self.crafter.config.victim.clone();
        let plan = crate::victim::eval::EvalPlan {
            trials: trials.unwrap_or(victim.trials).max(1),
            victim,
            control: true,
            noise_control: false,
            save_weights: false,
            first_poisons: None,
            // Pressing the key again after more steps retrains only the poisoned victims.
            grouped: None,
            victim_cache: Some(self.setup.run_dir.join("victims")),
        };
        self.event(
            EventKind::Evaluation,
            format!(
                "training {} poisoned + {} control {} victims ({} epochs) on {}",
                plan.trials,
                plan.trials,
                plan.victim.net.name(),
                plan.victim.epochs,
                dir.display()
            ),
        );
        let out = self.out.clone();
        let device = self.setup.device;
        let step = self.crafter.step;
        let busy = self.evaluating.clone();
        busy.store(true, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("evaluation".into())
            .spawn(move || {
                // (No set_num_threads here: libtorch's thread count is process-wide, so it
                // would slow the crafting thread too and change its reduction order.)
                let note = |kind: EventKind, message: String| {
                    let _ = out.send(Telemetry::Event(Event::new(step, kind, message)));
                };
                // A libtorch error (a panic in tch) fails this evaluation like any other error,
                // so the next `v` is not refused as "already running".
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::victim::eval::evaluate(&dir, &plan, device, |p| {
                        note(EventKind::Evaluation,
                            format!(
                                "victim {}/{} ({}{}): target -> {:?}, clean accuracy {:.1}%",
                                p.done,
                                p.total,
                                p.trial.arm,
                                if p.trial.cached { ", reused" } else { "" },
                                p.trial.predicted,
                                p.trial.clean_accuracy * 100.0
                            ),
                        );
                        true
                    })
                }))
                .unwrap_or_else(|payload| {
                    Err(crate::victim::eval::EvalError::Libtorch(
                        crate::failure::message(&*payload),
                    ))
                });
                match result {
                    Ok(report) => {
                        note(EventKind::Evaluation,
                            format!(
                                "done: poisoned {}/{} flipped, control {}/{}; clean accuracy {:.1}% vs {:.1}% ({})",
                                report.poisoned.successes,
                                report.poisoned.trials,
                                report.control.successes,
                                report.control.trials,
                                report.poisoned.accuracy_mean * 100.0,
                                report.control.accuracy_mean * 100.0,
                                dir.join("eval.json").display()
                            ),
                        );
                        let _ = out.send(Telemetry::Evaluation((&report).into()));
                    }
                    Err(e) => note(EventKind::EvaluationFailed, e.to_string()),
                }
                busy.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.evaluating.store(false, Ordering::SeqCst);
            self.event(
                EventKind::EvaluationFailed,
                format!("cannot start a thread: {e}"),
            );
        }
        Ok(())
    }

    /// With several ranks: rank 0's decision at this step boundary (`go_on`, a checkpoint
    /// asked for, the live settings) reaches every rank, and a termination signal on any rank
    /// stops them all with one checkpoint. Returns whether to go on. One process: `go_on`.
    fn boundary(&mut self, go_on: bool) -> Result<bool, EngineError> {
        let ranks = self.crafter.ranks().clone();
        if !ranks.several() {
            return Ok(go_on);
        }
        let mut message = Vec::new();
        if ranks.is_root() {
            let check = self.crafter.step % RANK_CHECK_EVERY == 0;
            message = serde_json::to_vec(&Boundary {
                go_on,
                checkpoint: self.checkpoint_due,
                live: self.crafter.live.clone(),
                digest: check.then(|| self.crafter.perturbation_digest()),
            })
            .unwrap_or_default();
        }
        ranks.broadcast_bytes(&mut message);
        let decided: Boundary = serde_json::from_slice(&message)
            .map_err(|e| EngineError::Ranks(format!("rank 0's step boundary message: {e}")))?;
        self.crafter.live = decided.live;
        if let Some(digest) = &decided.digest {
            // Rank 0 sent its own digest: only the others compute theirs.
            let differs = !ranks.is_root() && *digest != self.crafter.perturbation_digest();
            let mut by_rank = vec![0.0; ranks.size()];
            by_rank[ranks.rank()] = if differs { 1.0 } else { 0.0 };
            ranks.sum_f64(&mut by_rank);
            let off: Vec<usize> = (0..ranks.size()).filter(|&r| by_rank[r] > 0.0).collect();
            if !off.is_empty() {
                return Err(EngineError::Ranks(format!(
                    "the ranks no longer hold the same perturbation at step {} (rank {} differs from rank 0); stopped without a new checkpoint: resume from the last one",
                    self.crafter.step,
                    off.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let signalled = ranks.any(self.setup.stop.load(Ordering::SeqCst));
        if signalled && ranks.is_root() && !self.setup.stop.load(Ordering::SeqCst) {
            self.event(
                EventKind::Signal,
                "termination signal on another rank: checkpointing".into(),
            );
        }
        if decided.checkpoint || signalled {
            self.checkpoint_now()?;
            self.fresh_checkpoint = true;
            for cmd in std::mem::take(&mut self.deferred) {
                self.apply(cmd)?;
            }
            self.fresh_checkpoint = false;
        }
        Ok(decided.go_on && !signalled)
    }

    /// After the last step (with `linger`): serve exports, evaluations and previews until a
    /// stop, an abort or the controller's departure.
    fn serve_finished(&mut self, rx: &Receiver<Command>) -> Result<(), EngineError> {
        loop {
            if self.setup.stop.load(Ordering::SeqCst) {
                self.event(EventKind::Signal, "termination signal: leaving".into());
                return Ok(());
            }
            if let (Some(idle), Some(server)) = (self.setup.linger_idle, &self.out.server) {
                if server.viewers().idle_for() >= idle {
                    self.event(
                        EventKind::Stop,
                        format!(
                            "finished, and no viewer attached for {} s: leaving",
                            idle.as_secs()
                        ),
                    );
                    return Ok(());
                }
            }
            let cmd = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            match cmd {
                Command::Stop | Command::Abort => break,
                Command::ExportNow { .. }
                | Command::Evaluate { .. }
                | Command::Preview { .. }
                | Command::CheckpointNow => {
                    self.apply(cmd)?;
                }
                other => self.event(
                    EventKind::Rejected,
                    format!("the run is finished: {other:?} does nothing now"),
                ),
            }
        }
        Ok(())
    }

    /// Handles pending commands; while paused, waits for them. Returns false to stop.
    fn handle_commands(&mut self, rx: &Receiver<Command>) -> Result<bool, EngineError> {
        loop {
            if self.setup.stop.load(Ordering::SeqCst) {
                self.event(
                    EventKind::Signal,
                    "termination signal: checkpointing".into(),
                );
                self.checkpoint()?;
                return Ok(false);
            }
            let next = if self.paused {
                match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(cmd) => {
                    if !self.apply(cmd)? {
                        return Ok(false);
                    }
                }
                None if self.paused => {
                    // Nobody left to resume us: keep the work and stop.
                    self.checkpoint()?;
                    return Ok(false);
                }
                None => return Ok(true),
            }
        }
    }
}

/// A job ready to pretrain or restore: the config's `auto` fields settled for the device (the
/// notes say how, in the plan), the plan resolved, surrogates placed on their devices
/// (`run.surrogate_devices`), and on a CPU its threads shared among surrogates side by side
/// for as long as `intra_op` is kept. What a run crafts with, and what `bench --crafter-steps`
/// times.
pub struct Prepared {
    pub crafter: Crafter,
    /// The settled config.
    pub config: Config,
    pub intra_op: Option<parallel::IntraOpThreads>,
}

pub fn prepare(
    config: &Config,
    data: &Dataset,
    device: Device,
    kind: Kind,
    ranks: &crate::ranks::Ranks,
) -> Result<Prepared, EngineError> {
    let mut config = config.clone();
    let settled = config.settle(device.is_cuda());
    let mut plan = Plan::resolve(&config, data)?;
    plan.notes = settled;
    if ranks.several() {
        if !config.run.surrogate_devices.is_empty() {
            return Err(EngineError::Ranks(
                "run.surrogate_devices and MPI ranks both place surrogates: leave run.surrogate_devices empty (each rank uses its own device)".into(),
            ));
        }
        if plan.ensemble_size < ranks.size() {
            return Err(EngineError::Ranks(format!(
                "{} ranks for {} surrogates: every rank needs one; use at most {} ranks or a larger craft.ensemble_size",
                ranks.size(),
                plan.ensemble_size,
                plan.ensemble_size
            )));
        }
        if plan.grouped_surrogates {
            plan.grouped_surrogates = false;
            plan.notes.push(
                "craft.grouped_surrogates: off across MPI ranks (each rank steps its surrogates one by one)".into(),
            );
        }
        // The ranks on one machine share its cores: each runs as many surrogates at once as
        // its share of them allows.
        let per_rank = (tch::get_num_threads().max(1) as usize / crate::ranks::local_size()).max(1);
        if !device.is_cuda() && plan.parallel_surrogates > per_rank {
            plan.parallel_surrogates = per_rank;
            plan.notes.push(format!(
                "craft.parallel_surrogates: {per_rank} per rank ({} ranks share this machine's cores)",
                crate::ranks::local_size()
            ));
        }
        plan.notes.push(format!(
            "MPI: {} ranks; this is rank {}, owning surrogates {}, {} + {}, ...",
            ranks.size(),
            ranks.rank(),
            ranks.rank(),
            ranks.rank(),
            ranks.size()
        ));
    }
    for note in &plan.notes {
        tracing::info!("{note}");
    }
    let mut crafter = Crafter::new(config.clone(), data, plan, device, kind);
    crafter.share_with(ranks.clone());
    if !config.run.surrogate_devices.is_empty() {
        let devices = config
            .run
            .surrogate_devices
            .iter()
            .map(|d| {
                d.parse::<crate::device::DeviceChoice>()
                    .and_then(|c| c.resolve())
                    .map_err(EngineError::SurrogateDevice)
            })
            .collect::<Result<Vec<_>, _>>()?;
        crafter.spread_over(&devices);
    }
    // Several surrogates at once on the CPU: each worker gets its share of the cores for the
    // whole job (parallel.rs says why not per worker).
    // The ranks of an MPI job on one machine share its cores as well.
    let local_ranks = if ranks.several() {
        crate::ranks::local_size()
    } else {
        1
    };
    let intra_op = (!device.is_cuda()).then(|| {
        parallel::IntraOpThreads::share_among(crafter.plan.parallel_surrogates * local_ranks)
    });
    Ok(Prepared {
        crafter,
        config,
        intra_op,
    })
}

fn run(setup: EngineSetup, rx: Receiver<Command>, out: &Outbox) -> Result<(), EngineError> {
    std::fs::create_dir_all(&setup.run_dir)
        .map_err(crate::base::fs::failed("create run folder", &setup.run_dir))?;
    let _ = out.send(Telemetry::Phase(Phase::Preparing));
    let loaded = if setup.resume {
        Some(checkpoint::load(&setup.run_dir)?)
    } else {
        None
    };
    // On resume the caller passes the checkpoint's config (with any overrides, such as more
    // steps), settled when the run began. A new run settles its `auto` fields for this device
    // here, so the run folder records what ran (the caller loaded the data settled the same way).
    let Prepared {
        mut crafter,
        config,
        intra_op,
    } = prepare(
        &setup.config,
        &setup.data,
        setup.device,
        setup.kind,
        &setup.ranks,
    )?;
    let resumed_at = match &loaded {
        Some(l) => {
            l.restore_into(&mut crafter)?;
            Some(crafter.step)
        }
        None => None,
    };
    let _ = out.send(Telemetry::Started {
        protocol: protocol::PROTOCOL_VERSION,
        run_dir: setup.run_dir.display().to_string(),
        device: match intra_op {
            Some(_) => crate::device::describe_cpu_workers(crafter.plan.parallel_surrogates),
            None => crate::device::describe(setup.device),
        },
        config_summary: format!(
            "{} on {}, {} poisons of class {}, targets {:?} (class {}) -> class {}, {}",
            config.surrogate.net.name(),
            setup.data.name,
            crafter.plan.poison_indices.len(),
            crafter.plan.poison_class,
            crafter.plan.target_ids,
            crafter.plan.target_class,
            crafter.plan.adv_class,
            match crafter.plan.recipe {
                crate::config::CraftRecipe::Metapoison => format!(
                    "M={} stagger={} K={} fraction={} ({})",
                    crafter.plan.ensemble_size,
                    crafter.plan.stagger,
                    crafter.live.unroll_steps,
                    crafter.plan.meta_batch_fraction,
                    if crafter.plan.grouped_surrogates {
                        "grouped".to_string()
                    } else {
                        format!("{} at once", crafter.plan.parallel_surrogates)
                    }
                ),
                crate::config::CraftRecipe::GradientMatching => format!(
                    "gradient matching: {} surrogate(s), {} restarts",
                    crafter.plan.ensemble_size, config.matching.restarts
                ),
            }
        ),
        resumed_at,
        class_names: setup.data.class_names.clone(),
        plan: (&crafter.plan).into(),
        live: crafter.live.clone(),
        steps: config.craft.steps(),
    });
    let mut session = Session {
        events_sent: crafter.events.len(),
        crafter,
        setup: &setup,
        out,
        paused: false,
        latest_export: None,
        evaluating: Arc::new(AtomicBool::new(false)),
        checkpoint_due: false,
        deferred: Vec::new(),
        fresh_checkpoint: false,
    };
    for note in session.crafter.plan.notes.clone() {
        session.send(Telemetry::Event(Event::new(
            session.crafter.step,
            EventKind::Auto,
            note,
        )));
    }
    let several = setup.ranks.several();
    if resumed_at.is_none() {
        if setup.ranks.is_root() {
            let path = setup.run_dir.join("config.toml");
            std::fs::write(&path, config.to_toml())
                .map_err(crate::base::fs::failed("write", &path))?;
        }
        let m = session.crafter.plan.ensemble_size;
        let stop = setup.stop.clone();
        let tx = out.clone();
        let started = std::time::Instant::now();
        let completed = session.crafter.pretrain(|s, epoch, epochs| {
            if epoch <= 1 {
                let _ = tx.send(Telemetry::Phase(Phase::Pretraining {
                    surrogate: s + 1,
                    of: m,
                }));
            }
            let _ = tx.send(Telemetry::PretrainProgress {
                surrogate: s + 1,
                of: m,
                epoch,
                epochs,
            });
            // With several ranks a signal waits for the first step boundary, where all of
            // them stop together: one alone leaving would leave the others waiting.
            several || !stop.load(Ordering::SeqCst)
        });
        if !completed {
            session.event(
                EventKind::Signal,
                "stopped during pretraining; nothing crafted yet".into(),
            );
            return Ok(());
        }
        session.crafter.pretrain_seconds = started.elapsed().as_secs_f64();
        session.checkpoint_now()?;
    } else {
        session.event(
            EventKind::Resume,
            format!("resumed from checkpoint at step {}", session.crafter.step),
        );
    }
    session.send(Telemetry::Phase(Phase::Crafting));
    let every = config.run.checkpoint_every;
    while !session.crafter.finished() {
        // Rank 0 takes the commands (the others have no controller); all ranks then agree.
        let go_on = if setup.ranks.is_root() {
            session.handle_commands(&rx)?
        } else {
            true
        };
        if !session.boundary(go_on)? {
            return Ok(());
        }
        let stop = setup.stop.clone();
        // With several ranks a step is never cut short (the others would wait for this
        // rank's share): a signal takes effect at the next boundary.
        let Some(report) = session
            .crafter
            .craft_step(&|| !several && stop.load(Ordering::SeqCst))
        else {
            continue; // cancelled: handle_commands checkpoints and stops
        };
        tracing::info!(
            "step {}/{}: adv loss {:?}, linf {:.2}, {:.1}s",
            report.step + 1,
            report.steps,
            report.adv_loss,
            report.norms.linf,
            report.seconds
        );
        session.send(Telemetry::Step(report));
        session.flush_events();
        if several && session.crafter.step == RANK_CHECK_EVERY {
            session.crafter.inject_divergence_for_tests();
        }
        if session.crafter.nonfinite_in_row >= config.run.max_nonfinite_steps {
            session.checkpoint_now()?;
            return Err(EngineError::NonFinite {
                steps: session.crafter.nonfinite_in_row,
                run_dir: setup.run_dir.clone(),
            });
        }
        if every > 0 && session.crafter.step % every == 0 && !session.crafter.finished() {
            session.checkpoint_now()?;
        }
    }
    session.checkpoint_now()?;
    drop(intra_op);
    session.send(Telemetry::Phase(Phase::Done));
    session.send(Telemetry::Finished {
        steps_done: session.crafter.step,
        run_dir: setup.run_dir.display().to_string(),
    });
    if setup.linger {
        session.serve_finished(&rx)?;
    }
    Ok(())
}
