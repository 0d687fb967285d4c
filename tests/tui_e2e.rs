//! The real binary in a real terminal (tmux, TERM=screen-256color, NO_COLOR=1): the dashboard
//! comes up on a tiny crafting run (crafting in a process of its own, the dashboard attached
//! to it), Space pauses it, the parameters popup changes the outer step size (logged, applied
//! at the next step), Space resumes, the export menu writes a folder that passes `export
//! --verify`, `v` trains victims on it, the leave dialog checkpoints and stops the run, and
//! the terminal is handed back. An SSH drop (the tmux server killed) ends only the view: the
//! run crafts on and `attach` brings the dashboard back. Skipped (with a message) where tmux is
//! not installed; under CI that fails instead.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// Runs `cmd` in a new detached 100x30 session named e2e.
    fn start(&self, cmd: &str) {
        self.run(&[
            "new-session",
            "-d",
            "-s",
            "e2e",
            "-x",
            "100",
            "-y",
            "30",
            cmd,
        ]);
    }
    /// Types `keys` (tmux key names or text) into the e2e session.
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "e2e"];
        args.extend_from_slice(keys);
        self.run(&args);
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "e2e"])
    }
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        self.wait_until(&format!("`{needle}`"), secs, |s| s.contains(needle))
    }
    /// Waits until the header shows crafting step `step` or later. A step can be on screen
    /// for less than one poll, so waiting for one exact step number is a race.
    fn wait_for_step(&self, step: usize, secs: u64) -> String {
        self.wait_until(&format!("step {step} or later"), secs, |s| {
            shown_step(s).is_some_and(|n| n >= step)
        })
    }
    fn wait_until(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{what} did not appear within {secs}s; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The step number in the header's "step N/TOTAL", if the screen shows one.
fn shown_step(screen: &str) -> Option<usize> {
    screen.match_indices("step ").find_map(|(at, _)| {
        let rest = &screen[at + "step ".len()..];
        let (number, after) = rest.split_once('/')?;
        after
            .starts_with(|c: char| c.is_ascii_digit())
            .then_some(())?;
        number.parse().ok()
    })
}

/// Kills the run crafting in `.0` (its status file names the process) when a test ends, so
/// that a failed test leaves nothing crafting in the background.
struct KillRun(std::path::PathBuf);

impl Drop for KillRun {
    fn drop(&mut self) {
        if let Ok(Some(s)) = metapoison::engine::status::read(&self.0) {
            if metapoison::engine::status::process_alive(s.pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &s.pid.to_string()])
                    .status();
            }
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// Starts the dashboard in a detached 100x30 tmux session on a tiny 400-step run; `env` goes
/// before the command, `victim` is an optional `[victim]` TOML section, `tail` follows it in
/// the shell (so the pane stays to be read after exit).
fn start_dashboard(
    tmp: &std::path::Path,
    name: &str,
    env: &str,
    victim: &str,
    tail: &str,
) -> (Tmux, std::path::PathBuf) {
    let config = tmp.join("tiny.toml");
    std::fs::write(
        &config,
        format!("[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 400\nunroll_steps = 1\nensemble_size = 1\nstagger = 1\nmeta_batch_fraction = 1.0\n[surrogate]\nbatch_size = 50\n{victim}[run]\ncheckpoint_every = 0\n"),
    )
    .unwrap();
    let run_dir = tmp.join(format!("{name}-run"));
    let cmd = format!(
        "{env} TERM=screen-256color {} --data-dir {} --config {} tui --run-dir {}{tail}",
        env!("CARGO_BIN_EXE_metapoison"),
        tmp.display(),
        config.display(),
        run_dir.display()
    );
    let tmux = Tmux {
        socket: format!("metapoison-{name}-{}", std::process::id()),
    };
    tmux.start(&cmd);
    (tmux, run_dir)
}

/// Whether tmux is missing (then the test says it is skipped; under CI it fails).
fn tmux_missing() -> bool {
    common::skip_without("tmux", Command::new("tmux").arg("-V").output().is_ok())
}

#[test]
fn dashboard_in_tmux_pauses_checkpoints_and_quits() {
    if tmux_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (tmux, run_dir) = start_dashboard(
        tmp.path(),
        "e2e",
        "NO_COLOR=1",
        "[victim]\nepochs = 1\nbatch_size = 50\n",
        "; echo EXIT=$?; sleep 60",
    );
    let _kill = KillRun(run_dir.clone());
    let s = tmux.wait_for_step(2, 120);
    assert!(
        s.contains("Shirt -> T-shirt/top") && (s.contains("no NVIDIA GPU") || s.contains("GPU0")),
        "{s}"
    );
    assert!(s.contains("Space pause"), "{s}");
    tmux.keys(&[" "]);
    let s = tmux.wait_for("PAUSED", 60);
    assert!(s.contains("pause: paused between steps"), "{s}");
    // ASCII previews under NO_COLOR: no half-block characters anywhere.
    assert!(!s.contains('▀'), "{s}");
    // A live step-size change: outer lr 200 -> 50 in the parameters popup.
    tmux.keys(&["p"]);
    tmux.wait_for("outer", 10);
    for _ in 0..6 {
        tmux.keys(&["BSpace"]);
    }
    tmux.keys(&["50", "Enter"]);
    tmux.wait_for("outer lr 200 -> 50", 20);
    tmux.keys(&[" "]);
    tmux.wait_for("resume: resumed", 20);
    // The export menu, all parts, into RUN_DIR/export-step-NNNN.
    tmux.keys(&["e"]);
    tmux.wait_for("contact sheet", 10);
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("exported to", 60);
    let export = std::fs::read_dir(&run_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("export-step-"))
        })
        .unwrap_or_else(|| panic!("no export folder in {}: {s}", run_dir.display()));
    let verify = Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("export")
        .arg("--verify")
        .arg(&export)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("verdict      OK"));
    // Victims on the latest export, in the background; the result reaches the header.
    tmux.keys(&["v"]);
    tmux.wait_for("flipped (control", 120);
    assert!(export.join("eval.json").exists());
    tmux.keys(&["q"]);
    tmux.wait_for("checkpoint and stop the run", 10);
    tmux.keys(&["c"]);
    let s = tmux.wait_for("EXIT=", 60);
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        s.contains("run folder:") && s.contains("(stopped at step"),
        "the terminal is back to normal text: {s}"
    );
    let saved = metapoison::craft::checkpoint::load(&run_dir).unwrap();
    assert!(
        saved.state.step >= 2 && saved.state.step < 400,
        "stopped at step {}",
        saved.state.step
    );
    let kinds: Vec<&str> = saved.state.events.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["pause", "set_outer_lr", "resume", "export", "stop"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    // The new step size took effect at the step after the change.
    let change = saved
        .state
        .events
        .iter()
        .find(|e| e.kind == "set_outer_lr")
        .unwrap();
    let after: Vec<f64> = saved
        .state
        .history
        .iter()
        .filter(|r| r.step >= change.step)
        .map(|r| r.outer_lr)
        .collect();
    let before: Vec<f64> = saved
        .state
        .history
        .iter()
        .filter(|r| r.step < change.step)
        .map(|r| r.outer_lr)
        .collect();
    assert!(!after.is_empty() && !before.is_empty());
    // The schedule (warm-up, drops) multiplies the base: the ratio is the change, 50/200.
    let (b, a) = (before.last().unwrap(), after.first().unwrap());
    let warm = |step: usize| metapoison::craft::schedule::outer_lr(1.0, step, 5, &[20, 40], 0.1);
    let sb = saved
        .state
        .history
        .iter()
        .rfind(|r| r.step < change.step)
        .unwrap()
        .step;
    let sa = change.step;
    assert!(
        ((a / warm(sa)) / (b / warm(sb)) - 0.25).abs() < 1e-9,
        "outer lr {b} at step {sb} -> {a} at step {sa}"
    );
}

