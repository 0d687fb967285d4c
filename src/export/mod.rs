//! Exports: a folder another tool can use without this project: the poisons and the poisoned
//! training split as NumPy archives and in the data set's own format, PNGs, curves, and a
//! manifest with the SHA-256 of every file. Built in a temporary sibling folder and renamed into
//! place when complete, so a failure never leaves a half export.

pub mod curves;
pub mod images;
pub mod native;
pub mod npz;
pub mod verify;

use crate::craft::checkpoint::{self, CheckpointState};
use crate::craft::plan::Plan;
use crate::craft::recolor::Recolor;
use crate::data::{self, Dataset, Format};
use npz::NpyArray;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which optional parts to write (the manifest and `poisons.npz` are always written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formats {
    /// `poisoned_train.npz` and `test.npz`.
    pub datasets: bool,
    /// The poisoned training split in the data set's own format (`native/`).
    pub native: bool,
    pub png: bool,
    pub curves: bool,
}

impl Formats {
    pub const ALL: Formats = Formats {
        datasets: true,
        native: true,
        png: true,
        curves: true,
    };

    /// Parses "npz,native,png,curves" ("all" for everything).
    pub fn parse(list: &str) -> Result<Formats, ExportError> {
        let mut f = Formats {
            datasets: false,
            native: false,
            png: false,
            curves: false,
        };
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => f = Formats::ALL,
                "npz" => f.datasets = true,
                "native" => f.native = true,
                "png" => f.png = true,
                "curves" => f.curves = true,
                other => return Err(ExportError::UnknownFormat(other.to_string())),
            }
        }
        Ok(f)
    }
}

#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub run_dir: PathBuf,
    /// Craft step whose poisons to export (a checkpointed one); `None` = the latest checkpoint.
    pub step: Option<usize>,
    /// Destination; `None` = RUN_DIR/export-step-NNNN.
    pub out: Option<PathBuf>,
    pub formats: Formats,
    pub force: bool,
}

/// Perturbation sizes of the exported (quantised) poisons, 0-255 scale.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantisedNorms {
    pub linf: f64,
    pub mean_l2: f64,
    /// Fraction of pixel values that differ from the base.
    pub changed_fraction: f64,
    /// What the threat model allows: eps + the colour grid's largest shift + 0.5 for rounding.
    pub linf_bound: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    pub source: String,
    pub train_size: usize,
    pub test_size: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub class_names: Vec<String>,
    /// Official indices of the training / test images, for subsets (`data.train_limit`, the
    /// embedded data).
    pub train_origin: Option<Vec<u32>>,
    pub test_origin: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub tool_version: String,
    pub libtorch_version: String,
    pub device: String,
    pub craft_step: usize,
    pub seed: u64,
    pub config: crate::config::Config,
    pub plan: Plan,
    pub dataset: DatasetInfo,
    pub events: Vec<crate::craft::report::Event>,
    pub norms: QuantisedNorms,
    /// Adversarial loss reported at the exported step (mean over surrogates).
    pub final_adv_loss: Option<f64>,
    /// SHA-256 of every other file, by path relative to the export folder.
    pub files: BTreeMap<String, String>,
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(crate::digest::hex(&h.finalize()))
}

/// CHW (per image) -> HWC bytes.
fn chw_to_hwc(data: &[u8], n: usize, c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for i in 0..n {
        let (src, dst) = (
            &data[i * c * h * w..(i + 1) * c * h * w],
            &mut out[i * c * h * w..(i + 1) * c * h * w],
        );
        for ch in 0..c {
            for p in 0..h * w {
                dst[p * c + ch] = src[ch * h * w + p];
            }
        }
    }
    out
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ExportError + '_ {
    move |source| crate::base::fs::failed("write", path)(source).into()
}

/// Why an export was not written; nothing half-written is left behind.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("unknown export format `{0}`: use npz, native, png, curves or all")]
    UnknownFormat(String),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Restore(#[from] checkpoint::RestoreError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("the run's data no longer matches: {0}")]
    DataChanged(crate::craft::plan::PlanError),
    #[error(
        "the data set differs from the one the run crafted on (poison or target indices moved)"
    )]
    IndicesMoved,
    #[error("no poisons saved for step {step} in {run_dir} (saved: {saved})")]
    NoSnapshot {
        step: usize,
        run_dir: PathBuf,
        saved: String,
    },
    #[error("snapshot {path} holds {shape:?}, which does not fit the data set")]
    SnapshotShape { path: PathBuf, shape: Vec<usize> },
    #[error("{0} already exists: choose another --out or pass --force to replace it")]
    Exists(PathBuf),
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("poisons exceed their bound: L-inf {linf} > {bound}")]
    OutOfBound { linf: f64, bound: f64 },
    #[error("cannot hash the export: {0}")]
    Hash(std::io::Error),
    #[error("libtorch: {0}")]
    Tensor(#[from] tch::TchError),
}

