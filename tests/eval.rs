//! Victim evaluation: the clean-accuracy floor of a short training run, success read from the
//! real prediction, the Wilson interval, and `eval` on a real export.

mod common;

use metapoison::config::{DataConfig, DatasetKind, NetKind};
use metapoison::data;
use metapoison::export::{export, ExportRequest, Formats};
use metapoison::model::split_tensor;
use metapoison::model::{sgd, InputNorm, Network, State};
use metapoison::victim::eval::{
    load_export, mean_margin, run_trial, score, summarise, wilson95, Arm, Judged,
};
use metapoison::victim::train_from_scratch;
use tch::{Device, Kind, Tensor};

/// Documented floor: ConvNetBN trained 3 epochs on the first 2,000 embedded images reaches at
/// least 70% clean test accuracy (chance is 10%; 10 epochs on 5,000 images give about 85%).
#[test]
fn clean_victim_reaches_the_accuracy_floor() {
    let ds = data::load(&DataConfig {
        dataset: DatasetKind::Embedded,
        path: None,
        train_limit: 2000.into(),
        ..Default::default()
    })
    .unwrap();
    let net = Network::new(
        NetKind::ConvnetBn,
        1,
        10,
        1,
        InputNorm::for_dataset(&ds.name, 1),
    );
    let x = split_tensor(&ds.train, Device::Cpu);
    let y = Tensor::from_slice(&ds.train.labels).to_kind(Kind::Int64);
    let spec = common::short_victim(3);
    let state = train_from_scratch(&net, &spec, &x, &y, 5, Kind::Float, |_| true);
    let acc = sgd::accuracy(
        &net,
        &state,
        &split_tensor(&ds.test, Device::Cpu),
        &Tensor::from_slice(&ds.test.labels).to_kind(Kind::Int64),
    );
    assert!(acc >= 0.70, "clean accuracy {acc}");
}

#[test]
fn wilson_interval_matches_hand_computation() {
    // 7 of 10 at z = 1.96: centre (0.7 + z^2/20) / (1 + z^2/10), half-width
    // z sqrt(0.021 + z^2/400) / (1 + z^2/10): (0.3968, 0.8922).
    let (lo, hi) = wilson95(7, 10);
    assert!(
        (lo - 0.396_775).abs() < 1e-4 && (hi - 0.892_209).abs() < 1e-4,
        "({lo}, {hi})"
    );
    let (lo, hi) = wilson95(0, 10);
    assert!(lo == 0.0 && (hi - 0.277_533).abs() < 1e-4, "({lo}, {hi})");
    let (lo, hi) = wilson95(10, 10);
    assert!(
        (lo - 0.722_467).abs() < 1e-4 && (hi - 1.0).abs() < 1e-12,
        "({lo}, {hi})"
    );
}

