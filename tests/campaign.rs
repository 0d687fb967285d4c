//! Campaigns: one run per target, totals over targets, resumable; and the victim-variation
//! flags of `eval`.

mod common;

use metapoison::campaign::{totals, TargetResult};
use metapoison::victim::eval::{summarise, ArmSummary, EvalReport, Trial};
use std::process::Command;

fn trial(arm: &str, success: bool, acc: f64) -> Trial {
    Trial {
        arm: arm.into(),
        seed: 0,
        predicted: vec![if success { 0 } else { 6 }],
        target_probs: vec![vec![0.0; 10]],
        success: vec![success],
        clean_accuracy: acc,
        train_mode: vec![if success { 0.75 } else { 0.25 }],
        seconds: 1.0,
        cached: false,
        class_margin: None,
    }
}

fn report(net: &str, poisoned: &[bool], control: &[bool]) -> EvalReport {
    let mut trials: Vec<Trial> = poisoned
        .iter()
        .map(|&s| trial("poisoned", s, 0.8))
        .collect();
    trials.extend(control.iter().map(|&s| trial("control", s, 0.9)));
    let pick = |arm: &str| trials.iter().filter(|t| t.arm == arm).collect::<Vec<_>>();
    let (p, c): (ArmSummary, ArmSummary) =
        (summarise(&pick("poisoned")), summarise(&pick("control")));
    EvalReport {
        export: "x".into(),
        victim_net: net.into(),
        surrogate_net: "convnet-bn".into(),
        setting: if net == "convnet-bn" {
            "gray-box"
        } else {
            "black-box"
        }
        .into(),
        epochs: 1,
        protocol: None,
        poisons_used: 10,
        adversarial: vec![0],
        poisoned: p,
        control: c,
        noise: None,
        trials,
        seconds: 60.0,
    }
}

/// `report` for victims trained with the standard recipe.
fn standard(poisoned: &[bool], control: &[bool]) -> EvalReport {
    EvalReport {
        protocol: Some(metapoison::config::VictimConfig::default().standard_recipe()),
        ..report("convnet-bn", poisoned, control)
    }
}

#[test]
fn totals_pool_victims_over_targets_and_count_majority_flips() {
    let results = vec![
        TargetResult {
            target_id: 1,
            run_dir: String::new(),
            export_dir: String::new(),
            evals: vec![
                report("convnet-bn", &[true, true, false], &[false, false, false]),
                report("resnet20", &[false, false, false], &[false, false, false]),
                standard(&[false, false, false], &[false, false, false]),
            ],
            craft_seconds: 0.0,
            craft_loss: None,
        },
        TargetResult {
            target_id: 2,
            run_dir: String::new(),
            export_dir: String::new(),
            evals: vec![
                report("convnet-bn", &[true, false, false], &[true, false, false]),
                report("resnet20", &[true, false, false], &[false, false, false]),
                standard(&[true, true, true], &[false, false, false]),
            ],
            craft_seconds: 0.0,
            craft_loss: None,
        },
    ];
    let t = totals(&results);
    assert_eq!(t.len(), 3, "one line per architecture and recipe");
    let gray = &t[0];
    assert_eq!(gray.victim_net, "convnet-bn");
    assert_eq!((gray.successes, gray.victims), (3, 6));
    assert!((gray.success_rate - 0.5).abs() < 1e-12);
    // Only target 1 was flipped by a majority (2 of 3) of its victims.
    assert_eq!((gray.targets_flipped, gray.targets), (1, 2));
    assert_eq!((gray.control_successes, gray.control_victims), (1, 6));
    assert!((gray.accuracy_poisoned - 0.8).abs() < 1e-12);
    let wilson = metapoison::victim::eval::wilson95(3, 6);
    assert_eq!(gray.success_ci95, wilson);
    assert_eq!(t[1].setting, "black-box");
    assert_eq!((t[1].successes, t[1].targets_flipped), (1, 0));
    // The same architecture with the standard recipe is a victim kind of its own.
    assert_eq!(
        (t[2].victim_net.as_str(), t[2].recipe.as_str()),
        ("convnet-bn", "standard")
    );
    assert_eq!(
        (t[2].successes, t[2].victims, t[2].targets_flipped),
        (3, 6, 1)
    );
    assert_eq!(gray.recipe, "crafter");
    assert!((gray.eval_seconds - 120.0).abs() < 1e-9);
}

fn tiny_config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut c = common::tiny_config(400, 10, 1);
    c.victim.epochs = 1.into();
    c.victim.batch_size = 50;
    c.run.device = "cpu".into();
    let path = dir.join("tiny.toml");
    std::fs::write(&path, c.to_toml()).unwrap();
    path
}

