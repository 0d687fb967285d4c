//! Checkpoints: one safetensors file holding every tensor of the job (perturbation, Adam state,
//! surrogate weights and batch-norm statistics) with the rest of the state as JSON in its
//! metadata. Written to a temporary file, synced, then renamed over the old one, so a crash
//! never leaves a half-written checkpoint.

use super::crafter::{Crafter, LiveSettings};
use super::messages::{Event, StepReport};
use super::plan::Plan;
use crate::config::Config;
use crate::model::State;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const FILE_NAME: &str = "checkpoint.safetensors";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is damaged or not a metapoison checkpoint: {message}")]
    Corrupt { path: PathBuf, message: String },
}

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
}

fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Uint8 => Dtype::U8,
        _ => Dtype::F32,
    }
}

/// A tensor as safetensors wants it: dtype, shape, little-endian bytes.
type RawTensor = (Dtype, Vec<usize>, Vec<u8>);

pub(crate) fn bytes_of(t: &Tensor) -> RawTensor {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let kind = match t.kind() {
        Kind::Double | Kind::Int64 | Kind::Uint8 => t.kind(),
        _ => Kind::Float,
    };
    let t = t.to_kind(kind);
    let n = t.numel();
    let mut data = vec![0u8; n * kind.elt_size_in_bytes()];
    t.copy_data_u8(&mut data, n);
    (
        dtype_of(kind),
        t.size().iter().map(|&d| d as usize).collect(),
        data,
    )
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

/// Writes named tensors (and optional string metadata) as one safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    named: &[(String, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let raw: Vec<(String, RawTensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), bytes_of(t)))
        .collect();
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let mut metadata = metadata.unwrap_or_default();
    let sum = checksum(
        raw.iter()
            .map(|(n, (d, s, b))| (n.as_str(), *d, s.as_slice(), b.as_slice())),
        &metadata,
    );
    metadata.insert(CHECKSUM_KEY.to_string(), sum);
    let metadata = Some(metadata);
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(n, (d, s, b))| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| corrupt(format!("{e:?}")))
        })
        .collect::<Result<_, _>>()?;
    let bytes =
        safetensors::tensor::serialize(views, &metadata).map_err(|e| corrupt(format!("{e:?}")))?;
    write_atomic(path, &bytes).map_err(|source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The metadata key of a SHA-256 over every tensor of the file (name, dtype, shape and bytes,
/// in name order) and the rest of its metadata (the run's state). safetensors itself checks
/// only the layout, so without it a file damaged after it was written (a bad disk, a copy cut
/// short and padded) would be resumed from.
const CHECKSUM_KEY: &str = "sha256";

fn checksum<'a>(
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
    metadata: &HashMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    let mut entries: Vec<_> = metadata
        .iter()
        .filter(|(k, _)| *k != CHECKSUM_KEY)
        .collect();
    entries.sort();
    for (key, value) in entries {
        for text in [key, value] {
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
    }
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}").as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    crate::digest::hex(&h.finalize())
}

/// The tensors of a safetensors file and its metadata, checked against the checksum written
/// with them (files written before there was one are read as they are).
fn deserialize_checked<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<(SafeTensors<'a>, HashMap<String, String>), CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(format!("{e:?}")))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(format!("{e:?}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    if let Some(written) = metadata.get(CHECKSUM_KEY) {
        let tensors = st.tensors();
        let now = checksum(
            tensors
                .iter()
                .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
            &metadata,
        );
        if &now != written {
            return Err(corrupt(
                "its tensors do not match the checksum written with them (the file changed after it was written)"
                    .into(),
            ));
        }
    }
    Ok((st, metadata))
}

/// Writes a file through a temporary sibling and a rename; the old file stays intact until
/// the new one is complete and synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

/// Every tensor of a safetensors file written by `save_tensors`.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    tensors_of(&deserialize_checked(&bytes, path)?.0, path)
}

fn tensors_of(st: &SafeTensors, path: &Path) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F64 => Kind::Double,
            Dtype::F32 => Kind::Float,
            Dtype::I64 => Kind::Int64,
            Dtype::U8 => Kind::Uint8,
            other => {
                return Err(corrupt(format!(
                    "tensor {name} has unsupported dtype {other:?}"
                )))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    Ok(tensors)
}

