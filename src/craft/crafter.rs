//! One crafting job's state and its craft step, with no threads and no I/O: the engine
//! (engine.rs) drives it, the checkpoint module saves and restores it.

use super::adam::Adam;
use super::epoch::{CleanEpochJob, EpochJob, GroupedEpoch};
use super::matching::{self, MatchingState, Restarts};
use super::objective::TargetLabels;
use super::perturbation::Perturbation;
use super::plan::Plan;
use super::recolor::Recolor;
use super::report::{Event, EventKind, StepReport};
use super::schedule;
use super::unroll::UnrollSettings;
use crate::base::rng::{derive, Purpose, SplitMix64};
use crate::config::{Config, CraftRecipe};
use crate::data::Dataset;
use crate::failure::{attempt_group, GroupAttempt};
use crate::model::{split_tensor, InputNorm, Mode, Network, State};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Settings a user may change while the job runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveSettings {
    pub outer_lr: f64,
    pub inner_lr: f64,
    pub unroll_steps: usize,
}

/// A live change outside its range; the engine refuses it and a UI says so before sending,
/// with the same words.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LiveSettingError {
    #[error("outer lr {0} must be a positive number")]
    OuterLr(f64),
    #[error("inner lr {0} must be in (0, 10]")]
    InnerLr(f64),
    #[error("K = {0} must be in 1..=16")]
    UnrollSteps(usize),
}

/// The ranges a live change must respect; the engine enforces them and a UI checks them before
/// sending.
impl LiveSettings {
    pub fn check_outer_lr(v: f64) -> Result<f64, LiveSettingError> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(LiveSettingError::OuterLr(v))
        }
    }
    pub fn check_inner_lr(v: f64) -> Result<f64, LiveSettingError> {
        if v.is_finite() && v > 0.0 && v <= 10.0 {
            Ok(v)
        } else {
            Err(LiveSettingError::InnerLr(v))
        }
    }
    pub fn check_unroll_steps(k: usize) -> Result<usize, LiveSettingError> {
        if (1..=16).contains(&k) {
            Ok(k)
        } else {
            Err(LiveSettingError::UnrollSteps(k))
        }
    }
}

pub struct Crafter {
    pub config: Config,
    pub plan: Plan,
    pub device: Device,
    pub kind: Kind,
    pub net: Network,
    /// Training images, u8 [N, C, H, W] on the device, and labels.
    train_x: Tensor,
    train_y: Tensor,
    /// Poison slot of each training index, or -1 (shared with the epoch jobs).
    slot_of: Arc<[i64]>,
    pub perturbation: Perturbation,
    pub adam: Adam,
    pub targets: Tensor,
    pub labels: TargetLabels,
    pub surrogates: Vec<State>,
    /// Next craft step to run.
    pub step: usize,
    pub live: LiveSettings,
    pub events: Vec<Event>,
    pub history: Vec<StepReport>,
    pub nonfinite_in_row: usize,
    /// Wall-clock seconds the surrogates' pretraining took (before step 0).
    pub pretrain_seconds: f64,
    step_seconds: Vec<f64>,
    /// Surrogates in one grouped network (with `plan.grouped_surrogates`): the whole ensemble
    /// until the GPU runs out of memory, then halved.
    group_size: usize,
    /// The devices surrogates live on, each with its copy of what they read; the first is
    /// the crafter's own device unless `spread_over` says otherwise.
    replicas: Vec<Replica>,
    /// Surrogate m lives on `replicas[placement[m]]`.
    placement: Vec<usize>,
    /// Gradient matching's own state (empty for MetaPoison).
    pub matching: MatchingState,
    /// The job's processes (one, or MPI ranks): this one trains and unrolls only the
    /// surrogates it owns, and the ranks sum their meta-gradients.
    ranks: crate::ranks::Ranks,
}

/// What one recipe's step leaves for the step report.
struct StepOutcome {
    /// Each surrogate's loss this step (MetaPoison: None for one that took no meta step).
    losses: Vec<Option<f64>>,
    /// The outer rate applied to delta (0-255 scale).
    lr: f64,
    epochs: Vec<usize>,
    meta_batches: usize,
    /// False when the gradient was not finite and the update was skipped.
    updated: bool,
    /// Gradient matching: (restart, restarts), 1-based.
    restart: Option<(usize, usize)>,
}

/// A device surrogates live on; on a device other than the crafter's, its copy of what they
/// read (on the crafter's own device they read the crafter's tensors themselves).
struct Replica {
    device: Device,
    copies: Option<ReplicaData>,
}

/// The training split, the targets and their labels, copied to a replica's device once.
struct ReplicaData {
    train_x: Tensor,
    train_y: Tensor,
    targets: Tensor,
    labels: TargetLabels,
}

/// Per replica for one craft step: the perturbation (on another device, a detached copy whose
/// gradients are moved back) and the poisons as they stand.
struct StepInputs {
    perturbation: Perturbation,
    poisons_now: Tensor,
}

