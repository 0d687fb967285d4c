//! `eval`: victims trained from scratch on an export's poisoned training split, beside control
//! victims trained on the clean split (and, on request, on the same images moved by random
//! +-eps noise instead of the crafted perturbation), with the target's prediction and the clean
//! accuracy of each. The attack's effect is the difference between the arms.

use super::cache::VictimCache;
use super::{probabilities, train_from_scratch, VictimTraining};
use crate::export::npz::{read_npz, NpyArray};
use crate::export::Manifest;
use crate::failure::{attempt_group, GroupAttempt};
use crate::model::{sgd, InputNorm, Network, State};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One victim's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    /// "poisoned", "control" or "noise".
    pub arm: String,
    pub seed: u64,
    /// Predicted class of each target.
    pub predicted: Vec<i64>,
    /// Class probabilities of each target.
    pub target_probs: Vec<Vec<f64>>,
    /// Whether each target went to its adversarial class.
    pub success: Vec<bool>,
    pub clean_accuracy: f64,
    /// Per target, the fraction of `TRAIN_MODE_BATCHES` train-mode forward passes (batch
    /// statistics, beside a batch of training images) that put it in its adversarial class:
    /// how the authors count success. Empty in evaluations recorded before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_mode: Vec<f64>,
    pub seconds: f64,
    /// Read back from a victim cache (trained by an earlier evaluation with the same training
    /// split, protocol and seed) instead of trained now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// The mean adversarial margin (logits, as `adv_margin`) over the other test images of
    /// the first target's class: whether the poisons moved the whole class or the target.
    /// Absent in evaluations recorded before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_margin: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArmSummary {
    pub trials: usize,
    /// Successes over (trials x targets).
    pub successes: usize,
    pub success_rate: f64,
    /// 95% Wilson score interval of the success rate.
    pub success_ci95: (f64, f64),
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    /// Successes the authors' way (`Trial::train_mode` above one half), over (trials x
    /// targets).
    #[serde(default)]
    pub train_mode_successes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub export: String,
    pub victim_net: String,
    pub surrogate_net: String,
    /// "gray-box" when the victim has the surrogates' architecture, else "black-box".
    pub setting: String,
    pub epochs: usize,
    /// The victim protocol used (architecture, schedule, batch, weight decay, augmentation).
    #[serde(default)]
    pub protocol: Option<crate::config::VictimConfig>,
    /// Poisons left in the victims' training split (the export's, or the first n of them).
    #[serde(default)]
    pub poisons_used: usize,
    /// The adversarial class of each target.
    #[serde(default)]
    pub adversarial: Vec<i64>,
    pub poisoned: ArmSummary,
    pub control: ArmSummary,
    /// Victims trained with random +-eps noise in place of the crafted perturbations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<ArmSummary>,
    pub trials: Vec<Trial>,
    /// Wall-clock time of the evaluation (victims read back from a cache cost almost none).
    #[serde(default)]
    pub seconds: f64,
}

impl EvalReport {
    /// Per seed, the adversarial margin (`adv_margin`, first target) of the victim of `arm`
    /// minus that of the control victim trained with the same seed (the same initial weights
    /// and batch order), in the order of `arm`'s victims: what the arm's training split did
    /// to the target, free of the victims' own spread. Victims without a control twin are
    /// left out.
    pub fn seeded_margin_shifts(&self, arm: &str) -> Vec<(u64, f64)> {
        let Some(&adv) = self.adversarial.first() else {
            return Vec::new();
        };
        self.seeded_shifts(arm, |t| adv_margin(t.target_probs.first()?, adv))
    }

    /// The same for the target's class (`Trial::class_margin`): how far the poisons moved the
    /// other test images of the target's class. Beside `seeded_margin_shifts` it tells a
    /// targeted effect from a shifted class boundary.
    pub fn seeded_class_shifts(&self, arm: &str) -> Vec<(u64, f64)> {
        self.seeded_shifts(arm, |t| t.class_margin)
    }

    /// The mean of `seeded_margin_shifts` (`None` when no victim of `arm` has a control twin).
    pub fn margin_shift(&self, arm: &str) -> Option<f64> {
        mean_shift(&self.seeded_margin_shifts(arm))
    }

    /// The mean of `seeded_class_shifts`.
    pub fn class_shift(&self, arm: &str) -> Option<f64> {
        mean_shift(&self.seeded_class_shifts(arm))
    }

