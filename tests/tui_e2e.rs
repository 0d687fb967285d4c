//! The real binary in a real terminal (tmux, TERM=screen-256color, NO_COLOR=1): the dashboard
//! comes up on a tiny crafting run, Space pauses it, the quit dialog checkpoints and exits, and
//! the terminal is handed back. Skipped (with a message) where tmux is not installed.

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
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "e2e"])
    }
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "`{needle}` did not appear within {secs}s; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(300));
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

#[test]
fn dashboard_in_tmux_pauses_checkpoints_and_quits() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped: tmux is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 40\nunroll_steps = 1\nensemble_size = 1\nstagger = 1\nmeta_batch_fraction = 1.0\n[surrogate]\nbatch_size = 50\n[run]\ncheckpoint_every = 0\n",
    )
    .unwrap();
    let run_dir = tmp.path().join("run");
    let cmd = format!(
        "NO_COLOR=1 TERM=screen-256color {} --data-dir {} --config {} tui --run-dir {}; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_metapoison"),
        tmp.path().display(),
        config.display(),
        run_dir.display()
    );
    let tmux = Tmux {
        socket: format!("metapoison-e2e-{}", std::process::id()),
    };
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "e2e",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    let s = tmux.wait_for("step 2/40", 120);
    assert!(
        s.contains("Shirt -> T-shirt/top") && (s.contains("no NVIDIA GPU") || s.contains("GPU0")),
        "{s}"
    );
    assert!(s.contains("Space pause"), "{s}");
    tmux.run(&["send-keys", "-t", "e2e", " "]);
    let s = tmux.wait_for("PAUSED", 60);
    assert!(s.contains("pause: paused between steps"), "{s}");
    // ASCII previews under NO_COLOR: no half-block characters anywhere.
    assert!(!s.contains('▀'), "{s}");
    tmux.run(&["send-keys", "-t", "e2e", "q"]);
    tmux.wait_for("checkpoint and quit", 10);
    tmux.run(&["send-keys", "-t", "e2e", "Enter"]);
    let s = tmux.wait_for("EXIT=", 60);
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        s.contains("run folder:"),
        "the terminal is back to normal text: {s}"
    );
    let saved = metapoison::craft::checkpoint::load(&run_dir).unwrap();
    assert!(
        saved.state.step >= 2 && saved.state.step < 40,
        "stopped at step {}",
        saved.state.step
    );
    let kinds: Vec<&str> = saved.state.events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"pause") && kinds.contains(&"stop"),
        "{kinds:?}"
    );
}