impl Crafter {
    /// Builds the job; surrogates are initialised but not yet pretrained (see [`Self::pretrain`]).
    pub fn new(config: Config, data: &Dataset, plan: Plan, device: Device, kind: Kind) -> Crafter {
        let plan_ensemble = plan.ensemble_size;
        let train_x = split_tensor(&data.train, device);
        let train_y = Tensor::from_slice(&data.train.labels)
            .to_kind(Kind::Int64)
            .to_device(device);
        let mut slot_of = vec![-1i64; data.train.len()];
        for (s, &i) in plan.poison_indices.iter().enumerate() {
            slot_of[i] = s as i64;
        }
        let idx = |v: &[usize]| {
            Tensor::from_slice(&v.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device)
        };
        let base = train_x
            .index_select(0, &idx(&plan.poison_indices))
            .to_kind(kind);
        let recolor = Recolor::new(data.train.channels, config.threat.color_grid);
        let mut perturbation =
            Perturbation::zeros(base, recolor, config.threat.eps, config.threat.color_eps);
        perturbation.randomise(derive(config.run.seed, Purpose::PerturbationInit, 0, 0));
        perturbation.project(true);
        let adam = Adam::new(&[&perturbation.delta, &perturbation.offsets]);
        let test_x = split_tensor(&data.test, device);
        let targets = test_x
            .index_select(0, &idx(&plan.target_indices))
            .to_kind(kind);
        let t = plan.target_indices.len();
        let labels = TargetLabels {
            truth: Tensor::full([t as i64], plan.target_class, (Kind::Int64, device)),
            adversarial: Tensor::full([t as i64], plan.adv_class, (Kind::Int64, device)),
            poison_class: plan.poison_class,
        };
        let norm = InputNorm::for_dataset(&data.name, data.train.channels);
        let net = Network::new(
            config.surrogate.net,
            data.train.channels,
            data.num_classes(),
            config.surrogate.width,
            norm,
        )
        .with_channels_last(config.run.channels_last())
        .with_ops(crate::model::OwnOps::from(&config.run));
        let live = LiveSettings {
            // Gradient matching's outer rate is its signed-Adam step, a fraction of eps.
            outer_lr: match config.craft.recipe {
                CraftRecipe::Metapoison => config.craft.outer_lr,
                CraftRecipe::GradientMatching => config.matching.step_size,
            },
            inner_lr: config.surrogate.lr,
            unroll_steps: config.craft.unroll_steps,
        };
        let replicas = vec![Replica {
            device,
            copies: None,
        }];
        let mut crafter = Crafter {
            replicas,
            placement: vec![0; plan_ensemble],
            train_x,
            train_y,
            slot_of: slot_of.into(),
            perturbation,
            adam,
            targets,
            labels,
            surrogates: Vec::new(),
            step: 0,
            live,
            events: Vec::new(),
            history: Vec::new(),
            nonfinite_in_row: 0,
            pretrain_seconds: 0.0,
            step_seconds: Vec::new(),
            group_size: plan_ensemble,
            matching: MatchingState::default(),
            ranks: crate::ranks::Ranks::solo(),
            net,
            device,
            kind,
            plan,
            config,
        };
        crafter.surrogates = (0..crafter.plan.ensemble_size)
            .map(|m| crafter.fresh_surrogate(m, 0))
            .collect();
        crafter
    }

    fn fresh_surrogate(&self, m: usize, generation: usize) -> State {
        let seed = derive(
            self.config.run.seed,
            Purpose::SurrogateInit,
            m as u64,
            generation as u64,
        );
        let state = self
            .net
            .init(self.surrogate_device(m), self.kind, seed)
            .trainable();
        match self.plan.recipe {
            CraftRecipe::Metapoison => state.with_velocity(&self.sgd_rule()),
            // Gradient matching's surrogates never take a crafting step.
            CraftRecipe::GradientMatching => state,
        }
    }

    /// The surrogates' SGD rule (weight decay and momentum), in their own steps and unrolled.
    fn sgd_rule(&self) -> crate::model::sgd::SgdRule {
        (&self.config.surrogate).into()
    }

    /// Places the surrogates on `devices`, round robin (surrogate m on `devices[m % n]`), each
    /// device with its own copy of the training split and targets. The perturbation and its
    /// optimiser stay on the crafter's device; each step sends them over and brings the
    /// meta-gradients back. Call before pretraining (or restoring a checkpoint, which keeps
    /// each surrogate where it is). Several entries may name one device.
    pub fn spread_over(&mut self, devices: &[Device]) {
        if devices.is_empty() {
            return;
        }
        let _guard = tch::no_grad_guard();
        self.replicas = devices
            .iter()
            .map(|&d| Replica {
                device: d,
                copies: (d != self.device).then(|| ReplicaData {
                    train_x: self.train_x.to_device(d),
                    train_y: self.train_y.to_device(d),
                    targets: self.targets.to_device(d),
                    labels: TargetLabels {
                        truth: self.labels.truth.to_device(d),
                        adversarial: self.labels.adversarial.to_device(d),
                        poison_class: self.labels.poison_class,
                    },
                }),
            })
            .collect();
        self.placement = (0..self.plan.ensemble_size)
            .map(|m| m % devices.len())
            .collect();
        for m in 0..self.surrogates.len() {
            let d = self.surrogate_device(m);
            let s = &self.surrogates[m];
            let moved = |ts: &[Tensor]| ts.iter().map(|t| t.detach().to_device(d)).collect();
            self.surrogates[m] = State {
                weights: moved(&s.weights),
                buffers: moved(&s.buffers),
                velocity: moved(&s.velocity),
            }
            .trainable();
        }
    }

