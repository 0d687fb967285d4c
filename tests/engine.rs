//! The engine thread end to end on tiny settings: telemetry, live changes, and a run that is
//! interrupted and resumed ending with exactly the poisons of an uninterrupted run.

mod common;

use metapoison::config::{Auto, Config};
use metapoison::craft::checkpoint;
use metapoison::craft::schedule::surrogate_epoch;
use metapoison::data::{self, Dataset};
use metapoison::engine::protocol::{Command, Phase, StepReport, Telemetry};
use metapoison::engine::{spawn, EngineSetup};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Device, Kind};

fn tiny_config() -> Config {
    let mut c = common::tiny_config(400, 12, 5);
    c.craft.ensemble_size = Auto::Value(2);
    c.craft.meta_batch_fraction = Auto::Value(0.5);
    c.craft.warmup_steps = 2;
    c.craft.lr_drops = vec![3].into();
    c.run.checkpoint_every = 2;
    c.run.seed = 11;
    c
}

fn dataset(c: &Config) -> Dataset {
    data::load(&c.data).unwrap()
}

/// One engine at a time in this test process: libtorch's thread count is process-wide and an
/// engine sets it for its surrogate workers (parallel.rs), so two engines side by side would
/// change each other's float reduction order mid-run, and the exact-resume comparisons below
/// would fail for reasons no user meets (a process runs one engine).
static ONE_ENGINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the engine to the end (or until `stop_after` steps were reported, then raises the stop
/// flag as a signal would). Returns the step reports seen.
fn run(
    config: Config,
    dir: &Path,
    resume: bool,
    stop_after: Option<usize>,
    commands: Vec<(usize, Command)>,
) -> Vec<StepReport> {
    let _one = ONE_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = spawn(EngineSetup {
        data: dataset(&config),
        config,
        device: Device::Cpu,
        kind: Kind::Float,
        run_dir: dir.to_path_buf(),
        resume,
        stop: stop.clone(),
        linger: false,
        serve: false,
        linger_idle: None,
        ranks: metapoison::ranks::Ranks::solo(),
    });
    let mut reports = Vec::new();
    for t in handle.telemetry.iter() {
        if let Telemetry::Step(r) = &t {
            reports.push(r.clone());
            for (after, cmd) in &commands {
                if *after == r.step {
                    handle.commands.send(cmd.clone()).unwrap();
                }
            }
            if Some(reports.len()) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        }
        if let Telemetry::Phase(Phase::Failed { message }) = &t {
            panic!("engine failed: {message}");
        }
    }
    handle.join().unwrap();
    reports
}

fn final_tensors(
    dir: &Path,
) -> (
    checkpoint::CheckpointState,
    tch::Tensor,
    tch::Tensor,
    tch::Tensor,
) {
    let l = checkpoint::load(dir).unwrap();
    let w = l.tensors["surrogate.1.weight.0"].shallow_clone();
    (
        l.state,
        l.tensors["delta"].shallow_clone(),
        l.tensors["offsets"].shallow_clone(),
        w,
    )
}

/// What `assert_exact_resume` leaves for further checks.
struct Resumed {
    /// The uninterrupted run's step reports.
    full: Vec<StepReport>,
    /// The checkpoint the interrupted run was resumed from, and both runs' final ones.
    saved: checkpoint::Loaded,
    uninterrupted: checkpoint::Loaded,
    resumed: checkpoint::Loaded,
}

/// Crafts `config` (`steps` steps) in one go and, in another folder, stopped after
/// `stop_after` steps and resumed: the two end with the same poisons, surrogates and losses.
fn assert_exact_resume(config: Config, steps: usize, stop_after: usize) -> Resumed {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let full = run(config.clone(), &a, false, None, vec![]);
    assert_eq!(full.len(), steps);

    let first = run(config.clone(), &b, false, Some(stop_after), vec![]);
    assert!(
        first.len() >= stop_after && first.len() < steps,
        "stopped after {} steps",
        first.len()
    );
    let saved = checkpoint::load(&b).unwrap();
    assert_eq!(saved.state.step, first.len());
    // The run recorded its `auto` fields as the numbers it used (the CPU profile here), so the
    // resume below reads the same settings whatever machine it runs on.
    assert_eq!(config.victim.epochs, Auto::Auto);
    assert_eq!(saved.state.config.victim.epochs, Auto::Value(20));
    assert_eq!(
        saved.state.config.craft.stagger,
        Auto::Value(1),
        "given values stay"
    );
    let rest = run(saved.state.config.clone(), &b, true, None, vec![]);
    assert_eq!(first.len() + rest.len(), steps);

    let (sa, da, oa, wa) = final_tensors(&a);
    let (sb, db, ob, wb) = final_tensors(&b);
    assert_eq!((sa.step, sb.step), (steps, steps));
    let diff = |x: &tch::Tensor, y: &tch::Tensor| (x - y).abs().max().double_value(&[]);
    assert!(diff(&da, &db) < 1e-5, "delta differs by {}", diff(&da, &db));
    assert!(
        diff(&oa, &ob) < 1e-7,
        "offsets differ by {}",
        diff(&oa, &ob)
    );
    assert!(
        diff(&wa, &wb) < 1e-6,
        "surrogate weights differ by {}",
        diff(&wa, &wb)
    );
    // The losses reported after resuming continue the uninterrupted run's.
    for r in &rest {
        let twin = &full[r.step];
        let (x, y) = (r.adv_loss.unwrap_or(0.0), twin.adv_loss.unwrap_or(0.0));
        assert_eq!(r.adv_loss.is_some(), twin.adv_loss.is_some());
        assert!((x - y).abs() < 1e-4, "step {}: {x} vs {y}", r.step);
    }
    // The perturbation moved and stayed in bounds.
    assert!(da.abs().max().double_value(&[]) <= 8.0 + 1e-4);
    assert!(da.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    Resumed {
        full,
        saved,
        uninterrupted: checkpoint::load(&a).unwrap(),
        resumed: checkpoint::load(&b).unwrap(),
    }
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let r = assert_exact_resume(tiny_config(), 5, 2);
    assert!(
        !r.resumed.tensors.keys().any(|k| k.contains("velocity")),
        "plain SGD keeps no velocity"
    );
}

#[test]
fn gradient_matching_resumes_exactly_in_the_middle_of_a_restart() {
    let mut config = tiny_config();
    config.craft.recipe = metapoison::config::CraftRecipe::GradientMatching;
    config.matching.restarts = 2;
    config.matching.surrogates = 2;
    config.matching.surrogate_epochs = Auto::Value(1);
    config.matching.recolor = true;
    config.craft.steps = Auto::Value(16);
    config.run.checkpoint_every = 3;
    // Stopped inside the second restart, with the first one's best perturbation saved.
    let r = assert_exact_resume(config, 16, 11);
    assert!((9..16).contains(&r.saved.state.step));
    assert_eq!(r.saved.state.matching_best.map(|(k, _)| k), Some(0));
    assert!(r.saved.tensors.contains_key("matching.best.delta"));
    let full = &r.full;
    assert_eq!(
        (full[0].restart, full[15].restart),
        (Some((1, 2)), Some((2, 2)))
    );
    let (sa, sb) = (&r.uninterrupted.state, &r.resumed.state);
    assert_eq!(sa.matching_best, sb.matching_best);
    // Each restart lowered its loss, and the run ends on the better restart's perturbation.
    for restart in [&full[..8], &full[8..]] {
        let (start, end) = (restart[0].adv_loss.unwrap(), restart[7].adv_loss.unwrap());
        assert!(end < start, "matching loss {start} -> {end}");
    }
    let (kept, _) = sa.matching_best.unwrap();
    let t = &r.uninterrupted.tensors;
    let diff = |x: &tch::Tensor, y: &tch::Tensor| (x - y).abs().max().double_value(&[]);
    assert!(kept <= 1 && diff(&t["matching.best.delta"], &t["delta"]) == 0.0);
    assert!(sa
        .events
        .iter()
        .any(|e| e.kind == "restart" && e.message.starts_with("kept restart")));
}

#[test]
fn surrogates_with_momentum_weight_decay_and_one_cycle_resume_exactly() {
    let mut config = tiny_config();
    config.surrogate.momentum = 0.9;
    config.surrogate.nesterov = true;
    config.surrogate.weight_decay = 5e-4;
    config.surrogate.schedule = metapoison::config::LrSchedule::OneCycle;
    let r = assert_exact_resume(config, 5, 2);
    // The velocity is part of the checkpoint (the resume above depends on it), and it moved.
    let v = &r.resumed.tensors["surrogate.1.velocity.0"];
    assert!(v.abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

#[test]
fn reports_follow_the_schedule_and_live_changes_apply_and_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let config = tiny_config();
    let reports = run(
        config.clone(),
        &dir,
        false,
        None,
        vec![
            (0, Command::SetUnrollSteps { value: 2 }),
            (1, Command::SetOuterLr { value: 50.0 }),
            (1, Command::SetInnerLr { value: 0.05 }),
            (1, Command::SetUnrollSteps { value: 0 }),
            (
                2,
                Command::ExportNow {
                    formats: "npz".into(),
                    step: None,
                    out: None,
                },
            ),
        ],
    );
    assert_eq!(reports.len(), 5);
    for r in &reports {
        let want: Vec<usize> = (0..2).map(|m| surrogate_epoch(m, r.step, 2, 1)).collect();
        assert_eq!(r.epochs, want, "step {}", r.step);
        assert!(r.norms.delta_linf <= 8.0 + 1e-4);
        assert_eq!(r.target_probs[0].len(), 10);
        assert!((r.target_probs[0].iter().sum::<f64>() - 1.0).abs() < 1e-6);
    }
    // Each change is recorded with the step it applied at (commands race with the engine, so
    // the step is read from the log) and every report from that step on reflects it.
    let saved = checkpoint::load(&dir).unwrap();
    let at = |kind: &str| {
        saved
            .state
            .events
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.step)
            .unwrap_or_else(|| panic!("no {kind} event"))
    };
    let (k_at, outer_at, inner_at) = (
        at("set_unroll_steps"),
        at("set_outer_lr"),
        at("set_inner_lr"),
    );
    assert!(k_at >= 1 && outer_at >= 2 && inner_at >= 2);
    assert!(saved
        .state
        .events
        .iter()
        .any(|e| e.kind == "rejected" && e.message.contains("K = 0")));
    for r in &reports {
        assert_eq!(
            r.unroll_steps,
            if r.step >= k_at { 2 } else { 1 },
            "step {}",
            r.step
        );
        assert_eq!(
            r.inner_lr,
            if r.step >= inner_at { 0.05 } else { 0.1 },
            "step {}",
            r.step
        );
        // Outer lr: quadratic warm-up over 2 steps, x0.1 from step 3.
        let base = if r.step >= outer_at { 50.0 } else { 200.0 };
        let warm = (((r.step + 1) as f64) / 2.0).powi(2).min(1.0);
        let drop = if r.step >= 3 { 0.1 } else { 1.0 };
        assert!(
            (r.outer_lr - base * warm * drop).abs() < 1e-9,
            "step {}: {}",
            r.step,
            r.outer_lr
        );
    }
    assert_eq!(saved.state.live.outer_lr, 50.0);
    // Export-now: checkpointed, exported into the run folder, reported as an event.
    let export = saved
        .state
        .events
        .iter()
        .find(|e| e.kind == "export")
        .expect("an export event");
    let folder = export.message.trim_start_matches("exported to ");
    let v = metapoison::export::verify::verify(Path::new(folder)).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert!(
        Path::new(folder).join("poisoned_train.npz").exists()
            && !Path::new(folder).join("png").exists()
    );
    assert_eq!(saved.state.history.len(), 5);
}

#[test]
fn bad_target_id_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = tiny_config();
    config.threat.target_ids = Auto::Value(vec![500]);
    let _one = ONE_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let handle = spawn(EngineSetup {
        data: dataset(&config),
        config,
        device: Device::Cpu,
        kind: Kind::Float,
        run_dir: tmp.path().join("x"),
        resume: false,
        stop: Arc::new(AtomicBool::new(false)),
        linger: false,
        serve: false,
        linger_idle: None,
        ranks: metapoison::ranks::Ranks::solo(),
    });
    let failed: Vec<String> = handle
        .telemetry
        .iter()
        .filter_map(|t| match t {
            Telemetry::Phase(Phase::Failed { message }) => Some(message),
            _ => None,
        })
        .collect();
    let err = handle.join().unwrap_err().to_string();
    assert!(
        err.contains("threat.target_ids") && err.contains("500") && err.contains("200 images"),
        "{err}"
    );
    assert_eq!(failed, vec![err]);
}

#[test]
fn export_now_writes_an_earlier_step_to_a_chosen_folder_and_never_overwrites_it() {
    let mut config = common::tiny_config(400, 10, 6);
    config.run.checkpoint_every = 1;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    let export = |step| Command::ExportNow {
        formats: "npz".into(),
        step,
        out: Some(out.display().to_string()),
    };
    // After step 2 (of 0..5), export step 1; then try the same destination again.
    run(
        config,
        &dir.path().join("run"),
        false,
        None,
        vec![(2, export(Some(1))), (2, export(Some(2)))],
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["craft_step"], 1);
    let saved = checkpoint::load(&dir.path().join("run")).unwrap();
    let kinds: Vec<&str> = saved.state.events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"export") && kinds.contains(&"export_failed"),
        "{kinds:?}"
    );
}

