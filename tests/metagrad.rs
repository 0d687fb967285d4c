//! The meta-gradient against central finite differences, in float64 on the CPU, through batch
//! norm and K = 1 and K = 2 unrolled steps, for every objective, on random entries of the
//! additive perturbation and of the colour grid. (`metapoison bench --gradcheck --device cuda`
//! runs the same checks on a GPU.)

use metapoison::bench::gradcheck::{check, check_matching, check_momentum, Case, GradCheck};
use metapoison::config::ObjectiveKind;
use metapoison::craft::unroll::{meta_gradient, UnrollSettings};
use metapoison::model::sgd::SgdRule;
use tch::{Device, Kind};

fn assert_close(c: &GradCheck) {
    for e in &c.entries {
        assert!(
            e.error < 1e-4,
            "{} K={} C={} {} entry {}: analytic {:e} vs numeric {:e} (error {:e})",
            c.objective,
            c.unroll_steps,
            c.channels,
            e.param,
            e.index,
            e.analytic,
            e.numeric,
            e.error
        );
    }
    // The check must have bitten on something: the delta gradient is not all zero, and the
    // grid entries were compared too.
    assert!(c.delta_grad_l1 > 0.0);
    assert!(c
        .entries
        .iter()
        .any(|e| e.param == "grid" && e.analytic != 0.0));
    eprintln!(
        "{} K={} C={}: worst error {:e}",
        c.objective, c.unroll_steps, c.channels, c.worst_error
    );
}

#[test]
fn metagradient_matches_finite_differences_grey_k1_and_k2_every_objective() {
    for k in [1, 2] {
        for obj in [
            ObjectiveKind::Cw,
            ObjectiveKind::Xent,
            ObjectiveKind::XentC,
            ObjectiveKind::Dualxent,
            ObjectiveKind::Indis3,
        ] {
            assert_close(&check(1, k, obj, None, Device::Cpu));
        }
    }
}

#[test]
fn metagradient_matches_finite_differences_rgb_colour_grid() {
    for k in [1, 2] {
        assert_close(&check(3, k, ObjectiveKind::Cw, None, Device::Cpu));
    }
    assert_close(&check(3, 2, ObjectiveKind::Xent, None, Device::Cpu));
}

#[test]
fn metagradient_through_momentum_and_weight_decay_carried_into_the_unroll() {
    for nesterov in [false, true] {
        let c = check_momentum(2, nesterov, Device::Cpu);
        assert!(c.sgd.starts_with("momentum 0.9"), "{}", c.sgd);
        assert_close(&c);
    }
}

#[test]
fn the_matching_loss_gradient_matches_finite_differences_grey_and_rgb() {
    for channels in [1, 3] {
        let c = check_matching(channels, Device::Cpu);
        assert_eq!(c.objective, "gradient matching");
        assert_close(&c);
    }
}

#[test]
fn the_velocity_carried_into_the_unroll_changes_the_metagradient() {
    // Guard against a velocity that never reaches the unrolled steps: the same case with and
    // without the surrogate's incoming velocity gives different meta-gradients.
    let s = UnrollSettings {
        steps: 2,
        lr: 0.1,
        rule: SgdRule {
            weight_decay: 0.0,
            momentum: 0.9,
            nesterov: false,
        },
        objective: ObjectiveKind::Cw,
        smooth_coef: 1.0,
    };
    let without = Case::new(1, 2, 13, Device::Cpu);
    let with = Case::new(1, 2, 13, Device::Cpu).with_random_velocity(13);
    let g = |c: &Case| meta_gradient(c.model(), &c.perturbation, &c.batches, c.targets(), s).1;
    let (a, b) = (g(&without), g(&with));
    let scale = a.abs().max().double_value(&[]);
    assert!(scale > 0.0);
    assert!((a - b).abs().max().double_value(&[]) > 1e-3 * scale);
}

#[test]
fn metagradient_through_differentiable_augmentation() {
    assert_close(&check(1, 2, ObjectiveKind::Cw, Some(42), Device::Cpu));
    assert_close(&check(3, 1, ObjectiveKind::Xent, Some(7), Device::Cpu));
}

#[test]
fn a_wrong_gradient_is_caught() {
    // Guard against a check that cannot fail: compare the K = 2 gradient with the K = 1
    // objective's differences by hand.
    let case = Case::new(1, 2, 9, Device::Cpu);
    let s2 = UnrollSettings {
        steps: 2,
        lr: 0.1,
        rule: SgdRule::plain(0.0),
        objective: ObjectiveKind::Cw,
        smooth_coef: 1.0,
    };
    let (_, g2, _) = meta_gradient(
        case.model(),
        &case.perturbation,
        &case.batches,
        case.targets(),
        s2,
    );
    let s1 = UnrollSettings { steps: 1, ..s2 };
    let j = 101i64;
    let numeric = case.central_difference(true, j, 1e-4, s1);
    let analytic = g2.flatten(0, -1).double_value(&[j]);
    let err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs());
    assert!(err > 1e-3, "K=2 gradient matched K=1 differences ({err:e})");
}

#[test]
fn poisons_outside_the_batch_get_no_adversarial_gradient() {
    let c = Case::new(1, 1, 3, Device::Cpu);
    let s = UnrollSettings {
        steps: 1,
        lr: 0.1,
        rule: SgdRule::plain(0.0),
        objective: ObjectiveKind::Cw,
        smooth_coef: 0.0,
    };
    let (_, g_delta, _) = meta_gradient(c.model(), &c.perturbation, &c.batches, c.targets(), s);
    // slot 1 is not in the batch
    assert_eq!(
        g_delta.get(1).abs().sum(Kind::Double).double_value(&[]),
        0.0
    );
    assert!(g_delta.get(0).abs().sum(Kind::Double).double_value(&[]) > 0.0);
}
