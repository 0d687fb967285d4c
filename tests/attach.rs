//! Viewers in other processes: a detached run's socket, `metapoison attach`, and what the
//! socket refuses. Real processes throughout; each test has its own socket folder
//! (XDG_RUNTIME_DIR in a temporary folder).

mod common;

use common::{text, wait_for};

use metapoison::engine::client;
use metapoison::engine::protocol::{Command as EngineCommand, Telemetry};
use metapoison::engine::status::{process_alive, read, RunState, RunStatus};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One test at a time: two libtorch processes side by side on a small machine do not share
/// its cores, they stall each other, and these tests wait on steps.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Sandbox {
    tmp: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let xdg = tmp.path().join("xdg");
        std::fs::create_dir(&xdg).unwrap();
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
        Sandbox { tmp, _turn: turn }
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn bin(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_metapoison"));
        c.env("XDG_RUNTIME_DIR", self.path().join("xdg"))
            .arg("--data-dir")
            .arg(self.path());
        c
    }

    /// A config of tiny steps: `steps` of them.
    fn config(&self, steps: usize) -> PathBuf {
        let config = self.path().join(format!("tiny-{steps}.toml"));
        std::fs::write(
            &config,
            format!("[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = {steps}\nunroll_steps = 1\nensemble_size = 1\nstagger = 1\nmeta_batch_fraction = 1.0\n[surrogate]\nbatch_size = 50\n[run]\ncheckpoint_every = 0\n"),
        )
        .unwrap();
        config
    }

    /// Starts a detached run of `steps` steps in RUN_DIR `name`; returns the folder.
    fn detach(&self, steps: usize, name: &str) -> PathBuf {
        self.detach_with(steps, name, &[])
    }

    fn detach_with(&self, steps: usize, name: &str, extra: &[&str]) -> PathBuf {
        let run = self.path().join("runs").join(name);
        let out = self
            .bin()
            .arg("--config")
            .arg(self.config(steps))
            .args(["craft", "--detach", "--run-dir"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        run
    }
}

impl Drop for Sandbox {
    /// A failed test leaves no run crafting in the background.
    fn drop(&mut self) {
        let Ok(runs) = std::fs::read_dir(self.path().join("runs")) else {
            return;
        };
        for run in runs.filter_map(|e| e.ok()) {
            if let Ok(Some(s)) = read(&run.path()) {
                if process_alive(s.pid) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &s.pid.to_string()])
                        .status();
                }
            }
        }
    }
}

fn status(run: &Path) -> RunStatus {
    read(run).unwrap().expect("a status file")
}

fn wait_for_state(run: &Path, state: RunState, min_step: usize) -> RunStatus {
    wait_for(
        &format!("{state:?} at step {min_step} or later"),
        Duration::from_secs(120),
        || {
            read(run)
                .ok()
                .flatten()
                .is_some_and(|s| s.state == state && s.step >= min_step)
        },
    );
    status(run)
}

/// Stops the run and waits for its process to go.
fn stop(sandbox: &Sandbox, run: &Path) {
    let pid = status(run).pid;
    let out = sandbox.bin().arg("stop").arg(run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the run's process to exit", Duration::from_secs(60), || {
        !process_alive(pid)
    });
}

