//! One crafting epoch: a surrogate's clean pretraining epoch, its crafting epoch (the
//! meta-gradient at the chosen poison-holding batches and an SGD step at every batch, clean or
//! with the poisons in place as `craft.trajectory` says), and the crafting epoch of all
//! surrogates at once as one grouped network.
//!
//! Each job owns handles on the shared tensors, so a worker thread can run it (parallel.rs).

use super::objective::TargetLabels;
use super::perturbation::Perturbation;
use super::unroll::{
    meta_gradient, meta_gradient_grouped, GroupedSurrogates, Surrogate, Targets, UnrollBatches,
    UnrollSettings,
};
use crate::base::rng::{derive, Purpose, SplitMix64};
use crate::model::sgd::{self, SgdRule};
use crate::model::{Network, State};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub(super) fn as_index(v: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&v.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device)
}

/// One clean training epoch of a surrogate (pretraining), trained in place.
pub(super) struct CleanEpochJob {
    pub(super) net: Network,
    pub(super) state: State,
    pub(super) train_x: Tensor,
    pub(super) train_y: Tensor,
    pub(super) batch_size: usize,
    pub(super) lr: f64,
    pub(super) rule: SgdRule,
    pub(super) seed: u64,
    pub(super) kind: Kind,
    pub(super) device: Device,
}

