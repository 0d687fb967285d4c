//! `eval`: victims trained from scratch on an export's poisoned training split, beside control
//! victims trained on the clean split, with the target's prediction and the clean accuracy of
//! each. The attack's effect is the difference between the two.

use super::{probabilities, train_from_scratch, VictimTraining};
use crate::export::npz::{read_npz, NpyArray};
use crate::export::Manifest;
use crate::model::{sgd, InputNorm, Network};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One victim's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    /// "poisoned" or "control".
    pub arm: String,
    pub seed: u64,
    /// Predicted class of each target.
    pub predicted: Vec<i64>,
    /// Class probabilities of each target.
    pub target_probs: Vec<Vec<f64>>,
    /// Whether each target went to its adversarial class.
    pub success: Vec<bool>,
    pub clean_accuracy: f64,
    pub seconds: f64,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub export: String,
    pub victim_net: String,
    pub surrogate_net: String,
    /// "gray-box" when the victim has the surrogates' architecture, else "black-box".
    pub setting: String,
    pub epochs: usize,
    pub poisoned: ArmSummary,
    pub control: ArmSummary,
    pub trials: Vec<Trial>,
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
    }
}

fn images_tensor(a: &NpyArray, device: Device) -> Result<Tensor, String> {
    if a.descr != "|u1" || a.shape.len() != 4 {
        return Err(format!(
            "expected u8 images [N, H, W, C], found {} {:?}",
            a.descr, a.shape
        ));
    }
    let s: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&a.data)
        .view(&s[..])
        .permute([0, 3, 1, 2])
        .contiguous()
        .to_device(device))
}

fn labels_tensor(a: &NpyArray, device: Device) -> Result<Tensor, String> {
    Ok(Tensor::from_slice(&a.as_i64().ok_or("labels are not int64")?).to_device(device))
}

/// What `eval` needs from an export folder.
pub struct EvalData {
    pub manifest: Manifest,
    pub poisoned_x: Tensor,
    pub clean_x: Tensor,
    pub train_y: Tensor,
    pub test_x: Tensor,
    pub test_y: Tensor,
    pub targets: Tensor,
    pub adversarial: Vec<i64>,
}

pub fn load_export(dir: &Path, device: Device) -> Result<EvalData, String> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|e| {
        format!(
            "cannot read {}: {e} (is {} an export folder?)",
            mpath.display(),
            dir.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", mpath.display()))?;
    let need = |file: &str| -> Result<_, String> {
        let p = dir.join(file);
        if !p.exists() {
            return Err(format!(
                "{} is missing: export with the npz format (the default) to evaluate",
                p.display()
            ));
        }
        read_npz(&p)
    };
    let (poisons, train, test) = (
        need("poisons.npz")?,
        need("poisoned_train.npz")?,
        need("test.npz")?,
    );
    let get = |m: &std::collections::BTreeMap<String, NpyArray>,
               k: &str,
               f: &str|
     -> Result<NpyArray, String> {
        m.get(k).cloned().ok_or_else(|| format!("{f} lacks `{k}`"))
    };
    let poisoned_x = images_tensor(&get(&train, "images", "poisoned_train.npz")?, device)?;
    let idx = get(&poisons, "poison_indices", "poisons.npz")?
        .as_i64()
        .ok_or("poison_indices are not int64")?;
    let base = images_tensor(&get(&poisons, "base_images", "poisons.npz")?, device)?;
    let clean_x = poisoned_x.index_copy(0, &Tensor::from_slice(&idx).to_device(device), &base);
    Ok(EvalData {
        manifest,
        train_y: labels_tensor(&get(&train, "labels", "poisoned_train.npz")?, device)?,
        test_x: images_tensor(&get(&test, "images", "test.npz")?, device)?,
        test_y: labels_tensor(&get(&test, "labels", "test.npz")?, device)?,
        targets: images_tensor(&get(&poisons, "target_images", "poisons.npz")?, device)?,
        adversarial: get(&poisons, "target_adv_labels", "poisons.npz")?
            .as_i64()
            .ok_or("target_adv_labels are not int64")?,
        poisoned_x,
        clean_x,
    })
}

/// Trains one victim (on the poisoned or the clean split) and scores it; returns its weights too.
pub fn run_trial(
    data: &EvalData,
    net: &Network,
    spec: &VictimTraining,
    arm: &str,
    poisoned: bool,
    seed: u64,
) -> (Trial, crate::model::State) {
    let started = std::time::Instant::now();
    let x = if poisoned {
        &data.poisoned_x
    } else {
        &data.clean_x
    };
    let state = train_from_scratch(net, spec, x, &data.train_y, seed, Kind::Float, |_| true);
    let trial = score(
        data,
        net,
        &state,
        arm,
        seed,
        started.elapsed().as_secs_f64(),
    );
    (trial, state)
}

/// Saves a victim's weights and batch-norm statistics (safetensors, `weight.I` / `buffer.I` in
/// the order of the functional network) with the trial as JSON metadata.
pub fn save_victim(
    path: &Path,
    state: &crate::model::State,
    trial: &Trial,
    net: &Network,
) -> Result<(), String> {
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
    crate::craft::checkpoint::save_tensors(path, &named, Some(meta)).map_err(|e| e.to_string())
}

pub fn score(
    data: &EvalData,
    net: &Network,
    state: &crate::model::State,
    arm: &str,
    seed: u64,
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
    Trial {
        arm: arm.into(),
        seed,
        success: successes(&predicted, &data.adversarial),
        predicted,
        target_probs,
        clean_accuracy: sgd::accuracy(net, state, &data.test_x, &data.test_y),
        seconds,
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