/// The run's JSON lines as telemetry (what its process wrote to telemetry.jsonl).
fn recorded(run: &Path) -> Vec<Telemetry> {
    std::fs::read_to_string(run.join("telemetry.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_viewer_pauses_a_detached_run_a_second_resumes_it_and_both_get_its_history() {
    let sandbox = Sandbox::new();
    let run = sandbox.detach(100_000, "r1");
    let s = wait_for_state(&run, RunState::Crafting, 3);
    let socket = s.socket.clone().expect("the status names the socket");
    assert!(socket.starts_with(sandbox.path().join("xdg/metapoison")));
    // The socket folder and the socket are this user's alone.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);

    // A first viewer (`attach --json`, a real process) pauses the run, then is killed.
    let mut viewer = sandbox
        .bin()
        .args(["attach", "--json"])
        .arg(&run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(viewer.stdin.as_mut().unwrap(), "{{\"command\":\"pause\"}}").unwrap();
    let paused = wait_for_state(&run, RunState::Paused, 3);
    viewer.kill().unwrap(); // SIGKILL
    let _ = viewer.wait();
    // It saw the run's steps before the pause, and the pause itself.
    let mut seen = String::new();
    viewer
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    assert!(seen.contains("\"type\":\"step\""), "{seen}");
    assert!(seen.contains("\"phase\":\"paused\""), "{seen}");
    let listed = sandbox.bin().arg("runs").output().unwrap();
    let row = text(&listed)
        .lines()
        .find(|l| l.starts_with("r1 "))
        .map(String::from)
        .unwrap_or_else(|| panic!("r1 not listed: {}", text(&listed)));
    assert!(row.contains("paused") && row.ends_with("yes"), "{row}");
    std::thread::sleep(Duration::from_secs(2));
    let still = status(&run);
    assert_eq!(
        (still.state, still.step),
        (RunState::Paused, paused.step),
        "a paused run advanced after its viewer was killed"
    );

    // A second viewer (the library's client) gets the whole history: while the run is
    // paused nothing new happens, so it equals what the run recorded, progress lines aside.
    let second = client::attach(&socket, "test").unwrap();
    assert_eq!(second.pid, still.pid);
    assert_eq!(second.run_dir, run);
    let history: Vec<Telemetry> = second.telemetry.iter().take(second.history).collect();
    let without_progress: Vec<Telemetry> = history
        .iter()
        .filter(|t| !matches!(t, Telemetry::PretrainProgress { .. }))
        .cloned()
        .collect();
    assert_eq!(without_progress, recorded(&run));
    let steps_in_history = history
        .iter()
        .filter(|t| matches!(t, Telemetry::Step(_)))
        .count();
    assert_eq!(steps_in_history, paused.step);
    // It resumes the run: steps advance again, and it sees them live.
    second.commands.send(EngineCommand::Resume).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut live_steps = 0;
    while live_steps < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match second.telemetry.recv_timeout(left) {
            Ok(Telemetry::Step(r)) => {
                assert!(r.step >= paused.step, "step {} came live again", r.step);
                live_steps += 1;
            }
            Ok(_) => {}
            Err(e) => panic!("no live steps after resuming: {e}"),
        }
    }
    assert!(status(&run).step >= paused.step + 2);

    stop(&sandbox, &run);
    // The engine's end closes the viewer's feed after the last messages, and removes the socket.
    let rest: Vec<Telemetry> = second.telemetry.iter().collect();
    assert!(
        rest.iter()
            .any(|t| matches!(t, Telemetry::Checkpoint { .. })),
        "{rest:?}"
    );
    assert!(!socket.exists(), "the socket outlived its engine");
    let s = status(&run);
    assert_eq!((s.state, s.socket), (RunState::Stopped, None));
    let listed = text(&sandbox.bin().arg("runs").output().unwrap());
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("r1 ") && l.ends_with(" -")),
        "{listed}"
    );
    // Attaching now says why not, in one line.
    let out = sandbox.bin().arg("attach").arg(&run).output().unwrap();
    assert!(!out.status.success());
    let why = text(&out);
    assert!(
        why.contains("has ended (stopped at step") && why.contains("--resume"),
        "{why}"
    );
}

#[test]
fn random_bytes_oversized_lines_and_other_versions_leave_the_run_unaffected() {
    let sandbox = Sandbox::new();
    let run = sandbox.detach(100_000, "r2");
    let s = wait_for_state(&run, RunState::Crafting, 2);
    let socket = s.socket.clone().unwrap();
    let exchange = |payload: &[u8]| -> String {
        let mut c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        // The engine may refuse a line and close before the rest is written (an oversized
        // line is cut off at its limit): its reply is then already on the way.
        if let Err(e) = c.write_all(payload) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
        }
        let mut first = String::new();
        BufReader::new(c).read_line(&mut first).unwrap();
        first
    };
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 12345;
    for b in noise.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    noise.push(b'\n');
    let reply = exchange(&noise);
    assert!(reply.contains("must be a hello"), "{reply}");
    let reply = exchange(&vec![b'x'; 100_000]);
    assert!(reply.contains("over 65536 bytes"), "{reply}");
    let reply = exchange(b"{\"wire\":\"hello\",\"protocol\":99}\n");
    assert!(
        reply.contains("protocol 2 and the viewer 99") && reply.contains("build that started"),
        "{reply}"
    );
    // An attached viewer that sends garbage gets an error reply and stays attached.
    let mut c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    c.write_all(b"{\"wire\":\"hello\",\"protocol\":2}\n{\"wire\":\"command\",\"command\":{\"command\":\"explode\"}}\n")
        .unwrap();
    let mut lines = BufReader::new(c.try_clone().unwrap()).lines();
    let error = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("\"wire\":\"error\""))
        .unwrap();
    assert!(error.contains("not a command"), "{error}");
    let before = status(&run).step;
    let next_step = lines
        .map(|l| l.unwrap())
        .find(|l| l.contains("\"type\":\"step\""))
        .unwrap();
    assert!(next_step.contains("\"step\""), "{next_step}");
    drop(c);
    let after = wait_for_state(&run, RunState::Crafting, before + 2);
    assert_eq!(after.pid, s.pid);

    // A connection from another user id is refused, even where the folder's modes would
    // let it reach the socket: the engine checks the peer's credentials. (Needs root to
    // switch users; the permission bits above are checked everywhere.)
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let dir = socket.parent().unwrap();
        for d in [sandbox.path(), &sandbox.path().join("xdg"), dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let other = Command::new("/usr/bin/python3")
            .arg("-c")
            // It only listens: the refusal comes before anything is read from it.
            .arg("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint(s.makefile().readline())")
            .arg(&socket)
            .env_clear()
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        for d in [sandbox.path(), &sandbox.path().join("xdg"), dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        let said = text(&other);
        assert!(
            said.contains("refused: this run belongs to another user"),
            "{said}"
        );
    } else {
        eprintln!("not root: the other-user connection is not tried (the modes are)");
    }
    // Still crafting, same process.
    let later = wait_for_state(&run, RunState::Crafting, after.step + 1);
    assert_eq!(later.pid, s.pid);
    stop(&sandbox, &run);
}

