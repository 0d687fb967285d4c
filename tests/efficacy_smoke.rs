//! Smoke tests of efficacy, not measurements of it: short crafting runs on the embedded data
//! (MetaPoison at eps 16 on one pinned target; gradient matching over several suggested
//! targets) must move fresh victims, trained from scratch and never seen by the crafter,
//! toward the adversarial class compared with victims trained the same way on the clean set.
//! How often the default setting flips victims is measured by the benchmark
//! (`campaign --protocol`, docs/efficacy.md), which takes hours on a CPU.

mod common;

use metapoison::config::{Auto, Config, DataConfig, DatasetKind, ObjectiveKind};
use metapoison::craft::crafter::Crafter;
use metapoison::craft::objective::{adversarial_loss, TargetLabels};
use metapoison::craft::plan::Plan;
use metapoison::data;
use metapoison::model::sgd;
use metapoison::model::split_tensor;
use metapoison::victim::{poisoned_training_set, targets, train_from_scratch, VictimTraining};
use tch::{Device, Kind, Tensor};

/// 80 poisons at eps 16 among the first 1,000 embedded images: an attack strong enough to
/// show in a few steps.
fn small_attack() -> Config {
    let mut config = Config {
        data: DataConfig {
            dataset: DatasetKind::Embedded,
            path: None,
            train_limit: 1000.into(),
            ..Default::default()
        },
        ..Config::default()
    };
    config.threat.npoison = 80.into();
    config.threat.eps = 16.0;
    config
}

#[test]
fn crafted_poisons_lower_the_target_loss_of_fresh_victims() {
    let mut config = small_attack();
    config.craft.steps = 12.into();
    config.craft.ensemble_size = Auto::Value(2);
    config.craft.stagger = Auto::Value(2);
    config.craft.meta_batch_fraction = Auto::Value(1.0);
    config.craft.objective = ObjectiveKind::Cw;
    config.craft.warmup_steps = 2;
    config.surrogate.batch_size = 50;
    config.surrogate.warmup_epochs = 1;
    let data = data::load(&config.data).unwrap();
    let spec = common::short_victim(6);
    // Shirt 143: the one `targets suggest` put first on victims of this very protocol when
    // the test was written. Pinned, because that ranking moves with float rounding (one
    // build put id 53 first, a harder target), and the check is about the crafting.
    let s = targets::suggest(&data, &spec, (6, 0), 1, 1000, Device::Cpu, |_, _| {});
    let target = s
        .candidates
        .iter()
        .find(|c| c.id == 143)
        .expect("shirt 143 in the embedded test set");
    assert_eq!(
        target.correct, 1.0,
        "clean victims classify shirt 143 correctly"
    );
    config.threat.target_ids = Auto::Value(vec![target.id]);

    let plan = Plan::resolve(&config, &data).unwrap();
    let mut crafter = Crafter::new(
        config.clone(),
        &data,
        plan.clone(),
        Device::Cpu,
        Kind::Float,
    );
    assert!(crafter.pretrain(|_, _, _| true));
    while !crafter.finished() {
        crafter.craft_step(&|| false).unwrap();
    }
    let poisons = crafter.perturbation.quantised();

    let train_x = split_tensor(&data.train, Device::Cpu);
    let train_y = Tensor::from_slice(&data.train.labels).to_kind(Kind::Int64);
    let poisoned_x = poisoned_training_set(&train_x, &plan.poison_indices, &poisons);
    // Labels unchanged, and only the poison images differ.
    let changed = (&poisoned_x - train_x.to_kind(Kind::Float))
        .abs()
        .sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float)
        .gt(0.0);
    let changed_rows: Vec<i64> = Vec::try_from(changed.nonzero().view(-1)).unwrap();
    assert!(changed_rows
        .iter()
        .all(|&r| plan.poison_indices.contains(&(r as usize))));
    assert!(changed_rows.len() > plan.poison_indices.len() / 2);

    let target_x = split_tensor(&data.test, Device::Cpu)
        .index_select(0, &Tensor::from_slice(&[target.test_index as i64]));
    let labels = TargetLabels {
        truth: Tensor::from_slice(&[6i64]),
        adversarial: Tensor::from_slice(&[0i64]),
        poison_class: 0,
    };
    let net = crafter.net.clone();
    let loss_on = |x: &Tensor, seed: u64| {
        let state = train_from_scratch(&net, &spec, x, &train_y, seed, Kind::Float, |_| true);
        let logits = sgd::predict(&net, &state, &target_x, 1);
        adversarial_loss(ObjectiveKind::Cw, &logits, &labels).double_value(&[])
    };
    // Victim seeds far from anything the crafting used.
    let seeds = [9001u64, 9002, 9003, 9004, 9005, 9006];
    let clean: Vec<f64> = seeds.iter().map(|&s| loss_on(&train_x, s)).collect();
    let poisoned: Vec<f64> = seeds.iter().map(|&s| loss_on(&poisoned_x, s)).collect();
    // Paired by seed: the same initialisation and batch order, only the data differ.
    let diffs: Vec<f64> = poisoned.iter().zip(&clean).map(|(p, c)| p - c).collect();
    let mean_diff = diffs.iter().sum::<f64>() / diffs.len() as f64;
    eprintln!(
        "target id {} (clean margin {:.2}): clean CW {clean:?}, poisoned CW {poisoned:?}",
        target.id, target.margin
    );
    // Not "every victim": which victims move depends on float rounding through the 12 chaotic
    // craft steps (a 4-victim all-lower check passed and failed with the same code built with
    // other optimisation levels), so the paired mean and a clear majority.
    let lowered = diffs.iter().filter(|&&d| d < 0.0).count();
    assert!(
        lowered >= 4 && mean_diff < -0.5,
        "poisoning did not lower the target's adversarial loss on most fresh victims (lower on \
         {lowered} of 6, mean change {mean_diff:.2}): clean {clean:?}, poisoned {poisoned:?}"
    );
}