/// A one-step tiny run into `dir` whose engine stays after the last step (as under the
/// dashboard), with 1-epoch victims. Hold `ONE_ENGINE` while it runs.
fn spawn_lingering(dir: &Path) -> metapoison::engine::EngineHandle {
    let mut config = common::tiny_config(400, 10, 1);
    config.victim.epochs = 1.into();
    config.victim.batch_size = 50;
    spawn(EngineSetup {
        data: dataset(&config),
        config,
        device: Device::Cpu,
        kind: Kind::Float,
        run_dir: dir.to_path_buf(),
        resume: false,
        stop: Arc::new(AtomicBool::new(false)),
        linger: true,
        serve: false,
        linger_idle: None,
        ranks: metapoison::ranks::Ranks::solo(),
    })
}

#[test]
fn a_lingering_engine_exports_and_evaluates_after_the_last_step() {
    let dir = tempfile::tempdir().unwrap();
    let _one = ONE_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let handle = spawn_lingering(dir.path());
    let mut report = None;
    let mut events = Vec::new();
    for t in handle.telemetry.iter() {
        match t {
            Telemetry::Finished { .. } => {
                // A second evaluation while the first runs is refused, not queued.
                handle
                    .commands
                    .send(Command::Evaluate { trials: Some(1) })
                    .unwrap();
                handle
                    .commands
                    .send(Command::Evaluate { trials: Some(1) })
                    .unwrap();
            }
            Telemetry::Event(e) => events.push(e),
            Telemetry::Evaluation(r) => {
                report = Some(r);
                handle.commands.send(Command::Abort).unwrap();
            }
            Telemetry::Phase(Phase::Failed { message }) => panic!("{message}"),
            _ => {}
        }
    }
    handle.join().unwrap();
    let r = report.expect("an evaluation result");
    assert_eq!((r.poisoned.trials, r.control.trials), (1, 1));
    let export = dir.path().join("export-step-0001");
    assert!(export.join("eval.json").exists());
    assert!(export.join("poisons.npz").exists());
    assert!(events.iter().any(|e| e.kind == "export"));
    assert!(events
        .iter()
        .any(|e| e.kind == "rejected" && e.message.contains("already running")));
    assert!(events
        .iter()
        .any(|e| e.kind == "evaluation" && e.message.starts_with("done:")));
}