#[test]
fn a_campaign_crafts_and_evaluates_each_target_and_resumes_without_redoing_work() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config_file(tmp.path());
    let dir = tmp.path().join("camp");
    let run = |headless: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_metapoison"));
        if headless {
            command.arg("--headless");
        }
        command
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--config")
            .arg(&config)
            .args(["campaign", "--targets", "3,5", "--trials", "1", "--dir"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let out = run(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: one plain progress line per craft step, naming the target.
    assert!(stderr.contains("  target 3: step 1/"), "{stderr}");
    assert!(stderr.contains("  target 5: step 1/"), "{stderr}");
    // --headless: stdout is JSON lines only, each crafting message tagged with its target,
    // the totals last.
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let steps_of = |target: u64| {
        lines
            .iter()
            .filter(|v| v["type"] == "step" && v["target"] == target)
            .count()
    };
    assert!(steps_of(3) >= 1 && steps_of(3) == steps_of(5), "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "campaign_totals");
    assert_eq!(last["totals"][0]["victims"], 2);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("campaign.json")).unwrap()).unwrap();
    let targets: Vec<u64> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target_id"].as_u64().unwrap())
        .collect();
    assert_eq!(targets, vec![3, 5]);
    assert_eq!(report["totals"][0]["victims"], 2);
    assert!(report["selection"]["method"]
        .as_str()
        .unwrap()
        .contains("--targets"));
    // Each target has its own run, its export and its evaluation.
    let eval3 = dir.join("target-3/export/eval-convnet-bn.json");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&eval3).unwrap()).unwrap();
    assert_eq!(e["poisoned"]["trials"], 1);
    assert_eq!(e["control"]["trials"], 1);
    let csv = std::fs::read_to_string(dir.join("campaign.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    let md = std::fs::read_to_string(dir.join("campaign.md")).unwrap();
    assert!(md.contains("| 3 | convnet-bn (gray-box) | - | "), "{md}");
    assert!(md.contains("| 5 | convnet-bn (gray-box) | - | "), "{md}");
    // The control victim (clean split, same seed) is trained for the first target and read
    // back for the second: three victims trained, not four.
    let e5: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("target-5/export/eval-convnet-bn.json")).unwrap(),
    )
    .unwrap();
    let cached = |e: &serde_json::Value, arm: &str| {
        e["trials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["arm"] == arm)
            .unwrap()["cached"]
            .as_bool()
            .unwrap_or(false)
    };
    assert!(!cached(&e, "control") && cached(&e5, "control"));
    assert!(!cached(&e, "poisoned") && !cached(&e5, "poisoned"));
    assert_eq!(std::fs::read_dir(dir.join("victims")).unwrap().count(), 3);
    // Running it again reads everything back: no new evaluation is written.
    let before = std::fs::metadata(&eval3).unwrap().modified().unwrap();
    let again = run(false);
    assert!(again.status.success());
    assert_eq!(
        std::fs::metadata(&eval3).unwrap().modified().unwrap(),
        before
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("gray-box"));
}

/// A protocol of two targets (3 and 5), one victim an arm, both ConvNetBN recipes.
fn tiny_protocol_file(dir: &std::path::Path) -> std::path::PathBuf {
    let protocol = dir.join("tiny-protocol.toml");
    std::fs::write(
        &protocol,
        r#"name = "tiny"
description = "two targets, one victim an arm"
dataset = "embedded"
train_limit = 400
subset = "first"
victim_epochs = 1
target_class = 6
poison_class = 0
targets = [3, 5]
trials = 1
noise_control = true

[[victims]]
net = "convnet-bn"
recipe = "crafter"

[[victims]]
net = "convnet-bn"
recipe = "standard"
"#,
    )
    .unwrap();
    protocol
}

