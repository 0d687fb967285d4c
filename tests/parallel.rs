//! Surrogates crafted side by side (craft.parallel_surrogates) or as one grouped network
//! (craft.grouped_surrogates) give the same poisons as one after another: each surrogate's work
//! is independent and the sums run in surrogate order.

mod common;

use metapoison::config::Auto;
use metapoison::craft::crafter::Crafter;
use metapoison::craft::plan::Plan;
use metapoison::data;
use tch::{Device, Kind};

/// Pretrains and runs two craft steps in float64 with `parallel` surrogates at once; returns
/// the final delta, offsets and the adversarial losses reported.
fn craft(parallel: usize) -> (tch::Tensor, tch::Tensor, Vec<f64>) {
    craft_with(parallel, false, false, 3)
}

/// As `craft`, optionally with the surrogates grouped, `group` of them in one network.
fn craft_with(
    parallel: usize,
    grouped: bool,
    augment: bool,
    group: usize,
) -> (tch::Tensor, tch::Tensor, Vec<f64>) {
    craft_on(parallel, grouped, augment, group, &[])
}

/// As `craft_with`, the surrogates spread over `devices` (see `Crafter::spread_over`).
fn craft_on(
    parallel: usize,
    grouped: bool,
    augment: bool,
    group: usize,
    devices: &[Device],
) -> (tch::Tensor, tch::Tensor, Vec<f64>) {
    let mut c = common::tiny_config(300, 10, 2);
    c.craft.grouped_surrogates = grouped.into();
    c.craft.augment = augment;
    // Surrogates at different epochs of a warm-up train at different inner rates.
    c.surrogate.warmup_epochs = 2;
    // Three surrogates at epochs 0, 1, 2: with 2 at once the second wave holds one, so
    // uneven waves are covered too.
    c.craft.ensemble_size = Auto::Value(3);
    c.craft.meta_batch_fraction = Auto::Value(0.5);
    c.craft.parallel_surrogates = parallel.into();
    let ds = data::load(&c.data).unwrap();
    let plan = Plan::resolve(&c, &ds).unwrap();
    assert_eq!(plan.parallel_surrogates, parallel);
    assert_eq!(plan.grouped_surrogates, grouped);
    let mut crafter = Crafter::new(c, &ds, plan, Device::Cpu, Kind::Double);
    crafter.set_group_size(group);
    crafter.spread_over(devices);
    let mut progress = Vec::new();
    assert!(crafter.pretrain(|m, e, n| {
        progress.push((m, e, n));
        true
    }));
    // Every pretraining epoch is reported once, whatever the order.
    progress.sort();
    assert_eq!(progress, vec![(0, 0, 0), (1, 1, 1), (2, 1, 2), (2, 2, 2)]);
    let mut losses = Vec::new();
    while !crafter.finished() {
        let r = crafter.craft_step(&|| false).unwrap();
        assert_eq!(
            r.epochs,
            vec![r.step % 3, (1 + r.step) % 3, (2 + r.step) % 3]
        );
        losses.extend(r.adv_loss_per_surrogate.iter().flatten());
    }
    let p = &crafter.perturbation;
    (p.delta.detach().copy(), p.offsets.detach().copy(), losses)
}

#[test]
fn parallel_surrogates_craft_the_same_poisons() {
    let (d1, o1, l1) = craft(1);
    let (d2, o2, l2) = craft(2);
    assert_eq!(l1.len(), l2.len());
    assert!(!l1.is_empty());
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-9 * a.abs().max(1.0),
            "adv loss {a} vs {b}"
        );
    }
    // The perturbation moved (so the comparison means something) and moved identically.
    assert!(d1.abs().max().double_value(&[]) > 0.0);
    let dd = (&d1 - &d2).abs().max().double_value(&[]);
    let doff = (&o1 - &o2).abs().max().double_value(&[]);
    assert!(dd <= 1e-9, "delta differs by {dd}");
    assert!(doff <= 1e-12, "offsets differ by {doff}");
}