    /// Per seed, `margin` of the victim of `arm` minus that of its control twin.
    fn seeded_shifts(&self, arm: &str, margin: impl Fn(&Trial) -> Option<f64>) -> Vec<(u64, f64)> {
        let mut controls: Vec<(u64, f64)> = self
            .trials
            .iter()
            .filter(|t| t.arm == "control")
            .filter_map(|t| Some((t.seed, margin(t)?)))
            .collect();
        let mut out = Vec::new();
        for t in self.trials.iter().filter(|t| t.arm == arm) {
            let twin = controls.iter().position(|c| c.0 == t.seed);
            let (Some(m), Some(i)) = (margin(t), twin) else {
                continue;
            };
            out.push((t.seed, m - controls.remove(i).1));
        }
        out
    }

    /// The victims' recipe by name (`VictimConfig::recipe_name`); "crafter" for reports
    /// recorded before the protocol was.
    pub fn recipe(&self) -> &'static str {
        self.protocol
            .as_ref()
            .map_or("crafter", |p| p.recipe_name())
    }
}

/// What `evaluate` should do.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub victim: crate::config::VictimConfig,
    pub trials: usize,
    pub control: bool,
    /// Also train victims on the poison images moved by random +-eps noise (see
    /// `EvalData::with_noise_poisons`): does a perturbation of this size alone move the target?
    pub noise_control: bool,
    pub save_weights: bool,
    /// Keep only the first n poisons.
    pub first_poisons: Option<usize>,
    /// Folder of trained victims to reuse and add to (see `victim::cache`).
    pub victim_cache: Option<std::path::PathBuf>,
    /// Train the victims as one grouped network (the same victims, one kernel a layer for all
    /// of them); None = on CUDA, where that is faster, not on a CPU, where it is not.
    pub grouped: Option<bool>,
}

/// Which training split a victim learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// The export's poisoned split.
    Poisoned,
    /// The clean split.
    Control,
    /// The clean split with random +-eps noise on the poisons' images.
    Noise,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Poisoned => "poisoned",
            Arm::Control => "control",
            Arm::Noise => "noise",
        }
    }
}

/// Reported after each victim.
pub struct EvalProgress<'a> {
    pub done: usize,
    pub total: usize,
    pub trial: &'a Trial,
    pub eta_seconds: f64,
}

/// Why victims could not be trained on an export, or their result not written.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("trials, epochs and batch size must be at least 1")]
    Empty,
    #[error("victim lr {0} must be positive")]
    Lr(f64),
    // (Not a `source`: the message already says it, mid-sentence.)
    #[error("cannot read {path}: {error} (is {dir} an export folder?)")]
    NotExport {
        path: std::path::PathBuf,
        dir: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("{0} is missing: export with the npz format (the default) to evaluate")]
    MissingFile(std::path::PathBuf),
    #[error(transparent)]
    Npz(#[from] crate::export::npz::NpyError),
    #[error("{file} lacks `{key}`")]
    MissingArray { file: String, key: String },
    #[error("expected u8 images [N, H, W, C], found {descr} {shape:?}")]
    NotImages { descr: String, shape: Vec<usize> },
    #[error("{0} are not int64")]
    NotInt64(&'static str),
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error(transparent)]
    TensorFile(#[from] crate::base::tensor_file::TensorFileError),
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("evaluation cancelled")]
    Cancelled,
    /// A libtorch error raised while training a victim.
    #[error("{0}")]
    Libtorch(String),
}

