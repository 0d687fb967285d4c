//! The speed harness: one craft step (M surrogates, each one unrolled meta batch of K steps
//! plus its clean trajectory step, then the Adam update of the perturbation), timed after
//! warm-up, side by side with a PyTorch-eager reference of the same maths on the same inputs
//! (`reference.py`, run as a child process and alternated with our repetitions).
//!
//! Before timing, both sides compute the meta-gradient of the same float64 inputs and the
//! harness refuses to report a ratio unless they agree.

use crate::base::rng::SplitMix64;
use crate::base::tensor_file::save_tensors;
use crate::config::NetKind;
use crate::config::ObjectiveKind;
use crate::craft::adam::Adam;
use crate::craft::objective::TargetLabels;
use crate::craft::perturbation::Perturbation;
use crate::craft::recolor::Recolor;
use crate::craft::unroll::{
    meta_gradient, meta_gradient_grouped, GroupedSurrogates, Surrogate, Targets, UnrollBatches,
    UnrollSettings,
};
use crate::model::sgd::{sgd_step, sgd_step_grouped, SgdRule};
use crate::model::{InputNorm, Network, OwnOps, State};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use super::reference::Reference;

/// The shape of one benchmarked craft step.
#[derive(Debug, Clone, Serialize)]
pub struct StepSpec {
    pub net: NetKind,
    /// Image channels (1: Fashion-MNIST-shaped 28 px; 3: CIFAR-shaped 32 px).
    pub channels: usize,
    pub side: i64,
    pub classes: usize,
    /// Batch size of every unrolled and trajectory batch.
    pub batch: i64,
    /// Poisons in the first unrolled batch (the perturbation's entries that get a gradient).
    pub poisons_in_batch: i64,
    /// Size of the whole perturbation (what Adam updates and projects).
    pub npoison: i64,
    pub targets: i64,
    pub unroll_steps: usize,
    pub ensemble: usize,
    pub inner_lr: f64,
    pub outer_lr: f64,
    pub grid: usize,
    pub eps: f64,
    pub color_eps: f64,
    pub double: bool,
    pub seed: u64,
    /// Surrogates run at once on their own threads (the crafter's `craft.parallel_surrogates`);
    /// the reference always runs them one after another, as a plain PyTorch loop does.
    pub workers: usize,
    /// Our convolutions on channels-last tensors (`run.channels_last`).
    pub channels_last: bool,
    /// The reference's too (`model.to(memory_format=torch.channels_last)`, as a PyTorch user
    /// would write it); by default it runs in PyTorch's default NCHW layout.
    pub reference_channels_last: bool,
    /// Our M surrogates batched into one grouped network (`craft.grouped_surrogates`); the
    /// reference runs them one after another.
    pub grouped: bool,
    /// With `grouped`: surrogates in one grouped network (0 = all M), the groups one after
    /// another (what the crafter does when a GPU's memory holds fewer than M).
    #[serde(default)]
    pub group_size: usize,
    /// Our batch norm (and the ReLU after it) through libtorch's kernels instead of the fused
    /// op (`run.fused_batch_norm = false`).
    #[serde(default)]
    pub native_batch_norm: bool,
    /// The fused batch norm as ATen operations on the CPU too (what it runs on CUDA).
    #[serde(default)]
    pub batch_norm_aten_ops: bool,
    /// Our convolutions' second derivative through libtorch's double backward instead of the
    /// direct one (`run.direct_conv_double_backward = false`).
    #[serde(default)]
    pub libtorch_conv_double_backward: bool,
    /// The fused batch norm and direct convolution double backward on CUDA too
    /// (`run.fused_batch_norm = true`, `run.direct_conv_double_backward = true`; their `auto`
    /// is off on CUDA).
    #[serde(default)]
    pub own_ops_on_cuda: bool,
    /// Our max pooling through libtorch's CPU kernel instead of the crate's.
    #[serde(default)]
    pub libtorch_max_pool: bool,
}

impl StepSpec {
    /// The default config's step shape: embedded Fashion-MNIST, ConvNetBN, batch 125,
    /// 200 poisons (5 in a batch on average), K = 2, the CPU ensemble of 4.
    pub fn default_config() -> StepSpec {
        StepSpec {
            net: NetKind::ConvnetBn,
            channels: 1,
            side: 28,
            classes: 10,
            batch: 125,
            poisons_in_batch: 5,
            npoison: 200,
            targets: 1,
            unroll_steps: 2,
            ensemble: 4,
            inner_lr: 0.1,
            outer_lr: 200.0,
            grid: 10,
            eps: 8.0,
            color_eps: 0.04,
            double: false,
            seed: 0,
            workers: 1,
            channels_last: false,
            reference_channels_last: false,
            grouped: false,
            group_size: 0,
            native_batch_norm: false,
            batch_norm_aten_ops: false,
            libtorch_conv_double_backward: false,
            own_ops_on_cuda: false,
            libtorch_max_pool: false,
        }
    }

