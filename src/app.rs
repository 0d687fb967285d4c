//! What the command line, campaigns and the dashboard share to run things: starting the
//! engine, resolving the device, signals, progress lines, the victims' protocol and flags,
//! target ranking and results.csv. `cli` only parses and dispatches.

use crate::base::fmt::format_duration;
use crate::config::Config;
use crate::device::DeviceChoice;
use crate::engine::protocol::Telemetry;
use crate::engine::{self, EngineSetup};
use crate::paths::{timestamp, Paths};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Set (to "1") in the environment of a run started by `craft --detach`: it ignores SIGHUP.
pub const DETACHED_ENV: &str = "METAPOISON_DETACHED";

/// SIGINT, SIGTERM and SIGHUP set `stop` (the engine checkpoints and stops). A second SIGINT
/// or SIGTERM while the first is being handled ends the process at once (an impatient user);
/// SIGHUP never does, because a dropped SSH session often delivers it twice. A detached run
/// leaves SIGHUP ignored (its starter ignored it before the exec): it belongs to no terminal.
pub fn watch_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
    }
    let detached = std::env::var_os(DETACHED_ENV).is_some_and(|v| v == "1");
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        if sig == SIGHUP && detached {
            continue;
        }
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(())
}

/// What a run's process offers besides crafting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hosting {
    /// Serve exports and evaluations after the last step (see `EngineSetup::linger`).
    pub linger: bool,
    /// Accept viewers over the run's socket (`metapoison attach`).
    pub serve: bool,
    /// With both: leave once no viewer has been attached this long after the last step.
    pub linger_idle: Option<std::time::Duration>,
}

/// How long a detached run that has finished waits for a viewer before it leaves.
pub const DETACHED_LINGER: std::time::Duration = std::time::Duration::from_secs(600);

/// Validates `config`, loads its data and starts the engine thread on it.
pub fn spawn_engine(
    config: Config,
    run_dir: PathBuf,
    resume: bool,
    stop: Arc<AtomicBool>,
    hosting: Hosting,
    ranks: crate::ranks::Ranks,
) -> Result<engine::EngineHandle> {
    config.validate()?;
    let mut device = resolve_device(&config)?;
    if let (true, tch::Device::Cuda(_)) = (ranks.several(), device) {
        // Each rank of a machine takes its own GPU (round robin when there are fewer).
        let count = tch::Cuda::device_count().max(1) as usize;
        device = tch::Device::Cuda(crate::ranks::local_rank() % count);
    }
    // The engine settles the config's `auto` fields itself (and reports them); the data it
    // crafts on must be loaded with the same choices.
    let mut settled = config.clone();
    settled.settle(device.is_cuda());
    let data = crate::data::load(&settled.data)?;
    tracing::info!("crafting into {} on {device:?}", run_dir.display());
    Ok(engine::spawn(EngineSetup {
        config,
        data,
        device,
        kind: tch::Kind::Float,
        run_dir,
        resume,
        stop,
        linger: hosting.linger,
        serve: hosting.serve,
        linger_idle: hosting.linger_idle,
        ranks,
    }))
}

pub fn progress_line(t: &Telemetry) {
    if let Some(line) = progress_text(t) {
        let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
    }
}

/// The one-line progress text of a pretraining epoch or a craft step (None for the rest).
pub fn progress_text(t: &Telemetry) -> Option<String> {
    Some(match t {
        Telemetry::PretrainProgress {
            surrogate,
            of,
            epoch,
            epochs,
        } => {
            format!("pretraining surrogate {surrogate}/{of}: epoch {epoch}/{epochs}")
        }
        Telemetry::Step(r) => format!(
            "step {}/{}  adv loss {}  linf {:.1}  {:.1}s/step  ETA {}",
            r.step + 1,
            r.steps,
            r.adv_loss
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.norms.linf,
            r.seconds,
            format_duration(r.eta_seconds)
        ),
        _ => return None,
    })
}