/// Trains `plan.trials` poisoned victims (and as many paired control victims) on the export in
/// `dir`, writes `dir/eval.json` (atomically) and returns the report. `progress` is called after
/// each victim; returning false stops early (nothing is written then).
pub fn evaluate(
    dir: &Path,
    plan: &EvalPlan,
    device: Device,
    mut progress: impl FnMut(&EvalProgress) -> bool,
) -> Result<EvalReport, EvalError> {
    if plan.trials == 0 || plan.victim.epochs() == 0 || plan.victim.batch_size == 0 {
        return Err(EvalError::Empty);
    }
    if !(plan.victim.lr > 0.0 && plan.victim.lr.is_finite()) {
        return Err(EvalError::Lr(plan.victim.lr));
    }
    let mut data = load_export(dir, device)?;
    if let Some(n) = plan.first_poisons {
        data.keep_first_poisons(n);
    }
    let poisons_used = plan
        .first_poisons
        .map_or(data.poison_count(), |n| n.min(data.poison_count()));
    let spec = VictimTraining::from_config(&plan.victim);
    let net = victim_network(&data, &spec);
    let surrogate = data.manifest.config.surrogate.net;
    let mut arms = vec![Arm::Poisoned];
    if plan.control {
        arms.push(Arm::Control);
    }
    if plan.noise_control {
        data.with_noise_poisons(poisons_used, data.manifest.seed ^ 0x6e6f_6973_6500);
        arms.push(Arm::Noise);
    }
    let cache = plan
        .victim_cache
        .as_deref()
        .map(super::cache::VictimCache::new);
    // Each arm's split, hashed once for all its victims.
    let digests: Vec<String> = match &cache {
        Some(_) => arms
            .iter()
            .map(|&arm| super::cache::VictimCache::split_digest(data.split(arm), &data.train_y))
            .collect(),
        None => Vec::new(),
    };
    let total = plan.trials * arms.len();
    let started = std::time::Instant::now();
    let mut results: Vec<Trial> = Vec::new();
    // Every victim: (trial number, arm index). Victim seeds are far from the crafting run's
    // and shared by the arms (paired).
    let jobs: Vec<(usize, usize)> = (0..plan.trials)
        .flat_map(|t| (0..arms.len()).map(move |a| (t, a)))
        .collect();
    let seed_of = |t: usize| 1_000_000 + data.manifest.seed * 1000 + t as u64;
    // Grouped, all victims train at once (halved whenever the GPU runs out of memory).
    let mut group_size = if plan.grouped.unwrap_or(device.is_cuda()) {
        jobs.len()
    } else {
        1
    };
    let mut next = 0;
    while next < jobs.len() {
        let group = &jobs[next..(next + group_size).min(jobs.len())];
        let attempt = attempt_group(group_size, || {
            let mut victims: Vec<Option<(Trial, State)>> = Vec::new();
            let mut keys = Vec::new();
            for &(t, a) in group {
                let key = cache
                    .as_ref()
                    .map(|_| VictimCache::key(&net, &spec, &digests[a], seed_of(t)));
                let judged = Judged {
                    arm: arms[a],
                    seed: seed_of(t),
                    batch: spec.batch_size,
                };
                let hit = cache
                    .as_ref()
                    .and_then(|c| c.lookup(&data, &net, key.as_deref()?, judged));
                victims.push(hit);
                keys.push(key);
            }
            let missing: Vec<usize> = (0..group.len()).filter(|&i| victims[i].is_none()).collect();
            let trained = train_victims(&data, &net, &spec, &arms, group, &missing, seed_of);
            for (i, victim) in missing.into_iter().zip(trained) {
                if let (Some(c), Some(key)) = (&cache, &keys[i]) {
                    c.store(key, &victim.1, &victim.0, &net);
                }
                victims[i] = Some(victim);
            }
            victims
        });
        let victims = match attempt {
            GroupAttempt::Done(v) => v,
            GroupAttempt::OutOfMemory { smaller } => {
                group_size = smaller;
                tracing::warn!("victims: the GPU ran out of memory; now {group_size} at a time");
                continue;
            }
        };
        for (&(t, _), victim) in group.iter().zip(victims) {
            let (trial, state) = victim.expect("every victim trained or read back");
            if plan.save_weights {
                let folder = dir.join("victims");
                std::fs::create_dir_all(&folder)
                    .map_err(crate::base::fs::failed("create", &folder))?;
                let path = folder.join(format!(
                    "{}-{t:03}-{}.safetensors",
                    trial.arm,
                    spec.net.name()
                ));
                save_victim(&path, &state, &trial, &net)?;
            }
            results.push(trial);
            let done = results.len();
            let eta = started.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
            let go_on = progress(&EvalProgress {
                done,
                total,
                trial: results.last().expect("just pushed"),
                eta_seconds: eta,
            });
            if !go_on {
                return Err(EvalError::Cancelled);
            }
        }
        next += group.len();
    }
    let pick = |arm: &str| results.iter().filter(|t| t.arm == arm).collect::<Vec<_>>();
    let report = EvalReport {
        export: dir.display().to_string(),
        victim_net: spec.net.name().into(),
        surrogate_net: surrogate.name().into(),
        setting: if spec.net == surrogate {
            "gray-box"
        } else {
            "black-box"
        }
        .into(),
        epochs: spec.epochs,
        protocol: Some(plan.victim.clone()),
        poisons_used,
        adversarial: data.adversarial.clone(),
        poisoned: summarise(&pick("poisoned")),
        control: summarise(&pick("control")),
        noise: plan.noise_control.then(|| summarise(&pick("noise"))),
        trials: results,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    let path = dir.join("eval.json");
    crate::base::tensor_file::write_atomic(&path, json.as_bytes())
        .map_err(crate::base::fs::failed("write", &path))?;
    Ok(report)
}

/// The target's adversarial margin in one victim, in logits: ln p(adv) - ln max_{j != adv} p(j),
/// which equals z_adv - max_{j != adv} z_j because softmax keeps logit differences; above 0
/// when the victim is flipped. Probabilities are floored at 1e-12 (a margin of about -28), so
/// that a softmax saturated in float32 stays finite. `None` without such a class.
pub fn adv_margin(probs: &[f64], adv: i64) -> Option<f64> {
    let a = usize::try_from(adv).ok()?;
    let p_adv = *probs.get(a)?;
    let other = probs
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != a)
        .map(|(_, &p)| p)
        .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.max(p))))?;
    let floor = |p: f64| p.max(1e-12).ln();
    Some(floor(p_adv) - floor(other))
}