#[test]
fn grouped_surrogates_craft_the_same_poisons() {
    // All three in one group, with and without augmentation; and groups of 2 + 1 (what the
    // crafter falls back to when a GPU runs out of memory).
    for (augment, group) in [(false, 3), (true, 3), (false, 2)] {
        let (d1, o1, l1) = craft_with(1, false, augment, 3);
        let (d2, o2, l2) = craft_with(1, true, augment, group);
        assert_eq!(l1.len(), l2.len());
        assert!(!l1.is_empty());
        for (a, b) in l1.iter().zip(&l2) {
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                "augment {augment}: adv loss {a} vs {b}"
            );
        }
        assert!(d1.abs().max().double_value(&[]) > 0.0);
        let dd = (&d1 - &d2).abs().max().double_value(&[]);
        let doff = (&o1 - &o2).abs().max().double_value(&[]);
        assert!(dd <= 1e-9, "augment {augment}: delta differs by {dd}");
        assert!(doff <= 1e-12, "augment {augment}: offsets differ by {doff}");
    }
}

#[test]
fn surrogates_spread_over_devices_craft_the_same_poisons() {
    // Two replicas (here both the CPU: each with its own copy of the data and its own
    // detached perturbation, whose gradients are brought back and summed), one surrogate at a
    // time and grouped per device side by side.
    let (d1, o1, l1) = craft_with(1, false, false, 3);
    assert!(d1.abs().max().double_value(&[]) > 0.0);
    for grouped in [false, true] {
        let (d2, o2, l2) = craft_on(1, grouped, false, 3, &[Device::Cpu, Device::Cpu]);
        assert_eq!(l1.len(), l2.len());
        for (a, b) in l1.iter().zip(&l2) {
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                "grouped {grouped}: {a} vs {b}"
            );
        }
        let dd = (&d1 - &d2).abs().max().double_value(&[]);
        let doff = (&o1 - &o2).abs().max().double_value(&[]);
        assert!(dd <= 1e-9, "grouped {grouped}: delta differs by {dd}");
        assert!(doff <= 1e-12, "grouped {grouped}: offsets differ by {doff}");
    }
}

#[test]
fn parallel_surrogates_out_of_range_is_a_config_error() {
    let mut c = common::tiny_config(300, 10, 2);
    c.craft.parallel_surrogates = 0.into();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("craft.parallel_surrogates"), "{e}");
}

#[test]
fn a_checkpoint_resumes_with_another_count_of_parallel_surrogates_only() {
    let tmp = tempfile::tempdir().unwrap();
    let build = |parallel: usize, npoison: usize| {
        let mut c = common::tiny_config(300, npoison, 2);
        c.craft.ensemble_size = Auto::Value(2);
        c.craft.parallel_surrogates = parallel.into();
        let ds = data::load(&c.data).unwrap();
        let plan = Plan::resolve(&c, &ds).unwrap();
        Crafter::new(c, &ds, plan, Device::Cpu, Kind::Float)
    };
    let mut first = build(1, 10);
    assert!(first.pretrain(|_, _, _| true));
    first.craft_step(&|| false).unwrap();
    metapoison::craft::checkpoint::save(&first, tmp.path()).unwrap();
    let loaded = metapoison::craft::checkpoint::load(tmp.path()).unwrap();
    // Two at once (a machine with more cores) continues the run where it stopped...
    let mut resumed = build(2, 10);
    loaded.restore_into(&mut resumed).unwrap();
    assert_eq!(resumed.step, 1);
    assert_eq!(resumed.plan.parallel_surrogates, 2);
    let same = (&resumed.perturbation.delta - &first.perturbation.delta)
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(same, 0.0);
    // ...while a change of the maths (another poison budget) is still refused.
    let mut other = build(2, 12);
    let e = loaded.restore_into(&mut other).unwrap_err();
    assert!(e.contains("plan"), "{e}");
}