/// `metapoison campaign ARGS --dir DIR` with the data under TMP/data and CONFIG.
fn run_campaign(
    tmp: &std::path::Path,
    config: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("--data-dir")
        .arg(tmp.join("data"))
        .arg("--config")
        .arg(config)
        .arg("campaign")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn a_protocol_campaign_completes_a_campaign_on_its_targets_with_its_victim_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config_file(tmp.path());
    let dir = tmp.path().join("camp");
    let protocol = tiny_protocol_file(tmp.path());
    let campaign = |args: &[&str]| run_campaign(tmp.path(), &config, &dir, args);
    // A protocol fixes targets and victims: flags that choose them are refused up front, and
    // --targets may only pick some of its own.
    let p = protocol.to_str().unwrap();
    let refused = campaign(&["--protocol", p, "--trials", "2", "--black-box", "resnet-20"]);
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("--trials, --black-box: the protocol fixes"),
        "{msg}"
    );
    let foreign = campaign(&["--protocol", p, "--targets", "5,9,4"]);
    assert!(!foreign.status.success());
    let msg = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        msg.contains("--targets [9, 4]: not targets of protocol tiny; give some of [3, 5]"),
        "{msg}"
    );
    assert!(!dir.exists(), "nothing written for a refused campaign");
    // First the crafter's victims alone on the protocol's first target ...
    let first = campaign(&["--targets", "3", "--trials", "1", "--noise-control"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let crafter_eval = dir.join("target-3/export/eval-convnet-bn.json");
    let before = std::fs::metadata(&crafter_eval)
        .unwrap()
        .modified()
        .unwrap();
    // ... then the protocol's first target (a partial tier): that evaluation is read back,
    // the standard recipe's is added ...
    let partial = campaign(&["--protocol", p, "--first", "1"]);
    assert!(
        partial.status.success(),
        "{}",
        String::from_utf8_lossy(&partial.stderr)
    );
    let md = std::fs::read_to_string(dir.join("campaign.md")).unwrap();
    assert!(md.contains("Only its first 1 targets so far: [3]."), "{md}");
    assert!(dir
        .join("target-3/export/eval-convnet-bn-standard.json")
        .exists());
    assert!(!dir.join("target-5").exists());
    // ... then its other target alone (--targets): the folder gathers both, in the
    // protocol's order, which is the whole protocol.
    let out = campaign(&["--protocol", p, "--targets", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&crafter_eval)
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    let standard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("target-5/export/eval-convnet-bn-standard.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(standard["protocol"]["momentum"], 0.9);
    assert_eq!(standard["noise"]["trials"], 1);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("campaign.json")).unwrap()).unwrap();
    assert_eq!(report["protocol"]["name"], "tiny");
    assert_eq!(report["selection"]["targets"], serde_json::json!([3, 5]));
    let totals = report["totals"].as_array().unwrap();
    let recipes: Vec<&str> = totals
        .iter()
        .map(|t| t["recipe"].as_str().unwrap())
        .collect();
    assert_eq!(recipes, ["crafter", "standard"]);
    for t in totals {
        assert_eq!((&t["victims"], &t["noise_victims"]), (&2.into(), &2.into()));
        // Each poisoned and noise victim has its control twin (same seed): shifts exist.
        assert!(t["margin_shift"].as_f64().unwrap().is_finite(), "{t}");
        assert_eq!(
            t["margin_shift_ci95"].as_array().map(Vec::len),
            Some(2),
            "{t}"
        );
        assert!(t["noise_margin_shift"].as_f64().unwrap().is_finite(), "{t}");
        assert!(t["class_margin_shift"].as_f64().unwrap().is_finite(), "{t}");
    }
    assert!(report["results"][0]["craft_seconds"].as_f64().unwrap() > 0.0);
    // The crafting loss of each target's last steps, beside what its victims did.
    let loss = report["results"][0]["craft_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss != 0.0, "{loss}");
    let md = std::fs::read_to_string(dir.join("campaign.md")).unwrap();
    assert!(!md.contains("Only its first"), "{md}");
    for row in [
        "Protocol `tiny`: two targets, one victim an arm.",
        "| 3 | convnet-bn (gray-box) | ",
        &format!(" min | {loss:.2} | "),
        "| crafting | crafting loss, last 5 steps | evaluation |",
        "| margin shift poisoned / noise | its class moved |",
        "| 3 | convnet-bn, standard recipe (gray-box) | ",
        "| **all 2** | convnet-bn (gray-box) | **",
        "| **all 2** | convnet-bn, standard recipe (gray-box) | **",
    ] {
        assert!(md.contains(row), "{row} missing from\n{md}");
    }

    // An evaluation recorded before victims reported their class margin: `--rescore` fills it
    // in from the victim cache, trains nothing and keeps what was recorded.
    let standard_eval = dir.join("target-5/export/eval-convnet-bn-standard.json");
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&standard_eval).unwrap()).unwrap();
    let margins: Vec<serde_json::Value> = old["trials"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .map(|t| t.as_object_mut().unwrap().remove("class_margin").unwrap())
        .collect();
    old["seconds"] = 1234.5.into();
    std::fs::write(&standard_eval, old.to_string()).unwrap();
    let victims = std::fs::read_dir(dir.join("victims")).unwrap().count();
    let out = campaign(&["--protocol", p, "--rescore"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&standard_eval).unwrap()).unwrap();
    assert_eq!(new["seconds"], 1234.5, "the recorded time stays");
    let back: Vec<serde_json::Value> = new["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["class_margin"].clone())
        .collect();
    assert_eq!(back, margins, "the same victims scored again");
    assert_eq!(
        std::fs::read_dir(dir.join("victims")).unwrap().count(),
        victims
    );
    assert!(!dir.join("target-5/export/eval.json").exists());
}

/// A tiny crafted run exported (npz) into TMP/export; returns (config file, export folder).
fn crafted_export(tmp: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = tiny_config_file(tmp);
    let c = metapoison::config::Config::load(&config).unwrap();
    let run_dir = tmp.join("run");
    common::craft_to_end(&c, &run_dir);
    let export = tmp.join("export");
    metapoison::export::export(&metapoison::export::ExportRequest {
        run_dir,
        step: None,
        out: Some(export.clone()),
        formats: metapoison::export::Formats::parse("npz").unwrap(),
        force: false,
    })
    .unwrap();
    (config, export)
}

#[test]
fn eval_variation_flags_reach_the_victims_and_bad_values_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, export) = crafted_export(tmp.path());
    let eval = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_metapoison"))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--config")
            .arg(&config)
            .arg("eval")
            .arg(&export)
            .args(args)
            .output()
            .unwrap()
    };
    let succeeded = |out: &std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(export.join("eval.json")).unwrap()).unwrap()
    };
    let out = eval(&[
        "--trials",
        "1",
        "--no-control",
        "--noise-control",
        "--first-poisons",
        "4",
        "--victim-batch",
        "100",
        "--weight-decay",
        "2e-4",
        "--victim-lr",
        "0.2",
        "--augment",
    ]);
    let e = succeeded(&out);
    assert_eq!(e["poisons_used"], 4);
    assert_eq!(e["protocol"]["batch_size"], 100);
    assert_eq!(e["protocol"]["weight_decay"], 2e-4);
    assert_eq!(e["protocol"]["lr"], 0.2);
    assert_eq!(e["protocol"]["augment"], true);
    assert_eq!(e["control"]["trials"], 0);
    assert_eq!(e["noise"]["trials"], 1);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\nnoise "));

    // With controls, `eval` prints the margin shift: the mean over victims of the target's
    // adversarial margin minus that of the control victim with the same seed.
    let out = eval(&["--trials", "2"]);
    let e = succeeded(&out);
    let adv = e["adversarial"][0].as_u64().unwrap() as usize;
    let margin = |arm: &str, seed: &serde_json::Value| {
        let t = e["trials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["arm"] == arm && &t["seed"] == seed)
            .unwrap();
        let p: Vec<f64> = t["target_probs"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap().max(1e-12))
            .collect();
        let other = (0..p.len())
            .filter(|&j| j != adv)
            .map(|j| p[j])
            .fold(0.0, f64::max);
        p[adv].ln() - other.ln()
    };
    let poisoned: Vec<&serde_json::Value> = e["trials"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["arm"] == "poisoned")
        .map(|t| &t["seed"])
        .collect();
    assert_eq!(poisoned.len(), 2);
    let mean = poisoned
        .iter()
        .map(|s| margin("poisoned", s) - margin("control", s))
        .sum::<f64>()
        / 2.0;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("over victims): poisoned {mean:+.2} [")),
        "{mean}: {printed}"
    );
    // And the same for the other images of the target's class (their mean margin).
    let class_margin = |arm: &str, seed: &serde_json::Value| {
        e["trials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["arm"] == arm && &t["seed"] == seed)
            .unwrap()["class_margin"]
            .as_f64()
            .unwrap()
    };
    let class_mean = poisoned
        .iter()
        .map(|s| class_margin("poisoned", s) - class_margin("control", s))
        .sum::<f64>()
        / 2.0;
    assert!(
        printed.contains(&format!(
            "; the target's class, poisoned {class_mean:+.2} ["
        )),
        "{class_mean}: {printed}"
    );

    // The standard recipe: Nesterov momentum, one cycle; a flag given with it applies on top.
    let out = eval(&[
        "--trials",
        "1",
        "--no-control",
        "--recipe",
        "standard",
        "--weight-decay",
        "2e-4",
    ]);
    let e = succeeded(&out);
    let p = &e["protocol"];
    assert_eq!(
        (&p["momentum"], &p["nesterov"], &p["schedule"], &p["lr"]),
        (
            &serde_json::json!(0.9),
            &serde_json::json!(true),
            &serde_json::json!("one-cycle"),
            &serde_json::json!(0.1)
        )
    );
    assert_eq!(p["weight_decay"], 2e-4);
    // Each victim also reports the authors' train-mode verdict.
    assert_eq!(e["trials"][0]["train_mode"].as_array().unwrap().len(), 1);
    // With a flag on top it is no longer the standard recipe, and says so.
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("train mode") && printed.contains("custom recipe"),
        "{printed}"
    );

    for (args, named) in [
        (&["--victim-lr=-1"][..], "--victim-lr"),
        (&["--nesterov"][..], "--nesterov"),
        (&["--momentum", "1.5"][..], "--momentum"),
        (&["--schedule", "cosine"][..], "--schedule"),
    ] {
        let bad = eval(args);
        assert!(!bad.status.success());
        let msg = String::from_utf8_lossy(&bad.stderr);
        assert!(msg.contains(named), "{msg}");
        assert_eq!(msg.trim().lines().count(), 1, "{msg}");
    }
}