    /// The seed's setting: CIFAR-shaped inputs, ResNet-18, 10% poisons (12 or 13 in a batch of
    /// 125, 5,000 in all).
    pub fn cifar_resnet18() -> StepSpec {
        StepSpec {
            net: NetKind::Resnet18,
            channels: 3,
            side: 32,
            poisons_in_batch: 12,
            npoison: 5000,
            ..StepSpec::default_config()
        }
    }

    fn kind(&self) -> Kind {
        if self.double {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    pub fn network(&self) -> Network {
        let name = if self.channels == 1 {
            "fashion-mnist"
        } else {
            "cifar10"
        };
        Network::new(
            self.net,
            self.channels,
            self.classes,
            1,
            InputNorm::for_dataset(name, self.channels),
        )
        .with_channels_last(self.channels_last)
        .with_ops(OwnOps {
            fused_batch_norm: !self.native_batch_norm,
            batch_norm_as_aten_ops: self.batch_norm_aten_ops,
            direct_conv_double_backward: !self.libtorch_conv_double_backward,
            max_pool: !self.libtorch_max_pool,
            cuda: self.own_ops_on_cuda,
        })
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch < 2 {
            anyhow::bail!("--batch {} must be at least 2", self.batch);
        }
        if self.poisons_in_batch < 1 || self.poisons_in_batch > self.batch {
            anyhow::bail!(
                "--poisons-in-batch {} must be in 1..=batch ({})",
                self.poisons_in_batch,
                self.batch
            );
        }
        if self.npoison < self.poisons_in_batch {
            anyhow::bail!(
                "--npoison {} must be at least --poisons-in-batch {}",
                self.npoison,
                self.poisons_in_batch
            );
        }
        if !(1..=16).contains(&self.unroll_steps) {
            anyhow::bail!("--unroll {} must be in 1..=16", self.unroll_steps);
        }
        if self.ensemble == 0 || self.targets == 0 {
            anyhow::bail!("--ensemble and --targets must be at least 1");
        }
        if self.workers == 0 {
            anyhow::bail!("--workers must be at least 1");
        }
        Ok(())
    }
}

/// Everything one benchmarked step reads, on its device.
pub struct StepInputs {
    pub spec: StepSpec,
    pub net: Network,
    pub surrogates: Vec<State>,
    /// With `spec.grouped`: the surrogates stacked into grouped states, one per group of
    /// `spec.group_size`, which the timed steps train (the crafter stacks once per epoch, so
    /// the copy is not timed). Empty when not grouped.
    pub stacked: Vec<(std::ops::Range<usize>, State)>,
    /// Per surrogate: K + 1 batches (images 0-255, labels).
    pub batches: Vec<Vec<(Tensor, Tensor)>>,
    /// Per surrogate: which perturbation slots sit in its first batch (at positions 0..P).
    pub slots: Vec<Tensor>,
    pub positions: Tensor,
    pub perturbation: Perturbation,
    pub adam: Adam,
    pub targets: Tensor,
    pub labels: TargetLabels,
}

/// What one surrogate needs for its part of a benchmarked step, movable to a worker thread.
struct SurrogateJob {
    net: Network,
    state: State,
    perturbation: Perturbation,
    batches: UnrollBatches,
    targets: Tensor,
    labels: TargetLabels,
    settings: UnrollSettings,
    clean: (Tensor, Tensor),
}

impl SurrogateJob {
    /// The meta-gradient (d/d delta, d/d offsets), then the clean SGD step.
    fn run(self) -> (Tensor, Tensor) {
        let (_, gd, go) = meta_gradient(
            Surrogate::of(&self.net, &self.state),
            &self.perturbation,
            &self.batches,
            Targets {
                images: &self.targets,
                labels: &self.labels,
            },
            self.settings,
        );
        let (x, y) = &self.clean;
        let _ = sgd_step(
            &self.net,
            &self.state,
            x,
            y,
            self.settings.lr,
            &self.settings.rule,
        );
        (gd, go)
    }
}

impl StepInputs {
    /// Deterministic random inputs of the spec's shape (images uniform on 0-255, labels
    /// uniform, the perturbation at the authors' random start, freshly initialised nets).
    pub fn new(spec: &StepSpec, device: Device) -> StepInputs {
        let kind = spec.kind();
        let opts = (kind, device);
        let mut rng = SplitMix64::new(spec.seed ^ 0xbe7c);
        let net = spec.network();
        let (c, s, b) = (spec.channels as i64, spec.side, spec.batch);
        let labels = |rng: &mut SplitMix64, n: i64| {
            let v: Vec<i64> = (0..n).map(|_| rng.below(spec.classes) as i64).collect();
            Tensor::from_slice(&v).to_device(device)
        };
        let surrogates: Vec<State> = (0..spec.ensemble)
            .map(|m| net.init(device, kind, spec.seed + 1 + m as u64).trainable())
            .collect();
        let stacked = if spec.grouped {
            let size = if spec.group_size == 0 {
                spec.ensemble
            } else {
                spec.group_size
            };
            crate::craft::parallel::waves(spec.ensemble, size)
                .map(|range| {
                    let members: Vec<&State> = surrogates[range.clone()].iter().collect();
                    (range, State::stack(&members).trainable())
                })
                .collect()
        } else {
            Vec::new()
        };
        let batches = (0..spec.ensemble)
            .map(|_| {
                (0..=spec.unroll_steps)
                    .map(|_| {
                        let x = rng.uniform_tensor(&[b, c, s, s], 0.0, 255.0, opts);
                        (x, labels(&mut rng, b))
                    })
                    .collect()
            })
            .collect();
        let p = spec.poisons_in_batch;
        let slots = (0..spec.ensemble as i64)
            .map(|m| {
                let v: Vec<i64> = (0..p).map(|i| (m * p + i) % spec.npoison).collect();
                Tensor::from_slice(&v).to_device(device)
            })
            .collect();
        let base = rng.uniform_tensor(&[spec.npoison, c, s, s], 0.0, 255.0, opts);
        let mut perturbation = Perturbation::zeros(
            base,
            Recolor::new(spec.channels, spec.grid),
            spec.eps,
            spec.color_eps,
        );
        perturbation.randomise(spec.seed ^ 0xde17a);
        let adam = Adam::new(&[&perturbation.delta, &perturbation.offsets]);
        let targets = rng.uniform_tensor(&[spec.targets, c, s, s], 0.0, 255.0, opts);
        let t = spec.targets;
        StepInputs {
            spec: spec.clone(),
            net,
            surrogates,
            stacked,
            batches,
            slots,
            positions: Tensor::arange(p, (Kind::Int64, device)),
            perturbation,
            adam,
            targets,
            labels: TargetLabels {
                truth: Tensor::zeros([t], (Kind::Int64, device)),
                adversarial: Tensor::ones([t], (Kind::Int64, device)),
                poison_class: 1,
            },
        }
    }

    fn settings(&self) -> UnrollSettings {
        UnrollSettings {
            steps: self.spec.unroll_steps,
            lr: self.spec.inner_lr,
            rule: SgdRule::default(),
            objective: ObjectiveKind::Cw,
            smooth_coef: 1.0,
        }
    }

    fn unroll_batches(&self, m: usize) -> UnrollBatches {
        UnrollBatches {
            batches: self.batches[m]
                .iter()
                .map(|(x, y)| (x.shallow_clone(), y.shallow_clone()))
                .collect(),
            positions: self.positions.shallow_clone(),
            slots: self.slots[m].shallow_clone(),
            augment: None,
        }
    }

    /// Surrogate m's meta-gradient: (adversarial loss, d/d delta, d/d offsets).
    pub fn meta_gradient(&self, m: usize) -> (Tensor, Tensor, Tensor) {
        meta_gradient(
            Surrogate::of(&self.net, &self.surrogates[m]),
            &self.perturbation,
            &self.unroll_batches(m),
            Targets {
                images: &self.targets,
                labels: &self.labels,
            },
            self.settings(),
        )
    }

    /// The meta-gradients of all surrogates summed: (summed adversarial loss, d/d delta,
    /// d/d offsets); grouped when the spec says so (what the agreement check compares).
    pub fn meta_gradient_sum(&self) -> (Tensor, Tensor, Tensor) {
        let parts: Vec<(Tensor, Tensor, Tensor)> = if self.stacked.is_empty() {
            (0..self.spec.ensemble)
                .map(|m| self.meta_gradient(m))
                .collect()
        } else {
            self.stacked
                .iter()
                .map(|(range, stacked)| self.group_meta_gradient(range.clone(), stacked))
                .collect()
        };
        let mut parts = parts.into_iter();
        let (mut loss, mut gd, mut go) = parts.next().expect("at least one surrogate");
        for (l, d, o) in parts {
            loss += l;
            gd += d;
            go += o;
        }
        (loss, gd, go)
    }

    /// One group's summed meta-gradient, as one grouped unroll.
    fn group_meta_gradient(
        &self,
        range: std::ops::Range<usize>,
        stacked: &State,
    ) -> (Tensor, Tensor, Tensor) {
        let inputs: Vec<UnrollBatches> = range.clone().map(|m| self.unroll_batches(m)).collect();
        let lrs = vec![self.spec.inner_lr; range.len()];
        let (adv, gd, go) = meta_gradient_grouped(
            GroupedSurrogates {
                net: &self.net,
                weights: &stacked.weights,
                buffers: &stacked.buffers,
                velocity: &stacked.velocity,
                lrs: &lrs,
            },
            &self.perturbation,
            &inputs.iter().collect::<Vec<_>>(),
            Targets {
                images: &self.targets,
                labels: &self.labels,
            },
            self.settings(),
        );
        (adv.sum(adv.kind()), gd, go)
    }

    /// The grouped step: per group, the surrogates' meta-gradients in one grouped unroll, then
    /// one grouped clean SGD step. Returns the summed gradients.
    fn grouped_step(&self) -> (Tensor, Tensor) {
        let mut g_delta = self.perturbation.delta.detach().zeros_like();
        let mut g_offsets = self.perturbation.offsets.detach().zeros_like();
        for (range, stacked) in &self.stacked {
            let (_, gd, go) = self.group_meta_gradient(range.clone(), stacked);
            g_delta += gd;
            g_offsets += go;
            let batches = &self.batches[range.clone()];
            let xs = Tensor::stack(&batches.iter().map(|b| &b[0].0).collect::<Vec<_>>(), 0);
            let ys = Tensor::stack(&batches.iter().map(|b| &b[0].1).collect::<Vec<_>>(), 0);
            let lrs = vec![self.spec.inner_lr; range.len()];
            let _ = sgd_step_grouped(&self.net, stacked, &xs, &ys, &lrs, &SgdRule::default());
        }
        (g_delta, g_offsets)
    }

    /// One whole benchmarked step (no host sync inside): per surrogate the meta-gradient and
    /// one clean SGD step on its first batch (`spec.workers` surrogates at a time, as the
    /// crafter runs them); then the averaged meta-gradient drives one Adam step on delta and
    /// the grid, and the projection.
    pub fn step(&mut self) {
        let mut g_delta = self.perturbation.delta.detach().zeros_like();
        let mut g_offsets = self.perturbation.offsets.detach().zeros_like();
        let waves = if !self.stacked.is_empty() {
            (g_delta, g_offsets) = self.grouped_step();
            crate::craft::parallel::waves(0, 1)
        } else {
            crate::craft::parallel::waves(self.spec.ensemble, self.spec.workers)
        };
        for wave in waves {
            let jobs: Vec<SurrogateJob> = wave.map(|m| self.job(m)).collect();
            for (gd, go) in crate::craft::parallel::map(jobs, SurrogateJob::run) {
                g_delta += gd;
                g_offsets += go;
            }
        }
        let mm = self.spec.ensemble as f64;
        let p = &mut self.perturbation;
        self.adam.step(
            &mut [&mut p.delta, &mut p.offsets],
            &[g_delta / mm, g_offsets / mm],
            self.spec.outer_lr,
        );
        p.project(true);
    }

    /// Surrogate m's share of a step, with its own handles on the shared tensors.
    fn job(&self, m: usize) -> SurrogateJob {
        let (x, y) = &self.batches[m][0];
        SurrogateJob {
            net: self.net.clone(),
            state: self.surrogates[m].shallow_clone(),
            perturbation: self.perturbation.shallow_clone(),
            batches: self.unroll_batches(m),
            targets: self.targets.shallow_clone(),
            labels: self.labels.shallow_clone(),
            settings: self.settings(),
            clean: (x.shallow_clone(), y.shallow_clone()),
        }
    }

    /// Writes the inputs (and the spec as metadata) for the reference, plus `extra` tensors.
    pub fn save(&self, path: &Path, extra: &[(String, &Tensor)]) -> Result<()> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (m, s) in self.surrogates.iter().enumerate() {
            for (i, w) in s.weights.iter().enumerate() {
                named.push((format!("w.{m}.{i}"), w));
            }
            for (i, b) in s.buffers.iter().enumerate() {
                named.push((format!("b.{m}.{i}"), b));
            }
            for (j, (x, y)) in self.batches[m].iter().enumerate() {
                named.push((format!("x.{m}.{j}"), x));
                named.push((format!("y.{m}.{j}"), y));
            }
            named.push((format!("slots.{m}"), &self.slots[m]));
        }
        let p = &self.perturbation;
        named.push(("base".into(), &p.base));
        named.push(("delta".into(), &p.delta));
        named.push(("offsets".into(), &p.offsets));
        named.push(("targets".into(), &self.targets));
        named.push(("target_truth".into(), &self.labels.truth));
        named.push(("target_adv".into(), &self.labels.adversarial));
        named.extend(extra.iter().map(|(n, t)| (n.clone(), *t)));
        let norm = &self.net.norm;
        let meta = serde_json::json!({
            "spec": self.spec,
            "net": self.spec.net.name(),
            "norm_mean": norm.mean,
            "norm_std": norm.std,
            "norm_side": norm.side,
        });
        let metadata = HashMap::from([("bench".to_string(), meta.to_string())]);
        save_tensors(path, &named, Some(metadata))
            .with_context(|| format!("cannot write the bench inputs {}", path.display()))
    }
}

/// Waits for queued device work, so wall time measures it.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median and spread of a sample of seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub reps: usize,
}