impl Loaded {
    fn take(&self, name: &str, like: &Tensor) -> Result<Tensor, String> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("tensor {name} is missing"))?;
        if t.size() != like.size() {
            return Err(format!(
                "tensor {name} has shape {:?}, expected {:?}",
                t.size(),
                like.size()
            ));
        }
        Ok(t.to_kind(like.kind()).to_device(like.device()))
    }

    /// Puts the saved tensors and state into a crafter built from the same config and data.
    pub fn restore_into(&self, c: &mut Crafter) -> Result<(), String> {
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
            return Err("the run's plan (poisons, targets, ensemble) differs from the checkpoint's; was the data changed?".into());
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

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            (
                "b".to_string(),
                Tensor::from_slice(&[1.5f32, -2.0, 3.25, 0.0]).view([2, 2]),
            ),
            ("a".to_string(), Tensor::from_slice(&[7u8, 8, 9])),
        ]
    }

    fn save(path: &Path) {
        let named = sample();
        let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        save_tensors(path, &refs, None).unwrap();
    }

    /// A tensor byte changed after writing is refused by name; the file as written reads
    /// back equal, and a file without a checksum (written before there was one) still reads.
    #[test]
    fn a_checkpoint_damaged_after_writing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        save(&path);
        let back = load_tensors(&path).unwrap();
        for (name, t) in sample() {
            assert!(back[&name].equal(&t), "{name}");
        }
        let good = std::fs::read(&path).unwrap();
        // The last byte is tensor data (the header comes first): one bit flipped.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let err = load_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("do not match the checksum"), "{err}");
        assert!(err.contains("t.safetensors"), "{err}");
        assert_eq!(err.lines().count(), 1);
        // A change to the state in the metadata (same length, so the layout still parses).
        let named = sample();
        let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        let state = HashMap::from([("metapoison".to_string(), "{\"step\":3}".to_string())]);
        save_tensors(&path, &refs, Some(state)).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(9).position(|w| w == b"\"step\\\":3").unwrap();
        bytes[at + 8] = b'4';
        std::fs::write(&path, &bytes).unwrap();
        let err = load_tensors(&path).unwrap_err().to_string();
        assert!(err.contains("do not match the checksum"), "{err}");
        // Without the checksum in its metadata the same damaged data is read as it is.
        let named = sample();
        let raw: Vec<(String, RawTensor)> = named
            .iter()
            .map(|(n, t)| (n.clone(), bytes_of(t)))
            .collect();
        let views: Vec<(String, TensorView)> = raw
            .iter()
            .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let old = safetensors::tensor::serialize(views, &None).unwrap();
        std::fs::write(&path, &old).unwrap();
        assert!(load_tensors(&path).unwrap()["a"].equal(&sample()[1].1));
    }

    /// The checksum covers names, shapes, dtypes and the other metadata as well as bytes.
    #[test]
    fn the_checksum_sees_names_shapes_and_dtypes() {
        let data = [1u8, 2, 3, 4];
        let none = HashMap::new();
        let one = |name: &'static str, dtype: Dtype, shape: &'static [usize]| {
            checksum([(name, dtype, shape, &data[..])].into_iter(), &none)
        };
        let base = one("x", Dtype::U8, &[4]);
        assert_eq!(base, one("x", Dtype::U8, &[4]));
        assert_ne!(base, one("y", Dtype::U8, &[4]));
        assert_ne!(base, one("x", Dtype::U8, &[2, 2]));
        assert_ne!(base, one("x", Dtype::I8, &[4]));
        assert_eq!(base.len(), 64);
        // The rest of the metadata counts too; the checksum's own entry does not.
        let tensors = || [("x", Dtype::U8, &[4usize][..], &data[..])].into_iter();
        let state = |v: &str| HashMap::from([("metapoison".to_string(), v.to_string())]);
        assert_ne!(checksum(tensors(), &state("{\"step\":3}")), base);
        assert_ne!(
            checksum(tensors(), &state("{\"step\":3}")),
            checksum(tensors(), &state("{\"step\":4}"))
        );
        let mut with_sum = state("{\"step\":3}");
        with_sum.insert(CHECKSUM_KEY.to_string(), "anything".to_string());
        assert_eq!(
            checksum(tensors(), &with_sum),
            checksum(tensors(), &state("{\"step\":3}"))
        );
    }
}