/// Trains `victims` clean victims (the config's protocol) and ranks the target class's test
/// images; also returns the resolved plan and the data set's class names.
pub fn rank_targets(
    config: &Config,
    victims: usize,
) -> Result<(
    crate::victim::targets::Suggestion,
    crate::craft::plan::Plan,
    Vec<String>,
)> {
    use crate::victim::{targets, VictimTraining};
    let device = resolve_device(config)?;
    let mut config = config.clone();
    for note in config.settle(device.is_cuda()) {
        tracing::info!("{note}");
    }
    let data = crate::data::load(&config.data)?;
    let plan = crate::craft::plan::Plan::resolve(&config, &data)?;
    let spec = VictimTraining::from_config(&config.victim);
    eprintln!(
        "training {victims} clean {} victim(s) for {} epochs on {} images of {}",
        spec.net.name(),
        spec.epochs,
        data.train.len(),
        data.name
    );
    let s = targets::suggest(
        &data,
        &spec,
        (plan.target_class, plan.adv_class),
        victims,
        config.run.seed,
        device,
        |v, n| eprintln!("victim {v}/{n} trained"),
    );
    Ok((s, plan, data.class_names))
}

/// Victim protocol flags shared by `eval` and `campaign`: each overrides one field of the
/// config's `[victim]` section (the authors' robustness variations are single flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VictimArgs {
    /// Victims per arm (poisoned and control); default victim.trials.
    #[arg(long)]
    pub trials: Option<usize>,
    /// Victim architecture (default victim.net): convnet-bn, resnet20, resnet18, vgg11, vgg13.
    #[arg(long)]
    pub victim_net: Option<String>,
    /// Override victim.epochs (a longer schedule: more epochs).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override victim.batch_size (the authors' variation: twice the batch).
    #[arg(long)]
    pub victim_batch: Option<usize>,
    /// Override victim.weight_decay (the authors' variation: 2e-4).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Override victim.lr (the authors' variation: twice the lr).
    #[arg(long)]
    pub victim_lr: Option<f64>,
    /// Train victims with crop + flip augmentation.
    #[arg(long)]
    pub augment: bool,
    /// Victim training recipe: `crafter` (the [victim] protocol: plain SGD, as the surrogates
    /// train) or `standard` (SGD with Nesterov momentum 0.9, weight decay 5e-4, a one-cycle
    /// schedule; the same epochs, batch and augmentation). The flags below apply on top.
    #[arg(long)]
    pub recipe: Option<crate::config::Recipe>,
    /// Override victim.momentum (SGD momentum, 0 = plain SGD).
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Nesterov momentum (victim.nesterov).
    #[arg(long)]
    pub nesterov: bool,
    /// Override victim.schedule: `step` (warm-up, then x0.1 at victim.lr_drops) or
    /// `one-cycle`.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Keep only the first N poisons (the others revert to clean images).
    #[arg(long)]
    pub first_poisons: Option<usize>,
    /// Skip the control victims.
    #[arg(long)]
    pub no_control: bool,
    /// Also train as many victims on the poisons' clean images moved by random +-eps noise
    /// (the same budget spent at random): the "noise" arm.
    #[arg(long)]
    pub noise_control: bool,
    /// Keep trained victims in DIR and reuse any whose training split, protocol and seed
    /// match (a campaign keeps them in CAMPAIGN_DIR/victims, so its control victims are
    /// trained once for all targets).
    #[arg(long, value_name = "DIR")]
    pub victim_cache: Option<PathBuf>,
}