impl CleanEpochJob {
    /// The epoch's batches: the surrogate's own shuffle, cut into full batches.
    fn chunks(&self) -> Vec<Vec<usize>> {
        let mut perm: Vec<usize> = (0..self.train_x.size()[0] as usize).collect();
        SplitMix64::new(self.seed).shuffle(&mut perm);
        perm.chunks_exact(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    fn load(&self, chunk: &[usize]) -> (Tensor, Tensor) {
        let idx = as_index(chunk, self.device);
        let x = self.train_x.index_select(0, &idx).to_kind(self.kind);
        (x, self.train_y.index_select(0, &idx))
    }

    pub(super) fn run(self) {
        for chunk in self.chunks() {
            let (x, y) = self.load(&chunk);
            let _ = sgd::sgd_step(&self.net, &self.state, &x, &y, self.lr, &self.rule);
        }
    }

    /// Several surrogates' clean epochs in lockstep as one grouped network, `group_size` at a
    /// time: the same batches and steps as each job's own `run`.
    pub(super) fn run_grouped(jobs: &[CleanEpochJob], group_size: usize) {
        for group in jobs.chunks(group_size.max(1)) {
            let first = &group[0];
            let states: Vec<&State> = group.iter().map(|j| &j.state).collect();
            let stacked = State::stack(&states).trainable();
            let lrs: Vec<f64> = group.iter().map(|j| j.lr).collect();
            let walks: Vec<Vec<Vec<usize>>> = group.iter().map(CleanEpochJob::chunks).collect();
            for bi in 0..walks[0].len() {
                let batches: Vec<(Tensor, Tensor)> = group
                    .iter()
                    .zip(&walks)
                    .map(|(job, chunks)| job.load(&chunks[bi]))
                    .collect();
                let xs = Tensor::stack(&batches.iter().map(|(x, _)| x).collect::<Vec<_>>(), 0);
                let ys = Tensor::stack(&batches.iter().map(|(_, y)| y).collect::<Vec<_>>(), 0);
                let _ = sgd::sgd_step_grouped(&first.net, &stacked, &xs, &ys, &lrs, &first.rule);
            }
            let originals: Vec<State> = group.iter().map(|j| j.state.shallow_clone()).collect();
            stacked.unstack_into(&originals);
        }
    }
}

/// One surrogate's crafting epoch, with its own handles on the shared tensors so that it can
/// run on a worker thread (see parallel.rs). The surrogate's weights are trained in place.
pub(super) struct EpochJob {
    pub(super) m: usize,
    pub(super) step: usize,
    pub(super) seed: u64,
    pub(super) batch_size: usize,
    pub(super) settings: UnrollSettings,
    pub(super) meta_batch_fraction: f64,
    pub(super) augment: bool,
    /// The surrogate trains on the batches with the poisons in place (`craft.trajectory`).
    pub(super) poison_trajectory: bool,
    pub(super) kind: Kind,
    pub(super) device: Device,
    pub(super) net: Network,
    pub(super) state: State,
    pub(super) train_x: Tensor,
    pub(super) train_y: Tensor,
    /// Poison slot of each training index, or -1.
    pub(super) slot_of: Arc<[i64]>,
    pub(super) perturbation: Perturbation,
    pub(super) poisons_now: Tensor,
    pub(super) targets: Tensor,
    pub(super) labels: TargetLabels,
}

impl EpochJob {
    /// Positions in a batch that hold poisons, and their slots.
    fn poisons_in(&self, chunk: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for (p, &i) in chunk.iter().enumerate() {
            if self.slot_of[i] >= 0 {
                positions.push(p);
                slots.push(self.slot_of[i] as usize);
            }
        }
        (positions, slots)
    }

    /// A training batch; with `with_poisons` the poisons (as they stand this step) replace
    /// their clean originals.
    fn load(&self, chunk: &[usize], with_poisons: bool) -> (Tensor, Tensor) {
        let idx = as_index(chunk, self.device);
        let x = self.train_x.index_select(0, &idx).to_kind(self.kind);
        let x = if with_poisons {
            let (positions, slots) = self.poisons_in(chunk);
            self.with_poisons(x, &positions, &slots)
        } else {
            x
        };
        (x, self.train_y.index_select(0, &idx))
    }

    /// Clean batch `x` with the poisons (as they stand this step) of `slots` at `positions`.
    fn with_poisons(&self, x: Tensor, positions: &[usize], slots: &[usize]) -> Tensor {
        if positions.is_empty() {
            return x;
        }
        let p = self
            .poisons_now
            .index_select(0, &as_index(slots, self.device));
        x.index_copy(0, &as_index(positions, self.device), &p)
    }

    /// The surrogate's batches this epoch (its own shuffle) and its stream of choices.
    fn walk(&self) -> (Vec<Vec<usize>>, SplitMix64) {
        let (m, step, seed) = (self.m as u64, self.step as u64, self.seed);
        let mut perm: Vec<usize> = (0..self.slot_of.len()).collect();
        SplitMix64::new(derive(seed, Purpose::Shuffle, m, step)).shuffle(&mut perm);
        let chunks = perm
            .chunks_exact(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        (
            chunks,
            SplitMix64::new(derive(seed, Purpose::MetaBatchChoice, m, step)),
        )
    }

    /// Batch `bi` of the walk as the surrogate trains on it (clean, or with the poisons in
    /// place on the poison trajectory), and, when it holds poisons and is chosen for a meta
    /// step, the K + 1 batches to unroll on (the first clean: the unroll puts the poisons in
    /// with their graph). Draws from `choose` in a fixed order, so a grouped epoch makes
    /// exactly the choices of a lone one.
    fn batch(
        &self,
        chunks: &[Vec<usize>],
        bi: usize,
        choose: &mut SplitMix64,
    ) -> ((Tensor, Tensor), Option<UnrollBatches>) {
        let chunk = &chunks[bi];
        let (positions, slots) = self.poisons_in(chunk);
        let (x, y) = self.load(chunk, false);
        let meta =
            (!positions.is_empty() && choose.next_f64() < self.meta_batch_fraction).then(|| {
                let mut batches = vec![(x.shallow_clone(), y.shallow_clone())];
                for i in 1..=self.settings.steps {
                    batches.push(self.load(&chunks[(bi + i) % chunks.len()], true));
                }
                UnrollBatches {
                    batches,
                    positions: as_index(&positions, self.device),
                    slots: as_index(&slots, self.device),
                    augment: self.augment.then(|| choose.next_u64()),
                }
            });
        let x = if self.poison_trajectory {
            self.with_poisons(x, &positions, &slots)
        } else {
            x
        };
        ((x, y), meta)
    }

    /// The trajectory step's input: the batch, augmented when the run augments.
    fn trajectory_input(&self, x: Tensor, choose: &mut SplitMix64) -> Tensor {
        if self.augment {
            crate::model::augment::crop_flip(&x, choose)
        } else {
            x
        }
    }

    /// The surrogate walks one epoch, taking the meta-gradient at the chosen poison-holding
    /// batches and an ordinary SGD step at every batch (on its trajectory's batch). Returns
    /// the summed gradients, the summed adversarial loss (a tensor) and the number of meta
    /// batches.
    pub(super) fn run(self) -> (Tensor, Tensor, Tensor, usize) {
        let (chunks, mut choose) = self.walk();
        let mut g_delta = self.perturbation.delta.detach().zeros_like();
        let mut g_offsets = self.perturbation.offsets.detach().zeros_like();
        let mut adv_sum = Tensor::zeros([], (self.kind, self.device));
        let mut count = 0;
        for bi in 0..chunks.len() {
            let ((x, y), meta) = self.batch(&chunks, bi, &mut choose);
            if let Some(input) = meta {
                let (adv, gd, go) = meta_gradient(
                    Surrogate::of(&self.net, &self.state),
                    &self.perturbation,
                    &input,
                    Targets {
                        images: &self.targets,
                        labels: &self.labels,
                    },
                    self.settings,
                );
                g_delta += gd;
                g_offsets += go;
                adv_sum += adv;
                count += 1;
            }
            // The surrogate's own step: on the clean batch, or on the poisoned one.
            let x = self.trajectory_input(x, &mut choose);
            let settings = &self.settings;
            let _ = sgd::sgd_step(&self.net, &self.state, &x, &y, settings.lr, &settings.rule);
        }
        (g_delta, g_offsets, adv_sum, count)
    }
}

/// The crafting epochs of several surrogates walked in lockstep as one grouped network
/// (`craft.grouped_surrogates`): at each batch index, one grouped unroll for the surrogates
/// whose batch gets a meta step, then one grouped SGD step for all (on their trajectory
/// batches). The same choices, batches and maths as each job's own `run`; on a GPU, one kernel
/// a layer instead of one per surrogate.
pub(super) struct GroupedEpoch {
    pub(super) jobs: Vec<EpochJob>,
    /// Surrogates in one grouped network; the jobs run in groups of this many, one group
    /// after another (GPU memory grows with the group).
    pub(super) group_size: usize,
}

/// d/d delta and d/d offsets summed over surrogates, and per surrogate its summed
/// adversarial loss and meta-batch count.
type EpochSums = (Tensor, Tensor, Vec<(Tensor, usize)>);

impl GroupedEpoch {
    /// The gradients summed over all surrogates, with each surrogate's (in job order) summed
    /// adversarial loss and meta-batch count. `cancelled` is polled between batches; None when
    /// it said stop (the surrogates are then part-way through the epoch: the caller restores
    /// them).
    pub(super) fn run(&self, cancelled: &(dyn Fn() -> bool + Sync)) -> Option<EpochSums> {
        let mut total: Option<EpochSums> = None;
        for group in self.jobs.chunks(self.group_size.max(1)) {
            let (gd, go, adv) = Self::run_group(group, cancelled)?;
            total = Some(match total {
                None => (gd, go, adv),
                Some((d, o, mut a)) => {
                    a.extend(adv);
                    (d + gd, o + go, a)
                }
            });
        }
        total
    }

    /// One group's epoch in lockstep.
    fn run_group(jobs: &[EpochJob], cancelled: &(dyn Fn() -> bool + Sync)) -> Option<EpochSums> {
        let first = &jobs[0];
        let (net, device, kind) = (&first.net, first.device, first.kind);
        let states: Vec<&State> = jobs.iter().map(|j| &j.state).collect();
        let stacked = State::stack(&states).trainable();
        let lrs: Vec<f64> = jobs.iter().map(|j| j.settings.lr).collect();
        let mut walks: Vec<(Vec<Vec<usize>>, SplitMix64)> =
            jobs.iter().map(EpochJob::walk).collect();
        let n_batches = walks[0].0.len();
        assert!(
            walks.iter().all(|(c, _)| c.len() == n_batches),
            "grouped surrogates walk epochs of the same length"
        );
        let mut g_delta = first.perturbation.delta.detach().zeros_like();
        let mut g_offsets = first.perturbation.offsets.detach().zeros_like();
        let mut adv: Vec<(Tensor, usize)> = jobs
            .iter()
            .map(|_| (Tensor::zeros([], (kind, device)), 0))
            .collect();
        for bi in 0..n_batches {
            if cancelled() {
                return None;
            }
            let mut trajectory = Vec::with_capacity(jobs.len());
            let mut metas = Vec::new();
            for (i, (job, (chunks, choose))) in jobs.iter().zip(walks.iter_mut()).enumerate() {
                let ((x, y), meta) = job.batch(chunks, bi, choose);
                if let Some(input) = meta {
                    metas.push((i, input));
                }
                trajectory.push((job.trajectory_input(x, choose), y));
            }
            if !metas.is_empty() {
                let who: Vec<usize> = metas.iter().map(|(i, _)| *i).collect();
                let chosen = subset(&stacked, &who, jobs.len());
                let inputs: Vec<&UnrollBatches> = metas.iter().map(|(_, b)| b).collect();
                let sub_lrs: Vec<f64> = who.iter().map(|&i| lrs[i]).collect();
                let (advs, gd, go) = meta_gradient_grouped(
                    GroupedSurrogates {
                        net,
                        weights: &chosen.weights,
                        buffers: &chosen.buffers,
                        velocity: &chosen.velocity,
                        lrs: &sub_lrs,
                    },
                    &first.perturbation,
                    &inputs,
                    Targets {
                        images: &first.targets,
                        labels: &first.labels,
                    },
                    first.settings,
                );
                g_delta += gd;
                g_offsets += go;
                for (k, &i) in who.iter().enumerate() {
                    adv[i].0 += advs.get(k as i64);
                    adv[i].1 += 1;
                }
            }
            let xs = Tensor::stack(&trajectory.iter().map(|(x, _)| x).collect::<Vec<_>>(), 0);
            let ys = Tensor::stack(&trajectory.iter().map(|(_, y)| y).collect::<Vec<_>>(), 0);
            let _ = sgd::sgd_step_grouped(net, &stacked, &xs, &ys, &lrs, &first.settings.rule);
        }
        let originals: Vec<State> = jobs.iter().map(|j| j.state.shallow_clone()).collect();
        stacked.unstack_into(&originals);
        Some((g_delta, g_offsets, adv))
    }
}

/// The stacked state of surrogates `who` (of `m`), the weights as fresh leaves: all of them
/// as they are, or a gathered copy of the chosen ones' rows.
fn subset(stacked: &State, who: &[usize], m: usize) -> State {
    if who.len() == m {
        return stacked.shallow_clone();
    }
    let device = stacked.weights[0].device();
    let index = as_index(who, device);
    let pick = |t: &Tensor| {
        let mut shape = t.size();
        let rows = shape[0] / m as i64;
        let parts = t.detach().reshape([m as i64, -1]).index_select(0, &index);
        shape[0] = rows * who.len() as i64;
        parts.view(shape.as_slice())
    };
    State {
        weights: stacked
            .weights
            .iter()
            .map(|t| pick(t).set_requires_grad(true))
            .collect(),
        buffers: stacked.buffers.iter().map(pick).collect(),
        velocity: stacked.velocity.iter().map(pick).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetKind, ObjectiveKind};
    use crate::craft::recolor::Recolor;
    use crate::model::InputNorm;

    const KIND: Kind = Kind::Double;

    /// A crafting epoch of a small ConvNetBN on random grey images: 40 training images in
    /// batches of 10, 8 of them poisons carrying a perturbation far from zero; 4 classes.
    fn job(m: usize, poison_trajectory: bool) -> EpochJob {
        let device = Device::Cpu;
        let net = Network::new(
            NetKind::ConvnetBn,
            1,
            4,
            1,
            InputNorm::for_dataset("test", 1),
        );
        let mut rng = SplitMix64::new(5 + m as u64);
        let train_x = rng.uniform_tensor(&[40, 1, 12, 12], 0.0, 255.0, (KIND, device));
        let train_y = Tensor::from_slice(&(0..40).map(|i| i % 4).collect::<Vec<i64>>());
        let poison_idx: Vec<usize> = (0..40).step_by(5).collect();
        let mut slot_of = vec![-1i64; 40];
        for (slot, &i) in poison_idx.iter().enumerate() {
            slot_of[i] = slot as i64;
        }
        let base = train_x.index_select(0, &as_index(&poison_idx, device));
        let mut perturbation = Perturbation::zeros(base, Recolor::new(1, 4), 64.0, 0.04);
        perturbation.randomise(7);
        let poisons_now = perturbation.poisons_detached();
        EpochJob {
            m,
            step: 3,
            seed: 9,
            batch_size: 10,
            settings: UnrollSettings {
                steps: 1,
                lr: 0.1,
                rule: SgdRule::default(),
                objective: ObjectiveKind::Cw,
                smooth_coef: 1.0,
            },
            meta_batch_fraction: 0.5,
            augment: false,
            poison_trajectory,
            kind: KIND,
            device,
            net: net.clone(),
            state: net.init(device, KIND, 3 + m as u64).trainable(),
            train_x,
            train_y,
            slot_of: slot_of.into(),
            perturbation,
            poisons_now,
            targets: rng.uniform_tensor(&[1, 1, 12, 12], 0.0, 255.0, (KIND, device)),
            labels: TargetLabels {
                truth: Tensor::from_slice(&[1i64]),
                adversarial: Tensor::from_slice(&[0i64]),
                poison_class: 0,
            },
        }
    }

    /// The surrogate's weights after plain SGD over the job's walk, on the batches with or
    /// without the poisons in place (the meta steps do not move the surrogate).
    fn replay(job: &EpochJob, with_poisons: bool) -> State {
        let state = job.state.deep_clone().trainable();
        let (chunks, _) = job.walk();
        for chunk in &chunks {
            let (x, y) = job.load(chunk, with_poisons);
            let s = &job.settings;
            let _ = sgd::sgd_step(&job.net, &state, &x, &y, s.lr, &s.rule);
        }
        state
    }

    fn max_diff(a: &State, b: &State) -> f64 {
        a.weights
            .iter()
            .chain(&a.buffers)
            .zip(b.weights.iter().chain(&b.buffers))
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_surrogate_trains_on_the_batches_its_trajectory_names() {
        for poison_trajectory in [false, true] {
            let lone = job(0, poison_trajectory);
            let expected = replay(&lone, poison_trajectory);
            let other = replay(&lone, !poison_trajectory);
            let state = lone.state.shallow_clone();
            let (_, _, _, meta_batches) = lone.run();
            assert!(meta_batches > 0, "the epoch took meta steps");
            assert!(
                max_diff(&state, &expected) < 1e-10,
                "poison trajectory {poison_trajectory}: off by {}",
                max_diff(&state, &expected)
            );
            // The two trajectories differ, so the check above can tell them apart.
            assert!(max_diff(&expected, &other) > 1e-3);

            // Grouped surrogates walk the same trajectories.
            let jobs = vec![job(0, poison_trajectory), job(1, poison_trajectory)];
            let expected: Vec<State> = jobs.iter().map(|j| replay(j, poison_trajectory)).collect();
            let states: Vec<State> = jobs.iter().map(|j| j.state.shallow_clone()).collect();
            let _sums = GroupedEpoch {
                jobs,
                group_size: 2,
            }
            .run(&|| false)
            .expect("not cancelled");
            for (s, e) in states.iter().zip(&expected) {
                assert!(max_diff(s, e) < 1e-10, "grouped: off by {}", max_diff(s, e));
            }
        }
    }
}
