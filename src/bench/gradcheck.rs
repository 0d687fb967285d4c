//! The meta-gradient against central finite differences in float64, on any device: the
//! correctness check behind every speed figure (`metapoison bench --gradcheck`, and the tests).
//!
//! A tiny ConvNetBN (4 classes, batch norm in train mode) is unrolled K steps on random batches
//! with two poisons in the first batch; random entries of the additive perturbation (of both
//! poisons in the batch) and of the colour grid are perturbed by +-h and the objective (the
//! adversarial loss plus the grid's smoothness penalty) is recomputed. The same comparison
//! checks gradient matching's loss (`check_matching`).

use crate::base::rng::SplitMix64;
use crate::config::{NetKind, ObjectiveKind};
use crate::craft::objective::TargetLabels;
use crate::craft::perturbation::Perturbation;
use crate::craft::recolor::Recolor;
use crate::craft::unroll::{
    meta_gradient, unrolled_adversarial_loss, Surrogate, Targets, UnrollBatches, UnrollSettings,
};
use crate::model::sgd::SgdRule;
use crate::model::{InputNorm, Network, OwnOps};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// A small unrolling problem with everything the meta-gradient needs.
pub struct Case {
    pub net: Network,
    pub weights: Vec<Tensor>,
    pub buffers: Vec<Tensor>,
    /// The surrogate's SGD velocity going into the unroll (empty: none).
    pub velocity: Vec<Tensor>,
    pub perturbation: Perturbation,
    pub batches: UnrollBatches,
    pub targets: Tensor,
    pub labels: TargetLabels,
}

impl Case {
    /// `channels` 1 (28 px, 1-D colour grid) or 3 (32 px, YUV grid); `k` unrolled steps; the
    /// crate's own ops wherever they apply (CUDA included).
    pub fn new(channels: usize, k: usize, seed: u64, device: Device) -> Case {
        Case::variant(channels, k, seed, device, false, OwnOps::everywhere())
    }

    /// As `new`, with the network's convolutions on channels-last tensors or not, and `ops`.
    pub fn variant(
        channels: usize,
        k: usize,
        seed: u64,
        device: Device,
        channels_last: bool,
        ops: OwnOps,
    ) -> Case {
        let opts = (Kind::Double, device);
        let mut rng = SplitMix64::new(seed);
        let side = if channels == 1 { 28 } else { 32 };
        let c = channels as i64;
        let net = Network::new(
            NetKind::ConvnetBn,
            channels,
            4,
            1,
            InputNorm::for_dataset("test", channels),
        )
        .with_channels_last(channels_last)
        .with_ops(ops);
        let state = net.init(device, Kind::Double, seed);
        let weights = state
            .weights
            .into_iter()
            .map(|w| w.set_requires_grad(true))
            .collect();
        let b = 6;
        let labels_of = |rng: &mut SplitMix64, n: usize| {
            let v: Vec<i64> = (0..n).map(|_| (rng.next_u64() % 4) as i64).collect();
            Tensor::from_slice(&v).to_device(device)
        };
        let batches = (0..=k)
            .map(|_| {
                let x = rng.uniform_tensor(&[b, c, side, side], 0.0, 255.0, opts);
                (x, labels_of(&mut rng, b as usize))
            })
            .collect();
        let base = rng.uniform_tensor(&[3, c, side, side], 0.0, 255.0, opts);
        let mut perturbation = Perturbation::zeros(base, Recolor::new(channels, 4), 8.0, 0.04);
        perturbation.randomise(seed ^ 0x5eed);
        {
            // A non-trivial colour grid, inside its bounds.
            let _g = tch::no_grad_guard();
            let shape = perturbation.offsets.size();
            let o = rng.uniform_tensor(&shape, -0.03, 0.03, opts);
            perturbation.offsets.copy_(&o);
        }
        let index = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        Case {
            net,
            weights,
            buffers: state.buffers,
            velocity: Vec::new(),
            perturbation,
            batches: UnrollBatches {
                batches,
                positions: index(&[1, 4]),
                slots: index(&[2, 0]),
                augment: None,
            },
            targets: rng.uniform_tensor(&[2, c, side, side], 0.0, 255.0, opts),
            labels: TargetLabels {
                truth: index(&[1, 1]),
                adversarial: index(&[3, 3]),
                poison_class: 3,
            },
        }
    }

