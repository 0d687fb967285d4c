//! MPI ranks on the CPU (cargo feature `mpi`; `mpirun` from OpenMPI): two ranks craft the
//! poisons of one process, their checkpoints hold every surrogate and resume onto another
//! number of ranks, a signal to any rank stops them all with one checkpoint, and a killed
//! rank ends the job. Real `mpirun` jobs of the real binary.

mod common;

use common::text;

use metapoison::craft::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// One job at a time: two libtorch jobs side by side on a small machine stall each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn mpirun_missing() -> bool {
    let present = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    common::skip_without("mpirun (Debian: openmpi-bin)", present)
}

/// A config of tiny steps: 4 surrogates one epoch apart, K = 1, the outer schedule fixed (so
/// that `--steps` changes only where a run ends).
fn config(dir: &Path, checkpoint_every: usize) -> PathBuf {
    let path = dir.join(format!("ranks-{checkpoint_every}.toml"));
    std::fs::write(
        &path,
        format!("[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 6\nlr_drops = [20, 40]\nunroll_steps = 1\nensemble_size = 4\nstagger = 1\nmeta_batch_fraction = 1.0\n[surrogate]\nbatch_size = 50\n[run]\ncheckpoint_every = {checkpoint_every}\n"),
    )
    .unwrap();
    path
}

/// `metapoison --data-dir DIR` in one process.
fn one_process(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metapoison"));
    c.arg("--data-dir").arg(dir);
    c
}

/// `metapoison --data-dir DIR` as `ranks` MPI ranks, each with the environment `vars`
/// (`NAME=VALUE`, passed on by `mpirun -x`).
fn mpirun(dir: &Path, ranks: usize, vars: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string());
    for var in vars {
        c.arg("-x").arg(var);
    }
    c.arg(env!("CARGO_BIN_EXE_metapoison"))
        .arg("--data-dir")
        .arg(dir);
    c
}

/// `metapoison ARGS` in one process, or as `ranks` MPI ranks.
fn craft(dir: &Path, ranks: usize, args: &[&str]) -> Output {
    let mut c = if ranks == 1 {
        one_process(dir)
    } else {
        mpirun(dir, ranks, &[])
    };
    c.args(args).output().unwrap()
}