    /// What surrogate m reads, on its device: training images and labels, targets and their
    /// labels.
    fn data_of(&self, m: usize) -> (&Tensor, &Tensor, &Tensor, &TargetLabels) {
        match &self.replicas[self.placement[m]].copies {
            Some(c) => (&c.train_x, &c.train_y, &c.targets, &c.labels),
            None => (&self.train_x, &self.train_y, &self.targets, &self.labels),
        }
    }

    /// The device surrogate m lives on.
    pub fn surrogate_device(&self, m: usize) -> Device {
        self.replicas[self.placement[m]].device
    }

    /// Each replica's view of the perturbation for this step: the perturbation itself when
    /// all surrogates share the crafter's device, else a detached copy per replica (even one
    /// on the crafter's device, so replicas never share a gradient).
    fn step_inputs(&self, poisons_now: &Tensor) -> Vec<StepInputs> {
        let alone = self.replicas.len() == 1 && self.replicas[0].device == self.device;
        self.replicas
            .iter()
            .map(|r| {
                if alone {
                    StepInputs {
                        perturbation: self.perturbation.shallow_clone(),
                        poisons_now: poisons_now.shallow_clone(),
                    }
                } else {
                    StepInputs {
                        perturbation: self.perturbation.detached_on(r.device),
                        poisons_now: poisons_now.to_device(r.device),
                    }
                }
            })
            .collect()
    }

    fn batch_size(&self) -> usize {
        self.config.surrogate.batch_size
    }

    /// The surrogates' lr at `epoch` of their life (the ensemble's cycle of M x stagger
    /// epochs, over which a one-cycle schedule runs).
    fn inner_lr(&self, epoch: usize) -> f64 {
        let s = &self.config.surrogate;
        let life = self.plan.ensemble_size * self.plan.stagger;
        schedule::lr_at(
            s.schedule,
            self.live.inner_lr,
            epoch as f64,
            life,
            s.warmup_epochs,
            &s.lr_drops,
        )
    }

    pub fn outer_lr(&self, step: usize) -> f64 {
        let c = &self.config.craft;
        schedule::outer_lr(
            self.live.outer_lr,
            step,
            c.warmup_steps,
            c.lr_drops(),
            c.lr_drop_factor,
        )
    }

    /// Surrogate m's clean pretraining epoch `epoch`, as a job a worker thread can own.
    fn clean_epoch_job(&self, m: usize, epoch: usize, generation: usize) -> CleanEpochJob {
        let (train_x, train_y, _, _) = self.data_of(m);
        CleanEpochJob {
            net: self.net.clone(),
            state: self.surrogates[m].shallow_clone(),
            train_x: train_x.shallow_clone(),
            train_y: train_y.shallow_clone(),
            batch_size: self.batch_size(),
            lr: self.inner_lr(epoch),
            rule: self.sgd_rule(),
            seed: derive(
                self.config.run.seed,
                Purpose::Pretrain,
                (m * 1_000_003 + generation) as u64,
                epoch as u64,
            ),
            kind: self.kind,
            device: self.surrogate_device(m),
        }
    }

    /// Staggered pretraining: surrogate m is trained from scratch to its starting epoch,
    /// `plan.parallel_surrogates` surrogates at a time. `progress(m, epoch, epochs)` is called
    /// after each epoch; returning false cancels.
    pub fn pretrain(&mut self, mut progress: impl FnMut(usize, usize, usize) -> bool) -> bool {
        if self.plan.recipe == CraftRecipe::GradientMatching {
            return self.train_matching_surrogates(progress);
        }
        let (mm, stagger) = (self.plan.ensemble_size, self.plan.stagger);
        let epochs = |m: usize| schedule::surrogate_epoch(m, 0, mm, stagger);
        if self.plan.grouped_surrogates {
            return self.pretrain_grouped(progress);
        }
        let owned = self.owned();
        for wave in super::parallel::waves(owned.len(), self.plan.parallel_surrogates) {
            let wave: Vec<usize> = wave.map(|i| owned[i]).collect();
            let longest = wave.iter().map(|&m| epochs(m)).max().unwrap_or(0);
            for e in 0..longest {
                let busy: Vec<usize> = wave.iter().copied().filter(|&m| e < epochs(m)).collect();
                let jobs = busy
                    .iter()
                    .map(|&m| self.clean_epoch_job(m, e, 0))
                    .collect();
                super::parallel::map(jobs, CleanEpochJob::run);
                for &m in &busy {
                    if !progress(m, e + 1, epochs(m)) {
                        return false;
                    }
                }
            }
            for m in wave {
                if epochs(m) == 0 && !progress(m, 0, 0) {
                    return false;
                }
            }
        }
        true
    }

    /// The surrogates this process trains and unrolls (all of them in a one-process job).
    fn owned(&self) -> Vec<usize> {
        (0..self.plan.ensemble_size)
            .filter(|&m| self.ranks.owns(m))
            .collect()
    }

    /// Shares the job with the other ranks of an MPI job: from now on this process trains
    /// and unrolls only its own surrogates (grouped surrogates and gradient matching are
    /// for one process; `engine::prepare` checks).
    pub fn share_with(&mut self, ranks: crate::ranks::Ranks) {
        self.ranks = ranks;
    }

    pub fn ranks(&self) -> &crate::ranks::Ranks {
        &self.ranks
    }