#[test]
fn a_libtorch_failure_inside_an_evaluation_is_reported_and_the_next_one_may_start() {
    let dir = tempfile::tempdir().unwrap();
    let _one = ONE_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let handle = spawn_lingering(dir.path());
    let export = dir.path().join("export-step-0001");
    let mut failures = Vec::new();
    let mut events = Vec::new();
    // A regression would leave the engine waiting for commands: fail instead of hanging.
    let next = || {
        handle
            .telemetry
            .recv_timeout(std::time::Duration::from_secs(120))
            .ok()
    };
    while let Some(t) = next() {
        match t {
            Telemetry::Finished { .. } => handle
                .commands
                .send(Command::ExportNow {
                    formats: "npz".into(),
                    step: None,
                    out: None,
                })
                .unwrap(),
            Telemetry::Event(e) if e.kind == "export" => {
                // Three colour channels where the data has one: the evaluation's first
                // tensor operation on it fails inside libtorch (a panic in tch).
                let split = export.join("poisoned_train.npz");
                let n = metapoison::export::npz::read_npz(&split).unwrap()["labels"].len();
                let images = metapoison::export::npz::NpyArray::u8(
                    vec![n, 28, 28, 3],
                    vec![0; n * 28 * 28 * 3],
                );
                let labels = metapoison::export::npz::NpyArray::i64(vec![n], &vec![0; n]);
                metapoison::export::npz::write_npz(
                    &split,
                    &[("images", &images), ("labels", &labels)],
                )
                .unwrap();
                handle
                    .commands
                    .send(Command::Evaluate { trials: Some(1) })
                    .unwrap();
            }
            Telemetry::Event(e) if e.kind == "evaluation_failed" => {
                failures.push(e.message.clone());
                if failures.len() == 1 {
                    // Not refused as "already running": the failed one let go.
                    handle
                        .commands
                        .send(Command::Evaluate { trials: Some(1) })
                        .unwrap();
                } else {
                    handle.commands.send(Command::Abort).unwrap();
                }
            }
            Telemetry::Event(e) => events.push(e),
            Telemetry::Phase(Phase::Failed { message }) => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(failures.len(), 2, "{failures:?} {events:?}");
    handle.commands.send(Command::Abort).ok();
    handle.join().unwrap();
    assert!(
        failures
            .iter()
            .all(|m| m.lines().count() == 1 && !m.is_empty()),
        "{failures:?}"
    );
    assert!(!events
        .iter()
        .any(|e| e.kind == "rejected" && e.message.contains("already running")));
}