#[test]
fn keeping_the_first_poisons_reverts_the_rest_to_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, export) = crafted_export(tmp.path());
    let mut data = metapoison::victim::eval::load_export(&export, tch::Device::Cpu).unwrap();
    let changed = |d: &metapoison::victim::eval::EvalData| -> Vec<i64> {
        let diff = (&d.poisoned_x - &d.clean_x)
            .abs()
            .flatten(1, -1)
            .sum_dim_intlist(1i64, false, tch::Kind::Float)
            .gt(0.0)
            .nonzero()
            .flatten(0, -1);
        Vec::<i64>::try_from(diff).unwrap()
    };
    let all = changed(&data);
    assert!(
        all.len() >= 8,
        "most poisons differ from their bases: {all:?}"
    );
    let idx: Vec<i64> = Vec::try_from(&data.poison_indices).unwrap();
    data.keep_first_poisons(3);
    let kept = changed(&data);
    assert!(
        kept.iter().all(|i| idx[..3].contains(i)),
        "{kept:?} vs {:?}",
        &idx[..3]
    );
}

#[test]
fn a_victim_cache_reuses_exactly_the_victims_whose_inputs_match() {
    use metapoison::victim::eval::{evaluate, EvalPlan};
    let tmp = tempfile::tempdir().unwrap();
    let (config, export) = crafted_export(tmp.path());
    let config = metapoison::config::Config::load(&config).unwrap();
    let cache = tmp.path().join("victims");
    let plan = |trials: usize, epochs: usize| EvalPlan {
        victim: {
            let mut v = config.victim.clone();
            v.epochs = epochs.into();
            v
        },
        trials,
        control: true,
        noise_control: false,
        save_weights: false,
        first_poisons: None,
        grouped: None,
        victim_cache: Some(cache.clone()),
    };
    let files = || std::fs::read_dir(&cache).unwrap().count();
    let cpu = tch::Device::Cpu;
    let first = evaluate(&export, &plan(1, 1), cpu, |_| true).unwrap();
    assert!(first.trials.iter().all(|t| !t.cached));
    assert_eq!(files(), 2);
    // One more trial: the first trial's two victims are read back and score exactly as when
    // they were trained; only the new seed's victims are trained.
    let second = evaluate(&export, &plan(2, 1), cpu, |_| true).unwrap();
    let cached: Vec<bool> = second.trials.iter().map(|t| t.cached).collect();
    assert_eq!(cached, vec![true, true, false, false]);
    for (a, b) in first.trials.iter().zip(&second.trials) {
        assert_eq!(a.arm, b.arm);
        assert_eq!(a.predicted, b.predicted);
        assert_eq!(a.target_probs, b.target_probs);
        assert_eq!(a.clean_accuracy, b.clean_accuracy);
    }
    assert_eq!(files(), 4);
    // Grouped training (all victims as one network, as on CUDA) trains the same victims up to
    // float32 rounding, which training amplifies (tests/grouped.rs shows the float64 victims
    // equal to 1e-9): without the cache all four at once...
    let close = |a: &metapoison::victim::eval::Trial, b: &metapoison::victim::eval::Trial| {
        assert_eq!((&a.arm, a.seed), (&b.arm, b.seed));
        for (pa, pb) in a
            .target_probs
            .iter()
            .flatten()
            .zip(b.target_probs.iter().flatten())
        {
            assert!((pa - pb).abs() < 0.05, "{pa} vs {pb}");
        }
        assert!((a.clean_accuracy - b.clean_accuracy).abs() < 0.03);
    };
    let all_at_once = EvalPlan {
        grouped: Some(true),
        victim_cache: None,
        ..plan(2, 1)
    };
    let grouped = evaluate(&export, &all_at_once, cpu, |_| true).unwrap();
    assert!(grouped.trials.iter().all(|t| !t.cached));
    for (a, b) in second.trials.iter().zip(&grouped.trials) {
        close(a, b);
    }
    // ...and with it, the cached victims read back and only the third trial's two trained.
    let mixed = EvalPlan {
        grouped: Some(true),
        ..plan(3, 1)
    };
    let third = evaluate(&export, &mixed, cpu, |_| true).unwrap();
    let cached: Vec<bool> = third.trials.iter().map(|t| t.cached).collect();
    assert_eq!(cached, vec![true, true, true, true, false, false]);
    let one_at_a_time = EvalPlan {
        victim_cache: None,
        ..plan(3, 1)
    };
    let reference = evaluate(&export, &one_at_a_time, cpu, |_| true).unwrap();
    for (a, b) in reference.trials.iter().zip(&third.trials) {
        close(a, b);
    }
    assert_eq!(files(), 6);
    // Another protocol (2 epochs) matches nothing.
    let longer = evaluate(&export, &plan(1, 2), cpu, |_| true).unwrap();
    assert!(longer.trials.iter().all(|t| !t.cached));
    assert_eq!(files(), 8);
    // A damaged file is trained again, not an error.
    for entry in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not a safetensors file").unwrap();
    }
    let again = evaluate(&export, &plan(1, 1), cpu, |_| true).unwrap();
    assert!(again.trials.iter().all(|t| !t.cached));
    assert_eq!(again.trials[0].target_probs, first.trials[0].target_probs);
}