/// The mean of `values` and its two-sided 95% Student-t interval; `None` for fewer than two.
pub fn t_interval95(values: &[f64]) -> Option<(f64, (f64, f64))> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Some((mean, (mean - half, mean + half)))
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom: tabulated to 30, then
/// the first terms of its expansion around the normal quantile (within 0.001 beyond).
fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let (z, d) = (1.959_963_984_540_054_f64, df as f64);
            z + (z.powi(3) + z) / (4.0 * d)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
        }
    }
}

/// The mean of per-seed shifts; `None` for none.
pub fn mean_shift(shifts: &[(u64, f64)]) -> Option<f64> {
    (!shifts.is_empty()).then(|| shifts.iter().map(|(_, d)| d).sum::<f64>() / shifts.len() as f64)
}

/// Wilson score interval for `k` successes in `n` trials at z = 1.96.
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.959_963_984_540_054_f64, n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Success of each target: predicted class equals its adversarial class.
pub fn successes(predicted: &[i64], adversarial: &[i64]) -> Vec<bool> {
    predicted
        .iter()
        .zip(adversarial)
        .map(|(p, a)| p == a)
        .collect()
}

impl Trial {
    /// Whether each target counts as flipped the authors' way: classified as its adversarial
    /// class in more than half of the train-mode forward passes.
    pub fn train_mode_success(&self) -> Vec<bool> {
        self.train_mode.iter().map(|&f| f > 0.5).collect()
    }
}

pub fn summarise(trials: &[&Trial]) -> ArmSummary {
    let n = trials.iter().map(|t| t.success.len()).sum::<usize>();
    let k = trials
        .iter()
        .map(|t| t.success.iter().filter(|&&s| s).count())
        .sum::<usize>();
    let accs: Vec<f64> = trials.iter().map(|t| t.clean_accuracy).collect();
    let mean = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
    let var = accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (accs.len().max(2) - 1) as f64;
    ArmSummary {
        trials: trials.len(),
        successes: k,
        success_rate: if n > 0 { k as f64 / n as f64 } else { 0.0 },
        success_ci95: wilson95(k, n),
        accuracy_mean: mean,
        accuracy_std: var.sqrt(),
        train_mode_successes: trials
            .iter()
            .flat_map(|t| t.train_mode_success())
            .filter(|&s| s)
            .count(),
    }
}

fn images_tensor(a: &NpyArray, device: Device) -> Result<Tensor, EvalError> {
    if a.descr != "|u1" || a.shape.len() != 4 {
        return Err(EvalError::NotImages {
            descr: a.descr.clone(),
            shape: a.shape.clone(),
        });
    }
    let s: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&a.data)
        .view(&s[..])
        .permute([0, 3, 1, 2])
        .contiguous()
        .to_device(device))
}

fn labels_tensor(a: &NpyArray, device: Device) -> Result<Tensor, EvalError> {
    Ok(Tensor::from_slice(&a.as_i64().ok_or(EvalError::NotInt64("labels"))?).to_device(device))
}