#[test]
fn eval_on_a_real_export_reads_success_from_the_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    common::craft_to_end(&common::tiny_config(300, 10, 1), &run);
    let out = tmp.path().join("exp");
    export(&ExportRequest {
        run_dir: run,
        step: None,
        out: Some(out.clone()),
        formats: Formats::ALL,
        force: false,
    })
    .unwrap();
    let data = load_export(&out, Device::Cpu).unwrap();
    assert_eq!(data.adversarial, vec![0]);
    // The control split is the clean one: it differs from the poisoned split at poison indices only.
    let differs = common::images_that_differ(&data.poisoned_x, &data.clean_x);
    assert!(differs > 0 && differs <= 10, "{differs} images differ");

    // A victim that predicts class k for every input: all weights zero, output bias one-hot.
    let net = Network::new(
        NetKind::ConvnetBn,
        1,
        10,
        1,
        InputNorm::for_dataset("fashion-mnist", 1),
    );
    let forced = |k: i64| {
        let s = net.init(Device::Cpu, Kind::Float, 1);
        let n = s.weights.len();
        let weights = s
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == n - 1 {
                    Tensor::zeros([10], (Kind::Float, Device::Cpu)).index_fill(
                        0,
                        &Tensor::from_slice(&[k]),
                        5.0,
                    )
                } else {
                    w.zeros_like()
                }
            })
            .collect();
        State::new(weights, s.buffers)
    };
    let judged = Judged {
        arm: Arm::Poisoned,
        seed: 1,
        batch: 50,
    };
    let hit = score(&data, &net, &forced(0), judged, 0.0);
    assert_eq!(
        (hit.predicted.clone(), hit.success.clone()),
        (vec![0], vec![true])
    );
    assert!(
        (hit.clean_accuracy - 0.1).abs() < 1e-9,
        "a constant predictor is right on one class in ten"
    );
    let miss = score(&data, &net, &forced(6), judged, 0.0);
    assert_eq!(
        (miss.predicted.clone(), miss.success.clone()),
        (vec![6], vec![false])
    );
    // A constant predictor says the same in training mode, in all 8 batches.
    assert_eq!(
        (hit.train_mode.clone(), miss.train_mode.clone()),
        (vec![1.0], vec![0.0])
    );
    // The class probe: the other test images of the target's class. A victim forced to class
    // 0 (logit 5) holds every one of them 5 logits toward the adversarial class 0; one forced
    // to class 6, 5 logits away.
    assert_eq!(
        (hit.class_margin, miss.class_margin),
        (Some(5.0), Some(-5.0))
    );
    let of_class = data
        .test_y
        .eq(data.manifest.plan.target_class)
        .sum(Kind::Int64)
        .int64_value(&[]);
    let probe = data
        .class_probe
        .as_ref()
        .expect("the target's class has other images");
    assert_eq!(
        probe.size()[0],
        of_class - 1,
        "the target itself is left out"
    );
    let logits = Tensor::from_slice(&[1.0f32, 3.0, 0.0, 2.0, 0.0, 1.0]).view([2, 3]);
    assert_eq!(mean_margin(&logits, 0), Some(-0.5), "(1 - 3 + 2 - 1) / 2");
    assert_eq!(mean_margin(&logits, 3), None);
    let s = summarise(&[&hit, &miss]);
    assert_eq!((s.trials, s.successes), (2, 1));
    assert_eq!(s.train_mode_successes, 1);
    assert_eq!(s.success_ci95, wilson95(1, 2));

    // And a real, short victim trial runs on both splits.
    let (t, _) = run_trial(&data, &net, &common::short_victim(1), Arm::Control, 3);
    assert_eq!(t.arm, "control");
    assert_eq!(t.target_probs[0].len(), 10);
    assert!(t.clean_accuracy > 0.2, "{}", t.clean_accuracy);
    assert!(
        t.train_mode.len() == 1
            && [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0].contains(&t.train_mode[0]),
        "a fraction of 8 train-mode passes: {:?}",
        t.train_mode
    );

    // The noise arm: the clean split with each of the first n poisons' values moved by exactly
    // +-eps (8) where the pixel range allows, both signs present, nothing else touched.
    let mut data = data;
    data.with_noise_poisons(4, 7);
    let clean = data.clean_x.to_kind(Kind::Int64);
    let noisy = data.split(Arm::Noise).to_kind(Kind::Int64);
    let moved = (&noisy - &clean).abs();
    let idx = data.poison_indices.narrow(0, 0, 4);
    let rest = data.poison_indices.narrow(0, 4, 6);
    assert_eq!(
        moved
            .index_select(0, &rest)
            .sum(Kind::Int64)
            .int64_value(&[]),
        0
    );
    let in_poisons = moved.index_select(0, &idx);
    assert!(
        in_poisons.max().int64_value(&[]) == 8,
        "moved by at most eps"
    );
    let base = clean.index_select(0, &idx);
    let room = base.ge(8).logical_and(&base.le(247));
    assert_eq!(
        in_poisons
            .masked_select(&room)
            .ne(8)
            .sum(Kind::Int64)
            .int64_value(&[]),
        0,
        "every value with room moves by exactly eps"
    );
    let up = (&noisy - &clean)
        .index_select(0, &idx)
        .gt(0)
        .sum(Kind::Int64);
    let down = (&noisy - &clean)
        .index_select(0, &idx)
        .lt(0)
        .sum(Kind::Int64);
    assert!(up.int64_value(&[]) > 0 && down.int64_value(&[]) > 0);
    let outside = moved
        .sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Int64)
        .gt(0)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert_eq!(outside, 4, "only the first 4 poisons' images change");
    let (t, _) = run_trial(&data, &net, &common::short_victim(1), Arm::Noise, 3);
    assert_eq!(t.arm, "noise");
}

#[test]
fn eligible_targets_respect_the_margin_floor() {
    use metapoison::victim::targets::{Candidate, Suggestion};
    let c = |id, correct, margin, min_margin| Candidate {
        id,
        test_index: id * 10,
        correct,
        margin,
        min_margin,
        p_adv: 0.1,
    };
    // Ranked as `suggest` ranks: always-correct first, then by mean margin.
    let s = Suggestion {
        candidates: vec![
            c(4, 1.0, 0.3, 0.1),
            c(7, 1.0, 1.2, 0.9),
            c(2, 1.0, 2.0, 1.5),
            c(9, 0.5, 0.2, -0.4),
        ],
        accuracies: vec![0.85, 0.86],
    };
    let ids = |floor| s.eligible(floor).map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(0.0), vec![4, 7, 2]);
    assert_eq!(ids(1.0), vec![2]);
    assert_eq!(ids(0.5), vec![7, 2]);
}
