//! A non-finite meta-gradient is detected: the update is skipped and reported, the perturbation
//! is left as it was, and after `run.max_nonfinite_steps` in a row the engine stops with a clear
//! message and a usable checkpoint.

mod common;

use metapoison::craft::crafter::Crafter;
use metapoison::craft::plan::Plan;
use metapoison::data;
use tch::{Device, Kind};

#[test]
fn nonfinite_meta_gradients_are_skipped_and_counted() {
    let c = common::tiny_config(300, 10, 4);
    let ds = data::load(&c.data).unwrap();
    let plan = Plan::resolve(&c, &ds).unwrap();
    let mut crafter = Crafter::new(c, &ds, plan, Device::Cpu, Kind::Float);
    assert!(crafter.pretrain(|_, _, _| true));
    // A healthy step first.
    let ok = crafter.craft_step(&|| false).unwrap();
    assert!(!ok.skipped && crafter.nonfinite_in_row == 0);
    // Poison the target with NaN: every meta-gradient becomes NaN.
    crafter.targets = crafter.targets.full_like(f64::NAN);
    let before = crafter.perturbation.delta.copy();
    for k in 1..=2 {
        let r = crafter.craft_step(&|| false).unwrap();
        assert!(r.skipped, "step {k} should be skipped");
        assert_eq!(crafter.nonfinite_in_row, k);
    }
    let moved = (&crafter.perturbation.delta - &before)
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(moved, 0.0, "a skipped update leaves the perturbation alone");
    let kinds: Vec<&str> = crafter.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "nonfinite").count(), 2);
    assert!(crafter.perturbation.delta.isfinite().all().int64_value(&[]) == 1);
}