impl VictimArgs {
    /// The flags given that choose the victims or their training (all but --victim-cache).
    pub fn flags_given(&self) -> Vec<&'static str> {
        [
            (self.trials.is_some(), "--trials"),
            (self.victim_net.is_some(), "--victim-net"),
            (self.epochs.is_some(), "--epochs"),
            (self.victim_batch.is_some(), "--victim-batch"),
            (self.weight_decay.is_some(), "--weight-decay"),
            (self.victim_lr.is_some(), "--victim-lr"),
            (self.augment, "--augment"),
            (self.recipe.is_some(), "--recipe"),
            (self.momentum.is_some(), "--momentum"),
            (self.nesterov, "--nesterov"),
            (self.schedule.is_some(), "--schedule"),
            (self.first_poisons.is_some(), "--first-poisons"),
            (self.no_control, "--no-control"),
            (self.noise_control, "--noise-control"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }

    /// The evaluation plan: `base` (the victim protocol) with these flags applied.
    pub fn plan(
        &self,
        mut victim: crate::config::VictimConfig,
        save_weights: bool,
    ) -> Result<crate::victim::eval::EvalPlan> {
        if let Some(recipe) = self.recipe {
            victim = recipe.apply(victim);
        }
        if let Some(m) = self.momentum {
            if !(m.is_finite() && (0.0..1.0).contains(&m)) {
                bail!("--momentum {m} must be a number in [0, 1)");
            }
            victim.momentum = m;
        }
        if self.nesterov {
            victim.nesterov = true;
        }
        if victim.nesterov && victim.momentum == 0.0 {
            bail!("--nesterov needs a momentum above 0 (--momentum 0.9)");
        }
        if let Some(name) = &self.schedule {
            victim.schedule = toml::Value::String(name.clone())
                .try_into()
                .map_err(|_| anyhow::anyhow!("--schedule {name}: use step or one-cycle"))?;
        }
        if let Some(n) = &self.victim_net {
            victim.net = toml::Value::String(n.clone()).try_into().map_err(|_| {
                anyhow::anyhow!(
                    "--victim-net {n}: use convnet-bn, resnet20, resnet18, vgg11 or vgg13"
                )
            })?;
        }
        if let Some(e) = self.epochs {
            victim.epochs = e.into();
        }
        if let Some(b) = self.victim_batch {
            victim.batch_size = b;
        }
        if let Some(w) = self.weight_decay {
            if !(w >= 0.0 && w.is_finite()) {
                bail!("--weight-decay {w} must be a finite number >= 0");
            }
            victim.weight_decay = w;
        }
        if let Some(lr) = self.victim_lr {
            victim.lr = lr;
        }
        if self.augment {
            victim.augment = true;
        }
        let trials = self.trials.unwrap_or(victim.trials);
        if trials == 0 || victim.epochs() == 0 || victim.batch_size == 0 {
            bail!("--trials, --epochs and --victim-batch must be at least 1");
        }
        if !(victim.lr > 0.0 && victim.lr.is_finite()) {
            bail!("--victim-lr {} must be a positive number", victim.lr);
        }
        if self.first_poisons == Some(0) {
            bail!("--first-poisons must be at least 1");
        }
        Ok(crate::victim::eval::EvalPlan {
            victim,
            trials,
            control: !self.no_control,
            noise_control: self.noise_control,
            save_weights,
            first_poisons: self.first_poisons,
            grouped: None,
            victim_cache: self.victim_cache.clone(),
        })
    }
}

/// The victim protocol an evaluation starts from: the config given on the command line (or the
/// default file) when there is one, else the export's own.
pub fn victim_protocol(config: &Config, export_dir: &Path) -> crate::config::VictimConfig {
    if config != &Config::default() {
        return config.victim.clone();
    }
    std::fs::read_to_string(export_dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<crate::export::Manifest>(&t).ok())
        .map(|m| m.config.victim)
        .unwrap_or_else(|| config.victim.clone())
}

/// The printed summary of one evaluation.
pub fn report_table(report: &crate::victim::eval::EvalReport, control: bool) -> String {
    let targets = report.adversarial.len().max(1);
    let row_line = |name: &str, a: &crate::victim::eval::ArmSummary| {
        format!(
            "{name:<9} {:>6} {:>9.1}% [{:>5.1}%, {:>5.1}%] {:>9.2}% +- {:.2} {:>10}\n",
            a.trials,
            a.success_rate * 100.0,
            a.success_ci95.0 * 100.0,
            a.success_ci95.1 * 100.0,
            a.accuracy_mean * 100.0,
            a.accuracy_std * 100.0,
            format!("{}/{}", a.train_mode_successes, a.trials * targets)
        )
    };
    let recipe = report.protocol.as_ref().map_or("", |p| p.recipe_name());
    let mut out = format!(
        "{} victims ({}, {recipe} recipe, {} epochs, {} poisons) on {}\narm       trials   success [95% Wilson]      clean accuracy   train mode\n",
        report.setting, report.victim_net, report.epochs, report.poisons_used, report.export
    );
    out += &row_line("poisoned", &report.poisoned);
    if control {
        out += &row_line("control", &report.control);
    }
    if let Some(noise) = &report.noise {
        out += &row_line("noise", noise);
    }
    // How far the poisons moved the target, victim by victim against its control twin.
    let interval = |shifts: Vec<(u64, f64)>| {
        let d: Vec<f64> = shifts.into_iter().map(|(_, d)| d).collect();
        match crate::victim::eval::t_interval95(&d) {
            Some((m, (lo, hi))) => format!("{m:+.2} [{lo:+.2}, {hi:+.2}]"),
            None if d.len() == 1 => format!("{:+.2}", d[0]),
            None => "-".into(),
        }
    };
    if control {
        out += &format!(
            "margin shift (the target's adversarial margin minus its control twin's, logits, 95% t over victims): poisoned {}",
            interval(report.seeded_margin_shifts("poisoned"))
        );
        if report.noise.is_some() {
            out += &format!(", noise {}", interval(report.seeded_margin_shifts("noise")));
        }
        let class = report.seeded_class_shifts("poisoned");
        if !class.is_empty() {
            out += &format!("; the target's class, poisoned {}", interval(class));
        }
        out += "\n";
    }
    out
}

/// Appends one row per evaluation to DATA_DIR/results.csv (header on creation).
pub fn append_results_row(
    paths: &Paths,
    report: &crate::victim::eval::EvalReport,
) -> Result<PathBuf> {
    let csv = paths.data_dir.join("results.csv");
    std::fs::create_dir_all(&paths.data_dir)
        .with_context(|| format!("cannot create {}", paths.data_dir.display()))?;
    let new = !csv.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&csv)
        .with_context(|| format!("cannot open {}", csv.display()))?;
    if new {
        writeln!(f, "time,export,setting,victim_net,epochs,trials,success_rate,ci_low,ci_high,accuracy_mean,control_success_rate,control_accuracy_mean,poisons_used")?;
    }
    let a = &report.poisoned;
    writeln!(
        f,
        "{},{},{},{},{},{},{},{},{},{},{},{},{}",
        timestamp(),
        report.export,
        report.setting,
        report.victim_net,
        report.epochs,
        a.trials,
        a.success_rate,
        a.success_ci95.0,
        a.success_ci95.1,
        a.accuracy_mean,
        report.control.success_rate,
        report.control.accuracy_mean,
        report.poisons_used
    )
    .with_context(|| format!("cannot write {}", csv.display()))?;
    Ok(csv)
}

