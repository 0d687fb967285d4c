//! Runs seen from outside their process: the status file follows a real `craft` process,
//! `metapoison runs` lists it, `metapoison stop` makes it checkpoint and stop, and a run whose
//! process is gone is reported as stale.

mod common;

use common::{text, wait_for};

use metapoison::engine::status::{read, RunState};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn bin(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metapoison"));
    c.arg("--data-dir").arg(data_dir);
    c
}

/// A config of many tiny steps in `dir`: a run of it is still crafting when it is stopped.
fn long_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("long.toml");
    std::fs::write(
        &config,
        "[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 2000\nunroll_steps = 1\nensemble_size = 1\nstagger = 1\n[surrogate]\nbatch_size = 50\n",
    )
    .unwrap();
    config
}

/// Waits until the run in `run` has done `steps` craft steps and is still crafting.
fn wait_for_steps(run: &Path, steps: usize) {
    // Generous: on a busy machine pretraining alone has taken over two minutes.
    wait_for("craft steps", Duration::from_secs(400), || {
        read(run)
            .ok()
            .flatten()
            .is_some_and(|s| s.state == RunState::Crafting && s.step >= steps)
    });
}

#[test]
fn a_crafting_process_is_listed_and_stop_checkpoints_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = long_config(tmp.path());
    let run = tmp.path().join("runs").join("r1");
    let mut child = bin(tmp.path())
        .arg("--config")
        .arg(&config)
        .args(["craft", "--run-dir"])
        .arg(&run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_steps(&run, 2);
    let s = read(&run).unwrap().unwrap();
    assert_eq!((s.pid, s.steps), (child.id(), 2000));
    assert!(s.eta_seconds.is_some_and(|e| e > 0.0), "{s:?}");

    let listed = bin(tmp.path()).arg("runs").output().unwrap();
    let out = text(&listed);
    assert!(listed.status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("r1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("crafting") && line.contains("/2000"),
        "{line}"
    );
    assert!(line.contains(&child.id().to_string()), "{line}");

    let stopped = bin(tmp.path()).arg("stop").arg(&run).output().unwrap();
    let out = text(&stopped);
    assert!(stopped.status.success(), "{out}");
    assert!(out.contains("stopped at step"), "{out}");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let s = read(&run).unwrap().unwrap();
    assert_eq!(s.state, RunState::Stopped, "{s:?}");
    assert!(s.step >= 2 && s.step < 2000, "{s:?}");
    assert!(run.join("checkpoint.safetensors").exists());
    let listed = text(&bin(tmp.path()).arg("runs").output().unwrap());
    assert!(listed.contains("stopped"), "{listed}");
    // Stopping it again is refused, naming the state.
    let again = bin(tmp.path()).arg("stop").arg(&run).output().unwrap();
    assert!(!again.status.success());
    assert!(
        text(&again).contains("not running (state: stopped)"),
        "{}",
        text(&again)
    );
}

#[test]
fn a_run_whose_process_is_gone_is_stale_and_a_finished_one_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // A finished run, by the engine itself.
    let done = runs.join("done");
    common::craft_to_end(&common::tiny_config(300, 10, 2), &done);
    let s = read(&done).unwrap().unwrap();
    assert_eq!((s.state, s.step, s.steps), (RunState::Finished, 2, 2));
    assert_eq!(s.pid, std::process::id());
    // A run that says it crafts, written by a process that has exited.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = runs.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    let mut status = s.clone();
    status.state = RunState::Crafting;
    status.pid = pid;
    status.step = 1;
    std::fs::write(
        stale.join("status.json"),
        serde_json::to_string(&status).unwrap(),
    )
    .unwrap();
    let listed = bin(tmp.path()).arg("runs").output().unwrap();
    let out = text(&listed);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{out}"))
            .to_string()
    };
    assert!(
        line("done").contains("finished") && line("done").contains("2/2"),
        "{out}"
    );
    assert!(line("stale").contains("stale"), "{out}");
    let refused = bin(tmp.path()).arg("stop").arg(&stale).output().unwrap();
    assert!(!refused.status.success());
    let why = text(&refused);
    assert!(why.contains("is gone") && why.contains("--resume"), "{why}");
    assert_eq!(why.trim().lines().count(), 1, "{why}");
}

/// `craft --detach` returns at once with the run's folder; the run goes on in a process of
/// its own (not the one that started it), writes its JSON lines into the folder, and stops
/// with a checkpoint when asked.
#[test]
fn a_detached_run_outlives_its_starter_and_stops_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let config = long_config(tmp.path());
    let started = bin(tmp.path())
        .arg("--config")
        .arg(&config)
        .args(["craft", "--detach"])
        .output()
        .unwrap();
    assert!(started.status.success(), "{}", text(&started));
    let run = std::path::PathBuf::from(String::from_utf8_lossy(&started.stdout).trim());
    assert!(run.starts_with(tmp.path().join("runs")), "{run:?}");
    wait_for(
        "the detached run's second step",
        Duration::from_secs(120),
        || {
            read(&run)
                .ok()
                .flatten()
                .is_some_and(|s| s.state == RunState::Crafting && s.step >= 2)
        },
    );
    let s = read(&run).unwrap().unwrap();
    assert!(metapoison::engine::status::process_alive(s.pid));
    // A hang-up (what a dropped SSH link sends a terminal's processes) does not stop it.
    let hup = Command::new("kill")
        .args(["-HUP", &s.pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for_steps(&run, s.step + 2);
    assert!(metapoison::engine::status::process_alive(s.pid));
    let lines = std::fs::read_to_string(run.join("telemetry.jsonl")).unwrap();
    assert!(
        lines.lines().any(|l| l.contains("\"type\":\"step\"")),
        "{lines}"
    );
    let stopped = bin(tmp.path()).arg("stop").arg(&run).output().unwrap();
    assert!(stopped.status.success(), "{}", text(&stopped));
    wait_for(
        "the detached process to exit",
        Duration::from_secs(60),
        || !metapoison::engine::status::process_alive(s.pid),
    );
    assert_eq!(read(&run).unwrap().unwrap().state, RunState::Stopped);
    assert!(run.join("checkpoint.safetensors").exists());
}
