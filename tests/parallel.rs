//! Surrogates crafted side by side (craft.parallel_surrogates) or as one grouped network
//! (craft.grouped_surrogates) give the same poisons as one after another: each surrogate's work
//! is independent and the sums run in surrogate order.

mod common;

use metapoison::config::Auto;
use metapoison::craft::crafter::Crafter;
use metapoison::craft::plan::Plan;
use metapoison::data;
use tch::{Device, Kind};

/// What a short crafting job ends with: delta, the colour-grid offsets, the adversarial
/// losses reported, and how far the steps moved delta from where it started (it starts
/// random, so being non-zero says nothing).
struct Crafted {
    delta: tch::Tensor,
    offsets: tch::Tensor,
    losses: Vec<f64>,
    moved: f64,
}

/// Pretrains and runs two craft steps in float64 with `parallel` surrogates at once.
fn craft(parallel: usize) -> Crafted {
    craft_with(parallel, false, false, 3)
}

/// As `craft`, optionally with the surrogates grouped, `group` of them in one network.
fn craft_with(parallel: usize, grouped: bool, augment: bool, group: usize) -> Crafted {
    craft_on(parallel, grouped, augment, group, &[])
}

/// As `craft_with`, the surrogates spread over `devices` (see `Crafter::spread_over`).
fn craft_on(
    parallel: usize,
    grouped: bool,
    augment: bool,
    group: usize,
    devices: &[Device],
) -> Crafted {
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
    let start = crafter.perturbation.delta.detach().copy();
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
    Crafted {
        moved: (&p.delta - &start).abs().max().double_value(&[]),
        delta: p.delta.detach().copy(),
        offsets: p.offsets.detach().copy(),
        losses,
    }
}

/// `b` crafted the same poisons as `a` (float rounding aside), and the steps moved them.
fn assert_same(a: &Crafted, b: &Crafted, case: &str) {
    assert_eq!(a.losses.len(), b.losses.len());
    assert!(!a.losses.is_empty());
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!(
            (x - y).abs() <= 1e-9 * x.abs().max(1.0),
            "{case}: adv loss {x} vs {y}"
        );
    }
    // The steps moved the perturbation (so the comparison means something), identically.
    assert!(a.moved > 0.1, "{case}: delta moved by {}", a.moved);
    assert!(a.offsets.abs().max().double_value(&[]) > 0.0);
    let dd = (&a.delta - &b.delta).abs().max().double_value(&[]);
    let doff = (&a.offsets - &b.offsets).abs().max().double_value(&[]);
    assert!(dd <= 1e-9, "{case}: delta differs by {dd}");
    assert!(doff <= 1e-12, "{case}: offsets differ by {doff}");
}

#[test]
fn parallel_surrogates_craft_the_same_poisons() {
    assert_same(&craft(1), &craft(2), "2 at once");
}

#[test]
fn grouped_surrogates_craft_the_same_poisons() {
    // All three in one group, with and without augmentation; and groups of 2 + 1 (what the
    // crafter falls back to when a GPU runs out of memory).
    for (augment, group) in [(false, 3), (true, 3), (false, 2)] {
        assert_same(
            &craft_with(1, false, augment, 3),
            &craft_with(1, true, augment, group),
            &format!("grouped, augment {augment}, groups of {group}"),
        );
    }
}

#[test]
fn surrogates_spread_over_devices_craft_the_same_poisons() {
    // Two replicas (here both the CPU: each with its own copy of the data and its own
    // detached perturbation, whose gradients are brought back and summed), one surrogate at a
    // time and grouped per device side by side.
    let alone = craft_with(1, false, false, 3);
    for grouped in [false, true] {
        let spread = craft_on(1, grouped, false, 3, &[Device::Cpu, Device::Cpu]);
        assert_same(&alone, &spread, &format!("spread, grouped {grouped}"));
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
    assert!(e.to_string().contains("plan"), "{e}");
}