/// The libtorch device `run.device` names, with `run.threads` applied.
pub fn resolve_device(config: &Config) -> Result<tch::Device> {
    let device = config.run.device.parse::<DeviceChoice>()?.resolve()?;
    if config.run.threads > 0 {
        tch::set_num_threads(config.run.threads as i32);
    }
    crate::device::tune(device);
    Ok(device)
}

/// One run folder as `metapoison runs` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub dir: PathBuf,
    /// The status file's state, "stale" for a working state whose process is gone, or
    /// "no status" for a run from before status files.
    pub state: String,
    pub status: Option<crate::engine::status::RunStatus>,
}

/// The run folders under `root` (a run folder is one holding a status file or a checkpoint),
/// up to three levels down, so that a campaign's `target-ID/run` folders are found too.
pub fn list_runs(root: &Path) -> Result<Vec<RunRow>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let is_run = dir.join(crate::engine::status::FILE_NAME).exists()
            || dir.join(crate::craft::checkpoint::FILE_NAME).exists();
        if is_run {
            out.push(dir.to_path_buf());
            return;
        }
        if depth == 0 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            walk(&d, depth - 1, out);
        }
    }
    if !root.is_dir() {
        bail!("{} is not a folder of runs", root.display());
    }
    let mut dirs = Vec::new();
    walk(root, 3, &mut dirs);
    let mut rows = Vec::new();
    for dir in dirs {
        let status = crate::engine::status::read(&dir)?;
        let state = match &status {
            None => "no status".to_string(),
            Some(s) if s.state.active() && !crate::engine::status::process_alive(s.pid) => {
                "stale".to_string()
            }
            Some(s) => s.state.name().to_string(),
        };
        rows.push(RunRow { dir, state, status });
    }
    Ok(rows)
}

/// The runs table: folder (relative to `root`), state, step, ETA, device, pid, and whether
/// `attach` can open it now.
pub fn runs_table(root: &Path, rows: &[RunRow]) -> String {
    let mut out = format!(
        "{:<44} {:<12} {:>9} {:>8}  {:<28} {:>8}  {}\n",
        "RUN", "STATE", "STEP", "ETA", "DEVICE", "PID", "ATTACH"
    );
    for r in rows {
        let name = r
            .dir
            .strip_prefix(root)
            .unwrap_or(&r.dir)
            .display()
            .to_string();
        let name = if name.is_empty() {
            ".".to_string()
        } else {
            name
        };
        let attach = match &r.status {
            Some(s) if s.socket.is_some() && crate::engine::status::process_alive(s.pid) => "yes",
            _ => "-",
        };
        let (step, eta, device, pid) = match &r.status {
            Some(s) => (
                format!("{}/{}", s.step, s.steps),
                s.eta_seconds
                    .filter(|_| r.state != "stale")
                    .map(format_duration)
                    .unwrap_or_else(|| "-".into()),
                s.device.clone(),
                s.pid.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{name:<44} {:<12} {step:>9} {eta:>8}  {device:<28} {pid:>8}  {attach}\n",
            r.state
        ));
    }
    out
}