fn run_ok(dir: &Path, ranks: usize, args: &[&str]) -> String {
    let out = craft(dir, ranks, args);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// The largest difference between two checkpoints' tensor `key`.
fn diff(a: &checkpoint::Loaded, b: &checkpoint::Loaded, key: &str) -> f64 {
    (&a.tensors[key] - &b.tensors[key])
        .abs()
        .max()
        .double_value(&[])
}

/// Every surrogate's tensors agree: the surrogates train on the clean data, so their
/// trajectories do not depend on how the ranks summed the meta-gradient.
fn assert_same_surrogates(a: &checkpoint::Loaded, b: &checkpoint::Loaded) {
    let keys: Vec<&String> = a
        .tensors
        .keys()
        .filter(|k| k.starts_with("surrogate."))
        .collect();
    assert!(
        keys.iter().any(|k| k.starts_with("surrogate.3.")),
        "{keys:?}"
    );
    for k in keys {
        let d = diff(a, b, k);
        assert!(d < 1e-5, "{k} differs by {d}");
    }
}

/// The perturbations agree. The ranks sum the meta-gradient in another order, but in float64,
/// where a few float32 gradients add exactly: on 2 cores the poisons are those of one process
/// bit for bit (measured). The bound leaves room for a machine where a rank's surrogates run on
/// other intra-op thread counts than one process's, whose rounding Adam carries on wherever a
/// pixel's gradient is near zero (when the sum was float32: 1.6% of pixels differed by over
/// 0.5 after 6 steps on one 2-core machine, 10.5% on another, which failed this bound).
fn assert_same_poisons(a: &checkpoint::Loaded, b: &checkpoint::Loaded) {
    assert_eq!(a.state.step, b.state.step);
    let (da, db) = (&a.tensors["delta"], &b.tensors["delta"]);
    let gap = (da - db).abs();
    let mean_gap = gap.mean(tch::Kind::Double).double_value(&[]);
    let size = da.abs().mean(tch::Kind::Double).double_value(&[]);
    assert!(size > 1.0, "the perturbation did not move ({size})");
    assert!(
        mean_gap < 0.02 * size,
        "delta differs by {mean_gap} on average (its mean size {size})"
    );
    let far = gap
        .gt(0.5)
        .to_kind(tch::Kind::Double)
        .mean(tch::Kind::Double)
        .double_value(&[]);
    assert!(
        far < 0.05,
        "{:.1}% of delta differs by over 0.5",
        far * 100.0
    );
    let o = diff(a, b, "offsets");
    assert!(o < 1e-3, "the colour grid differs by {o}");
}

/// Crafts three steps on `ranks.0` ranks, resumes to six on `ranks.1`, and compares the
/// result with `reference`, a six-step run.
fn resume_across(dir: &Path, cfg: &str, ranks: (usize, usize), reference: &checkpoint::Loaded) {
    let split = dir.join(format!("{}-then-{}", ranks.0, ranks.1));
    let split = split.to_str().unwrap();
    let first = ["--config", cfg, "craft", "--run-dir", split, "--steps", "3"];
    run_ok(dir, ranks.0, &first);
    assert_eq!(checkpoint::load(Path::new(split)).unwrap().state.step, 3);
    run_ok(dir, ranks.1, &["craft", "--resume", split, "--steps", "6"]);
    let whole = checkpoint::load(Path::new(split)).unwrap();
    assert_same_surrogates(&whole, reference);
    assert_same_poisons(&whole, reference);
}

#[test]
fn two_ranks_craft_the_poisons_of_one_process_and_resume_onto_either_count() {
    if mpirun_missing() {
        return;
    }
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(dir, 3);
    let cfg = cfg.to_str().unwrap();
    let one = dir.join("one");
    let two = dir.join("two");
    let lines_one = run_ok(
        dir,
        1,
        &["--config", cfg, "craft", "--run-dir", one.to_str().unwrap()],
    );
    let lines_two = run_ok(
        dir,
        2,
        &["--config", cfg, "craft", "--run-dir", two.to_str().unwrap()],
    );
    // Rank 0 alone speaks: one JSON line per step, not two.
    let steps = |s: &str| {
        s.lines()
            .filter(|l| l.contains("\"type\":\"step\""))
            .count()
    };
    assert_eq!((steps(&lines_one), steps(&lines_two)), (6, 6));
    // With ranks each step says how long it spent communicating.
    let timed = |s: &str| {
        s.lines()
            .filter(|l| l.contains("\"comm_seconds\":"))
            .count()
    };
    assert_eq!((timed(&lines_one), timed(&lines_two)), (0, 6));
    assert!(
        lines_two.contains("MPI: 2 ranks; this is rank 0"),
        "{lines_two}"
    );
    let (a, b) = (
        checkpoint::load(&one).unwrap(),
        checkpoint::load(&two).unwrap(),
    );
    assert_same_surrogates(&a, &b);
    assert_same_poisons(&a, &b);
    // The first step's per-surrogate losses are the same numbers (nothing summed yet).
    let (ra, rb) = (&a.state.history[0], &b.state.history[0]);
    assert_eq!(ra.adv_loss_per_surrogate.len(), 4);
    for (x, y) in ra
        .adv_loss_per_surrogate
        .iter()
        .zip(&rb.adv_loss_per_surrogate)
    {
        assert!((x.unwrap() - y.unwrap()).abs() < 1e-9, "{x:?} vs {y:?}");
    }
    assert_eq!(ra.meta_batches, rb.meta_batches);

    // 2 -> 1: three steps on two ranks, the rest in one process; and 1 -> 2.
    resume_across(dir, cfg, (2, 1), &a);
    resume_across(dir, cfg, (1, 2), &b);
}

/// The process ids of the job's ranks crafting into `run` (rank 0's is in its status file).
fn rank_pids(run: &Path) -> Vec<u32> {
    let needle = format!("--run-dir\0{}", run.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).into_owned();
            (cmd.contains(&needle) && !cmd.starts_with("mpirun")).then_some(pid)
        })
        .collect()
}