/// What `eval` needs from an export folder.
pub struct EvalData {
    pub manifest: Manifest,
    /// Training-set positions of the poisons, in poison order.
    pub poison_indices: Tensor,
    /// The poisons' clean originals [P, C, H, W].
    pub poison_bases: Tensor,
    pub poisoned_x: Tensor,
    pub clean_x: Tensor,
    pub train_y: Tensor,
    pub test_x: Tensor,
    pub test_y: Tensor,
    pub targets: Tensor,
    pub adversarial: Vec<i64>,
    /// The test images of the first target's class, the targets left out (`Trial::class_margin`).
    pub class_probe: Option<Tensor>,
    /// The noise arm's training split, once `with_noise_poisons` made it.
    pub noise_x: Option<Tensor>,
}

pub fn load_export(dir: &Path, device: Device) -> Result<EvalData, EvalError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|error| EvalError::NotExport {
        path: mpath.clone(),
        dir: dir.to_path_buf(),
        error,
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|source| EvalError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    let need = |file: &str| -> Result<_, EvalError> {
        let p = dir.join(file);
        if !p.exists() {
            return Err(EvalError::MissingFile(p));
        }
        Ok(read_npz(&p)?)
    };
    let (poisons, train, test) = (
        need("poisons.npz")?,
        need("poisoned_train.npz")?,
        need("test.npz")?,
    );
    let get = |m: &std::collections::BTreeMap<String, NpyArray>,
               k: &str,
               f: &str|
     -> Result<NpyArray, EvalError> {
        m.get(k).cloned().ok_or_else(|| EvalError::MissingArray {
            file: f.to_string(),
            key: k.to_string(),
        })
    };
    let poisoned_x = images_tensor(&get(&train, "images", "poisoned_train.npz")?, device)?;
    let idx = get(&poisons, "poison_indices", "poisons.npz")?
        .as_i64()
        .ok_or(EvalError::NotInt64("poison_indices"))?;
    let base = images_tensor(&get(&poisons, "base_images", "poisons.npz")?, device)?;
    let poison_indices = Tensor::from_slice(&idx).to_device(device);
    let clean_x = poisoned_x.index_copy(0, &poison_indices, &base);
    let test_x = images_tensor(&get(&test, "images", "test.npz")?, device)?;
    let test_y = labels_tensor(&get(&test, "labels", "test.npz")?, device)?;
    let targets = images_tensor(&get(&poisons, "target_images", "poisons.npz")?, device)?;
    let class_probe = class_probe(&test_x, &test_y, &targets, manifest.plan.target_class);
    Ok(EvalData {
        manifest,
        poison_indices,
        poison_bases: base,
        train_y: labels_tensor(&get(&train, "labels", "poisoned_train.npz")?, device)?,
        test_x,
        test_y,
        targets,
        class_probe,
        adversarial: get(&poisons, "target_adv_labels", "poisons.npz")?
            .as_i64()
            .ok_or(EvalError::NotInt64("target_adv_labels"))?,
        poisoned_x,
        clean_x,
        noise_x: None,
    })
}

/// The test images of `class` other than the targets (told apart by their pixels, so that the
/// test split's order does not matter); `None` when there are none.
pub fn class_probe(
    test_x: &Tensor,
    test_y: &Tensor,
    targets: &Tensor,
    class: i64,
) -> Option<Tensor> {
    let mut keep = test_y.eq(class);
    for t in 0..targets.size()[0] {
        let same = (test_x - targets.get(t).unsqueeze(0))
            .abs()
            .flatten(1, -1)
            .amax([1].as_slice(), false)
            .eq(0);
        keep = keep.logical_and(&same.logical_not());
    }
    let idx = keep.nonzero().squeeze_dim(1);
    (idx.size()[0] > 0).then(|| test_x.index_select(0, &idx))
}

/// The mean over images of z_adv - max_{j != adv} z_j, from logits [N, classes].
pub fn mean_margin(logits: &Tensor, adv: i64) -> Option<f64> {
    let classes = logits.size()[1];
    if adv < 0 || adv >= classes {
        return None;
    }
    let z = logits.to_kind(Kind::Double);
    let z_adv = z.select(1, adv);
    let others = z
        .index_fill(
            1,
            &Tensor::from_slice(&[adv]).to_device(z.device()),
            f64::NEG_INFINITY,
        )
        .amax([1].as_slice(), false);
    Some((z_adv - others).mean(Kind::Double).double_value(&[]))
}