#[test]
fn craft_takes_its_target_ids_from_the_command_line_and_names_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config_file(tmp.path());
    let craft = |targets: &str, run: &str| {
        Command::new(env!("CARGO_BIN_EXE_metapoison"))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--config")
            .arg(&config)
            .args(["craft", "--headless", "--steps", "1", "--targets", targets])
            .arg("--run-dir")
            .arg(tmp.path().join(run))
            .output()
            .unwrap()
    };
    let out = craft("3,5", "run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved =
        metapoison::config::Config::load(&tmp.path().join("run").join("config.toml")).unwrap();
    assert_eq!(
        saved.threat.target_ids,
        metapoison::config::Auto::Value(vec![3, 5])
    );
    let started = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "started")
        .unwrap();
    assert_eq!(started["plan"]["target_ids"], serde_json::json!([3, 5]));
    let bad = craft("3,100000", "bad");
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("threat.target_ids"), "{msg}");
    assert_eq!(msg.trim().lines().count(), 1, "{msg}");
}

#[test]
fn the_markdown_table_shows_each_victims_adversarial_probability_and_the_totals() {
    use metapoison::campaign::{markdown, CampaignReport, Selection};
    use metapoison::victim::targets::Candidate;
    let mut gray = report("convnet-bn", &[true, false], &[false, false]);
    // Victims in arm order: poisoned 0.91, 0.12; controls 0.03, 0.40 (the other classes at
    // 0, so the margin shifts are ln(0.91 / 0.03) and ln(0.12 / 0.40): +1.10 on average).
    for (t, p) in gray.trials.iter_mut().zip([0.91, 0.12, 0.03, 0.40]) {
        t.target_probs[0][0] = p;
    }
    let results = vec![one_target(7, gray)];
    let r = CampaignReport {
        started: String::new(),
        selection: Selection {
            method: "test".into(),
            targets: vec![7],
            candidates: vec![Candidate {
                id: 7,
                test_index: 70,
                correct: 1.0,
                margin: 2.5,
                min_margin: 1.25,
                p_adv: 0.1,
            }],
        },
        protocol: None,
        totals: totals(&results),
        results,
        seconds: 0.0,
    };
    let md = markdown(&r);
    assert!(
        md.contains(
            "| 7 | convnet-bn (gray-box) | 2.50 / 1.25 | 1/2 | 0.91, 0.12 | 0/2 | 0.03, 0.40 | +1.10 | 80.0% / 90.0% |"
        ),
        "{md}"
    );
    // Then the totals as `campaign` prints them: 1 of 2 flipped, no control.
    let totals_text = metapoison::campaign::summary(&r);
    assert!(totals_text.contains("  1/2    50.0% ["), "{totals_text}");
    assert!(md.contains(&totals_text), "{md}");
}

/// A target's result holding one evaluation, nothing crafted.
fn one_target(target_id: usize, e: EvalReport) -> TargetResult {
    TargetResult {
        target_id,
        run_dir: String::new(),
        export_dir: String::new(),
        evals: vec![e],
        craft_seconds: 0.0,
        craft_loss: None,
    }
}

/// Sets each victim's seed and its target's probabilities of the adversarial class (0) and
/// of the strongest other class (6), in the order of `e.trials`.
fn with_probs(mut e: EvalReport, victims: &[(u64, f64, f64)]) -> EvalReport {
    assert_eq!(e.trials.len(), victims.len());
    for (t, &(seed, adv, other)) in e.trials.iter_mut().zip(victims) {
        t.seed = seed;
        t.target_probs[0][0] = adv;
        t.target_probs[0][6] = other;
    }
    e
}

