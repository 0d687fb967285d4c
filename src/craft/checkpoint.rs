//! Checkpoints: one safetensors file holding every tensor of the job (perturbation, Adam state,
//! surrogate weights and batch-norm statistics) with the rest of the state as JSON in its
//! metadata. Written to a temporary file, synced, then renamed over the old one, so a crash
//! never leaves a half-written checkpoint.

use super::crafter::{Crafter, LiveSettings};
use super::plan::Plan;
use super::report::{Event, StepReport};
use crate::base::tensor_file::{deserialize_checked, tensors_of};
pub use crate::base::tensor_file::{
    load_tensors, save_tensors, write_atomic, TensorFileError as CheckpointError,
};
use crate::config::Config;
use crate::model::State;
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FILE_NAME: &str = "checkpoint.safetensors";
const FORMAT: u32 = 1;

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    pub tool_version: String,
    /// Next craft step to run.
    pub step: usize,
    pub config: Config,
    pub plan: Plan,
    pub live: LiveSettings,
    pub events: Vec<Event>,
    pub history: Vec<StepReport>,
    pub nonfinite_in_row: usize,
    pub adam_t: i64,
    pub float64: bool,
    /// Where the run computed (e.g. "cuda:0", "cpu (2 threads)", "cpu (2 surrogates x 1 thread)").
    #[serde(default)]
    pub device: String,
    /// Wall-clock seconds of the surrogates' pretraining (0 in runs recorded before).
    #[serde(default)]
    pub pretrain_seconds: f64,
    /// Gradient matching: the best restart so far (0-based) and its final matching loss; its
    /// perturbation is saved as the tensors `matching.best.delta` and `matching.best.offsets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching_best: Option<(usize, f64)>,
}

impl CheckpointState {
    /// Seconds spent crafting up to this checkpoint: pretraining and every craft step.
    pub fn crafting_seconds(&self) -> f64 {
        self.pretrain_seconds + self.history.iter().map(|r| r.seconds).sum::<f64>()
    }

    /// The crafting objective at the end: the mean of the last `n` steps' loss that has a value
    /// (MetaPoison's adversarial loss on its unrolled surrogates, below 0 when they are fooled;
    /// gradient matching's matching loss). Whether the crafting reached its own goal, beside
    /// what the victims did.
    pub fn final_loss(&self, n: usize) -> Option<f64> {
        let last: Vec<f64> = self
            .history
            .iter()
            .rev()
            .take(n)
            .filter_map(|r| r.adv_loss)
            .collect();
        (!last.is_empty()).then(|| last.iter().sum::<f64>() / last.len() as f64)
    }
}

fn surrogate_names(m: usize, s: &State) -> Vec<(String, &Tensor)> {
    let mut out: Vec<(String, &Tensor)> = s
        .weights
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("surrogate.{m}.weight.{i}"), t))
        .collect();
    out.extend(
        s.buffers
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("surrogate.{m}.buffer.{i}"), t)),
    );
    out.extend(
        s.velocity
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("surrogate.{m}.velocity.{i}"), t)),
    );
    out
}

/// Writes `dir/checkpoint.safetensors` atomically.
pub fn save(crafter: &Crafter, dir: &Path) -> Result<PathBuf, CheckpointError> {
    let state = CheckpointState {
        format: FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        step: crafter.step,
        config: crafter.config.clone(),
        plan: crafter.plan.clone(),
        live: crafter.live.clone(),
        events: crafter.events.clone(),
        history: crafter.history.clone(),
        nonfinite_in_row: crafter.nonfinite_in_row,
        adam_t: crafter.adam.t,
        float64: crafter.kind == Kind::Double,
        device: crate::device::describe(crafter.device),
        pretrain_seconds: crafter.pretrain_seconds,
        matching_best: crafter.matching.best.as_ref().map(|b| (b.restart, b.loss)),
    };
    let mut named: Vec<(String, &Tensor)> = vec![
        ("delta".into(), &crafter.perturbation.delta),
        ("offsets".into(), &crafter.perturbation.offsets),
    ];
    for (i, (m, v)) in crafter.adam.m.iter().zip(&crafter.adam.v).enumerate() {
        named.push((format!("adam.m.{i}"), m));
        named.push((format!("adam.v.{i}"), v));
    }
    for (m, s) in crafter.surrogates.iter().enumerate() {
        named.extend(surrogate_names(m, s));
    }
    if let Some(best) = &crafter.matching.best {
        named.push(("matching.best.delta".into(), &best.delta));
        named.push(("matching.best.offsets".into(), &best.offsets));
    }
    let meta = HashMap::from([(
        "metapoison".to_string(),
        serde_json::to_string(&state).expect("state serialises"),
    )]);
    let path = dir.join(FILE_NAME);
    save_tensors(&path, &named, Some(meta))?;
    Ok(path)
}