impl EvalData {
    /// Keeps only the first `n` poisons (the others revert to their clean originals): the
    /// authors' "fewer poisons" victim variation.
    pub fn keep_first_poisons(&mut self, n: usize) {
        let total = self.poison_indices.size()[0] as usize;
        if n >= total {
            return;
        }
        let rest = (total - n) as i64;
        let idx = self.poison_indices.narrow(0, n as i64, rest);
        let base = self.poison_bases.narrow(0, n as i64, rest);
        self.poisoned_x = self.poisoned_x.index_copy(0, &idx, &base);
    }

    pub fn poison_count(&self) -> usize {
        self.poison_indices.size()[0] as usize
    }

    /// Makes the noise arm's split: the first `count` poisons' clean originals, every value
    /// moved by +eps or -eps (the export's `threat.eps`, a fair coin each, from `seed`), rounded
    /// and clipped to 0..=255 as an exported poison is; no colour shift. The other images are
    /// clean. The same budget as the crafted perturbation, spent at random.
    pub fn with_noise_poisons(&mut self, count: usize, seed: u64) {
        let n = count.min(self.poison_count()) as i64;
        let eps = self.manifest.config.threat.eps;
        let base = self.poison_bases.narrow(0, 0, n).to_kind(Kind::Float);
        let mut coin = crate::base::rng::SplitMix64::new(seed);
        let signs: Vec<f32> = (0..base.numel())
            .map(|_| if coin.next_u64() & 1 == 1 { 1.0 } else { -1.0 })
            .collect();
        let noise = Tensor::from_slice(&signs)
            .view_as(&base)
            .to_device(base.device())
            * eps;
        let noisy = (base + noise)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(self.clean_x.kind());
        let idx = self.poison_indices.narrow(0, 0, n);
        self.noise_x = Some(self.clean_x.index_copy(0, &idx, &noisy));
    }

    /// The training images of an arm (the noise arm needs `with_noise_poisons` first).
    pub fn split(&self, arm: Arm) -> &Tensor {
        match arm {
            Arm::Poisoned => &self.poisoned_x,
            Arm::Control => &self.clean_x,
            Arm::Noise => self
                .noise_x
                .as_ref()
                .expect("with_noise_poisons before training the noise arm"),
        }
    }
}

/// Trains one victim on the split of its arm and scores it; returns its weights too.
pub fn run_trial(
    data: &EvalData,
    net: &Network,
    spec: &VictimTraining,
    arm: Arm,
    seed: u64,
) -> (Trial, crate::model::State) {
    let started = std::time::Instant::now();
    let x = data.split(arm);
    let state = train_from_scratch(net, spec, x, &data.train_y, seed, Kind::Float, |_| true);
    let trial = score(
        data,
        net,
        &state,
        Judged {
            arm,
            seed,
            batch: spec.batch_size,
        },
        started.elapsed().as_secs_f64(),
    );
    (trial, state)
}

/// Trains the victims at positions `missing` of `group` ((trial, arm index) pairs): one at a
/// time, or as one grouped network when there are several.
fn train_victims(
    data: &EvalData,
    net: &Network,
    spec: &VictimTraining,
    arms: &[Arm],
    group: &[(usize, usize)],
    missing: &[usize],
    seed_of: impl Fn(usize) -> u64,
) -> Vec<(Trial, State)> {
    if missing.len() == 1 {
        let (t, a) = group[missing[0]];
        return vec![run_trial(data, net, spec, arms[a], seed_of(t))];
    }
    if missing.is_empty() {
        return Vec::new();
    }
    let started = std::time::Instant::now();
    let xs: Vec<&Tensor> = missing
        .iter()
        .map(|&i| data.split(arms[group[i].1]))
        .collect();
    let seeds: Vec<u64> = missing.iter().map(|&i| seed_of(group[i].0)).collect();
    let states =
        super::train_from_scratch_grouped(net, spec, &xs, &data.train_y, &seeds, Kind::Float);
    let seconds = started.elapsed().as_secs_f64() / missing.len() as f64;
    missing
        .iter()
        .zip(states)
        .map(|(&i, state)| {
            let (t, a) = group[i];
            let judged = Judged {
                arm: arms[a],
                seed: seed_of(t),
                batch: spec.batch_size,
            };
            let trial = score(data, net, &state, judged, seconds);
            (trial, state)
        })
        .collect()
}