#[test]
fn a_stale_socket_is_reported_and_removed() {
    let sandbox = Sandbox::new();
    let run = sandbox.detach(100_000, "r3");
    let s = wait_for_state(&run, RunState::Crafting, 1);
    let socket = s.socket.clone().unwrap();
    // A SIGKILL leaves no chance to clean up.
    let killed = Command::new("kill")
        .args(["-KILL", &s.pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for("the killed process to go", Duration::from_secs(30), || {
        !process_alive(s.pid)
    });
    assert!(socket.exists());
    let out = sandbox.bin().arg("attach").arg(&run).output().unwrap();
    assert!(!out.status.success());
    let why = text(&out);
    assert!(
        why.contains("is gone") && why.contains("stale socket is removed"),
        "{why}"
    );
    assert!(!socket.exists());
    // With no run named and none alive, attach says where it looked.
    let out = sandbox.bin().arg("attach").output().unwrap();
    assert!(text(&out).contains("no run to attach to"), "{}", text(&out));
}

#[test]
fn a_detached_run_that_was_stopped_resumes_to_the_same_poisons_as_an_uninterrupted_one() {
    let sandbox = Sandbox::new();
    let steps = 60;
    let run = sandbox.detach(steps, "interrupted");
    wait_for_state(&run, RunState::Crafting, 3);
    stop(&sandbox, &run);
    let stopped_at = status(&run).step;
    assert!(stopped_at < steps, "stopped at {stopped_at}");
    let resumed = sandbox
        .bin()
        .arg("craft")
        .arg("--resume")
        .arg(&run)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed));
    let reference = sandbox.path().join("runs/reference");
    let whole = sandbox
        .bin()
        .arg("--config")
        .arg(sandbox.config(steps))
        .args(["craft", "--run-dir"])
        .arg(&reference)
        .output()
        .unwrap();
    assert!(whole.status.success(), "{}", text(&whole));
    let a = metapoison::craft::checkpoint::load(&run).unwrap();
    let b = metapoison::craft::checkpoint::load(&reference).unwrap();
    assert_eq!((a.state.step, b.state.step), (steps, steps));
    let weight = a
        .tensors
        .keys()
        .find(|k| k.starts_with("surrogate.") && k.contains(".weight."))
        .expect("surrogate weights in the checkpoint")
        .clone();
    for key in ["delta", "offsets", weight.as_str()] {
        let diff = (&a.tensors[key] - &b.tensors[key])
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{key} differs by {diff}");
    }
    assert_eq!(
        a.state.events.iter().filter(|e| e.kind == "stop").count()
            + a.state.events.iter().filter(|e| e.kind == "signal").count(),
        1,
        "{:?}",
        a.state.events
    );
}

#[test]
fn a_finished_detached_run_serves_viewers_then_leaves_when_none_is_attached() {
    let sandbox = Sandbox::new();
    // The idle time must outlast how long a loaded machine takes to see the run finish and
    // attach (3 s failed once with the 2 cores busy: the run had already left).
    let run = sandbox.detach_with(3, "finished", &["--linger-idle", "15"]);
    let s = wait_for_state(&run, RunState::Finished, 3);
    assert!(
        process_alive(s.pid),
        "a finished detached run waits for viewers"
    );
    let socket = s.socket.clone().expect("still serving");
    let viewer = client::attach(&socket, "test").unwrap();
    let history: Vec<Telemetry> = viewer.telemetry.iter().take(viewer.history).collect();
    assert!(history
        .iter()
        .any(|t| matches!(t, Telemetry::Finished { steps_done: 3, .. })));
    // Exports still work after the last step, through the socket.
    let exported = common::export_through(&viewer);
    assert_eq!(exported, run.join("export-step-0003"));
    assert!(exported.join("poisons.npz").exists());
    // While a viewer is attached it stays, however long; once none is, it leaves after the
    // idle time, and says so.
    std::thread::sleep(Duration::from_secs(4));
    assert!(process_alive(s.pid), "left while a viewer was attached");
    drop(viewer);
    wait_for("the idle run to leave", Duration::from_secs(60), || {
        !process_alive(s.pid)
    });
    let after = status(&run);
    assert_eq!((after.state, after.socket), (RunState::Finished, None));
    assert!(!socket.exists());
    let log = std::fs::read_to_string(run.join("telemetry.jsonl")).unwrap();
    assert!(
        log.contains("no viewer attached for 15 s: leaving"),
        "{log}"
    );
}