/// Asks the run in `dir` to checkpoint and stop (SIGTERM to its process, which checkpoints at
/// the step boundary), and waits up to `wait` for it to say it stopped.
pub fn stop_run(dir: &Path, wait: std::time::Duration) -> Result<crate::engine::status::RunStatus> {
    use crate::engine::status::{process_alive, read};
    let Some(status) = read(dir)? else {
        bail!(
            "{} has no status file: not a run folder, or a run from before status files",
            dir.display()
        );
    };
    // A finished run whose process still serves viewers is stopped like a running one.
    let lingering = status.state == crate::engine::status::RunState::Finished
        && status.socket.is_some()
        && process_alive(status.pid);
    if !status.state.active() && !lingering {
        bail!(
            "the run in {} is not running (state: {})",
            dir.display(),
            status.state.name()
        );
    }
    if !process_alive(status.pid) {
        bail!(
            "the run in {} says {} but its process {} is gone: continue it with `metapoison craft --resume {}`",
            dir.display(),
            status.state.name(),
            status.pid,
            dir.display()
        );
    }
    let pid = libc::pid_t::try_from(status.pid).context("process id out of range")?;
    // SAFETY: a plain signal to a process this user started (its status file says so).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal process {}: {}",
            status.pid,
            std::io::Error::last_os_error()
        );
    }
    let started = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = read(dir)?.unwrap_or(status.clone());
        if !process_alive(status.pid) || (!lingering && !now.state.active()) {
            return Ok(now);
        }
        if started.elapsed() > wait {
            bail!(
                "asked process {} to stop; it has not within {} s (it checkpoints at the end of the current craft step): see `metapoison runs`",
                status.pid,
                wait.as_secs()
            );
        }
    }
}

/// The socket of the run in `dir` (or, without one, of the most recently updated run under
/// `runs_root` that has a live process), checked: the process lives and the socket exists.
/// A socket whose process is gone is removed, and said so.
pub fn attachable_run(dir: Option<&Path>, runs_root: &Path) -> Result<(PathBuf, PathBuf)> {
    use crate::engine::status::{process_alive, read};
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let rows = if runs_root.is_dir() {
                list_runs(runs_root)?
            } else {
                Vec::new()
            };
            rows.into_iter()
                .filter_map(|r| r.status.map(|s| (r.dir, s)))
                .filter(|(_, s)| s.socket.is_some() && process_alive(s.pid))
                .max_by(|a, b| a.1.updated.total_cmp(&b.1.updated))
                .map(|(d, _)| d)
                .with_context(|| {
                    format!(
                        "no run to attach to under {}: start one with `metapoison` or `metapoison craft --detach`, or name its folder",
                        runs_root.display()
                    )
                })?
        }
    };
    let Some(status) = read(&dir)? else {
        bail!(
            "{} has no status file: not a run folder, or a run from before status files",
            dir.display()
        );
    };
    if !status.state.active() && status.state != crate::engine::status::RunState::Finished
        || status.state == crate::engine::status::RunState::Finished && status.socket.is_none()
    {
        bail!(
            "the run in {} has ended ({} at step {}/{}): continue it with `metapoison craft --detach --resume {}`, or export it",
            dir.display(),
            status.state.name(),
            status.step,
            status.steps,
            dir.display()
        );
    }
    let Some(socket) = status.socket.clone() else {
        bail!(
            "the run in {} does not accept viewers (started by `campaign`, by an older build, or its socket could not be made: see its craft.log or the log folder)",
            dir.display()
        );
    };
    if !process_alive(status.pid) {
        let removed = std::fs::remove_file(&socket).is_ok();
        bail!(
            "the run in {} is not running: its process {} is gone{}; continue it with `metapoison craft --detach --resume {}`",
            dir.display(),
            status.pid,
            if removed { " (its stale socket is removed)" } else { "" },
            dir.display()
        );
    }
    if !socket.exists() {
        bail!(
            "the run in {} (process {}) has no socket at {}: it is ending, or the file was removed; stop it with `metapoison stop {}`",
            dir.display(),
            status.pid,
            socket.display(),
            dir.display()
        );
    }
    Ok((dir, socket))
}
