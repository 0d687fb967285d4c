//! The unrolled meta-gradient: K plain SGD steps of training with the graph kept, the poisons in
//! place of their clean originals in the first step's batch, the adversarial loss of the targets
//! taken under the weights after each step and averaged over steps 1..K, backpropagated through
//! the unrolled steps into the perturbation.
//!
//! As in the authors' code the targets ride along in each step's batch (train-mode batch norm
//! sees them; they add nothing to the training loss), and step i's forward pass, on batch i,
//! gives both the training loss for step i and the targets' logits under the weights w_i.

use super::objective::{adversarial_loss, cross_entropy, TargetLabels};
use super::perturbation::Perturbation;
use crate::config::ObjectiveKind;
use crate::model::sgd::{GroupRates, SgdRule};
use crate::model::{Mode, Network, State};
use tch::Tensor;

/// One unrolled batch sequence.
pub struct UnrollBatches {
    /// K + 1 batches (images 0-255 [B, C, H, W], labels [B]). Batch 0 holds clean images; the
    /// poisons replace the entries at `positions`. Later batches are used as they are.
    pub batches: Vec<(Tensor, Tensor)>,
    /// Positions in batch 0 that hold poisons.
    pub positions: Tensor,
    /// The poison slot at each of those positions.
    pub slots: Tensor,
    /// When set, every unrolled batch is augmented (crop + flip, differentiably) with draws
    /// from this seed.
    pub augment: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct UnrollSettings {
    pub steps: usize,
    pub lr: f64,
    /// The surrogates' SGD rule (weight decay, momentum), which the unrolled steps follow.
    pub rule: SgdRule,
    pub objective: ObjectiveKind,
    /// Weight of the colour grid's smoothness penalty in the objective.
    pub smooth_coef: f64,
}

/// A surrogate network at its current weights (which must require grad).
#[derive(Clone, Copy)]
pub struct Surrogate<'a> {
    pub net: &'a Network,
    pub weights: &'a [Tensor],
    pub buffers: &'a [Tensor],
    /// Its SGD velocity (empty: none, or zero), which the unrolled steps carry on.
    pub velocity: &'a [Tensor],
}

impl<'a> Surrogate<'a> {
    /// `net` at the weights, buffers and velocity of its training state.
    pub fn of(net: &'a Network, state: &'a State) -> Self {
        Surrogate {
            net,
            weights: &state.weights,
            buffers: &state.buffers,
            velocity: &state.velocity,
        }
    }
}

/// The SGD steps of an unroll: each weight and its velocity, stepped inside the graph.
struct UnrolledWeights<'r> {
    w: Vec<Tensor>,
    v: Vec<Option<Tensor>>,
    rates: GroupRates,
    rule: &'r SgdRule,
}

impl<'r> UnrolledWeights<'r> {
    fn new(weights: &[Tensor], velocity: &[Tensor], lrs: &[f64], rule: &'r SgdRule) -> Self {
        UnrolledWeights {
            w: weights.iter().map(|t| t.shallow_clone()).collect(),
            v: (0..weights.len())
                .map(|j| velocity.get(j).map(|t| t.detach()))
                .collect(),
            rates: GroupRates::new(lrs, weights),
            rule,
        }
    }

    /// One step down `loss`, keeping the graph (second-order terms included).
    fn step(&mut self, loss: Tensor) {
        let grads = Tensor::run_backward(&[loss], &self.w, true, true);
        for (j, g) in grads.iter().enumerate() {
            let (w, v) = self
                .rates
                .step(self.rule, j, &self.w[j], g, self.v[j].as_ref());
            self.w[j] = w;
            self.v[j] = v;
        }
    }
}

/// The target images (0-255, [T, C, H, W]) and their classes.
#[derive(Clone, Copy)]
pub struct Targets<'a> {
    pub images: &'a Tensor,
    pub labels: &'a TargetLabels,
}