impl Timing {
    pub fn of(mut samples: Vec<f64>) -> Timing {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Timing {
            median_s: median,
            min_s: samples.first().copied().unwrap_or(f64::NAN),
            max_s: samples.last().copied().unwrap_or(f64::NAN),
            reps: n,
        }
    }
}

/// Float64 agreement of our meta-gradient with the reference's on the same tiny inputs.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub max_rel_error_delta: f64,
    pub max_rel_error_grid: f64,
    pub loss_ours: f64,
    pub loss_reference: f64,
}

/// The tiny float64 spec the agreement check runs (same network kind and channels as the
/// timed spec, so the reference's architecture code is what gets checked).
pub fn agreement_spec(spec: &StepSpec) -> StepSpec {
    StepSpec {
        batch: 8,
        poisons_in_batch: 3,
        npoison: 5,
        targets: 2,
        // Two surrogates when grouped, so that the grouping itself is checked.
        ensemble: if spec.grouped { 2 } else { 1 },
        grid: 4,
        double: true,
        ..spec.clone()
    }
}

/// Computes the surrogates' summed meta-gradient here and in the reference, and compares them.
pub fn check_agreement(
    spec: &StepSpec,
    device: Device,
    reference: &mut Reference,
    dir: &Path,
) -> Result<Agreement> {
    let mut tiny = agreement_spec(spec);
    tiny.seed = spec.seed + 17;
    let mut inputs = StepInputs::new(&tiny, device);
    {
        // Move the grid off zero so the colour part of the gradient is exercised too.
        let _g = tch::no_grad_guard();
        let o = SplitMix64::new(3).uniform_tensor(
            &inputs.perturbation.offsets.size(),
            -0.02,
            0.02,
            (Kind::Double, device),
        );
        inputs.perturbation.offsets.copy_(&o);
    }
    let (loss, gd, go) = inputs.meta_gradient_sum();
    let path = dir.join("agreement.safetensors");
    inputs.save(
        &path,
        &[
            ("expected_loss".into(), &loss),
            ("expected_g_delta".into(), &gd),
            ("expected_g_offsets".into(), &go),
        ],
    )?;
    reference.check(&path)
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Times `reps` steps after `warmup` untimed ones, alternating with the reference when one is
/// given (ours, reference, ours, ...). Returns (ours, reference).
pub fn time_side_by_side(
    inputs: &mut StepInputs,
    device: Device,
    mut reference: Option<&mut Reference>,
    warmup: usize,
    reps: usize,
) -> Result<(Timing, Option<Timing>)> {
    // On CPU each side's idle OpenMP threads spin for a while after its step; a pause before
    // each timed side keeps that tail out of the other side's time.
    let pause = !device.is_cuda() && reference.is_some();
    let settle = || {
        if pause {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    };
    for _ in 0..warmup {
        inputs.step();
        synchronize(device);
        if let Some(r) = reference.as_deref_mut() {
            r.step()?;
        }
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        settle();
        synchronize(device);
        let t = Instant::now();
        inputs.step();
        synchronize(device);
        ours.push(t.elapsed().as_secs_f64());
        settle();
        if let Some(r) = reference.as_deref_mut() {
            theirs.push(r.step()?);
        }
    }
    Ok((Timing::of(ours), reference.map(|_| Timing::of(theirs))))
}
