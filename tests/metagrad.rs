//! The meta-gradient against central finite differences, in float64 on the CPU, through batch
//! norm and K = 1 and K = 2 unrolled steps, for every objective, on random entries of the
//! additive perturbation and of the colour grid.

use metapoison::config::{NetKind, ObjectiveKind};
use metapoison::craft::objective::TargetLabels;
use metapoison::craft::perturbation::Perturbation;
use metapoison::craft::recolor::Recolor;
use metapoison::craft::unroll::{
    meta_gradient, unrolled_adversarial_loss, Surrogate, Targets, UnrollBatches, UnrollSettings,
};
use metapoison::model::{InputNorm, Network};
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

struct Case {
    net: Network,
    weights: Vec<Tensor>,
    buffers: Vec<Tensor>,
    pert: Perturbation,
    batches: UnrollBatches,
    targets: Tensor,
    labels: TargetLabels,
}

impl Case {
    fn model(&self) -> Surrogate<'_> {
        Surrogate {
            net: &self.net,
            weights: &self.weights,
            buffers: &self.buffers,
        }
    }
    fn targets(&self) -> Targets<'_> {
        Targets {
            images: &self.targets,
            labels: &self.labels,
        }
    }
}

fn case(channels: usize, k: usize, seed: i64) -> Case {
    tch::manual_seed(seed);
    let side = if channels == 1 { 28 } else { 32 };
    let net = Network::new(
        NetKind::ConvnetBn,
        channels,
        4,
        1,
        InputNorm::for_dataset("test", channels),
    );
    let state = net.init(Device::Cpu, Kind::Double, seed as u64);
    let weights: Vec<Tensor> = state
        .weights
        .into_iter()
        .map(|w| w.set_requires_grad(true))
        .collect();
    let b = 6;
    let batches = (0..=k)
        .map(|_| {
            (
                Tensor::rand([b, channels as i64, side, side], F64) * 255.0,
                Tensor::randint(4, [b], (Kind::Int64, Device::Cpu)),
            )
        })
        .collect();
    let base = Tensor::rand([3, channels as i64, side, side], F64) * 255.0;
    let mut pert = Perturbation::zeros(base, Recolor::new(channels, 4), 8.0, 0.04);
    pert.randomise(seed as u64);
    {
        let _g = tch::no_grad_guard();
        // A non-trivial colour grid, inside its bounds.
        let o = pert.offsets.rand_like() * 0.06 - 0.03;
        pert.offsets.copy_(&o);
    }
    Case {
        net,
        weights,
        buffers: state.buffers,
        pert,
        batches: UnrollBatches {
            batches,
            positions: Tensor::from_slice(&[1i64, 4]),
            slots: Tensor::from_slice(&[2i64, 0]),
            augment: None,
        },
        targets: Tensor::rand([2, channels as i64, side, side], F64) * 255.0,
        labels: TargetLabels {
            truth: Tensor::from_slice(&[1i64, 1]),
            adversarial: Tensor::from_slice(&[3i64, 3]),
            poison_class: 3,
        },
    }
}

fn objective_value(c: &Case, s: UnrollSettings, smooth: f64) -> f64 {
    let v = unrolled_adversarial_loss(c.model(), &c.pert, &c.batches, c.targets(), s);
    let sm = c.pert.recolor.smoothness(&c.pert.offsets).double_value(&[]) * smooth;
    v.double_value(&[]) + sm
}

fn check(channels: usize, k: usize, objective: ObjectiveKind) {
    check_with(channels, k, objective, None)
}

fn check_with(channels: usize, k: usize, objective: ObjectiveKind, augment: Option<u64>) {
    let mut c = case(channels, k, 7 + k as i64);
    c.batches.augment = augment;
    let s = UnrollSettings {
        steps: k,
        lr: 0.1,
        weight_decay: 0.0,
        objective,
        smooth_coef: 1.0,
    };
    let smooth = s.smooth_coef;
    let (_, g_delta, g_off) = meta_gradient(c.model(), &c.pert, &c.batches, c.targets(), s);
    let g_delta = g_delta.flatten(0, -1);
    let g_off = g_off.flatten(0, -1);
    // Entries of delta belonging to poisons in the batch (slots 0 and 2), and grid entries.
    let per_image = c.pert.delta.size()[1..].iter().product::<i64>();
    let mut entries: Vec<(bool, i64, f64)> = Vec::new();
    for j in [3i64, 101, 377, 600] {
        entries.push((true, j, 1e-4)); // slot 0
        entries.push((true, 2 * per_image + (j * 2 + 1) % per_image, 1e-4)); // slot 2
    }
    let grid_size = c.pert.offsets.numel() as i64;
    for j in [5i64, grid_size / 3 + 1, grid_size - 2] {
        entries.push((false, j, 1e-6));
    }
    let mut worst: f64 = 0.0;
    for (is_delta, j, h) in entries {
        let param = if is_delta {
            &c.pert.delta
        } else {
            &c.pert.offsets
        };
        let flat = param.view(-1);
        let analytic = if is_delta {
            g_delta.double_value(&[j])
        } else {
            g_off.double_value(&[j])
        };
        let orig = flat.double_value(&[j]);
        let set = |v: f64| {
            let _g = tch::no_grad_guard();
            let _ = flat.get(j).fill_(v);
        };
        set(orig + h);
        let up = objective_value(&c, s, smooth);
        set(orig - h);
        let down = objective_value(&c, s, smooth);
        set(orig);
        let numeric = (up - down) / (2.0 * h);
        let scale = analytic.abs().max(numeric.abs()).max(1e-8);
        let rel = (analytic - numeric).abs() / scale;
        // A gradient entry that is essentially zero on both sides is compared absolutely.
        let err = if scale < 1e-7 {
            (analytic - numeric).abs()
        } else {
            rel
        };
        assert!(
            err < 1e-4,
            "{objective:?} K={k} C={channels} {} entry {j}: analytic {analytic:e} vs numeric {numeric:e} (rel {rel:e})",
            if is_delta { "delta" } else { "grid" }
        );
        worst = worst.max(err);
    }
    // The check must have bitten on something: the delta gradient is not all zero.
    assert!(g_delta.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    eprintln!("{objective:?} K={k} C={channels}: worst relative error {worst:e}");
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
            check(1, k, obj);
        }
    }
}

#[test]
fn metagradient_matches_finite_differences_rgb_colour_grid() {
    for k in [1, 2] {
        check(3, k, ObjectiveKind::Cw);
    }
    check(3, 2, ObjectiveKind::Xent);
}

#[test]
fn metagradient_through_differentiable_augmentation() {
    check_with(1, 2, ObjectiveKind::Cw, Some(42));
    check_with(3, 1, ObjectiveKind::Xent, Some(7));
}

#[test]
fn poisons_outside_the_batch_get_no_adversarial_gradient() {
    let c = case(1, 1, 3);
    let s = UnrollSettings {
        steps: 1,
        lr: 0.1,
        weight_decay: 0.0,
        objective: ObjectiveKind::Cw,
        smooth_coef: 0.0,
    };
    let (_, g_delta, _) = meta_gradient(c.model(), &c.pert, &c.batches, c.targets(), s);
    // slot 1 is not in the batch
    assert_eq!(
        g_delta.get(1).abs().sum(Kind::Double).double_value(&[]),
        0.0
    );
    assert!(g_delta.get(0).abs().sum(Kind::Double).double_value(&[]) > 0.0);
}