#[test]
fn the_margin_shift_pairs_victims_by_seed_and_has_a_t_interval_over_targets() {
    use metapoison::campaign::margin_shifts;
    use metapoison::victim::eval::{adv_margin, t_interval95};
    let ln = f64::ln;
    // The margin is ln p(adv) - ln max of the others; a zero probability is floored at 1e-12.
    let mut p = vec![0.0; 10];
    p[6] = 1.0;
    assert!((adv_margin(&p, 0).unwrap() - ln(1e-12)).abs() < 1e-9);
    assert_eq!(adv_margin(&p, 10), None);
    // Target A: poisoned seeds 1, 2; controls listed in the other order (seeds 2, 1).
    let a = with_probs(
        report("convnet-bn", &[true, false], &[false, false]),
        &[(1, 0.5, 0.25), (2, 0.2, 0.4), (2, 0.1, 0.5), (1, 0.2, 0.4)],
    );
    let want_a = [ln(2.0) - ln(0.5), ln(0.5) - ln(0.2)];
    let got = margin_shifts(&a, "poisoned");
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(want_a) {
        assert!((g - w).abs() < 1e-9, "{got:?} against {want_a:?}");
    }
    // Target B: the poisons move it by ln 1.5 for both seeds.
    let b = with_probs(
        report("convnet-bn", &[false, false], &[false, false]),
        &[(1, 0.3, 0.4), (2, 0.3, 0.4), (1, 0.2, 0.4), (2, 0.2, 0.4)],
    );
    assert!((b.margin_shift("poisoned").unwrap() - ln(1.5)).abs() < 1e-9);
    let mean_a = (want_a[0] + want_a[1]) / 2.0;
    let results = vec![one_target(1, a), one_target(2, b)];
    let t = &totals(&results)[0];
    let mean = (mean_a + ln(1.5)) / 2.0;
    assert!((t.margin_shift.unwrap() - mean).abs() < 1e-9);
    assert_eq!(t.noise_margin_shift, None, "no noise victims");
    // Two targets: the interval is over their four victims' shifts.
    let (_, want) = t_interval95(&[want_a[0], want_a[1], ln(1.5), ln(1.5)]).unwrap();
    let got = t.margin_shift_ci95.unwrap();
    assert!((got.0 - want.0).abs() < 1e-9 && (got.1 - want.1).abs() < 1e-9);
    assert_eq!(t.margin_shift_ci_over, "victims");
    // Five targets (A, B, B, B, B): over the targets' means, mean +- t(4 df) x sd / sqrt 5.
    let mut five = results.clone();
    for id in 3..6 {
        five.push(TargetResult {
            target_id: id,
            ..results[1].clone()
        });
    }
    let t5 = &totals(&five)[0];
    assert_eq!(t5.margin_shift_ci_over, "targets");
    let means = [mean_a, ln(1.5), ln(1.5), ln(1.5), ln(1.5)];
    let m5 = means.iter().sum::<f64>() / 5.0;
    let sd = (means.iter().map(|v| (v - m5).powi(2)).sum::<f64>() / 4.0).sqrt();
    let (lo, hi) = t5.margin_shift_ci95.unwrap();
    let half = 2.776 * sd / 5f64.sqrt();
    assert!((lo - (m5 - half)).abs() < 1e-9 && (hi - (m5 + half)).abs() < 1e-9);
    let (m, (lo, hi)) = t_interval95(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(m, 2.0);
    assert!((hi - 2.0 - 4.303 / 3f64.sqrt()).abs() < 1e-9 && (2.0 - lo - (hi - 2.0)).abs() < 1e-12);
}

#[test]
fn compare_pairs_two_campaigns_victims_by_seed_on_their_shared_targets() {
    use metapoison::campaign::{
        compare, compare_judged, comparison_markdown, csv, judged_targets_from_csv, CampaignReport,
        Comparison, Selection,
    };
    let ln = f64::ln;
    let campaign = |targets: Vec<(usize, Vec<EvalReport>)>| CampaignReport {
        started: String::new(),
        selection: Selection {
            method: "test".into(),
            targets: targets.iter().map(|t| t.0).collect(),
            candidates: vec![],
        },
        protocol: None,
        results: targets
            .into_iter()
            .map(|(id, evals)| TargetResult {
                target_id: id,
                run_dir: String::new(),
                export_dir: String::new(),
                evals,
                craft_seconds: 0.0,
                craft_loss: None,
            })
            .collect(),
        totals: vec![],
        seconds: 0.0,
    };
    // The same controls in both (seeds 1 and 2: p(adv) 0.2 against 0.4).
    let gray = |poisoned: [(u64, f64); 2], flipped: [bool; 2]| {
        with_probs(
            report("convnet-bn", &flipped, &[false, false]),
            &[
                (poisoned[0].0, poisoned[0].1, 0.4),
                (poisoned[1].0, poisoned[1].1, 0.4),
                (1, 0.2, 0.4),
                (2, 0.2, 0.4),
            ],
        )
    };
    let first = campaign(vec![
        (7, vec![gray([(1, 0.2), (2, 0.2)], [false, false])]),
        (8, vec![gray([(1, 0.4), (2, 0.2)], [false, false])]),
    ]);
    // The second campaign lists its victims in the other seed order, has target 9 that the
    // first lacks and a victim kind (standard recipe) that the first lacks.
    let second = campaign(vec![
        (9, vec![gray([(1, 0.9), (2, 0.9)], [true, true])]),
        (
            8,
            vec![
                gray([(2, 0.6), (1, 0.4)], [true, false]),
                standard(&[true, true], &[false, false]),
            ],
        ),
        (7, vec![gray([(2, 0.2), (1, 0.8)], [false, true])]),
    ]);
    let c = compare(&first, &second);
    assert_eq!(c.len(), 1, "only the victim kind both evaluated: {c:?}");
    let c = &c[0];
    assert_eq!(
        c.targets,
        [7, 8],
        "shared targets, in the first campaign's order"
    );
    assert_eq!(c.flipped, [(0, 4), (2, 4)]);
    // Target 7: seed 1 moves by ln(0.8/0.2) = ln 4, seed 2 by 0; target 8: seed 1 by 0,
    // seed 2 by ln(0.6/0.2) = ln 3. Paired by order instead of seed, both would read ln 2.
    let want = [(7, ln(4.0) / 2.0), (8, ln(3.0) / 2.0)];
    for ((t, d), (wt, wd)) in c.per_target.iter().zip(want) {
        assert_eq!(*t, wt);
        assert!((d - wd).abs() < 1e-9, "{:?}", c.per_target);
    }
    assert!((c.difference - (ln(4.0) + ln(3.0)) / 4.0).abs() < 1e-9);
    assert!((c.margin_shift[0] - ln(2.0) / 4.0).abs() < 1e-9);
    assert_eq!(c.ci_over, "victims");
    let (lo, hi) = c.difference_ci95.unwrap();
    assert!(lo < c.difference && c.difference < hi);
    // Victims trained for another number of epochs are not paired with these.
    let mut longer = second.clone();
    for r in &mut longer.results {
        for e in &mut r.evals {
            e.epochs += 1;
        }
    }
    assert!(compare(&first, &longer).is_empty());
    assert_eq!(c.targets_higher(), 2);
    let md = comparison_markdown(["a", "b"], std::slice::from_ref(c));
    assert!(
        md.contains("| convnet-bn | 2 | 0/4 | 2/4 | +0.17 | +0.79 | **+0.62** ["),
        "{md}"
    );
    assert!(
        md.contains("| higher on 2 of 2: 7: +0.69, 8: +0.55 |"),
        "{md}"
    );

    // Several campaigns after the first: one sweep table, a row per campaign and victim kind,
    // each against the first on the targets it shares with it (the first campaign against
    // itself differs by exactly 0).
    let dir = tempfile::tempdir().unwrap();
    for (name, c) in [("base", &first), ("b", &second), ("c", &first)] {
        let folder = dir.path().join(name);
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(
            folder.join("campaign.json"),
            serde_json::to_string(c).unwrap(),
        )
        .unwrap();
    }
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metapoison"));
        cmd.current_dir(dir.path())
            .args(["compare", "base", "b", "c"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let sweep = run(false);
    let rows: Vec<&str> = sweep
        .lines()
        .filter(|l| l.starts_with("| b |") || l.starts_with("| c |"))
        .collect();
    assert_eq!(rows.len(), 2, "{sweep}");
    assert!(
        rows[0].starts_with("| b | convnet-bn | 2 | 0/4 | 2/4 | +0.17 | +0.79 | **+0.62** ["),
        "{sweep}"
    );
    assert!(
        rows[1].starts_with("| c | convnet-bn | 2 | 0/4 | 0/4 | +0.17 | +0.17 | **+0.00**"),
        "{sweep}"
    );
    // Higher on: both targets for b, none for the first campaign against itself.
    assert!(rows[0].ends_with("| 2/2 |"), "{sweep}");
    assert!(rows[1].ends_with("| 0/2 |"), "{sweep}");
    let lines: Vec<Vec<Comparison>> = run(true)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON line per campaign compared");
    assert!((lines[0][0].difference - c.difference).abs() < 1e-12);
    assert_eq!(lines[1][0].difference, 0.0);

    // The campaigns' CSV tables, which outlive their folders, compare alike: a target's
    // difference is the difference of its two means (every seed pairs here), and with 2
    // targets there is no interval (the victims' shifts are not in a table). A table against
    // a report reads the same.
    for (name, c) in [("base", &first), ("b", &second)] {
        std::fs::write(dir.path().join(format!("{name}.csv")), csv(&c.results)).unwrap();
    }
    let table_row =
        "| convnet-bn | 2 | 0/4 | 2/4 | +0.17 | +0.79 | **+0.62** | higher on 2 of 2: 7: +0.69, 8: +0.55 |";
    for args in [["base.csv", "b.csv"], ["base", "b.csv"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_metapoison"))
            .current_dir(dir.path())
            .arg("compare")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let md = String::from_utf8(out.stdout).unwrap();
        assert!(md.contains(table_row), "{args:?}: {md}");
        assert!(md.starts_with("`b` against `base`"), "{md}");
    }
    // From 5 targets on the interval is over targets, which a table has: the same as the
    // reports' up to the table's 4 decimals.
    let more = |c: &CampaignReport| {
        let mut c = c.clone();
        let extra: Vec<TargetResult> = c
            .results
            .iter()
            .filter(|r| r.target_id == 7 || r.target_id == 8)
            .cycle()
            .take(3)
            .zip([10, 11, 12])
            .map(|(r, id)| TargetResult {
                target_id: id,
                ..r.clone()
            })
            .collect();
        c.results.extend(extra);
        c
    };
    let (first5, second5) = (more(&first), more(&second));
    let from_reports = compare(&first5, &second5);
    let from_tables = compare_judged(
        &judged_targets_from_csv(&csv(&first5.results)).unwrap(),
        &judged_targets_from_csv(&csv(&second5.results)).unwrap(),
    );
    let (r, t) = (&from_reports[0], &from_tables[0]);
    assert_eq!((r.targets.len(), r.ci_over.as_str()), (5, "targets"));
    assert_eq!(t.ci_over, "targets");
    let ((rl, rh), (tl, th)) = (r.difference_ci95.unwrap(), t.difference_ci95.unwrap());
    for (a, b) in [(r.difference, t.difference), (rl, tl), (rh, th)] {
        assert!((a - b).abs() < 1e-3, "{r:?} against {t:?}");
    }
    assert!(
        rh - rl > 0.1,
        "an interval that could tell them apart: {r:?}"
    );
    assert_eq!(r.targets_higher(), t.targets_higher());
}

#[test]
fn a_table_that_is_not_a_campaigns_csv_gives_a_typed_error_naming_line_and_column() {
    use metapoison::campaign::{judged_targets_from_csv, CsvTableError};
    let header =
        "target_id,victim_net,recipe,epochs,poisoned_successes,poisoned_victims,margin_shift";
    assert_eq!(judged_targets_from_csv(""), Err(CsvTableError::Empty));
    assert_eq!(
        judged_targets_from_csv("target_id,victim_net\n1,convnet-bn\n"),
        Err(CsvTableError::MissingColumn { column: "recipe" })
    );
    assert_eq!(
        judged_targets_from_csv(&format!("{header}\n\n7,convnet-bn,crafter,20,1\n")),
        Err(CsvTableError::CellCount {
            line: 3,
            cells: 5,
            columns: 7
        })
    );
    let bad_count =
        judged_targets_from_csv(&format!("{header}\n7,convnet-bn,crafter,20,-1,8,0.5\n"));
    assert_eq!(
        bad_count,
        Err(CsvTableError::BadCell {
            line: 2,
            column: "poisoned_successes".into(),
            value: "-1".into(),
            expected: "a count"
        })
    );
    assert_eq!(
        bad_count.unwrap_err().to_string(),
        "line 2: `-1` is not a count (poisoned_successes)"
    );
    // An empty shift (no control twins) reads as none; the rest as written.
    let rows = judged_targets_from_csv(&format!(
        "{header}\n7,convnet-bn,crafter,20,1,8,\n9,resnet-20,standard,8,0,8,-0.25\n"
    ))
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].target_id, rows[0].flipped, rows[0].margin_shift),
        (7, (1, 8), None)
    );
    assert_eq!(
        (
            rows[1].victim_net.as_str(),
            rows[1].epochs,
            rows[1].margin_shift
        ),
        ("resnet-20", 8, Some(-0.25))
    );
}

#[test]
fn a_protocol_campaigns_table_says_which_of_its_targets_the_folder_holds() {
    use metapoison::campaign::{markdown, CampaignReport, Protocol, Selection};
    let gray = Protocol::load("gray-box").unwrap();
    let holding = |targets: Vec<usize>| {
        markdown(&CampaignReport {
            started: String::new(),
            selection: Selection {
                method: "protocol gray-box".into(),
                targets,
                candidates: vec![],
            },
            protocol: Some(gray.clone()),
            results: vec![],
            totals: vec![],
            seconds: 0.0,
        })
    };
    let all = gray.targets.clone();
    assert!(holding(all[..3].to_vec()).contains(&format!(
        " Only its first 3 targets so far: {:?}.",
        &all[..3]
    )));
    let share = vec![all[8], all[9]];
    assert!(holding(share.clone()).contains(&format!(" Only 2 of its 10 targets here: {share:?}.")));
    assert!(!holding(all).contains(" Only "));
}

#[test]
fn a_folder_holding_targets_outside_the_protocol_is_refused_before_anything_is_crafted() {
    use metapoison::campaign::{CampaignReport, Selection};
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config_file(tmp.path());
    let dir = tmp.path().join("camp");
    std::fs::create_dir_all(&dir).unwrap();
    // A campaign on target 4, chosen by hand, already in the folder.
    let held = CampaignReport {
        started: String::new(),
        selection: Selection {
            method: "given on the command line (--targets)".into(),
            targets: vec![4],
            candidates: vec![],
        },
        protocol: None,
        results: vec![],
        totals: vec![],
        seconds: 0.0,
    };
    std::fs::write(
        dir.join("campaign.json"),
        serde_json::to_string(&held).unwrap(),
    )
    .unwrap();
    let protocol = tiny_protocol_file(tmp.path());
    let out = run_campaign(
        tmp.path(),
        &config,
        &dir,
        &["--protocol", protocol.to_str().unwrap(), "--targets", "3"],
    );
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains(
            "holds a campaign on targets [4], and 4 is not a target of protocol tiny ([3, 5]): use another --dir"
        ),
        "{msg}"
    );
    assert!(!dir.join("target-3").exists() && !dir.join("config.toml").exists());
}