    /// `t` summed over the ranks (itself in a one-process job).
    fn sum_over_ranks(&self, t: Tensor) -> Tensor {
        if !self.ranks.several() {
            return t;
        }
        let (kind, device, shape) = (t.kind(), t.device(), t.size());
        let flat = t.to_device(Device::Cpu).flatten(0, -1);
        let summed = if kind == Kind::Float {
            let mut v = Vec::<f32>::try_from(&flat).unwrap_or_default();
            self.ranks.sum_f32(&mut v);
            Tensor::from_slice(&v)
        } else {
            let mut v = Vec::<f64>::try_from(flat.to_kind(Kind::Double)).unwrap_or_default();
            self.ranks.sum_f64(&mut v);
            Tensor::from_slice(&v).to_kind(kind)
        };
        summed.reshape(&shape).to_device(device)
    }

    /// Brings every rank's surrogates to rank 0, which writes checkpoints (a collective call:
    /// every rank makes it at the same step boundary). Nothing to do in a one-process job.
    pub fn gather_surrogates(&mut self) {
        if !self.ranks.several() {
            return;
        }
        let mut mine = Vec::new();
        for m in self.owned() {
            mine.extend_from_slice(&(m as u64).to_le_bytes());
            for t in self.surrogate_tensors(m) {
                let bytes = tensor_bytes(&t);
                mine.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                mine.extend_from_slice(&bytes);
            }
        }
        let all = self.ranks.gather_bytes(mine);
        for (rank, payload) in all.into_iter().enumerate().skip(1) {
            let mut at = 0;
            let read_u64 = |at: &mut usize| -> u64 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&payload[*at..*at + 8]);
                *at += 8;
                u64::from_le_bytes(b)
            };
            while at < payload.len() {
                let m = read_u64(&mut at) as usize;
                assert!(
                    self.ranks.size() > 1 && m % self.ranks.size() == rank,
                    "rank {rank} sent surrogate {m}, which is not its own"
                );
                let device = self.surrogate_device(m);
                let s = &mut self.surrogates[m];
                let slots = s
                    .weights
                    .iter_mut()
                    .chain(s.buffers.iter_mut())
                    .chain(s.velocity.iter_mut());
                for slot in slots {
                    let n = read_u64(&mut at) as usize;
                    let data = &payload[at..at + n];
                    at += n;
                    let grad = slot.requires_grad();
                    let t =
                        Tensor::from_data_size(data, &slot.size(), slot.kind()).to_device(device);
                    *slot = if grad { t.set_requires_grad(true) } else { t };
                }
            }
        }
    }

    /// A SHA-256 of the perturbation (delta and colour grid, their bytes): the ranks of an
    /// MPI job compare theirs to find out that they no longer hold the same poisons.
    pub fn perturbation_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(tensor_bytes(&self.perturbation.delta.detach()));
        h.update(tensor_bytes(&self.perturbation.offsets.detach()));
        crate::digest::hex(&h.finalize())
    }

    /// For the divergence test only: the rank named by `METAPOISON_INJECT_DIVERGENCE_AT_RANK`
    /// moves one pixel of its perturbation, as a rank that missed an update would differ.
    pub fn inject_divergence_for_tests(&mut self) {
        let named = std::env::var("METAPOISON_INJECT_DIVERGENCE_AT_RANK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        if self.ranks.several() && named == Some(self.ranks.rank()) {
            let _guard = tch::no_grad_guard();
            let mut first = self.perturbation.delta.flatten(0, -1).get(0);
            let _ = first.g_add_scalar_(0.5);
        }
    }

    /// Surrogate m's tensors in checkpoint order: weights, buffers, velocity.
    fn surrogate_tensors(&self, m: usize) -> Vec<Tensor> {
        let s = &self.surrogates[m];
        s.weights
            .iter()
            .chain(&s.buffers)
            .chain(&s.velocity)
            .map(|t| t.detach())
            .collect()
    }

    /// Gradient matching's surrogates: each trained from scratch on the clean split with
    /// `matching.surrogate_recipe` for `matching.surrogate_epochs` (the victims' protocol), one
    /// after another. They do not train further while crafting.
    fn train_matching_surrogates(
        &mut self,
        mut progress: impl FnMut(usize, usize, usize) -> bool,
    ) -> bool {
        let m = &self.config.matching;
        let mut victim = m.surrogate_recipe.apply(self.config.victim.clone());
        victim.net = self.config.surrogate.net;
        victim.epochs = m.surrogate_epochs().into();
        let spec = crate::model::train::VictimTraining::from_config(&victim);
        let epochs = spec.epochs;
        for k in self.owned() {
            let seed = derive(self.config.run.seed, Purpose::Pretrain, k as u64, 0);
            let mut go_on = true;
            let state = crate::model::train::train_from_scratch(
                &self.net,
                &spec,
                &self.train_x,
                &self.train_y,
                seed,
                self.kind,
                |epoch| {
                    go_on = progress(k, epoch, epochs);
                    go_on
                },
            );
            if !go_on {
                return false;
            }
            // Crafting differentiates through the weights but never steps them: no velocity.
            self.surrogates[k] = State::new(state.weights, state.buffers).trainable();
        }
        self.matching.targets.clear();
        true
    }

    /// The targets' adversarial gradient on each surrogate, computed once after pretraining
    /// or a restore.
    /// (With MPI ranks, of this rank's surrogates, in their order.)
    fn ensure_target_gradients(&mut self) {
        let owned = self.owned();
        if self.matching.targets.len() == owned.len() {
            return;
        }
        self.matching.targets = owned
            .iter()
            .map(|&m| {
                let s = &self.surrogates[m];
                matching::target_gradient(&self.net, s, &self.targets, &self.labels.adversarial)
            })
            .collect();
    }

    /// `matching::ensemble_loss` of `poisons` (all of them, in slot order) with their true
    /// labels on the surrogates: the loss to differentiate, each surrogate's value, and the
    /// ensemble's mean. With MPI ranks the loss to differentiate is this rank's share of the
    /// mean (its surrogates' losses over M), so that the gradients summed over the ranks are
    /// the mean's; the values are every rank's.
    fn matching_loss(&self, poisons: &Tensor) -> (Tensor, Vec<f64>, f64) {
        let idx = super::epoch::as_index(&self.plan.poison_indices, self.device);
        let labels = self.train_y.index_select(0, &idx);
        if !self.ranks.several() {
            let (loss, each) = matching::ensemble_loss(
                &self.net,
                &self.surrogates,
                &self.matching.targets,
                poisons,
                &labels,
            );
            let mean = loss.double_value(&[]);
            return (loss, each, mean);
        }
        let mm = self.plan.ensemble_size;
        let owned = self.owned();
        let losses: Vec<Tensor> = owned
            .iter()
            .zip(&self.matching.targets)
            .map(|(&m, t)| {
                matching::matching_loss(&self.net, &self.surrogates[m], poisons, &labels, t)
            })
            .collect();
        let mut each = vec![0.0; mm];
        for (&m, l) in owned.iter().zip(&losses) {
            each[m] = l.double_value(&[]);
        }
        self.ranks.sum_f64(&mut each);
        let share = Tensor::stack(&losses, 0).sum(Kind::Double) / mm as f64;
        let mean = each.iter().sum::<f64>() / mm as f64;
        (share, each, mean)
    }

    /// A fresh random perturbation (within its bounds) from the run seed's stream at (a, b).
    fn rerandomise(&mut self, a: u64, b: u64) {
        let seed = derive(self.config.run.seed, Purpose::PerturbationInit, a, b);
        self.perturbation.randomise(seed);
        self.perturbation.project(true);
    }

    /// The end of restart `restart`: its unaugmented matching loss is scored against the best
    /// restart so far; after the last one, the best restart's perturbation becomes the run's.
    fn finish_restart(&mut self, restart: usize, last: bool) {
        let loss = self.matching_loss(&self.perturbation.poisons(None)).2;
        let p = &self.perturbation;
        let kept = self.matching.offer(restart, loss, &p.delta, &p.offsets);
        let restarts = self.config.matching.restarts;
        self.events.push(Event::new(
            self.step,
            EventKind::Restart,
            format!(
                "restart {}/{restarts} ended at matching loss {loss:.4}{}",
                restart + 1,
                if kept { ", the best so far" } else { "" }
            ),
        ));
        if last {
            if let Some(best) = &self.matching.best {
                let _guard = tch::no_grad_guard();
                self.perturbation.delta.copy_(&best.delta);
                self.perturbation.offsets.copy_(&best.offsets);
                self.events.push(Event::new(
                    self.step,
                    EventKind::Restart,
                    format!(
                        "kept restart {}/{restarts}: matching loss {:.4}",
                        best.restart + 1,
                        best.loss
                    ),
                ));
            }
        }
    }

    /// `pretrain` with the surrogates grouped: at each epoch, every surrogate still short of
    /// its starting epoch trains as part of one grouped network (the same batches and steps
    /// as one at a time). Halves the group when the GPU runs out of memory.
    fn pretrain_grouped(&mut self, mut progress: impl FnMut(usize, usize, usize) -> bool) -> bool {
        let (mm, stagger) = (self.plan.ensemble_size, self.plan.stagger);
        let epochs = |m: usize| schedule::surrogate_epoch(m, 0, mm, stagger);
        let longest = (0..mm).map(epochs).max().unwrap_or(0);
        for m in 0..mm {
            if epochs(m) == 0 && !progress(m, 0, 0) {
                return false;
            }
        }
        for e in 0..longest {
            let busy: Vec<usize> = (0..mm).filter(|&m| e < epochs(m)).collect();
            let before: Vec<State> = busy
                .iter()
                .map(|&m| self.surrogates[m].deep_clone())
                .collect();
            loop {
                // One grouped network per device, the devices side by side.
                let mut jobs: Vec<Vec<CleanEpochJob>> =
                    self.replicas.iter().map(|_| Vec::new()).collect();
                for &m in &busy {
                    jobs[self.placement[m]].push(self.clean_epoch_job(m, e, 0));
                }
                jobs.retain(|j| !j.is_empty());
                let group_size = self.group_size.clamp(1, busy.len());
                match attempt_group(group_size, || {
                    super::parallel::map(jobs, |j| CleanEpochJob::run_grouped(&j, group_size))
                }) {
                    GroupAttempt::Done(_) => break,
                    GroupAttempt::OutOfMemory { smaller } => {
                        for (&m, s) in busy.iter().zip(&before) {
                            self.surrogates[m] = s.deep_clone().trainable();
                        }
                        self.group_size = smaller;
                        tracing::warn!(
                            "pretraining: the GPU ran out of memory with {group_size} surrogates in a group: now {smaller} at a time"
                        );
                    }
                }
            }
            for &m in &busy {
                if !progress(m, e + 1, epochs(m)) {
                    return false;
                }
            }
        }
        true
    }

    /// What surrogate m needs to walk its crafting epoch at `step`, as handles a worker
    /// thread can own.
    fn epoch_job(&self, m: usize, step: usize, inputs: &[StepInputs]) -> EpochJob {
        let epoch = schedule::surrogate_epoch(m, step, self.plan.ensemble_size, self.plan.stagger);
        let (train_x, train_y, targets, labels) = self.data_of(m);
        let here = &inputs[self.placement[m]];
        EpochJob {
            m,
            step,
            seed: self.config.run.seed,
            batch_size: self.batch_size(),
            settings: UnrollSettings {
                steps: self.live.unroll_steps,
                lr: self.inner_lr(epoch),
                rule: self.sgd_rule(),
                objective: self.plan.objective,
                smooth_coef: self.config.threat.smooth_coef,
            },
            meta_batch_fraction: self.plan.meta_batch_fraction,
            augment: self.config.craft.augment,
            poison_trajectory: self.config.craft.trajectory == crate::config::Trajectory::Poison,
            kind: self.kind,
            device: self.surrogate_device(m),
            net: self.net.clone(),
            state: self.surrogates[m].shallow_clone(),
            train_x: train_x.shallow_clone(),
            train_y: train_y.shallow_clone(),
            slot_of: Arc::clone(&self.slot_of),
            perturbation: here.perturbation.shallow_clone(),
            poisons_now: here.poisons_now.shallow_clone(),
            targets: targets.shallow_clone(),
            labels: labels.shallow_clone(),
        }
    }

    /// Ensemble-averaged class probabilities of the targets, and per-surrogate fooled flags.
    fn evaluate_targets(&self) -> (Vec<Vec<f64>>, Vec<f64>) {
        let _guard = tch::no_grad_guard();
        let mut sum: Option<Tensor> = None;
        let mut fooled = Tensor::zeros([self.targets.size()[0]], (Kind::Double, self.device));
        for (m, s) in self.surrogates.iter().enumerate() {
            if !self.ranks.owns(m) {
                continue;
            }
            let (_, _, targets, _) = self.data_of(m);
            let logits = self
                .net
                .forward(&s.weights, &s.buffers, targets, Mode::Eval)
                .to_device(self.device);
            let p = logits.softmax(1, Kind::Double);
            fooled += logits
                .argmax(1, false)
                .eq_tensor(&self.labels.adversarial)
                .to_kind(Kind::Double);
            sum = Some(match sum {
                None => p,
                Some(acc) => acc + p,
            });
        }
        let m = self.surrogates.len() as f64;
        let sum = self.sum_over_ranks(sum.expect("at least one surrogate"));
        let fooled = self.sum_over_ranks(fooled);
        let probs = (sum / m).to_device(Device::Cpu);
        let rows: Vec<Vec<f64>> = (0..probs.size()[0])
            .map(|i| Vec::<f64>::try_from(probs.get(i)).unwrap_or_default())
            .collect();
        let fooled: Vec<f64> =
            Vec::<f64>::try_from((fooled / m).to_device(Device::Cpu)).unwrap_or_default();
        (rows, fooled)
    }

    /// Caps the surrogates in one grouped network (normally the whole ensemble, halved when
    /// the GPU runs out of memory).
    pub fn set_group_size(&mut self, n: usize) {
        self.group_size = n.max(1);
    }

    /// Surrogate m's epoch at `step`; a surrogate whose epoch wraps to 0 starts afresh (its
    /// next generation).
    fn start_epoch(&mut self, m: usize, step: usize) -> usize {
        let (mm, stagger) = (self.plan.ensemble_size, self.plan.stagger);
        let epoch = schedule::surrogate_epoch(m, step, mm, stagger);
        if epoch == 0 && step > 0 {
            let generation = schedule::surrogate_generation(m, step, mm, stagger);
            self.surrogates[m] = self.fresh_surrogate(m, generation);
        }
        epoch
    }

    /// Runs craft step `self.step` and advances it. `cancelled` is polled between surrogates.
    pub fn craft_step(&mut self, cancelled: &(dyn Fn() -> bool + Sync)) -> Option<StepReport> {
        let started = Instant::now();
        let comm_before = self.ranks.comm_seconds();
        let step = self.step;
        let outcome = match self.plan.recipe {
            CraftRecipe::Metapoison => self.metapoison_step(step, cancelled)?,
            CraftRecipe::GradientMatching => self.matching_step(step),
        };
        let counted: Vec<f64> = outcome.losses.iter().flatten().copied().collect();
        let adv_loss =
            (!counted.is_empty()).then(|| counted.iter().sum::<f64>() / counted.len() as f64);
        let (target_probs, target_fooled) = self.evaluate_targets();
        let seconds = started.elapsed().as_secs_f64();
        self.step_seconds.push(seconds);
        let recent = &self.step_seconds[self.step_seconds.len().saturating_sub(5)..];
        let mean = recent.iter().sum::<f64>() / recent.len() as f64;
        let steps = self.config.craft.steps();
        let report = StepReport {
            step,
            steps,
            adv_loss,
            adv_loss_per_surrogate: outcome.losses,
            target_probs,
            target_fooled,
            norms: self.perturbation.norms(),
            outer_lr: outcome.lr,
            inner_lr: self.live.inner_lr,
            unroll_steps: self.live.unroll_steps,
            epochs: outcome.epochs,
            meta_batches: outcome.meta_batches,
            seconds,
            eta_seconds: mean * (steps.saturating_sub(step + 1)) as f64,
            skipped: !outcome.updated,
            restart: outcome.restart,
            comm_seconds: self
                .ranks
                .several()
                .then(|| self.ranks.comm_seconds() - comm_before),
        };
        self.step += 1;
        self.history.push(report.clone());
        Some(report)
    }

    /// Applies an outer step to the perturbation when its gradients are finite (the rates:
    /// delta's, then the colour grid's); otherwise counts a skipped step. Returns whether it
    /// was applied.
    fn update_perturbation(&mut self, step: usize, grads: [Tensor; 2], rates: [f64; 2]) -> bool {
        let finite = grads
            .iter()
            .all(|g| g.isfinite().all().int64_value(&[]) != 0);
        if finite {
            self.nonfinite_in_row = 0;
            let p = &mut self.perturbation;
            self.adam
                .step_each(&mut [&mut p.delta, &mut p.offsets], &grads, &rates);
            p.project(true);
        } else {
            self.nonfinite_in_row += 1;
            self.events.push(Event::new(
                step,
                EventKind::Nonfinite,
                format!(
                    "gradient not finite: update skipped ({} in a row)",
                    self.nonfinite_in_row
                ),
            ));
        }
        finite
    }

    /// MetaPoison's craft step: every surrogate walks its epoch, taking the meta-gradient at
    /// its poison-holding batches; the averaged meta-gradient moves the perturbation (Adam).
    /// None when cancelled (the surrogates are put back).
    fn metapoison_step(
        &mut self,
        step: usize,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Option<StepOutcome> {
        let mm = self.plan.ensemble_size;
        let restart = self.config.craft.restart_period;
        if step > 0 && restart > 0 && step % restart == 0 {
            self.rerandomise(step as u64, 0);
            self.events.push(Event::new(
                step,
                EventKind::Restart,
                "perturbation re-initialised",
            ));
        }
        let poisons_now = self.perturbation.poisons_detached();
        let inputs = self.step_inputs(&poisons_now);
        let main = self.device;
        // The meta-gradients are summed in float64: a sum of a few float32 gradients is then
        // exact in any order, so MPI ranks (each sums its own surrogates, then the ranks sum)
        // get the gradient of one process, not one that differs in the last bit, which Adam
        // would carry on into other signs wherever a pixel's gradient is near zero.
        let mut g_delta = self
            .perturbation
            .delta
            .detach()
            .zeros_like()
            .to_kind(Kind::Double);
        let mut g_offsets = (self.perturbation.offsets.detach().zeros_like()).to_kind(Kind::Double);
        let mut adv_per = Vec::with_capacity(mm);
        let mut epochs = Vec::with_capacity(mm);
        let mut meta_batches = 0;
        // Surrogates change in place during the step; a cancelled step puts them back, so the
        // job always sits at a step boundary (where checkpoints are taken).
        let snapshot: Vec<State> = self.surrogates.iter().map(State::deep_clone).collect();
        if self.plan.grouped_surrogates {
            // The surrogates of each device as one grouped network, in lockstep through their
            // epochs, the devices side by side; if a GPU runs out of memory, the step starts
            // again with half as many in a group.
            let outcome = loop {
                epochs.clear();
                let mut jobs: Vec<Vec<EpochJob>> =
                    self.replicas.iter().map(|_| Vec::new()).collect();
                let mut members: Vec<Vec<usize>> =
                    self.replicas.iter().map(|_| Vec::new()).collect();
                for m in 0..mm {
                    epochs.push(self.start_epoch(m, step));
                    jobs[self.placement[m]].push(self.epoch_job(m, step, &inputs));
                    members[self.placement[m]].push(m);
                }
                let group_size = self.group_size.clamp(1, mm);
                let grouped: Vec<GroupedEpoch> = jobs
                    .into_iter()
                    .filter(|j| !j.is_empty())
                    .map(|jobs| GroupedEpoch { jobs, group_size })
                    .collect();
                members.retain(|m| !m.is_empty());
                match attempt_group(group_size, || {
                    super::parallel::map(grouped, |g| g.run(cancelled))
                }) {
                    GroupAttempt::Done(outcome) => break (outcome, members),
                    GroupAttempt::OutOfMemory { smaller } => {
                        self.surrogates = snapshot
                            .iter()
                            .map(|s| s.deep_clone().trainable())
                            .collect();
                        self.group_size = smaller;
                        self.events.push(Event::new(
                            step,
                            EventKind::Memory,
                            format!(
                                "the GPU ran out of memory with {group_size} surrogates in a group: now {smaller} at a time"
                            ),
                        ));
                    }
                }
            };
            let (per_device, members) = outcome;
            let mut per_surrogate: Vec<Option<(Tensor, usize)>> = (0..mm).map(|_| None).collect();
            for (result, members) in per_device.into_iter().zip(members) {
                let Some((gd, go, adv)) = result else {
                    self.surrogates = snapshot.into_iter().map(State::trainable).collect();
                    return None;
                };
                g_delta += gd.to_device(main);
                g_offsets += go.to_device(main);
                for (m, a) in members.into_iter().zip(adv) {
                    per_surrogate[m] = Some(a);
                }
            }
            for (a, n) in per_surrogate.into_iter().flatten() {
                meta_batches += n;
                adv_per.push((a, n));
            }
        }
        let owned = if self.plan.grouped_surrogates {
            Vec::new()
        } else {
            self.owned()
        };
        // Each rank's own surrogates' losses and meta batch counts, by surrogate (summed over
        // the ranks below, where the others' are zeros).
        let mut loss_by_m = vec![0.0; mm];
        let mut batches_by_m = vec![0.0; mm];
        for wave in super::parallel::waves(owned.len(), self.plan.parallel_surrogates) {
            if cancelled() {
                self.surrogates = snapshot.into_iter().map(State::trainable).collect();
                return None;
            }
            let members: Vec<usize> = wave.map(|i| owned[i]).collect();
            let mut jobs = Vec::with_capacity(members.len());
            for &m in &members {
                epochs.push(self.start_epoch(m, step));
                jobs.push(self.epoch_job(m, step, &inputs));
            }
            // Summed in surrogate order whatever thread finished first.
            for (&m, (gd, go, adv, n)) in members
                .iter()
                .zip(super::parallel::map(jobs, EpochJob::run))
            {
                g_delta += gd.to_device(main);
                g_offsets += go.to_device(main);
                if self.ranks.several() {
                    loss_by_m[m] = adv.double_value(&[]);
                    batches_by_m[m] = n as f64;
                } else {
                    adv_per.push((adv, n));
                }
                meta_batches += n;
            }
        }
        if self.ranks.several() {
            g_delta = self.sum_over_ranks(g_delta);
            g_offsets = self.sum_over_ranks(g_offsets);
            let mut numbers = [loss_by_m, batches_by_m].concat();
            self.ranks.sum_f64(&mut numbers);
            let (losses, batches) = numbers.split_at(mm);
            adv_per = losses
                .iter()
                .zip(batches)
                .map(|(&a, &n)| (Tensor::from(a), n as usize))
                .collect();
            meta_batches = batches.iter().map(|&n| n as usize).sum();
            let stagger = self.plan.stagger;
            epochs = (0..mm)
                .map(|m| schedule::surrogate_epoch(m, step, mm, stagger))
                .collect();
        }
        let g_delta = (g_delta / mm as f64).to_kind(self.perturbation.delta.kind());
        let g_offsets = (g_offsets / mm as f64).to_kind(self.perturbation.offsets.kind());
        let lr = self.outer_lr(step);
        let updated = self.update_perturbation(step, [g_delta, g_offsets], [lr, lr]);
        Some(StepOutcome {
            losses: adv_per
                .iter()
                .map(|(a, n)| (*n > 0).then(|| a.double_value(&[]) / *n as f64))
                .collect(),
            lr,
            epochs,
            meta_batches,
            updated,
            restart: None,
        })
    }

    /// Gradient matching's craft step (matching.rs): a fresh random perturbation at the start
    /// of each restart, one signed-Adam step on the averaged matching loss, and at the end of
    /// each restart its unaugmented loss scored against the best restart so far; after the
    /// last step the best restart's poisons are the run's.
    fn matching_step(&mut self, step: usize) -> StepOutcome {
        let schedule = Restarts {
            restarts: self.config.matching.restarts,
            steps: self.config.craft.steps(),
        };
        let (restart, i) = schedule.locate(step);
        if i == 0 && restart > 0 {
            self.rerandomise(restart as u64, 1);
            self.adam = Adam::new(&[&self.perturbation.delta, &self.perturbation.offsets]);
        }
        self.ensure_target_gradients();
        let augment = self.config.matching.augment.then(|| {
            SplitMix64::new(derive(
                self.config.run.seed,
                Purpose::Augment,
                0,
                step as u64,
            ))
        });
        let poisons = self.perturbation.poisons(None);
        let poisons = match augment {
            Some(mut rng) => crate::model::augment::crop_flip(&poisons, &mut rng),
            None => poisons,
        };
        let (loss, losses, _) = self.matching_loss(&poisons);
        let recolor = self.config.matching.recolor;
        // The smoothness penalty counts once: with MPI ranks rank 0's gradient carries it.
        let objective = if recolor && self.ranks.is_root() {
            let p = &self.perturbation;
            loss + p.recolor.smoothness(&p.offsets) * self.config.threat.smooth_coef
        } else {
            loss
        };
        let p = &self.perturbation;
        let mut grads = Tensor::run_backward(&[&objective], &[&p.delta, &p.offsets], false, false);
        // Summed over the ranks before the sign (one process: as it is).
        let g_offsets = if recolor {
            self.sum_over_ranks(grads.pop().expect("two gradients"))
                .sign()
        } else {
            let _ = grads.pop();
            p.offsets.detach().zeros_like()
        };
        let g_delta = self
            .sum_over_ranks(grads.pop().expect("two gradients"))
            .sign();
        // The step as a fraction of each bound: pixels for delta, colour units for the grid.
        let fraction = self.live.outer_lr * schedule.factor(i);
        let lr = fraction * self.perturbation.eps;
        let rates = [lr, fraction * self.perturbation.color_eps];
        let updated = self.update_perturbation(step, [g_delta, g_offsets], rates);
        if i + 1 == schedule.per_restart() {
            self.finish_restart(restart, step + 1 == schedule.steps);
        }
        StepOutcome {
            losses: losses.into_iter().map(Some).collect(),
            lr,
            epochs: Vec::new(),
            meta_batches: 0,
            updated,
            restart: Some((restart + 1, schedule.restarts)),
        }
    }

    pub fn finished(&self) -> bool {
        self.step >= self.config.craft.steps()
    }
}

/// A tensor's values as bytes (on the CPU, contiguous, its own dtype).
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}