/// The adversarial objective after unrolling (averaged over steps 1..K), as a differentiable
/// function of the perturbation. `weights` must require grad.
pub fn unrolled_adversarial_loss(
    model: Surrogate,
    perturbation: &Perturbation,
    input: &UnrollBatches,
    targets: Targets,
    settings: UnrollSettings,
) -> Tensor {
    let (net, weights, buffers) = (model.net, model.weights, model.buffers);
    let labels = targets.labels;
    let targets = targets.images;
    let k = settings.steps;
    assert!(
        input.batches.len() > k,
        "need K + 1 batches for K unrolled steps"
    );
    let poisons = perturbation.poisons(Some(&input.slots));
    let first = input.batches[0].0.index_copy(0, &input.positions, &poisons);
    let n_targets = targets.size()[0];
    let mut w = UnrolledWeights::new(weights, model.velocity, &[settings.lr], &settings.rule);
    let mut total: Option<Tensor> = None;
    let mut rng = input.augment.map(crate::base::rng::SplitMix64::new);
    for i in 0..=k {
        let (x, y) = if i == 0 {
            (&first, &input.batches[0].1)
        } else {
            (&input.batches[i].0, &input.batches[i].1)
        };
        let augmented = rng.as_mut().map(|r| crate::model::augment::crop_flip(x, r));
        let x = augmented.as_ref().unwrap_or(x);
        let b = x.size()[0];
        let logits = net.forward(&w.w, buffers, &Tensor::cat(&[x, targets], 0), Mode::Train);
        if i > 0 {
            let adv = adversarial_loss(settings.objective, &logits.narrow(0, b, n_targets), labels);
            total = Some(match total {
                None => adv,
                Some(t) => t + adv,
            });
        }
        if i < k {
            w.step(cross_entropy(&logits.narrow(0, 0, b), y));
        }
    }
    total.expect("K >= 1") / k as f64
}

/// The meta-gradient of one batch sequence: (adversarial loss, d/d delta, d/d offsets). The
/// differentiated objective adds `smooth_coef` times the colour grid's smoothness penalty.
pub fn meta_gradient(
    model: Surrogate,
    perturbation: &Perturbation,
    input: &UnrollBatches,
    targets: Targets,
    settings: UnrollSettings,
) -> (Tensor, Tensor, Tensor) {
    let adv = unrolled_adversarial_loss(model, perturbation, input, targets, settings);
    let (g_delta, g_offsets) = perturbation_gradients(&adv, 1.0, perturbation, settings);
    (adv.detach(), g_delta, g_offsets)
}

/// d/d delta and d/d offsets of `adv` (summed) plus `surrogates` times the smoothness penalty
/// (each surrogate's objective carries one).
fn perturbation_gradients(
    adv: &Tensor,
    surrogates: f64,
    perturbation: &Perturbation,
    settings: UnrollSettings,
) -> (Tensor, Tensor) {
    let summed = adv.sum(adv.kind());
    let objective = if settings.smooth_coef > 0.0 {
        summed
            + perturbation.recolor.smoothness(&perturbation.offsets)
                * (settings.smooth_coef * surrogates)
    } else {
        summed
    };
    let mut grads = Tensor::run_backward(
        &[&objective],
        &[&perturbation.delta, &perturbation.offsets],
        false,
        false,
    );
    let g_offsets = grads.pop().unwrap();
    (grads.pop().unwrap(), g_offsets)
}

/// Several surrogates batched into one grouped network (`Network::forward_grouped`): their
/// weights and buffers stacked along dim 0 (`State::stack`); the weights must require grad.
#[derive(Clone, Copy)]
pub struct GroupedSurrogates<'a> {
    pub net: &'a Network,
    pub weights: &'a [Tensor],
    pub buffers: &'a [Tensor],
    /// Their stacked velocities (empty: none).
    pub velocity: &'a [Tensor],
    /// Each surrogate's inner learning rate (they differ with the surrogates' epochs); the
    /// settings' `lr` is not used.
    pub lrs: &'a [f64],
}