/// Gradient matching, short, on several targets: each run lowers its matching loss, and the
/// victims trained from scratch on its poisons (with the recipe the surrogate was trained
/// with, fresh seeds) give the target's adversarial class more probability than paired
/// victims trained on the clean split, on average over the targets. The targets are the first
/// few that `targets suggest` ranks (not one pinned image), each crafted from its own seed.
#[test]
fn gradient_matching_raises_the_adversarial_probability_of_fresh_victims_over_several_targets() {
    let mut config = small_attack();
    config.craft.recipe = metapoison::config::CraftRecipe::GradientMatching;
    config.craft.steps = 40.into();
    config.matching.restarts = 1;
    config.matching.surrogate_epochs = Auto::Value(6);
    config.victim.batch_size = 50;
    config.victim.epochs = Auto::Value(6);
    let victim = config.victim.standard_recipe();
    let spec = VictimTraining::from_config(&victim);
    let data = data::load(&config.data).unwrap();
    let s = targets::suggest(&data, &spec, (6, 0), 1, 1000, Device::Cpu, |_, _| {});
    let chosen: Vec<_> = s.eligible(0.5).take(4).cloned().collect();
    assert_eq!(chosen.len(), 4);
    let train_x = split_tensor(&data.train, Device::Cpu);
    let train_y = Tensor::from_slice(&data.train.labels).to_kind(Kind::Int64);
    let test_x = split_tensor(&data.test, Device::Cpu);
    let mut shifts = Vec::new();
    for (k, target) in chosen.iter().enumerate() {
        let mut c = config.clone();
        c.threat.target_ids = Auto::Value(vec![target.id]);
        c.run.seed = 100 + k as u64;
        let plan = Plan::resolve(&c, &data).unwrap();
        let mut crafter = Crafter::new(c, &data, plan.clone(), Device::Cpu, Kind::Float);
        assert!(crafter.pretrain(|_, _, _| true));
        let mut losses = Vec::new();
        while !crafter.finished() {
            losses.push(crafter.craft_step(&|| false).unwrap().adv_loss.unwrap());
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        // The first step's loss is that of the random start (the update comes after it).
        let (early, late) = (losses[0], mean(&losses[losses.len() - 5..]));
        assert!(
            late < early - 0.03,
            "target {}: matching loss {early:.3} -> {late:.3}: {losses:?}",
            target.id
        );
        let poisoned_x = poisoned_training_set(
            &train_x,
            &plan.poison_indices,
            &crafter.perturbation.quantised(),
        );
        let target_x = test_x.index_select(0, &Tensor::from_slice(&[target.test_index as i64]));
        let net = crafter.net.clone();
        let p_adv = |x: &Tensor, seed: u64| {
            let state = train_from_scratch(&net, &spec, x, &train_y, seed, Kind::Float, |_| true);
            sgd::predict(&net, &state, &target_x, 1)
                .softmax(1, Kind::Double)
                .double_value(&[0, 0])
        };
        for seed in [9101u64, 9102] {
            let (p, clean) = (p_adv(&poisoned_x, seed), p_adv(&train_x, seed));
            eprintln!(
                "target {} victim {seed}: p(T-shirt) poisoned {p:.3}, clean {clean:.3}; matching loss {early:.3} -> {late:.3}",
                target.id
            );
            shifts.push(p - clean);
        }
    }
    let mean_shift = shifts.iter().sum::<f64>() / shifts.len() as f64;
    let raised = shifts.iter().filter(|&&d| d > 0.0).count();
    assert!(
        mean_shift > 0.03 && raised * 2 > shifts.len(),
        "poisons moved the fresh victims' p(T-shirt) by {mean_shift:.3} on average, up in {raised} of {}: {shifts:?}",
        shifts.len()
    );
}
