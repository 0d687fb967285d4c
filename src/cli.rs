//! The command line. Errors reach the user as one line (anyhow context chains joined).

use crate::app::{
    append_results_row, progress_line, rank_targets, report_table, resolve_device, spawn_engine,
    victim_protocol, watch_signals, VictimArgs,
};
use crate::base::fmt::format_duration;
use crate::config::Config;
use crate::engine;
use crate::engine::protocol::{Phase, Telemetry};
use crate::paths::{timestamp, Paths};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");

fn long_version() -> String {
    format!(
        "{}\nlibtorch {} (tch 0.24)\nCUDA available: {} ({} device(s))",
        env!("CARGO_PKG_VERSION"),
        crate::device::libtorch_version(),
        tch::Cuda::is_available(),
        tch::Cuda::device_count()
    )
}

#[derive(Parser)]
#[command(
    name = "metapoison",
    about = "Clean-label data poisoning with MetaPoison on libtorch",
    disable_version_flag = true
)]
pub struct Cli {
    /// Print the version, the libtorch version and whether CUDA is available.
    #[arg(short = 'V', long)]
    version: bool,
    /// No dashboard: JSON lines on stdout even on a terminal (as `craft`).
    #[arg(long, global = true)]
    headless: bool,
    /// Config file (default: the config dir's config.toml when present, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Folder for logs and runs (default: the platform data dir, e.g. ~/.local/share/metapoison).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Craft poisons headless: one JSON object per line on stdout (craft steps and events),
    /// a progress line on stderr when it is a terminal. Ctrl-c / SIGTERM / SIGHUP checkpoint and stop.
    Craft {
        #[command(flatten)]
        run: RunArgs,
        /// Start the run as a process of its own (a new session: it survives the terminal and
        /// the SSH link), print its folder and return. Its JSON lines go to
        /// RUN_DIR/telemetry.jsonl, its messages to RUN_DIR/craft.log; `metapoison runs` shows
        /// it, `metapoison stop RUN_DIR` stops it.
        #[arg(long)]
        detach: bool,
        /// A detached run that has finished waits this many seconds with no viewer attached
        /// before it leaves (its exports and evaluations stay available meanwhile).
        #[arg(long, hide = true, default_value_t = crate::app::DETACHED_LINGER.as_secs())]
        linger_idle: u64,
    },
    /// The live dashboard over a crafting run (the default command on a terminal): the run
    /// crafts in a process of its own, and the dashboard attaches to it, so that a closed
    /// terminal or a dropped SSH link only ends the view. Without a terminal it falls back to
    /// the headless mode of `craft`.
    Tui {
        #[command(flatten)]
        run: RunArgs,
        /// Craft inside the dashboard's own process (the run stops, with a checkpoint, when
        /// the dashboard quits or its terminal goes away).
        #[arg(long, conflicts_with = "replay")]
        foreground: bool,
        /// Play back a recorded telemetry file (the JSON lines of `craft`) instead of crafting.
        #[arg(long, conflicts_with = "resume")]
        replay: Option<PathBuf>,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Export a run's poisons (and the poisoned data set) into a folder other tools read, or
    /// with --verify re-check such a folder.
    Export {
        /// The run folder (or, with --verify, the export folder).
        dir: PathBuf,
        /// Re-check an export: hashes, shapes, labels, bounds. Exit code 1 when anything is off.
        #[arg(long)]
        verify: bool,
        /// Craft step to export (one that was checkpointed); default the latest.
        #[arg(long)]
        step: Option<usize>,
        /// Destination folder (default RUN_DIR/export-step-NNNN).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Comma-separated parts besides poisons.npz and the manifest: npz, native, png, curves, or all.
        #[arg(long, default_value = "all")]
        format: String,
        /// Replace an existing export folder.
        #[arg(long)]
        force: bool,
    },
    /// Train victims from scratch on an export's poisoned training split, and control victims
    /// on the clean split; report target success (95% Wilson interval) and clean accuracy.
    Eval {
        /// An export folder (see `export`).
        dir: PathBuf,
        #[command(flatten)]
        victim: VictimArgs,
        /// Save each victim's weights (safetensors) into DIR/victims/.
        #[arg(long)]
        save_weights: bool,
    },
    /// Craft and evaluate one run per target id (chosen with `targets suggest` unless given),
    /// and report the success rate over targets. Re-running with the same --dir resumes.
    Campaign(crate::campaign::CampaignArgs),
    /// Compare two campaigns (two settings judged on the same targets) by how far their
    /// poisons move each target toward the adversarial class, victims paired by seed, with a
    /// 95% interval: finer than counting flips when few victims flip. Several campaigns after
    /// the first give one sweep table, each against the first.
    Compare {
        /// The campaign to compare against (a folder, or its campaign.json).
        first: PathBuf,
        /// The campaign or campaigns compared with it.
        #[arg(required = true)]
        others: Vec<PathBuf>,
        /// JSON instead of Markdown: one line per campaign compared, a list of comparisons.
        #[arg(long)]
        json: bool,
    },
    /// Target selection.
    Targets {
        #[command(subcommand)]
        action: TargetsCmd,
    },
    /// Data sets.
    Data {
        #[command(subcommand)]
        action: DataCmd,
    },
    /// List runs with their state (crafting, paused, finished, stopped, failed, or stale when
    /// the process is gone), step, ETA, device and process id.
    Runs {
        /// A folder of runs (default: DATA_DIR/runs); campaign folders work too.
        dir: Option<PathBuf>,
    },
    /// Open the dashboard on a run crafting in another process (started by `metapoison` or
    /// `craft --detach`): its history first, then live. Quitting detaches; the run goes on.
    Attach {
        /// The run folder (default: the most recently active run under DATA_DIR/runs).
        dir: Option<PathBuf>,
        /// No dashboard: the run's telemetry as JSON lines on stdout (history first), and
        /// commands read as JSON lines from stdin (e.g. {"command":"pause"}).
        #[arg(long)]
        json: bool,
    },
    /// Ask a running run to checkpoint at the end of its current step and stop.
    Stop {
        /// The run folder.
        dir: PathBuf,
        /// Seconds to wait for it to stop.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Time one craft step side by side with a PyTorch-eager reference of the same maths (after
    /// checking both give the same float64 meta-gradient); or, with --gradcheck, check the
    /// meta-gradient against finite differences on the chosen device.
    Bench(crate::bench::command::BenchArgs),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate a config file.
    Check { file: PathBuf },
    /// Print the effective config (file given by --config, or the default one, or defaults),
    /// and as comments what its `auto` fields become on this machine.
    Show,
    /// Write the documented example config to the config dir (never overwrites).
    Init,
}

#[derive(Subcommand)]
enum TargetsCmd {
    /// Train clean victims (the config's victim protocol) and rank the target class's test
    /// images: always correctly classified first, then closest to the adversarial class.
    Suggest {
        /// Clean victims to train.
        #[arg(long, default_value_t = 2)]
        victims: usize,
        /// Override victim.epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// How many candidates to print.
        #[arg(long, default_value_t = 15)]
        top: usize,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Sizes, classes and per-class counts of the configured data set.
    Info,
}

fn load_config(cli_config: Option<&Path>, paths: &Paths) -> Result<Config> {
    match cli_config {
        Some(p) => Ok(Config::load(p)?),
        None if paths.config_file.exists() => Ok(Config::load(&paths.config_file)?),
        None => Ok(Config::default()),
    }
}

fn init_logging(paths: &Paths) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let dir = paths.log_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let appender = tracing_appender::rolling::never(&dir, "metapoison.log");
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let filter = tracing_subscriber::EnvFilter::try_from_env("METAPOISON_LOG")
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .ok()?;
    Some(guard)
}

pub fn main() -> std::process::ExitCode {
    crate::device::tune_host_allocator();
    crate::failure::install_panic_hook();
    let cli = Cli::parse();
    // libtorch's errors arrive as panics: reported as one line like every other error.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)))
        .unwrap_or_else(|payload| Err(anyhow::anyhow!(crate::failure::message(&*payload))));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = crate::failure::one_line(&e);
            tracing::error!("{msg}");
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.version {
        println!("metapoison {}", long_version());
        return Ok(());
    }
    let paths = Paths::new(cli.data_dir.clone());
    let command = cli.command.unwrap_or(Cmd::Tui {
        run: RunArgs::default(),
        foreground: false,
        replay: None,
    });
    match command {
        Cmd::Config { action } => match action {
            ConfigCmd::Check { file } => {
                Config::load(&file)?;
                println!("{}: ok", file.display());
            }
            ConfigCmd::Show => {
                let config = load_config(cli.config.as_deref(), &paths)?;
                print!("{}", config.to_toml());
                // What the `auto` fields would become for a run started here, as comments so
                // that the output stays a valid config file.
                let on_gpu = resolve_device(&config)?.is_cuda();
                for note in config.clone().settle(on_gpu) {
                    println!("# {note}");
                }
            }
            ConfigCmd::Init => {
                let target = &paths.config_file;
                if target.exists() {
                    bail!(
                        "{} already exists; not overwritten (edit it, or remove it first)",
                        target.display()
                    );
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                std::fs::write(target, EXAMPLE_CONFIG)
                    .with_context(|| format!("cannot write {}", target.display()))?;
                println!("wrote {}", target.display());
            }
        },
        Cmd::Runs { dir } => {
            let root = dir.unwrap_or_else(|| paths.runs_dir());
            let rows = crate::app::list_runs(&root)?;
            if rows.is_empty() {
                println!("no runs in {}", root.display());
            } else {
                print!("{}", crate::app::runs_table(&root, &rows));
            }
        }
        Cmd::Stop { dir, wait } => {
            let s = crate::app::stop_run(&dir, std::time::Duration::from_secs(wait))?;
            println!(
                "{}: {} at step {}/{}",
                dir.display(),
                s.state.name(),
                s.step,
                s.steps
            );
        }
        Cmd::Bench(args) => {
            crate::bench::command::run(args, &load_config(cli.config.as_deref(), &paths)?)?
        }
        Cmd::Data {
            action: DataCmd::Info,
        } => {
            let mut config = load_config(cli.config.as_deref(), &paths)?;
            // What a run on this machine would train on (`data.train_limit` may be auto).
            config.settle(resolve_device(&config)?.is_cuda());
            let data = crate::data::load(&config.data)?;
            print!("{}", data.summary());
            match config.data.train_limit() {
                0 => println!("subset   none: the whole training split (data.train_limit 0)"),
                n => println!(
                    "subset   data.train_limit {n}, data.subset {:?} (as a run on this machine)",
                    config.data.subset()
                ),
            }
        }
        Cmd::Export {
            dir,
            verify,
            step,
            out,
            format,
            force,
        } => {
            if verify {
                let v = crate::export::verify::verify(&dir)?;
                println!("{}", v.summary);
                for p in &v.problems {
                    println!("problem: {p}");
                }
                if !v.problems.is_empty() {
                    bail!(
                        "{} does not verify ({} problem(s))",
                        dir.display(),
                        v.problems.len()
                    );
                }
            } else {
                let formats = crate::export::Formats::parse(&format)?;
                let req = crate::export::ExportRequest {
                    run_dir: dir,
                    step,
                    out,
                    formats,
                    force,
                };
                let folder = crate::export::export(&req)?;
                println!("{}", folder.display());
            }
        }
        Cmd::Eval {
            dir,
            victim,
            save_weights,
        } => {
            let _log = init_logging(&paths);
            let config = load_config(cli.config.as_deref(), &paths)?;
            evaluate(&config, &paths, &dir, &victim, save_weights)?;
        }
        Cmd::Campaign(args) => {
            let _log = init_logging(&paths);
            let config = load_config(cli.config.as_deref(), &paths)?;
            crate::campaign::run(config, &paths, args, cli.headless)?;
        }
        Cmd::Compare {
            first,
            others,
            json,
        } => crate::campaign::compare_folders(&first, &others, json)?,
        Cmd::Targets {
            action:
                TargetsCmd::Suggest {
                    victims,
                    epochs,
                    top,
                },
        } => {
            let _log = init_logging(&paths);
            let mut config = load_config(cli.config.as_deref(), &paths)?;
            if let Some(e) = epochs {
                config.victim.epochs = e.into();
            }
            config.validate()?;
            anyhow::ensure!(
                victims >= 1 && top >= 1,
                "--victims and --top must be at least 1"
            );
            suggest_targets(&config, victims, top)?;
        }
        Cmd::Craft {
            run,
            detach: true,
            linger_idle,
        } => {
            let run_dir = detach_craft(cli.config.as_deref(), &paths, run, linger_idle)?;
            println!("{}", run_dir.display());
            eprintln!(
                "crafting in the background: `metapoison attach {0}` shows it, `metapoison stop {0}` stops it",
                run_dir.display()
            );
        }
        Cmd::Craft {
            run,
            detach: false,
            linger_idle,
        } => {
            let _log = init_logging(&paths);
            craft(cli.config.as_deref(), &paths, run, linger_idle)?;
        }
        Cmd::Attach { dir, json } => {
            let (_, socket) = crate::app::attachable_run(dir.as_deref(), &paths.runs_dir())?;
            if json {
                attach_json(&socket)?;
            } else {
                let _log = init_logging(&paths);
                let keys = load_keys(cli.config.as_deref(), &paths)?;
                attach_dashboard(&socket, keys)?;
            }
        }
        Cmd::Tui {
            run,
            foreground,
            replay,
        } => {
            let _log = init_logging(&paths);
            let idle = crate::app::DETACHED_LINGER.as_secs();
            if cli.headless && replay.is_none() {
                craft(cli.config.as_deref(), &paths, run, idle)?;
            } else {
                tui(cli.config.as_deref(), &paths, run, replay, foreground)?;
            }
        }
    }
    Ok(())
}

/// What starts (or resumes) a crafting run, from the command line.
#[derive(clap::Args, Clone, Default, Debug)]
struct RunArgs {
    /// Continue the run in this folder from its checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Folder for this run (default: a new timestamped folder under DATA_DIR/runs).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Override run.device (auto, cpu, cuda:N).
    #[arg(long)]
    device: Option<String>,
    /// Override craft.steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Override threat.target_ids: the target ids (indices among the test images of the
    /// target class), comma separated; several ids craft one poison set for all of them.
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    targets: Vec<usize>,
}

/// Loads what a run needs and starts the engine thread; signals set its stop flag.
/// Starts the engine for `craft` or `tui`; `linger` keeps it serving exports and evaluations
/// after the last step (the dashboard's case).
fn start_engine(
    config_path: Option<&Path>,
    paths: &Paths,
    args: RunArgs,
    hosting: crate::app::Hosting,
    ranks: crate::ranks::Ranks,
) -> Result<(engine::EngineHandle, PathBuf)> {
    let RunArgs {
        resume,
        run_dir,
        device,
        steps,
        targets,
    } = args;
    let (mut config, run_dir, resuming) = match resume {
        Some(dir) => {
            let loaded = crate::craft::checkpoint::load(&dir)?;
            (loaded.state.config, dir, true)
        }
        None => {
            let mut config = load_config(config_path, paths)?;
            if !targets.is_empty() {
                config.threat.target_ids = crate::config::Auto::Value(targets);
            }
            let dir = run_dir.unwrap_or_else(|| new_run_dir(&config, paths));
            (config, dir, false)
        }
    };
    if let Some(d) = device {
        config.run.device = d;
    }
    if let Some(s) = steps {
        config.craft.steps = s.into();
    }
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(&stop)?;
    let handle = spawn_engine(config, run_dir.clone(), resuming, stop, hosting, ranks)?;
    Ok((handle, run_dir))
}

/// A new timestamped run folder under `run.output_dir` (default DATA_DIR/runs).
fn new_run_dir(config: &Config, paths: &Paths) -> PathBuf {
    let base = config
        .run
        .output_dir
        .clone()
        .unwrap_or_else(|| paths.runs_dir());
    base.join(format!("{}-{}", timestamp(), config.surrogate.net.name()))
}

/// `craft --detach`: the same `craft` as a process of its own session, its output in the run
/// folder; returns the folder once the run has written its status with its socket (or
/// failed to start).
fn detach_craft(
    config_path: Option<&Path>,
    paths: &Paths,
    args: RunArgs,
    linger_idle: u64,
) -> Result<PathBuf> {
    refuse_ranks("craft --detach")?;
    use std::os::unix::process::CommandExt;
    let run_dir = match (&args.resume, &args.run_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => new_run_dir(&load_config(config_path, paths)?, paths),
    };
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
    let open = |name: &str| {
        let path = run_dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    };
    let (stdout, stderr) = (open("telemetry.jsonl")?, open("craft.log")?);
    let mut child = std::process::Command::new(
        std::env::current_exe().context("cannot find this program's own path")?,
    );
    child.arg("--data-dir").arg(&paths.data_dir);
    if let Some(c) = config_path {
        child.arg("--config").arg(c);
    }
    child
        .arg("craft")
        .args(["--linger-idle", &linger_idle.to_string()]);
    match &args.resume {
        Some(dir) => child.arg("--resume").arg(dir),
        None => child.arg("--run-dir").arg(&run_dir),
    };
    if let Some(d) = &args.device {
        child.args(["--device", d]);
    }
    if let Some(n) = args.steps {
        child.args(["--steps", &n.to_string()]);
    }
    if !args.targets.is_empty() {
        let ids: Vec<String> = args.targets.iter().map(|t| t.to_string()).collect();
        child.args(["--targets", &ids.join(",")]);
    }
    child
        .env(crate::app::DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: setsid and signal are async-signal-safe. The child leaves this terminal's
    // session, so a closed terminal or SSH link sends it no SIGHUP, and ignores any other
    // (the ignored disposition survives the exec; the detached run never installs a handler).
    unsafe {
        child.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut process = child.spawn().context("cannot start the detached run")?;
    let pid = process.id();
    let started = std::time::Instant::now();
    loop {
        if let Some(exit) = process.try_wait()? {
            let log = std::fs::read_to_string(run_dir.join("craft.log")).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!("the detached run ended at once ({exit}): {last}");
        }
        let status = crate::engine::status::read(&run_dir).ok().flatten();
        if status.is_some_and(|s| s.pid == pid) || started.elapsed().as_secs() >= 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(run_dir)
}

/// The headless mode: JSON lines on stdout, a progress line on stderr when it is a terminal.
/// Viewers may attach; a detached run (see `detach_craft`) also waits `linger_idle` seconds
/// for one after its last step.
fn craft(config_path: Option<&Path>, paths: &Paths, args: RunArgs, linger_idle: u64) -> Result<()> {
    let detached = std::env::var_os(crate::app::DETACHED_ENV).is_some_and(|v| v == "1");
    let hosting = crate::app::Hosting {
        linger: detached,
        serve: true,
        linger_idle: Some(std::time::Duration::from_secs(linger_idle)),
    };
    // Under mpirun or srun: this process is one rank of the job (MPI stays up until the
    // guard drops, after the engine has ended).
    let (ranks, _mpi) = crate::ranks::start()?;
    if ranks.several() && args.run_dir.is_none() && args.resume.is_none() {
        bail!(
            "under mpirun every rank must craft into the same folder: give --run-dir (or --resume)"
        );
    }
    let root = ranks.is_root();
    let (handle, run_dir) = start_engine(config_path, paths, args, hosting, ranks)?;
    // Only rank 0 speaks: the others' output would repeat it.
    let progress = root && std::io::stderr().is_terminal();
    let mut stdout = std::io::stdout().lock();
    for t in handle.telemetry.iter() {
        if !root {
            if let Telemetry::Phase(Phase::Failed { .. }) = t {
                break;
            }
            continue;
        }
        if matches!(t, Telemetry::PretrainProgress { .. }) && !progress {
            // Per-epoch pretraining progress is only for the terminal line.
        } else if !matches!(t, Telemetry::Preview(_)) {
            writeln!(stdout, "{}", serde_json::to_string(&t)?)?;
            stdout.flush()?;
        }
        if progress {
            progress_line(&t);
        }
        if let Telemetry::Phase(Phase::Failed { .. }) = t {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    handle.join()?;
    // stderr may be a terminal that went away (SSH drop): never panic on it.
    if root {
        let _ = writeln!(std::io::stderr(), "run folder: {}", run_dir.display());
    }
    Ok(())
}

/// Commands that run one process refuse to be started as MPI ranks.
fn refuse_ranks(what: &str) -> Result<()> {
    if let Some(n) = crate::ranks::launched_size().filter(|&n| n > 1) {
        bail!("{what} does not run as MPI ranks (started as one of {n}): under mpirun use `metapoison craft --run-dir D`, and run mpirun itself in the background (nohup, tmux) to detach");
    }
    Ok(())
}

fn suggest_targets(config: &Config, victims: usize, top: usize) -> Result<()> {
    let (s, plan, class_names) = rank_targets(config, victims)?;
    let acc: Vec<String> = s
        .accuracies
        .iter()
        .map(|a| format!("{:.2}%", a * 100.0))
        .collect();
    println!(
        "clean test accuracy: {}\ntarget class {} ({}), adversarial class {} ({})",
        acc.join(", "),
        plan.target_class,
        class_names[plan.target_class as usize],
        plan.adv_class,
        class_names[plan.adv_class as usize]
    );
    println!(
        "{:>5} {:>10} {:>8} {:>8} {:>10} {:>8}",
        "id", "test_index", "correct", "margin", "min_margin", "p_adv"
    );
    for c in s.candidates.iter().take(top) {
        println!(
            "{:>5} {:>10} {:>8.2} {:>8.3} {:>10.3} {:>8.4}",
            c.id, c.test_index, c.correct, c.margin, c.min_margin, c.p_adv
        );
    }
    Ok(())
}

fn evaluate(
    config: &Config,
    paths: &Paths,
    dir: &Path,
    args: &VictimArgs,
    save_weights: bool,
) -> Result<()> {
    let device = resolve_device(config)?;
    let mut victim = victim_protocol(config, dir);
    victim.settle(device.is_cuda());
    let plan = args.plan(victim, save_weights)?;
    let report = crate::victim::eval::evaluate(dir, &plan, device, |p| {
        let r = p.trial;
        eprintln!(
            "victim {}/{} ({}{}): target -> {:?}, success {:?}, clean accuracy {:.2}%, ETA {}",
            p.done,
            p.total,
            r.arm,
            if r.cached { ", reused" } else { "" },
            r.predicted,
            r.success,
            r.clean_accuracy * 100.0,
            format_duration(p.eta_seconds)
        );
        true
    })?;
    print!("{}", report_table(&report, plan.control));
    if save_weights {
        println!("victim weights: {}", dir.join("victims").display());
    }
    let csv = append_results_row(paths, &report)?;
    eprintln!(
        "wrote {} and appended to {}",
        dir.join("eval.json").display(),
        csv.display()
    );
    Ok(())
}

/// Key bindings are the user's, whatever run is shown: from the config file (or defaults).
fn load_keys(config_path: Option<&Path>, paths: &Paths) -> Result<crate::tui::app::Keymap> {
    let config = load_config(config_path, paths)?;
    config.validate()?;
    Ok(crate::tui::app::Keymap::from_config(&config.keys))
}

/// The dashboard as a viewer of the run listening on `socket`.
fn attach_dashboard(socket: &Path, keys: crate::tui::app::Keymap) -> Result<()> {
    if !(std::io::stdout().is_terminal() && std::io::stdin().is_terminal()) {
        bail!("attach needs a terminal (or --json for JSON lines)");
    }
    let attached = crate::engine::client::attach(socket, "dashboard")?;
    let run_dir = attached.run_dir.clone();
    crate::tui::run(crate::tui::Source::Remote(attached), keys)?;
    // stderr may be a terminal that went away (SSH drop): never panic on it.
    let status = crate::engine::status::read(&run_dir).ok().flatten();
    let going_on = status.as_ref().filter(|s| {
        s.socket.is_some()
            && (s.state.active() || s.state == crate::engine::status::RunState::Finished)
            && crate::engine::status::process_alive(s.pid)
    });
    let _ = match (going_on, &status) {
        (Some(s), _) => writeln!(
            std::io::stderr(),
            "detached; the run goes on ({} at step {}/{}): `metapoison attach {}` shows it again",
            s.state.name(),
            s.step,
            s.steps,
            run_dir.display()
        ),
        (None, Some(s)) => writeln!(
            std::io::stderr(),
            "run folder: {} ({} at step {}/{})",
            run_dir.display(),
            s.state.name(),
            s.step,
            s.steps
        ),
        (None, None) => writeln!(std::io::stderr(), "run folder: {}", run_dir.display()),
    };
    Ok(())
}

/// `attach --json`: the run's telemetry on stdout, commands from stdin, until the run ends.
fn attach_json(socket: &Path) -> Result<()> {
    let attached = crate::engine::client::attach(socket, "json")?;
    let commands = attached.commands.clone();
    // Commands from stdin on a thread of their own; its end (EOF) leaves the view open.
    let _ = std::thread::Builder::new()
        .name("stdin-commands".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<engine::protocol::Command>(&line) {
                    Ok(c) => {
                        if commands.send(c).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("not a command ({e}): {line}"),
                }
            }
        });
    let mut stdout = std::io::stdout().lock();
    for t in attached.telemetry.iter() {
        if writeln!(stdout, "{}", serde_json::to_string(&t)?).is_err() || stdout.flush().is_err() {
            break;
        }
    }
    Ok(())
}

fn tui(
    config_path: Option<&Path>,
    paths: &Paths,
    run: RunArgs,
    replay: Option<PathBuf>,
    foreground: bool,
) -> Result<()> {
    let terminal = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    if replay.is_none() && terminal {
        refuse_ranks("the dashboard")?;
    }
    let keys = load_keys(config_path, paths)?;
    if let Some(file) = replay {
        if !terminal {
            bail!("--replay needs a terminal");
        }
        let records = crate::tui::read_replay(&file)?;
        return Ok(crate::tui::run(crate::tui::Source::Replay(records), keys)?);
    }
    if !terminal {
        eprintln!("not a terminal: crafting headless (JSON lines on stdout)");
        return craft(
            config_path,
            paths,
            run,
            crate::app::DETACHED_LINGER.as_secs(),
        );
    }
    if !foreground {
        let run_dir = detach_craft(
            config_path,
            paths,
            run,
            crate::app::DETACHED_LINGER.as_secs(),
        )?;
        let (_, socket) = crate::app::attachable_run(Some(&run_dir), &paths.runs_dir())?;
        return attach_dashboard(&socket, keys);
    }
    let hosting = crate::app::Hosting {
        linger: true,
        serve: true,
        linger_idle: None,
    };
    let (handle, run_dir) = start_engine(
        config_path,
        paths,
        run,
        hosting,
        crate::ranks::Ranks::solo(),
    )?;
    crate::tui::run(crate::tui::Source::Engine(handle), keys)?;
    // stderr may be a terminal that went away (SSH drop): never panic on it.
    let _ = writeln!(std::io::stderr(), "run folder: {}", run_dir.display());
    Ok(())
}