fn wait_for_step(run: &Path, step: usize) -> u32 {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = metapoison::engine::status::read(run) {
            if s.step >= step {
                return s.pid;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no step {step}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn long_job(dir: &Path, run: &Path) -> std::process::Child {
    let cfg = config(dir, 1);
    mpirun(dir, 2, &[])
        .arg("--config")
        .arg(&cfg)
        .args(["craft", "--steps", "100000", "--run-dir"])
        .arg(run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{what}: the job did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_signal_to_any_rank_stops_all_with_one_checkpoint_and_a_killed_rank_ends_the_job() {
    if mpirun_missing() {
        return;
    }
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // SIGTERM to rank 1 (not the one writing the folder): every rank stops at the next step
    // boundary, after one checkpoint, and the job ends well.
    let run = dir.join("signalled");
    let mut job = long_job(dir, &run);
    let root = wait_for_step(&run, 2);
    let pids = rank_pids(&run);
    assert_eq!(pids.len(), 2, "{pids:?}");
    let other = *pids.iter().find(|&&p| p != root).unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &other.to_string()])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut job, "SIGTERM to rank 1");
    assert!(status.success(), "{status}");
    let saved = checkpoint::load(&run).unwrap();
    let s = metapoison::engine::status::read(&run).unwrap().unwrap();
    assert_eq!(
        saved.state.step, s.step,
        "the checkpoint is of the last step"
    );
    assert!(
        saved
            .state
            .events
            .iter()
            .any(|e| e.message.contains("termination signal on another rank")),
        "{:?}",
        saved.state.events
    );
    assert!(saved.tensors.contains_key("surrogate.3.weight.0"));

    // SIGKILL to rank 1: mpirun ends the job; the last periodic checkpoint stays usable.
    let run = dir.join("killed");
    let mut job = long_job(dir, &run);
    let root = wait_for_step(&run, 2);
    let other = *rank_pids(&run).iter().find(|&&p| p != root).unwrap();
    assert!(Command::new("kill")
        .args(["-KILL", &other.to_string()])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut job, "SIGKILL to rank 1");
    assert!(!status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("rank 1"),
        "mpirun names the rank that died: {said}"
    );
    let saved = checkpoint::load(&run).unwrap();
    assert!(saved.state.step >= 1, "{}", saved.state.step);
    common::wait_for(
        "rank 0 to end with the job",
        Duration::from_secs(30),
        || !metapoison::engine::status::process_alive(root),
    );
}

#[test]
fn ranks_that_no_longer_hold_the_same_perturbation_stop_with_a_clear_error() {
    if mpirun_missing() {
        return;
    }
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = config(dir, 1);
    let run = dir.join("diverged");
    // Rank 1 moves one pixel after step 5; the check at that step boundary finds it.
    let out = mpirun(dir, 2, &["METAPOISON_INJECT_DIVERGENCE_AT_RANK=1".into()])
        .arg("--config")
        .arg(&cfg)
        .args(["craft", "--steps", "8", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("no longer hold the same perturbation at step 5 (rank 1 differs"),
        "{said}"
    );
    // The last checkpoint (rank 0's perturbation, after step 5) stays usable.
    let saved = checkpoint::load(&run).unwrap();
    assert_eq!(saved.state.step, 5);
}

#[test]
fn a_viewer_pauses_changes_the_step_size_and_stops_every_rank_through_rank_0() {
    if mpirun_missing() {
        return;
    }
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let xdg = dir.join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    let run = dir.join("viewed");
    let cfg = config(dir, 0);
    let mut job = mpirun(dir, 2, &[format!("XDG_RUNTIME_DIR={}", xdg.display())])
        .arg("--config")
        .arg(&cfg)
        .args(["craft", "--steps", "100000", "--run-dir"])
        .arg(&run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_step(&run, 2);
    let status = || metapoison::engine::status::read(&run).unwrap().unwrap();
    let socket = status().socket.expect("rank 0 serves viewers");
    let viewer = metapoison::engine::client::attach(&socket, "test").unwrap();
    use metapoison::engine::protocol::Command as EngineCommand;
    viewer.commands.send(EngineCommand::Pause).unwrap();
    let start = Instant::now();
    while status().state != metapoison::engine::status::RunState::Paused {
        assert!(start.elapsed() < Duration::from_secs(60), "not paused");
        std::thread::sleep(Duration::from_millis(100));
    }
    let paused_at = status().step;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status().step, paused_at, "a paused job went on");
    // A live change on rank 0 reaches rank 1 too: if it did not, the ranks' perturbations
    // would part, and the check every 5 steps would stop the job with an error.
    viewer
        .commands
        .send(EngineCommand::SetOuterLr { value: 50.0 })
        .unwrap();
    viewer.commands.send(EngineCommand::Resume).unwrap();
    let start = Instant::now();
    while status().step < paused_at + 7 {
        if let Some(exit) = job.try_wait().unwrap() {
            let mut said = String::new();
            std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut said).unwrap();
            panic!("the job ended ({exit}) after the live change: {said}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no step {}",
            paused_at + 7
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An export through the viewer: rank 0 writes it from the checkpoint all ranks take at
    // the next step boundary.
    let folder = common::export_through(&viewer);
    let verified = Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("export")
        .arg("--verify")
        .arg(&folder)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", text(&verified));
    viewer.commands.send(EngineCommand::Stop).unwrap();
    let exit = wait_exit(&mut job, "stop through a viewer");
    let mut said = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert!(exit.success(), "{exit}: {said}");
    let saved = checkpoint::load(&run).unwrap();
    assert!(saved.state.step >= paused_at + 7, "{}", saved.state.step);
    let change = saved
        .state
        .events
        .iter()
        .find(|e| e.kind == "set_outer_lr")
        .expect("the change is recorded");
    assert!(
        saved
            .state
            .history
            .iter()
            .filter(|r| r.step >= change.step)
            .all(|r| r.outer_lr < 60.0),
        "the new step size was not used after step {}",
        change.step
    );
}

#[test]
fn gradient_matching_on_two_ranks_crafts_the_poisons_of_one_process() {
    if mpirun_missing() {
        return;
    }
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("matching.toml");
    std::fs::write(
        &cfg,
        "[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nrecipe = \"gradient-matching\"\nsteps = 16\n[matching]\nsurrogates = 2\nrestarts = 2\nsurrogate_epochs = 1\nrecolor = true\n[surrogate]\nbatch_size = 50\n[run]\ncheckpoint_every = 0\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    // The one-process run with one thread, as each rank has here: gradient matching trains
    // its surrogates from scratch with all the threads, and another thread count rounds the
    // convolutions' sums differently.
    let alone = one_process(dir)
        .env("OMP_NUM_THREADS", "1")
        .args(["--config", cfg, "craft", "--run-dir"])
        .arg(&one)
        .output()
        .unwrap();
    assert!(alone.status.success(), "{}", text(&alone));
    let said = run_ok(
        dir,
        2,
        &["--config", cfg, "craft", "--run-dir", two.to_str().unwrap()],
    );
    assert!(said.contains("kept restart"), "{said}");
    let (a, b) = (
        checkpoint::load(&one).unwrap(),
        checkpoint::load(&two).unwrap(),
    );
    // Each rank trained its own surrogate; rank 0's checkpoint holds both.
    for k in ["surrogate.0.weight.0", "surrogate.1.weight.0"] {
        let d = diff(&a, &b, k);
        assert!(d < 1e-5, "{k} differs by {d}");
    }
    // The per-surrogate matching losses of the first step are the same numbers.
    let (ra, rb) = (&a.state.history[0], &b.state.history[0]);
    for (x, y) in ra
        .adv_loss_per_surrogate
        .iter()
        .zip(&rb.adv_loss_per_surrogate)
    {
        assert!((x.unwrap() - y.unwrap()).abs() < 1e-6, "{x:?} vs {y:?}");
    }
    assert_same_poisons(&a, &b);
    assert_eq!(
        a.state.matching_best.map(|(k, _)| k),
        b.state.matching_best.map(|(k, _)| k)
    );
}