/// `report` with a noise arm: `noise` victims after the controls, seeds set by `with_probs`.
fn with_noise(mut e: EvalReport, noise: &[bool]) -> EvalReport {
    e.trials
        .extend(noise.iter().map(|&s| trial("noise", s, 0.85)));
    let arm: Vec<&Trial> = e.trials.iter().filter(|t| t.arm == "noise").collect();
    e.noise = Some(summarise(&arm));
    e
}

#[test]
fn the_totals_say_how_far_the_poisons_move_the_target_beyond_noise_of_the_same_budget() {
    use metapoison::campaign::{markdown, CampaignReport, Protocol, Selection};
    let ln = f64::ln;
    // Victims in trial order: poisoned seeds 1, 2; controls seeds 2, 1; noise seeds 2, 1.
    // Per seed the poisoned margin less the noise margin (the controls cancel): seed 1
    // ln(0.5 / 0.25) - ln(0.1 / 0.5), seed 2 ln(0.2 / 0.4) - ln(0.3 / 0.3).
    let a = with_probs(
        with_noise(
            report("convnet-bn", &[true, false], &[false, false]),
            &[false, false],
        ),
        &[
            (1, 0.5, 0.25),
            (2, 0.2, 0.4),
            (2, 0.1, 0.5),
            (1, 0.2, 0.4),
            (2, 0.3, 0.3),
            (1, 0.1, 0.5),
        ],
    );
    let want = [ln(2.0) - ln(0.2), ln(0.5) - ln(1.0)];
    let got = metapoison::campaign::beyond_noise(&a);
    assert_eq!(got.len(), 2, "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "{got:?} against {want:?}");
    }
    // It is the poisoned shift less the noise shift, target by target.
    let mean = (want[0] + want[1]) / 2.0;
    let by_shifts = a.margin_shift("poisoned").unwrap() - a.margin_shift("noise").unwrap();
    assert!((mean - by_shifts).abs() < 1e-9);
    let results = vec![one_target(3, a.clone())];
    let t = &totals(&results)[0];
    assert!((t.beyond_noise.unwrap() - mean).abs() < 1e-9);
    // One target: the interval is over its two victims.
    let (_, ci) = metapoison::victim::eval::t_interval95(&want).unwrap();
    let (lo, hi) = t.beyond_noise_ci95.unwrap();
    assert!((lo - ci.0).abs() < 1e-9 && (hi - ci.1).abs() < 1e-9);
    // A target without a noise arm leaves the totals without it (its interval would be over
    // other targets than the margin shift's).
    let plain = with_probs(
        report("convnet-bn", &[false, false], &[false, false]),
        &[(1, 0.3, 0.4), (2, 0.3, 0.4), (1, 0.2, 0.4), (2, 0.2, 0.4)],
    );
    let mixed = totals(&[one_target(3, a.clone()), one_target(4, plain)]);
    assert_eq!(
        (mixed[0].beyond_noise, mixed[0].beyond_noise_ci95),
        (None, None)
    );
    // The benchmark table's totals row and the printed summary both carry it.
    let r = CampaignReport {
        started: String::new(),
        selection: Selection {
            method: "protocol gray-box".into(),
            targets: vec![3],
            candidates: vec![],
        },
        protocol: Some(Protocol::load("gray-box").unwrap()),
        totals: totals(&results),
        results,
        seconds: 0.0,
    };
    let text = format!("{mean:+.2} [{:+.2}, {:+.2}]", ci.0, ci.1);
    let md = markdown(&r);
    assert!(
        md.contains(&format!("; poisoned beyond noise {text} |")),
        "{md}"
    );
    let summary = metapoison::campaign::summary(&r);
    assert!(summary.contains("beyond noise [95% t]"), "{summary}");
    assert!(summary.trim_end().ends_with(&text), "{summary}");
}