/// Whether a process whose command line contains `needle` is still running.
fn running(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains(needle) && !c.contains("tmux")
        })
}

/// Kills the tmux server (what an SSH drop does to the terminal) and waits until no process
/// whose command line holds `needle` is left.
fn drop_terminal(tmux: &Tmux, needle: &str) {
    tmux.run(&["kill-server"]);
    let start = Instant::now();
    while running(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the dashboard is still running 60 s after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn an_ssh_drop_ends_only_the_view_and_attach_brings_the_dashboard_back() {
    if tmux_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (tmux, run_dir) = start_dashboard(tmp.path(), "drop", "", "", "");
    let _kill = KillRun(run_dir.clone());
    let before = shown_step(&tmux.wait_for_step(2, 120)).unwrap();
    // The dashboard's own process (its arguments are NUL-separated in /proc); the run's
    // process says `craft` instead.
    let view = format!("tui\0--run-dir\0{}", run_dir.display());
    assert!(
        running(&view),
        "the dashboard process is not visible in /proc"
    );
    let engine = metapoison::engine::status::read(&run_dir)
        .unwrap()
        .expect("the run's status")
        .pid;
    // The terminal disappears: the pane's processes get SIGHUP. The view ends...
    drop_terminal(&tmux, &view);
    // ...and the run crafts on.
    let status = || metapoison::engine::status::read(&run_dir).unwrap().unwrap();
    let start = Instant::now();
    while status().step < before + 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run stopped advancing after the SSH drop: {:?}",
            status()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(metapoison::engine::status::process_alive(engine));
    // `attach` in a new terminal shows the later steps and the history before the drop.
    let later = status().step;
    let tmux = Tmux {
        socket: format!("metapoison-attach-{}", std::process::id()),
    };
    tmux.start(&format!(
        "TERM=screen-256color {} --data-dir {} attach {}; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_metapoison"),
        tmp.path().display(),
        run_dir.display()
    ));
    let s = tmux.wait_for_step(later, 60);
    assert!(s.contains("adversarial loss"), "{s}");
    // The loss chart starts at step 0: the history came with the view.
    assert!(
        s.lines().any(|l| l.contains("│     0 ")),
        "the chart's axis does not start at step 0: {s}"
    );
    // Stopping it from outside ends the run with a checkpoint; the view closes by itself.
    let stopped = Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("stop")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    let s = tmux.wait_for("EXIT=", 60);
    assert!(
        s.contains("EXIT=0") && s.contains("(stopped at step"),
        "{s}"
    );
    assert_signal_checkpoint(&run_dir, later, "");
}

/// The run in `run_dir` stopped on a signal with a checkpoint at step `step` or later.
fn assert_signal_checkpoint(run_dir: &std::path::Path, step: usize, log: &str) {
    let saved = metapoison::craft::checkpoint::load(run_dir).unwrap();
    assert!(
        saved.state.step >= step,
        "checkpoint at step {}; log:\n{log}",
        saved.state.step
    );
    assert!(
        saved.state.events.iter().any(|e| e.kind == "signal"),
        "{:?}",
        saved.state.events
    );
}

#[test]
fn in_the_foreground_an_ssh_drop_checkpoints_and_the_process_exits() {
    if tmux_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (tmux, run_dir) = start_dashboard(tmp.path(), "fg-drop", "", "", " --foreground");
    tmux.wait_for_step(2, 120);
    let needle = run_dir.display().to_string();
    assert!(
        running(&needle),
        "the dashboard process is not visible in /proc"
    );
    // The terminal disappears: the pane's processes get SIGHUP.
    drop_terminal(&tmux, &needle);
    let log = std::fs::read_to_string(tmp.path().join("logs/metapoison.log")).unwrap_or_default();
    assert_signal_checkpoint(&run_dir, 2, &log);
}

#[test]
fn a_recorded_run_replays_and_q_quits() {
    if tmux_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 4\nunroll_steps = 1\nensemble_size = 1\nstagger = 1\n[surrogate]\nbatch_size = 50\n",
    )
    .unwrap();
    // Record: a headless run's JSON lines.
    let recorded = Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("--config")
        .arg(&config)
        .args(["craft", "--run-dir"])
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(recorded.status.success(), "{recorded:?}");
    let record = tmp.path().join("telemetry.jsonl");
    std::fs::write(&record, &recorded.stdout).unwrap();
    // Play it back.
    let tmux = Tmux {
        socket: format!("metapoison-replay-{}", std::process::id()),
    };
    let cmd = format!(
        "TERM=screen-256color {} --data-dir {} tui --replay {}; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_metapoison"),
        tmp.path().display(),
        record.display()
    );
    tmux.start(&cmd);
    let s = tmux.wait_for("finished 4 steps", 30);
    assert!(s.contains("done  step 4/4"), "{s}");
    // Keys still work (the export menu opens), and a command says no engine is there to take it.
    tmux.keys(&["e"]);
    tmux.wait_for("contact sheet", 10);
    tmux.keys(&["Enter"]);
    tmux.wait_for("replay: ExportNow", 10);
    tmux.keys(&["q"]);
    let s = tmux.wait_for("EXIT=", 10);
    assert!(s.contains("EXIT=0"), "{s}");
    // The terminal is handed back: the dashboard's frame is gone from the screen.
    assert!(!s.contains("adversarial loss"), "{s}");
}
