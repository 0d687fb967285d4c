//! Set-up shared by the integration tests: tiny crafting jobs on the embedded data, short victims.
#![allow(dead_code)] // each test file uses part of it

use metapoison::config::{Auto, Config, DataConfig, DatasetKind, LrSchedule, NetKind};
use metapoison::data;
use metapoison::engine::protocol::{Phase, Telemetry};
use metapoison::engine::{spawn, EngineSetup};
use metapoison::model::sgd::SgdRule;
use metapoison::victim::VictimTraining;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A job small enough for a test: the first `train_limit` embedded images, `npoison` poisons,
/// `steps` craft steps, one surrogate, K = 1, every poison-holding batch unrolled, batch 50.
pub fn tiny_config(train_limit: usize, npoison: usize, steps: usize) -> Config {
    let mut c = Config {
        data: DataConfig {
            dataset: DatasetKind::Embedded,
            path: None,
            train_limit: train_limit.into(),
            ..Default::default()
        },
        ..Config::default()
    };
    c.threat.npoison = npoison.into();
    c.craft.steps = steps.into();
    c.craft.unroll_steps = 1;
    c.craft.ensemble_size = Auto::Value(1);
    c.craft.stagger = Auto::Value(1);
    c.craft.meta_batch_fraction = Auto::Value(1.0);
    c.surrogate.batch_size = 50;
    c
}

/// Runs the engine on the CPU into `dir` until it finishes; panics if it fails.
pub fn craft_to_end(config: &Config, dir: &Path) {
    let handle = spawn(EngineSetup {
        data: data::load(&config.data).unwrap(),
        config: config.clone(),
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
        run_dir: dir.to_path_buf(),
        resume: false,
        stop: Arc::new(AtomicBool::new(false)),
        linger: false,
        serve: false,
        linger_idle: None,
        ranks: metapoison::ranks::Ranks::solo(),
    });
    for t in handle.telemetry.iter() {
        if let Telemetry::Phase(Phase::Failed { message }) = t {
            panic!("{message}");
        }
    }
    handle.join().unwrap();
}

/// How many images (along dimension 0 of [N, C, H, W]) differ anywhere between `a` and `b`.
pub fn images_that_differ(a: &tch::Tensor, b: &tch::Tensor) -> i64 {
    (a - b)
        .abs()
        .sum_dim_intlist(&[1i64, 2, 3][..], false, tch::Kind::Int64)
        .gt(0)
        .sum(tch::Kind::Int64)
        .int64_value(&[])
}

/// Whether a test must skip because `what` (a tool or data set it checks against) is missing.
/// Under CI (`CI` set and not "false"), where `.ci/run` installs everything, a missing tool
/// fails the test instead: nothing skips quietly there.
pub fn skip_without(what: &str, present: bool) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    skip_without_under(what, present, ci)
}

pub fn skip_without_under(what: &str, present: bool, ci: bool) -> bool {
    if present {
        return false;
    }
    assert!(
        !ci,
        "{what} is missing; .ci/run installs it, and under CI this test must not skip"
    );
    eprintln!("skipped: {what} is missing");
    true
}

/// A finished command's stdout and stderr, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until `check` holds, or panics after `limit` saying what was awaited.
pub fn wait_for(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Asks an attached engine for an npz export of its current step and waits for its event;
/// the export folder.
pub fn export_through(viewer: &metapoison::engine::client::Attached) -> std::path::PathBuf {
    use metapoison::engine::protocol::{Command, Telemetry};
    viewer
        .commands
        .send(Command::ExportNow {
            formats: "npz".into(),
            step: None,
            out: None,
        })
        .unwrap();
    let message = viewer
        .telemetry
        .iter()
        .find_map(|t| match t {
            Telemetry::Event(e) if e.message.starts_with("exported to ") => Some(e.message),
            _ => None,
        })
        .expect("an export event");
    std::path::PathBuf::from(message.trim_start_matches("exported to "))
}

/// A short ConvNetBN victim for tests: the crafter's recipe (plain SGD at lr 0.1, a 1-epoch
/// warm-up, no drops) on batches of 50, no augmentation.
pub fn short_victim(epochs: usize) -> VictimTraining {
    VictimTraining {
        net: NetKind::ConvnetBn,
        width: 1,
        epochs,
        lr: 0.1,
        warmup_epochs: 1,
        lr_drops: vec![],
        batch_size: 50,
        rule: SgdRule::plain(0.0),
        schedule: LrSchedule::Step,
        augment: false,
    }
}