    pub fn model(&self) -> Surrogate<'_> {
        Surrogate {
            net: &self.net,
            weights: &self.weights,
            buffers: &self.buffers,
            velocity: &self.velocity,
        }
    }

    /// Gives the surrogate a velocity of the weights' shapes (what training with momentum
    /// leaves), random and about as large as a few gradients.
    pub fn with_random_velocity(mut self, seed: u64) -> Case {
        let mut rng = SplitMix64::new(seed);
        self.velocity = self
            .weights
            .iter()
            .map(|w| rng.uniform_tensor(&w.size(), -0.05, 0.05, (w.kind(), w.device())))
            .collect();
        self
    }

    pub fn targets(&self) -> Targets<'_> {
        Targets {
            images: &self.targets,
            labels: &self.labels,
        }
    }

    /// The differentiated objective's value at the current perturbation.
    /// (Grad mode must stay on: the unrolled inner steps differentiate the training loss.)
    pub fn objective(&self, s: UnrollSettings) -> f64 {
        let adv = unrolled_adversarial_loss(
            self.model(),
            &self.perturbation,
            &self.batches,
            self.targets(),
            s,
        );
        let p = &self.perturbation;
        adv.double_value(&[]) + p.recolor.smoothness(&p.offsets).double_value(&[]) * s.smooth_coef
    }

    /// Central difference of the objective in entry `j` of delta (`is_delta`) or of the grid
    /// offsets, with step `h`; the entry is put back afterwards.
    pub fn central_difference(&self, is_delta: bool, j: i64, h: f64, s: UnrollSettings) -> f64 {
        self.central_difference_of(is_delta, j, h, &|| self.objective(s))
    }

    /// `central_difference` of any objective of the perturbation.
    pub fn central_difference_of(
        &self,
        is_delta: bool,
        j: i64,
        h: f64,
        objective: &dyn Fn() -> f64,
    ) -> f64 {
        let p = &self.perturbation;
        let flat = if is_delta {
            p.delta.view(-1)
        } else {
            p.offsets.view(-1)
        };
        let orig = flat.double_value(&[j]);
        let set = |v: f64| {
            let _g = tch::no_grad_guard();
            let _ = flat.get(j).fill_(v);
        };
        set(orig + h);
        let up = objective();
        set(orig - h);
        let down = objective();
        set(orig);
        (up - down) / (2.0 * h)
    }
}