/// `unrolled_adversarial_loss` of m surrogates at once, surrogate i unrolled on `inputs[i]`
/// (all with the same batch size): the m losses as a tensor [m]. The same maths as m separate
/// calls; each layer runs as one grouped kernel for all of them.
pub fn unrolled_adversarial_losses_grouped(
    model: GroupedSurrogates,
    perturbation: &Perturbation,
    inputs: &[&UnrollBatches],
    targets: Targets,
    settings: UnrollSettings,
) -> Tensor {
    let (net, buffers) = (model.net, model.buffers);
    let m = inputs.len() as i64;
    let k = settings.steps;
    assert!(
        inputs.iter().all(|input| input.batches.len() > k),
        "need K + 1 batches for K unrolled steps"
    );
    let firsts: Vec<Tensor> = inputs
        .iter()
        .map(|input| {
            let poisons = perturbation.poisons(Some(&input.slots));
            input.batches[0].0.index_copy(0, &input.positions, &poisons)
        })
        .collect();
    let mut rngs: Vec<Option<crate::base::rng::SplitMix64>> = inputs
        .iter()
        .map(|input| input.augment.map(crate::base::rng::SplitMix64::new))
        .collect();
    let images = targets.images;
    let n_targets = images.size()[0];
    let mut target_shape = vec![m];
    target_shape.extend(images.size());
    let target_images = images.unsqueeze(0).expand(&target_shape, false);
    let mut w = UnrolledWeights::new(model.weights, model.velocity, model.lrs, &settings.rule);
    let mut total: Option<Tensor> = None;
    for i in 0..=k {
        let xs: Vec<Tensor> = (0..inputs.len())
            .map(|j| {
                let x = if i == 0 {
                    &firsts[j]
                } else {
                    &inputs[j].batches[i].0
                };
                match rngs[j].as_mut() {
                    Some(r) => crate::model::augment::crop_flip(x, r),
                    None => x.shallow_clone(),
                }
            })
            .collect();
        let b = xs[0].size()[0];
        let x = Tensor::cat(&[Tensor::stack(&xs, 0), target_images.shallow_clone()], 1);
        let logits = net.forward_grouped(&w.w, buffers, &x, Mode::Train);
        if i > 0 {
            let adv: Vec<Tensor> = (0..m)
                .map(|j| {
                    let z = logits.get(j).narrow(0, b, n_targets);
                    adversarial_loss(settings.objective, &z, targets.labels)
                })
                .collect();
            let adv = Tensor::stack(&adv, 0);
            total = Some(match total {
                None => adv,
                Some(t) => t + adv,
            });
        }
        if i < k {
            // The mean over all m batches of equal size, times m: the sum of the m losses, so
            // each surrogate's weights get exactly its own loss's gradient.
            let classes = logits.size()[2];
            let z = logits.narrow(1, 0, b).reshape([m * b, classes]);
            let ys: Vec<&Tensor> = inputs.iter().map(|input| &input.batches[i].1).collect();
            w.step(cross_entropy(&z, &Tensor::cat(&ys, 0)) * m as f64);
        }
    }
    total.expect("K >= 1") / k as f64
}

/// `meta_gradient` of m surrogates at once: their adversarial losses [m] and the gradients
/// of their sum (each surrogate's objective, the smoothness penalty included, summed), as m
/// separate calls summed would give.
pub fn meta_gradient_grouped(
    model: GroupedSurrogates,
    perturbation: &Perturbation,
    inputs: &[&UnrollBatches],
    targets: Targets,
    settings: UnrollSettings,
) -> (Tensor, Tensor, Tensor) {
    let adv = unrolled_adversarial_losses_grouped(model, perturbation, inputs, targets, settings);
    let (g_delta, g_offsets) =
        perturbation_gradients(&adv, inputs.len() as f64, perturbation, settings);
    (adv.detach(), g_delta, g_offsets)
}