/// A run recorded before `data.subset` existed trained on the first `train_limit` images; the
/// field's default, `auto`, would pick others on CUDA (balanced), so such a run reads as `first`.
fn recorded_before_subset(state: &mut serde_json::Value) {
    if let Some(data) = state
        .pointer_mut("/config/data")
        .and_then(|d| d.as_object_mut())
    {
        data.entry("subset").or_insert_with(|| "first".into());
    }
}

/// A checkpoint read back: the state and the tensors by name (on the CPU).
pub struct Loaded {
    pub state: CheckpointState,
    pub tensors: HashMap<String, Tensor>,
}

pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let path = if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join(FILE_NAME)
    };
    let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Read {
        path: path.clone(),
        source,
    })?;
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.clone(),
        message,
    };
    let (st, metadata) = deserialize_checked(&bytes, &path)?;
    let json = metadata
        .get("metapoison")
        .ok_or_else(|| corrupt("no metapoison state in its metadata".into()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| corrupt(format!("state: {e}")))?;
    recorded_before_subset(&mut value);
    let state: CheckpointState =
        serde_json::from_value(value).map_err(|e| corrupt(format!("state: {e}")))?;
    if state.format != FORMAT {
        return Err(corrupt(format!(
            "format {} is not the supported format {FORMAT}",
            state.format
        )));
    }
    let tensors = tensors_of(&st, &path)?;
    Ok(Loaded { state, tensors })
}

/// A checkpoint that does not fit the crafter it is restored into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("the run's plan (poisons, targets, ensemble) differs from the checkpoint's; was the data changed?")]
    PlanDiffers,
    #[error("tensor {0} is missing")]
    Missing(String),
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
}

