//! Trained victims kept by what determines them. A victim is a function of its training split,
//! labels, architecture, protocol and seed, so a campaign's control victims (the same clean
//! split and seeds for every target) need training only once, and an evaluation run again with
//! more trials reuses the victims it trained before. Each file is named by a SHA-256 of those
//! inputs; a file that is missing, unreadable or of the wrong shape is simply trained again.

use super::eval::{save_victim, score, EvalData, Judged, Trial};
use super::VictimTraining;
use crate::digest::hex;
use crate::model::{Network, State};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Bumped when training changes in a way the key cannot see (a new optimiser detail), so old
/// victims stop matching.
const VERSION: &str = "metapoison-victim-1";

pub struct VictimCache {
    dir: PathBuf,
}

impl VictimCache {
    pub fn new(dir: &Path) -> VictimCache {
        VictimCache {
            dir: dir.to_path_buf(),
        }
    }

    /// The hex SHA-256 of a training split: images `x` and labels `y` (computed once per arm,
    /// since every victim of the arm trains on the same split).
    pub fn split_digest(x: &Tensor, y: &Tensor) -> String {
        let mut h = Sha256::new();
        for t in [x, y] {
            let (dtype, shape, bytes) = crate::base::tensor_file::bytes_of(t);
            h.update(format!("{dtype:?} {shape:?}\n").as_bytes());
            h.update(&bytes);
        }
        hex(&h.finalize())
    }

    /// The hex key of a victim trained on the split with digest `split` with `spec` from `seed`.
    pub fn key(net: &Network, spec: &VictimTraining, split: &str, seed: u64) -> String {
        let mut h = Sha256::new();
        h.update(format!("{VERSION}\n{net:?}\n{spec:?}\nseed {seed}\nsplit {split}\n").as_bytes());
        hex(&h.finalize())
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The victim saved under `key`, on `device`, if a complete one is there.
    pub fn load(&self, key: &str, net: &Network, device: tch::Device) -> Option<State> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        let loaded = match crate::base::tensor_file::load_tensors(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("victim cache: {e}; training that victim again");
                return None;
            }
        };
        // The shapes a fresh network of this architecture has.
        let template = net.init(device, Kind::Float, 0);
        let take = |prefix: &str, like: &[Tensor]| -> Option<Vec<Tensor>> {
            like.iter()
                .enumerate()
                .map(|(i, l)| {
                    let t = loaded.get(&format!("{prefix}.{i}"))?;
                    (t.size() == l.size()).then(|| t.to_kind(l.kind()).to_device(device))
                })
                .collect()
        };
        let state = State::new(
            take("weight", &template.weights)?,
            take("buffer", &template.buffers)?,
        );
        (loaded.len() == state.weights.len() + state.buffers.len()).then_some(state)
    }

    /// The victim saved under `key`, scored, if this cache holds a complete one.
    pub fn lookup(
        &self,
        data: &EvalData,
        net: &Network,
        key: &str,
        judged: Judged,
    ) -> Option<(Trial, State)> {
        let started = std::time::Instant::now();
        let state = self.load(key, net, data.train_y.device())?;
        let mut trial = score(data, net, &state, judged, started.elapsed().as_secs_f64());
        trial.cached = true;
        Some((trial, state))
    }

    /// Keeps a trained victim under `key` (a failed write only costs the reuse, so it is
    /// logged, not returned).
    pub fn store(&self, key: &str, state: &State, trial: &Trial, net: &Network) {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!("victim cache: cannot create {}: {e}", self.dir.display());
        } else if let Err(e) = save_victim(&self.path(key), state, trial, net) {
            tracing::warn!("victim cache: {e}");
        }
    }
}