/// Writes the export; returns its folder.
pub fn export(req: &ExportRequest) -> Result<PathBuf, ExportError> {
    let loaded = checkpoint::load(&req.run_dir)?;
    let state: CheckpointState = loaded.state;
    let step = req.step.unwrap_or(state.step);
    let snapshot = checkpoint::snapshot_path(&req.run_dir, step);
    let data = data::load(&state.config.data)?;
    let plan = Plan::resolve(&state.config, &data).map_err(ExportError::DataChanged)?;
    if plan.poison_indices != state.plan.poison_indices
        || plan.target_indices != state.plan.target_indices
    {
        return Err(ExportError::IndicesMoved);
    }
    let (shape, chw) = if snapshot.exists() {
        checkpoint::load_poison_snapshot(&snapshot)?
    } else if step == state.step {
        // Runs without snapshots: rebuild the poisons from the checkpoint's perturbation.
        poisons_from_checkpoint(&loaded.tensors, &state, &data, &plan)?
    } else {
        let mut have: Vec<String> = std::fs::read_dir(req.run_dir.join(checkpoint::SNAPSHOT_DIR))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        have.sort();
        return Err(ExportError::NoSnapshot {
            step,
            run_dir: req.run_dir.clone(),
            saved: have.join(", "),
        });
    };
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    if (h, w, c) != (data.train.height, data.train.width, data.train.channels)
        || n != plan.poison_indices.len()
    {
        return Err(ExportError::SnapshotShape {
            path: snapshot,
            shape,
        });
    }
    let out = req
        .out
        .clone()
        .unwrap_or_else(|| req.run_dir.join(format!("export-step-{step:04}")));
    if out.exists() && !req.force {
        return Err(ExportError::Exists(out));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(crate::base::fs::failed("create", parent))?;
    let name = out
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_folder(
        &tmp,
        &state,
        &data,
        &plan,
        step,
        &chw_to_hwc(&chw, n, c, h, w),
        req.formats,
    )
    .and_then(|()| {
        if out.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&out, &old).map_err(io(&out))?;
            std::fs::rename(&tmp, &out)
                .map_err(crate::base::fs::failed("move the export into", &out))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &out)
                .map_err(crate::base::fs::failed("move the export into", &out))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(out)
}

/// The quantised poisons [P, C, H, W] recomputed from a checkpoint's delta and colour grid.
fn poisons_from_checkpoint(
    tensors: &std::collections::HashMap<String, tch::Tensor>,
    state: &CheckpointState,
    data: &Dataset,
    plan: &Plan,
) -> Result<(Vec<usize>, Vec<u8>), ExportError> {
    use crate::craft::perturbation::Perturbation;
    use crate::model::split_tensor;
    let _guard = tch::no_grad_guard();
    let idx = tch::Tensor::from_slice(
        &plan
            .poison_indices
            .iter()
            .map(|&i| i as i64)
            .collect::<Vec<_>>(),
    );
    let base = split_tensor(&data.train, tch::Device::Cpu)
        .index_select(0, &idx)
        .to_kind(tch::Kind::Float);
    let th = &state.config.threat;
    let mut p = Perturbation::zeros(
        base,
        Recolor::new(data.train.channels, th.color_grid),
        th.eps,
        th.color_eps,
    );
    for (name, target) in [("delta", &mut p.delta), ("offsets", &mut p.offsets)] {
        let t = tensors
            .get(name)
            .ok_or_else(|| checkpoint::RestoreError::Missing(name.to_string()))?;
        if t.size() != target.size() {
            return Err(checkpoint::RestoreError::Shape {
                name: name.to_string(),
                found: t.size(),
                expected: target.size(),
            }
            .into());
        }
        target.copy_(&t.to_kind(tch::Kind::Float));
    }
    let q = p.quantised().to_kind(tch::Kind::Uint8).contiguous();
    let shape: Vec<usize> = q.size().iter().map(|&d| d as usize).collect();
    Ok((shape, Vec::<u8>::try_from(q.flatten(0, -1))?))
}

fn write_folder(
    dir: &Path,
    state: &CheckpointState,
    data: &Dataset,
    plan: &Plan,
    step: usize,
    poisons: &[u8],
    formats: Formats,
) -> Result<(), ExportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (h, w, c) = (data.train.height, data.train.width, data.train.channels);
    let per = h * w * c;
    let n = plan.poison_indices.len();
    let base: Vec<u8> = plan
        .poison_indices
        .iter()
        .flat_map(|&i| data.train.image(i).to_vec())
        .collect();
    let as_i64 = |v: &[usize]| v.iter().map(|&i| i as i64).collect::<Vec<_>>();
    let poison_labels: Vec<i64> = plan
        .poison_indices
        .iter()
        .map(|&i| data.train.labels[i] as i64)
        .collect();
    let t = plan.target_indices.len();
    let targets: Vec<u8> = plan
        .target_indices
        .iter()
        .flat_map(|&i| data.test.image(i).to_vec())
        .collect();
    let target_labels: Vec<i64> = plan
        .target_indices
        .iter()
        .map(|&i| data.test.labels[i] as i64)
        .collect();
    let arrays = [
        (
            "poison_images",
            NpyArray::u8(vec![n, h, w, c], poisons.to_vec()),
        ),
        (
            "poison_indices",
            NpyArray::i64(vec![n], &as_i64(&plan.poison_indices)),
        ),
        ("poison_labels", NpyArray::i64(vec![n], &poison_labels)),
        ("base_images", NpyArray::u8(vec![n, h, w, c], base.clone())),
        (
            "target_images",
            NpyArray::u8(vec![t, h, w, c], targets.clone()),
        ),
        (
            "target_indices",
            NpyArray::i64(vec![t], &as_i64(&plan.target_indices)),
        ),
        ("target_labels", NpyArray::i64(vec![t], &target_labels)),
        (
            "target_adv_labels",
            NpyArray::i64(vec![t], &vec![plan.adv_class; t]),
        ),
    ];
    let p = dir.join("poisons.npz");
    npz::write_npz(&p, &arrays.iter().map(|(k, a)| (*k, a)).collect::<Vec<_>>()).map_err(io(&p))?;

    // The whole training split with the poisons in place.
    let mut train = data.train.images.clone();
    for (k, &i) in plan.poison_indices.iter().enumerate() {
        train[i * per..(i + 1) * per].copy_from_slice(&poisons[k * per..(k + 1) * per]);
    }
    if formats.datasets {
        let p = dir.join("poisoned_train.npz");
        let labels: Vec<i64> = data.train.labels.iter().map(|&y| y as i64).collect();
        let images = NpyArray::u8(vec![data.train.len(), h, w, c], train.clone());
        npz::write_npz(
            &p,
            &[
                ("images", &images),
                ("labels", &NpyArray::i64(vec![labels.len()], &labels)),
            ],
        )
        .map_err(io(&p))?;
        let p = dir.join("test.npz");
        let labels: Vec<i64> = data.test.labels.iter().map(|&y| y as i64).collect();
        let images = NpyArray::u8(vec![data.test.len(), h, w, c], data.test.images.clone());
        npz::write_npz(
            &p,
            &[
                ("images", &images),
                ("labels", &NpyArray::i64(vec![labels.len()], &labels)),
            ],
        )
        .map_err(io(&p))?;
    }
    if formats.native {
        let nd = dir.join("native");
        std::fs::create_dir_all(&nd).map_err(io(&nd))?;
        let train_pair = (&train[..], &data.train.labels[..]);
        let test_pair = (&data.test.images[..], &data.test.labels[..]);
        match data.format {
            Format::CifarBinary => {
                native::write_cifar(&nd, train_pair, test_pair).map_err(io(&nd))?;
            }
            Format::CifarPython => {
                native::write_cifar_python(&nd, train_pair, test_pair, &data.class_names)
                    .map_err(io(&nd))?;
            }
            Format::Idx => {
                native::write_idx(&nd, train_pair, test_pair, (h, w)).map_err(io(&nd))?;
            }
        }
    }
    if formats.png {
        let pd = dir.join("png");
        std::fs::create_dir_all(&pd).map_err(io(&pd))?;
        fn img(data: &[u8], h: usize, w: usize, c: usize) -> images::Image<'_> {
            images::Image {
                height: h,
                width: w,
                channels: c,
                data,
            }
        }
        for k in 0..n {
            let (pk, bk) = (
                &poisons[k * per..(k + 1) * per],
                &base[k * per..(k + 1) * per],
            );
            for (kind, bytes) in [
                ("poison", pk.to_vec()),
                ("base", bk.to_vec()),
                ("delta", images::amplified_difference(pk, bk, 10.0)),
            ] {
                let path = pd.join(format!("{kind}_{k:04}.png"));
                images::write_png(&path, &img(&bytes, h, w, c)).map_err(io(&path))?;
            }
        }
        for k in 0..t {
            let path = pd.join(format!("target_{k:02}.png"));
            images::write_png(&path, &img(&targets[k * per..(k + 1) * per], h, w, c))
                .map_err(io(&path))?;
        }
        let shown: Vec<&[u8]> = (0..n.min(256))
            .map(|k| &poisons[k * per..(k + 1) * per])
            .collect();
        let (sh, sw, sheet) = images::contact_sheet(&shown, h, w, c);
        let path = pd.join("contact_sheet.png");
        images::write_png(
            &path,
            &images::Image {
                height: sh,
                width: sw,
                channels: c,
                data: &sheet,
            },
        )
        .map_err(io(&path))?;
    }
    if formats.curves {
        let history: Vec<_> = state
            .history
            .iter()
            .filter(|r| r.step < step)
            .cloned()
            .collect();
        let path = dir.join("curves.csv");
        std::fs::write(&path, curves::csv(&history)).map_err(io(&path))?;
        let path = dir.join("curves.svg");
        std::fs::write(&path, curves::svg(&history)).map_err(io(&path))?;
        let path = dir.join("surrogates.csv");
        std::fs::write(&path, curves::surrogates_csv(&history)).map_err(io(&path))?;
    }

    let recolor = Recolor::new(c, state.config.threat.color_grid);
    let norms = quantised_norms(
        poisons,
        &base,
        n,
        state.config.threat.eps + 255.0 * recolor.max_shift(state.config.threat.color_eps) + 0.5,
    );
    if norms.linf > norms.linf_bound {
        return Err(ExportError::OutOfBound {
            linf: norms.linf,
            bound: norms.linf_bound,
        });
    }
    let mut files = BTreeMap::new();
    collect_hashes(dir, dir, &mut files).map_err(ExportError::Hash)?;
    let manifest = Manifest {
        tool: "metapoison".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        libtorch_version: crate::device::libtorch_version(),
        device: state.device.clone(),
        craft_step: step,
        seed: state.config.run.seed,
        config: state.config.clone(),
        plan: plan.clone(),
        dataset: DatasetInfo {
            name: data.name.clone(),
            source: data.source.clone(),
            train_size: data.train.len(),
            test_size: data.test.len(),
            height: h,
            width: w,
            channels: c,
            class_names: data.class_names.clone(),
            train_origin: data.train_origin.clone(),
            test_origin: data.test_origin.clone(),
        },
        events: state
            .events
            .iter()
            .filter(|e| e.step <= step)
            .cloned()
            .collect(),
        norms,
        final_adv_loss: state
            .history
            .iter()
            .rev()
            .find(|r| r.step < step)
            .and_then(|r| r.adv_loss),
        files,
    };
    let path = dir.join("manifest.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&manifest).expect("manifest serialises"),
    )
    .map_err(io(&path))?;
    Ok(())
}

pub fn quantised_norms(poisons: &[u8], base: &[u8], n: usize, linf_bound: f64) -> QuantisedNorms {
    let per = poisons.len() / n.max(1);
    let mut linf: f64 = 0.0;
    let mut l2_sum = 0.0;
    let mut changed = 0usize;
    for k in 0..n {
        let mut sq = 0.0;
        for j in k * per..(k + 1) * per {
            let d = poisons[j] as f64 - base[j] as f64;
            linf = linf.max(d.abs());
            sq += d * d;
            changed += usize::from(d != 0.0);
        }
        l2_sum += sq.sqrt();
    }
    QuantisedNorms {
        linf,
        mean_l2: l2_sum / n.max(1) as f64,
        changed_fraction: changed as f64 / poisons.len().max(1) as f64,
        linf_bound,
    }
}

fn collect_hashes(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect_hashes(root, &path, out)?;
        } else if path.file_name().is_some_and(|n| n != "manifest.json") {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.insert(rel, sha256_file(&path)?);
        }
    }
    Ok(())
}