impl Loaded {
    fn take(&self, name: &str, like: &Tensor) -> Result<Tensor, RestoreError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| RestoreError::Missing(name.to_string()))?;
        if t.size() != like.size() {
            return Err(RestoreError::Shape {
                name: name.to_string(),
                found: t.size(),
                expected: like.size(),
            });
        }
        Ok(t.to_kind(like.kind()).to_device(like.device()))
    }

    /// Puts the saved tensors and state into a crafter built from the same config and data.
    pub fn restore_into(&self, c: &mut Crafter) -> Result<(), RestoreError> {
        let _guard = tch::no_grad_guard();
        // The notes say how `auto` fields were settled when the run began; a resumed run's
        // config is already settled, so only the decisions themselves must agree. How many
        // surrogates run at once is speed only (a resume on another machine may change it).
        let decisions = |p: &crate::craft::plan::Plan| crate::craft::plan::Plan {
            notes: Vec::new(),
            parallel_surrogates: 1,
            grouped_surrogates: false,
            ..p.clone()
        };
        if decisions(&self.state.plan) != decisions(&c.plan) {
            return Err(RestoreError::PlanDiffers);
        }
        c.plan.notes = self.state.plan.notes.clone();
        let delta = self.take("delta", &c.perturbation.delta)?;
        c.perturbation.delta.copy_(&delta);
        let offsets = self.take("offsets", &c.perturbation.offsets)?;
        c.perturbation.offsets.copy_(&offsets);
        for i in 0..c.adam.m.len() {
            c.adam.m[i] = self.take(&format!("adam.m.{i}"), &c.adam.m[i])?;
            c.adam.v[i] = self.take(&format!("adam.v.{i}"), &c.adam.v[i])?;
        }
        c.adam.t = self.state.adam_t;
        for (m, s) in c.surrogates.iter_mut().enumerate() {
            for (i, w) in s.weights.iter_mut().enumerate() {
                *w = self
                    .take(&format!("surrogate.{m}.weight.{i}"), w)?
                    .set_requires_grad(true);
            }
            for (i, b) in s.buffers.iter_mut().enumerate() {
                *b = self.take(&format!("surrogate.{m}.buffer.{i}"), b)?;
            }
            for (i, v) in s.velocity.iter_mut().enumerate() {
                *v = self.take(&format!("surrogate.{m}.velocity.{i}"), v)?;
            }
        }
        c.step = self.state.step;
        c.live = self.state.live.clone();
        c.events = self.state.events.clone();
        c.history = self.state.history.clone();
        c.nonfinite_in_row = self.state.nonfinite_in_row;
        c.pretrain_seconds = self.state.pretrain_seconds;
        c.matching.targets.clear();
        c.matching.best = match self.state.matching_best {
            Some((restart, loss)) => Some(crate::craft::matching::BestRestart {
                restart,
                loss,
                delta: self.take("matching.best.delta", &c.perturbation.delta)?,
                offsets: self.take("matching.best.offsets", &c.perturbation.offsets)?,
            }),
            None => None,
        };
        Ok(())
    }
}

/// Folder of the per-checkpoint poison snapshots (what `export --step` reads).
pub const SNAPSHOT_DIR: &str = "poisons";

pub fn snapshot_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(SNAPSHOT_DIR)
        .join(format!("step-{step:04}.safetensors"))
}

/// Saves the poisons as they would be exported (clipped, rounded, u8 [P, C, H, W]) for the
/// crafter's current step, atomically.
pub fn save_poison_snapshot(crafter: &Crafter, dir: &Path) -> Result<PathBuf, CheckpointError> {
    let path = snapshot_path(dir, crafter.step);
    let write_err = |source| CheckpointError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir.join(SNAPSHOT_DIR)).map_err(write_err)?;
    let q = crafter.perturbation.quantised().to_kind(Kind::Uint8);
    save_tensors(&path, &[("poisons".to_string(), &q)], None)?;
    Ok(path)
}

/// Reads a snapshot back as (shape [P, C, H, W], bytes).
pub fn load_poison_snapshot(path: &Path) -> Result<(Vec<usize>, Vec<u8>), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let (st, _) = deserialize_checked(&bytes, path)?;
    let view = st
        .tensor("poisons")
        .map_err(|e| corrupt(format!("{e:?}")))?;
    if view.dtype() != Dtype::U8 || view.shape().len() != 4 {
        return Err(corrupt(format!(
            "poisons tensor is {:?} {:?}, expected u8 [P, C, H, W]",
            view.dtype(),
            view.shape()
        )));
    }
    Ok((view.shape().to_vec(), view.data().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_recorded_before_data_subset_reads_as_the_first_images() {
        let mut config = serde_json::to_value(Config::default()).unwrap();
        config["data"].as_object_mut().unwrap().remove("subset");
        let mut old = serde_json::json!({ "config": config });
        recorded_before_subset(&mut old);
        let c: Config = serde_json::from_value(old["config"].clone()).unwrap();
        assert_eq!(c.data.subset(), crate::config::Subset::First);
        // A state that records the field keeps it.
        let mut settled = Config::default();
        settled.settle(true);
        let mut new = serde_json::json!({ "config": settled });
        recorded_before_subset(&mut new);
        let c: Config = serde_json::from_value(new["config"].clone()).unwrap();
        assert_eq!(c.data.subset(), crate::config::Subset::Balanced);
    }
}