/// One compared entry.
#[derive(Debug, Clone, Serialize)]
pub struct EntryCheck {
    /// "delta" or "grid".
    pub param: &'static str,
    pub index: i64,
    pub analytic: f64,
    pub numeric: f64,
    /// Relative error, or the absolute one where both sides are below 1e-7.
    pub error: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GradCheck {
    pub device: String,
    pub channels: usize,
    pub unroll_steps: usize,
    pub objective: String,
    pub augment: bool,
    pub channels_last: bool,
    /// Which ops ran (`OwnOps::describe`).
    pub ops: String,
    /// The unrolled steps' SGD rule: "plain", or its momentum and weight decay.
    pub sgd: String,
    pub entries: Vec<EntryCheck>,
    pub worst_error: f64,
    /// Sum of |d/d delta|: the check only means something if this is not zero.
    pub delta_grad_l1: f64,
}

/// Compares the meta-gradient with central differences (h = 1e-4 on the 0-255 delta, 1e-6 on
/// the grid) at 8 delta entries and 3 grid entries.
pub fn check(
    channels: usize,
    k: usize,
    objective: ObjectiveKind,
    augment: Option<u64>,
    device: Device,
) -> GradCheck {
    check_variant(
        channels,
        k,
        objective,
        augment,
        device,
        false,
        OwnOps::everywhere(),
    )
}

/// As `check`, with the network's convolutions on channels-last tensors or not, and `ops`.
pub fn check_variant(
    channels: usize,
    k: usize,
    objective: ObjectiveKind,
    augment: Option<u64>,
    device: Device,
    channels_last: bool,
    ops: OwnOps,
) -> GradCheck {
    let mut case = Case::variant(channels, k, 7 + k as u64, device, channels_last, ops);
    case.batches.augment = augment;
    let s = UnrollSettings {
        steps: k,
        lr: 0.1,
        rule: SgdRule::default(),
        objective,
        smooth_coef: 1.0,
    };
    let report = compare(&case, s);
    GradCheck {
        augment: augment.is_some(),
        channels_last,
        ops: ops.describe(),
        ..report
    }
}

/// The unrolled steps with SGD momentum (heavy ball or Nesterov) and weight decay, the
/// surrogate coming in with a velocity of its own: grey images, the crate's own ops.
pub fn check_momentum(k: usize, nesterov: bool, device: Device) -> GradCheck {
    let case = Case::new(1, k, 11 + k as u64, device).with_random_velocity(13);
    let s = UnrollSettings {
        steps: k,
        lr: 0.1,
        rule: SgdRule {
            weight_decay: 5e-4,
            momentum: 0.9,
            nesterov,
        },
        objective: ObjectiveKind::Cw,
        smooth_coef: 1.0,
    };
    compare(&case, s)
}

/// The meta-gradient of `case` under `s` against central differences (augmentation, layout
/// and ops as the case has them).
fn compare(case: &Case, s: UnrollSettings) -> GradCheck {
    let (_, g_delta, g_offsets) = meta_gradient(
        case.model(),
        &case.perturbation,
        &case.batches,
        case.targets(),
        s,
    );
    let entries = entries(case, &g_delta, &g_offsets, &|| case.objective(s));
    let r = s.rule;
    GradCheck {
        device: crate::device::describe(case.weights[0].device()),
        channels: case.perturbation.base.size()[1] as usize,
        unroll_steps: s.steps,
        objective: format!("{:?}", s.objective).to_lowercase(),
        augment: case.batches.augment.is_some(),
        channels_last: case.net.channels_last,
        ops: case.net.ops.describe(),
        sgd: if r.has_velocity() {
            format!(
                "momentum {}{}, weight decay {}",
                r.momentum,
                if r.nesterov { " (Nesterov)" } else { "" },
                r.weight_decay
            )
        } else {
            "plain".into()
        },
        worst_error: entries.iter().map(|e| e.error).fold(0.0, f64::max),
        entries,
        delta_grad_l1: g_delta.abs().sum(Kind::Double).double_value(&[]),
    }
}

/// The gradients `g_delta` and `g_offsets` of `objective` against its central differences
/// (h = 1e-4 on the 0-255 delta, 1e-6 on the grid) at 8 delta entries (poison slots 0 and 2)
/// and 3 grid entries.
fn entries(
    case: &Case,
    g_delta: &Tensor,
    g_offsets: &Tensor,
    objective: &dyn Fn() -> f64,
) -> Vec<EntryCheck> {
    let g_delta = g_delta.to_device(Device::Cpu).flatten(0, -1);
    let g_offsets = g_offsets.to_device(Device::Cpu).flatten(0, -1);
    let per_image = case.perturbation.delta.size()[1..].iter().product::<i64>();
    let mut picks: Vec<(bool, i64, f64)> = Vec::new();
    for j in [3i64, 101, 377, 600] {
        picks.push((true, j, 1e-4)); // slot 0
        picks.push((true, 2 * per_image + (j * 2 + 1) % per_image, 1e-4)); // slot 2
    }
    let grid_size = case.perturbation.offsets.numel() as i64;
    for j in [5i64, grid_size / 3 + 1, grid_size - 2] {
        picks.push((false, j, 1e-6));
    }
    picks
        .into_iter()
        .map(|(is_delta, j, h)| {
            let analytic = if is_delta { &g_delta } else { &g_offsets }.double_value(&[j]);
            let numeric = case.central_difference_of(is_delta, j, h, objective);
            let scale = analytic.abs().max(numeric.abs());
            let error = if scale < 1e-7 {
                (analytic - numeric).abs()
            } else {
                (analytic - numeric).abs() / scale
            };
            EntryCheck {
                param: if is_delta { "delta" } else { "grid" },
                index: j,
                analytic,
                numeric,
                error,
            }
        })
        .collect()
}

/// Gradient matching's loss (1 - cos between the targets' adversarial gradient and the
/// poisons' training gradient, in eval mode, the poisons cropped and flipped) against central
/// differences in delta and the colour grid: grey or RGB, the crate's own ops.
pub fn check_matching(channels: usize, device: Device) -> GradCheck {
    use crate::craft::matching::{matching_loss, target_gradient};
    let case = Case::new(channels, 1, 17 + channels as u64, device);
    let state = crate::model::State::new(
        case.weights.iter().map(|w| w.shallow_clone()).collect(),
        case.buffers.iter().map(|b| b.shallow_clone()).collect(),
    );
    let target = target_gradient(&case.net, &state, &case.targets, &case.labels.adversarial);
    let labels = Tensor::from_slice(&[2i64, 0, 1]).to_device(device);
    let loss = || {
        let mut rng = SplitMix64::new(99);
        let poisons = crate::model::augment::crop_flip(&case.perturbation.poisons(None), &mut rng);
        matching_loss(&case.net, &state, &poisons, &labels, &target)
    };
    let p = &case.perturbation;
    let mut grads = Tensor::run_backward(&[loss()], &[&p.delta, &p.offsets], false, false);
    let g_offsets = grads.pop().expect("two gradients");
    let g_delta = grads.pop().expect("two gradients");
    let entries = entries(&case, &g_delta, &g_offsets, &|| loss().double_value(&[]));
    GradCheck {
        device: crate::device::describe(device),
        channels,
        unroll_steps: 0,
        objective: "gradient matching".into(),
        augment: true,
        channels_last: false,
        ops: case.net.ops.describe(),
        sgd: "none (eval mode)".into(),
        worst_error: entries.iter().map(|e| e.error).fold(0.0, f64::max),
        entries,
        delta_grad_l1: g_delta.abs().sum(Kind::Double).double_value(&[]),
    }
}

/// The suite `bench --gradcheck` runs: grey K = 1, 2 with every objective, RGB with the colour
/// grid, through differentiable augmentation, and with channels-last convolutions, all on the
/// crate's own ops (CUDA included); then RGB on libtorch's ops in both layouts, and on a CPU
/// the batch norm as the ATen operations CUDA runs.
pub fn suite(device: Device) -> Vec<GradCheck> {
    use ObjectiveKind::*;
    let mut out = Vec::new();
    for k in [1, 2] {
        for obj in [Cw, Xent, XentC, Dualxent, Indis3] {
            out.push(check(1, k, obj, None, device));
        }
        out.push(check(3, k, Cw, None, device));
    }
    out.push(check(1, 2, Cw, Some(42), device));
    out.push(check(3, 1, Xent, Some(7), device));
    let ours = OwnOps::everywhere();
    out.push(check_variant(3, 2, Cw, None, device, true, ours));
    for channels_last in [false, true] {
        out.push(check_variant(
            3,
            2,
            Cw,
            None,
            device,
            channels_last,
            OwnOps::LIBTORCH,
        ));
    }
    if device == Device::Cpu {
        let aten = OwnOps {
            batch_norm_as_aten_ops: true,
            ..ours
        };
        out.push(check_variant(1, 2, Cw, None, device, false, aten));
    }
    for nesterov in [false, true] {
        out.push(check_momentum(2, nesterov, device));
    }
    for channels in [1, 3] {
        out.push(check_matching(channels, device));
    }
    out
}
