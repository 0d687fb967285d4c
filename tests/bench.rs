//! The speed harness: its step keeps every bound, and the PyTorch reference computes the same
//! float64 meta-gradient (and the comparison notices when it does not).

mod common;

use metapoison::bench::{agreement_spec, reference, Reference, StepInputs, StepSpec};
use tch::{Device, Kind, Tensor};

fn tiny() -> StepSpec {
    StepSpec {
        batch: 8,
        poisons_in_batch: 3,
        npoison: 6,
        ensemble: 2,
        grid: 4,
        ..StepSpec::default_config()
    }
}

#[test]
fn a_bench_step_moves_the_poisons_and_keeps_the_bounds() {
    let spec = tiny();
    let mut inputs = StepInputs::new(&spec, Device::Cpu);
    let before = inputs.perturbation.delta.detach().copy();
    inputs.step();
    let p = &inputs.perturbation;
    let moved = (&p.delta - &before).abs().max().double_value(&[]);
    assert!(moved > 0.1, "delta did not move ({moved})");
    assert!(p.delta.abs().max().double_value(&[]) <= spec.eps + 1e-4);
    let poisons = p.poisons_detached();
    assert!(poisons.min().double_value(&[]) >= -1e-3);
    assert!(poisons.max().double_value(&[]) <= 255.0 + 1e-3);
}

#[test]
fn bad_bench_shapes_are_refused_with_the_flag_named() {
    let mut s = tiny();
    s.poisons_in_batch = 9;
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--poisons-in-batch"));
    let mut s = tiny();
    s.unroll_steps = 0;
    assert!(s.validate().unwrap_err().to_string().contains("--unroll"));
}

/// The reference needs a python with torch: the project's .venv (scripts/test.sh makes it).
fn start_reference(dir: &std::path::Path) -> Option<Reference> {
    let python = reference::default_python();
    let ok = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if common::skip_without(&format!("torch in {}", python.display()), ok) {
        return None;
    }
    Some(Reference::start(&python, dir, "cpu", 1).expect("reference starts"))
}

#[test]
fn the_pytorch_reference_agrees_in_float64_and_a_wrong_gradient_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut r) = start_reference(dir.path()) else {
        return;
    };
    for net in ["convnet-bn", "resnet20"] {
        let mut spec = tiny();
        spec.net = serde_json::from_value(serde_json::Value::String(net.into())).unwrap();
        if net != "convnet-bn" {
            spec.channels = 3;
            spec.side = 32;
        }
        let a = metapoison::bench::check_agreement(&spec, Device::Cpu, &mut r, dir.path()).unwrap();
        assert!(a.max_rel_error_delta < 1e-9, "{net}: {a:?}");
        assert!(a.max_rel_error_grid < 1e-9, "{net}: {a:?}");
        assert!(
            (a.loss_ours - a.loss_reference).abs() < 1e-9,
            "{net}: {a:?}"
        );
    }
    // The same comparison with our expected gradient scaled by 1.01 must report ~1%.
    let spec = agreement_spec(&tiny());
    let inputs = StepInputs::new(&spec, Device::Cpu);
    let (loss, gd, go) = inputs.meta_gradient(0);
    let (gd, go): (Tensor, Tensor) = (gd * 1.01, go.to_kind(Kind::Double));
    let path = dir.path().join("wrong.safetensors");
    inputs
        .save(
            &path,
            &[
                ("expected_loss".into(), &loss),
                ("expected_g_delta".into(), &gd),
                ("expected_g_offsets".into(), &go),
            ],
        )
        .unwrap();
    let a = r.check(&path).unwrap();
    assert!(
        (a.max_rel_error_delta - 0.01 / 1.01).abs() < 1e-6,
        "scaled gradient gave {a:?}"
    );
}

#[test]
fn timed_steps_alternate_with_the_reference_and_both_take_time() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut r) = start_reference(dir.path()) else {
        return;
    };
    let spec = tiny();
    let mut inputs = StepInputs::new(&spec, Device::Cpu);
    let path = dir.path().join("inputs.safetensors");
    inputs.save(&path, &[]).unwrap();
    r.load(&path).unwrap();
    let (ours, theirs) =
        metapoison::bench::time_side_by_side(&mut inputs, Device::Cpu, Some(&mut r), 1, 3).unwrap();
    let theirs = theirs.unwrap();
    assert_eq!((ours.reps, theirs.reps), (3, 3));
    assert!(ours.min_s > 0.0 && theirs.min_s > 0.0);
    assert!(ours.min_s <= ours.median_s && ours.median_s <= ours.max_s);
    let stats = r.stats().unwrap();
    // The reference counted the FLOPs of a real step (convolutions and their double backward).
    assert!(stats["flops_per_step"].as_f64().unwrap() > 1e6);
}

#[test]
fn grouped_bench_steps_compute_the_same_meta_gradient_and_step_in_any_group_size() {
    let base = StepSpec {
        ensemble: 3,
        double: true,
        ..tiny()
    };
    let alone = StepInputs::new(&base, Device::Cpu);
    let (loss, gd, go) = alone.meta_gradient_sum();
    assert!(gd.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    let mut stepped = Vec::new();
    for group_size in [0, 1, 2] {
        let spec = StepSpec {
            grouped: true,
            group_size,
            ..base.clone()
        };
        let mut inputs = StepInputs::new(&spec, Device::Cpu);
        let (l, d, o) = inputs.meta_gradient_sum();
        let rel = |a: &Tensor, b: &Tensor| {
            (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
        };
        assert!(rel(&l, &loss) < 1e-10, "group size {group_size}: loss");
        assert!(
            rel(&d, &gd) < 1e-9,
            "group size {group_size}: delta {}",
            rel(&d, &gd)
        );
        assert!(
            rel(&o, &go) < 1e-9,
            "group size {group_size}: grid {}",
            rel(&o, &go)
        );
        inputs.step();
        stepped.push(inputs.perturbation.delta.detach().copy());
    }
    // A whole grouped step (meta-gradients, clean steps, Adam) lands in the same place
    // whatever the grouping.
    for d in &stepped[1..] {
        let diff = (d - &stepped[0]).abs().max().double_value(&[]);
        assert!(diff < 1e-9, "{diff}");
    }
}

/// `bench --crafter-steps` runs the crafter as a run would (the engine's own preparation):
/// the `auto` fields settled, the plan resolved, the surrogates pretrained, N steps taken.
#[test]
fn the_crafters_own_steps_are_timed_on_the_runs_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[data]\ntrain_limit = 300\n[threat]\nnpoison = 10\n[craft]\nsteps = 4\nunroll_steps = 1\nensemble_size = 2\nstagger = 1\nmeta_batch_fraction = 1.0\n[surrogate]\nbatch_size = 50\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metapoison"))
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("--config")
        .arg(&config)
        .args(["bench", "--crafter-steps", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(report["kind"], "crafter_step");
    assert_eq!(report["step_s"].as_array().unwrap().len(), 2);
    // 10 poisons among 300 images in batches of 50: each of the 2 surrogates unrolls at
    // every batch that holds a poison, at least 1 and at most 6 a surrogate.
    for n in report["meta_batches"].as_array().unwrap() {
        let n = n.as_u64().unwrap();
        assert!((2..=12).contains(&n), "{n} meta batches");
    }
    assert!(stderr.contains("M 2 stagger 1, K 1"), "{stderr}");
}