/// Saves a victim's weights and batch-norm statistics (safetensors, `weight.I` / `buffer.I` in
/// the order of the functional network) with the trial as JSON metadata.
pub fn save_victim(
    path: &Path,
    state: &crate::model::State,
    trial: &Trial,
    net: &Network,
) -> Result<(), crate::base::tensor_file::TensorFileError> {
    let mut named: Vec<(String, &Tensor)> = state
        .weights
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("weight.{i}"), t))
        .collect();
    named.extend(
        state
            .buffers
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("buffer.{i}"), t)),
    );
    let meta = std::collections::HashMap::from([
        (
            "trial".to_string(),
            serde_json::to_string(trial).unwrap_or_default(),
        ),
        ("net".to_string(), net.kind.name().to_string()),
    ]);
    crate::base::tensor_file::save_tensors(path, &named, Some(meta))
}

/// Which victim a score is for: its arm, seed and training batch size.
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    pub arm: Arm,
    pub seed: u64,
    pub batch: usize,
}

/// Train-mode forward passes behind `Trial::train_mode`.
pub const TRAIN_MODE_BATCHES: usize = 8;

/// Per target, the fraction of `TRAIN_MODE_BATCHES` forward passes in training mode (batch
/// statistics, running statistics untouched) that classify it as `adversarial`, each pass on
/// the targets beside `batch` random images of the training split `x` (drawn from `seed`):
/// the authors log a victim's success this way, as the target's accuracy inside a training
/// batch, where eval mode uses the running statistics.
pub fn train_mode_flips(
    net: &Network,
    state: &crate::model::State,
    x: &Tensor,
    targets: &Tensor,
    adversarial: &[i64],
    batch: usize,
    seed: u64,
) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let n = x.size()[0];
    let t = targets.size()[0];
    let batch = (batch as i64).min(n);
    let kind = state.weights[0].kind();
    let mut rng = crate::base::rng::SplitMix64::new(seed ^ 0x7472_6169_6e6d);
    let mut hits = vec![0usize; t as usize];
    for _ in 0..TRAIN_MODE_BATCHES {
        let mut perm: Vec<i64> = (0..n).collect();
        rng.shuffle(&mut perm);
        let idx = Tensor::from_slice(&perm[..batch as usize]).to_device(x.device());
        let input = Tensor::cat(&[x.index_select(0, &idx), targets.shallow_clone()], 0);
        let logits = net.forward(
            &state.weights,
            &state.buffers,
            &input.to_kind(kind),
            crate::model::Mode::Train,
        );
        let predicted = logits
            .narrow(0, batch, t)
            .argmax(1, false)
            .to_device(Device::Cpu);
        for (i, hit) in hits.iter_mut().enumerate() {
            if predicted.int64_value(&[i as i64]) == adversarial[i] {
                *hit += 1;
            }
        }
    }
    hits.iter()
        .map(|&h| h as f64 / TRAIN_MODE_BATCHES as f64)
        .collect()
}

pub fn score(
    data: &EvalData,
    net: &Network,
    state: &crate::model::State,
    judged: Judged,
    seconds: f64,
) -> Trial {
    let target_probs = probabilities(net, state, &data.targets);
    let predicted: Vec<i64> = target_probs
        .iter()
        .map(|p| {
            p.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as i64)
                .unwrap_or(-1)
        })
        .collect();
    let train_mode = train_mode_flips(
        net,
        state,
        data.split(judged.arm),
        &data.targets,
        &data.adversarial,
        judged.batch,
        judged.seed,
    );
    Trial {
        arm: judged.arm.name().into(),
        seed: judged.seed,
        success: successes(&predicted, &data.adversarial),
        predicted,
        target_probs,
        clean_accuracy: sgd::accuracy(net, state, &data.test_x, &data.test_y),
        train_mode,
        seconds,
        cached: false,
        class_margin: data.class_probe.as_ref().and_then(|x| {
            mean_margin(
                &sgd::predict(net, state, x, 500),
                *data.adversarial.first()?,
            )
        }),
    }
}

/// The network a victim of this export uses.
pub fn victim_network(data: &EvalData, spec: &VictimTraining) -> Network {
    let d = &data.manifest.dataset;
    Network::new(
        spec.net,
        d.channels,
        d.class_names.len(),
        spec.width,
        InputNorm::for_dataset(&d.name, d.channels),
    )
}
