//! Training a network from scratch with a recipe (SGD, its momentum and weight decay, a
//! schedule, optional augmentation): how victims are trained, and gradient matching's
//! surrogates with them.

use crate::base::rng::{derive, Purpose, SplitMix64};
use crate::config::{LrSchedule, NetKind, VictimConfig};
use crate::model::schedule;
use crate::model::sgd::{self, SgdRule};
use crate::model::{Network, State};
use tch::{Kind, Tensor};

/// How to train one victim.
#[derive(Debug, Clone)]
pub struct VictimTraining {
    pub net: NetKind,
    pub width: usize,
    pub epochs: usize,
    pub lr: f64,
    pub warmup_epochs: usize,
    pub lr_drops: Vec<usize>,
    pub batch_size: usize,
    pub rule: SgdRule,
    pub schedule: LrSchedule,
    pub augment: bool,
}

impl VictimTraining {
    pub fn from_config(v: &VictimConfig) -> VictimTraining {
        VictimTraining {
            net: v.net,
            width: 1,
            epochs: v.epochs(),
            lr: v.lr,
            warmup_epochs: v.warmup_epochs,
            lr_drops: v.lr_drops.clone(),
            batch_size: v.batch_size,
            rule: v.into(),
            schedule: v.schedule,
            augment: v.augment,
        }
    }

    /// The learning rate of batch `batch` of `batches` in `epoch` (a one-cycle schedule moves
    /// every batch; the step schedule every epoch).
    pub fn lr(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        let progress = epoch as f64 + batch as f64 / batches.max(1) as f64;
        schedule::lr_at(
            self.schedule,
            self.lr,
            progress,
            self.epochs,
            self.warmup_epochs,
            &self.lr_drops,
        )
    }
}

/// Trains a fresh network on images `x` (0-255, [N, C, H, W], any numeric kind) and labels
/// `y`. `seed` fixes the initialisation, batch order and augmentation. `progress(epoch)` is
/// called after each epoch; returning false stops early.
pub fn train_from_scratch(
    net: &Network,
    spec: &VictimTraining,
    x: &Tensor,
    y: &Tensor,
    seed: u64,
    kind: Kind,
    mut progress: impl FnMut(usize) -> bool,
) -> State {
    let device = x.device();
    let state = net
        .init(
            device,
            kind,
            derive(seed, Purpose::SurrogateInit, u64::MAX, 0),
        )
        .trainable()
        .with_velocity(&spec.rule);
    let n = x.size()[0] as usize;
    let batches = n / spec.batch_size.min(n);
    for epoch in 0..spec.epochs {
        let mut rng = SplitMix64::new(derive(seed, Purpose::Shuffle, u64::MAX, epoch as u64));
        let mut perm: Vec<i64> = (0..n as i64).collect();
        rng.shuffle(&mut perm);
        for (bi, chunk) in perm.chunks_exact(spec.batch_size.min(n)).enumerate() {
            let idx = Tensor::from_slice(chunk).to_device(device);
            let mut xb = x.index_select(0, &idx).to_kind(kind);
            if spec.augment {
                xb = crate::model::augment::crop_flip(&xb, &mut rng);
            }
            let yb = y.index_select(0, &idx);
            let lr = spec.lr(epoch, bi, batches);
            let _ = sgd::sgd_step(net, &state, &xb, &yb, lr, &spec.rule);
        }
        if !progress(epoch + 1) {
            break;
        }
    }
    state
}

/// `train_from_scratch` of several victims at once as one grouped network
/// (`Network::forward_grouped`): victim i learns images `xs[i]` (labels `y`, shared) from
/// `seeds[i]`, with the init, shuffles and augmentation draws it would have alone, so the
/// victims equal those trained one at a time (float rounding aside). On a GPU, one kernel a
/// layer for all of them.
pub fn train_from_scratch_grouped(
    net: &Network,
    spec: &VictimTraining,
    xs: &[&Tensor],
    y: &Tensor,
    seeds: &[u64],
    kind: Kind,
) -> Vec<State> {
    let device = y.device();
    let states: Vec<State> = seeds
        .iter()
        .map(|&seed| {
            net.init(
                device,
                kind,
                derive(seed, Purpose::SurrogateInit, u64::MAX, 0),
            )
            .with_velocity(&spec.rule)
        })
        .collect();
    let stacked = State::stack(&states.iter().collect::<Vec<_>>()).trainable();
    let n = y.size()[0] as usize;
    let b = spec.batch_size.min(n);
    for epoch in 0..spec.epochs {
        let mut walks: Vec<(SplitMix64, Vec<i64>)> = seeds
            .iter()
            .map(|&seed| {
                let mut rng =
                    SplitMix64::new(derive(seed, Purpose::Shuffle, u64::MAX, epoch as u64));
                let mut perm: Vec<i64> = (0..n as i64).collect();
                rng.shuffle(&mut perm);
                (rng, perm)
            })
            .collect();
        for (bi, start) in (0..n - n % b).step_by(b).enumerate() {
            let mut xbs = Vec::with_capacity(xs.len());
            let mut ybs = Vec::with_capacity(xs.len());
            for (x, (rng, perm)) in xs.iter().zip(walks.iter_mut()) {
                let idx = Tensor::from_slice(&perm[start..start + b]).to_device(device);
                let mut xb = x.index_select(0, &idx).to_kind(kind);
                if spec.augment {
                    xb = crate::model::augment::crop_flip(&xb, rng);
                }
                xbs.push(xb);
                ybs.push(y.index_select(0, &idx));
            }
            let lrs = vec![spec.lr(epoch, bi, n / b); seeds.len()];
            let _ = sgd::sgd_step_grouped(
                net,
                &stacked,
                &Tensor::stack(&xbs, 0),
                &Tensor::stack(&ybs, 0),
                &lrs,
                &spec.rule,
            );
        }
    }
    let states: Vec<State> = states.into_iter().map(State::trainable).collect();
    stacked.unstack_into(&states);
    states
}
