//! `export --verify`: re-checks an export folder on its own (hashes, shapes, labels, bounds)
//! and summarises it.

use super::npz::{read_npz, NpyArray};
use super::{quantised_norms, sha256_file, Manifest};
use std::collections::BTreeMap;
use std::path::Path;

pub struct Verified {
    pub summary: String,
    /// Everything found wrong; empty when the export is sound.
    pub problems: Vec<String>,
}

fn want<'a>(
    arrays: &'a BTreeMap<String, NpyArray>,
    key: &str,
    descr: &str,
    problems: &mut Vec<String>,
) -> Option<&'a NpyArray> {
    match arrays.get(key) {
        None => {
            problems.push(format!("poisons.npz lacks `{key}`"));
            None
        }
        Some(a) if a.descr != descr => {
            problems.push(format!(
                "poisons.npz `{key}` has dtype {} (expected {descr})",
                a.descr
            ));
            None
        }
        Some(a) => Some(a),
    }
}

/// An export that cannot be checked at all (its problems, when it can, are in `Verified`).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("{path} is not a metapoison manifest: {source}")]
    NotManifest {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Npz(#[from] super::npz::NpyError),
}

pub fn verify(dir: &Path) -> Result<Verified, VerifyError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(crate::base::fs::failed("read", &mpath))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| VerifyError::NotManifest {
            path: mpath.clone(),
            source,
        })?;
    let mut problems = Vec::new();
    for (rel, hash) in &manifest.files {
        match sha256_file(&dir.join(rel)) {
            Ok(h) if &h == hash => {}
            Ok(_) => problems.push(format!("{rel}: SHA-256 does not match the manifest")),
            Err(e) => problems.push(format!("{rel}: {e}")),
        }
    }
    let arrays = read_npz(&dir.join("poisons.npz"))?;
    let (h, w, c) = (
        manifest.dataset.height,
        manifest.dataset.width,
        manifest.dataset.channels,
    );
    let n = manifest.plan.poison_indices.len();
    let mut linf = f64::NAN;
    let poison = want(&arrays, "poison_images", "|u1", &mut problems);
    let base = want(&arrays, "base_images", "|u1", &mut problems);
    let indices = want(&arrays, "poison_indices", "<i8", &mut problems).and_then(NpyArray::as_i64);
    let labels = want(&arrays, "poison_labels", "<i8", &mut problems).and_then(NpyArray::as_i64);
    for key in [
        "target_images",
        "target_indices",
        "target_labels",
        "target_adv_labels",
    ] {
        if !arrays.contains_key(key) {
            problems.push(format!("poisons.npz lacks `{key}`"));
        }
    }
    if let (Some(p), Some(b)) = (poison, base) {
        for (name, a) in [("poison_images", p), ("base_images", b)] {
            if a.shape != vec![n, h, w, c] {
                problems.push(format!(
                    "{name} has shape {:?}, expected {:?}",
                    a.shape,
                    [n, h, w, c]
                ));
            }
        }
        if p.shape == b.shape {
            let norms = quantised_norms(&p.data, &b.data, n, manifest.norms.linf_bound);
            linf = norms.linf;
            if norms.linf > manifest.norms.linf_bound {
                problems.push(format!(
                    "poisons exceed the bound: L-inf {} > {}",
                    norms.linf, manifest.norms.linf_bound
                ));
            }
            if norms != manifest.norms {
                problems.push(format!(
                    "perturbation norms {norms:?} differ from the manifest's {:?}",
                    manifest.norms
                ));
            }
        }
    }
    if let Some(idx) = &indices {
        if idx.iter().map(|&i| i as usize).collect::<Vec<_>>() != manifest.plan.poison_indices {
            problems.push("poison_indices differ from the manifest's plan".into());
        }
    }
    let train = dir.join("poisoned_train.npz");
    if train.exists() {
        let t = read_npz(&train)?;
        match (
            t.get("images"),
            t.get("labels").and_then(NpyArray::as_i64),
            poison,
            &indices,
            &labels,
        ) {
            (Some(img), Some(tl), Some(p), Some(idx), Some(pl)) => {
                let per = h * w * c;
                if img.shape != vec![manifest.dataset.train_size, h, w, c]
                    || tl.len() != manifest.dataset.train_size
                {
                    problems.push(format!("poisoned_train.npz has shape {:?}", img.shape));
                } else {
                    for (k, &i) in idx.iter().enumerate() {
                        let i = i as usize;
                        if img.data[i * per..(i + 1) * per] != p.data[k * per..(k + 1) * per] {
                            problems.push(format!("poisoned_train image {i} is not poison {k}"));
                            break;
                        }
                        if tl[i] != pl[k] {
                            problems.push(format!("label of poison {k} changed: {} in the training split, {} originally", tl[i], pl[k]));
                            break;
                        }
                    }
                }
            }
            _ => problems.push("poisoned_train.npz lacks images or labels".into()),
        }
    }
    let classes = &manifest.dataset.class_names;
    let name = |k: i64| {
        classes
            .get(k as usize)
            .cloned()
            .unwrap_or_else(|| k.to_string())
    };
    let summary = format!(
        "export of {} craft step {} ({} {} on {})\n\
         poisons      {n} images of class {} ({}), {}x{}x{}\n\
         targets      test ids {:?} of class {} -> adversarial class {}\n\
         L-inf        {linf} (bound {:.2}, 0-255 scale), mean L2 {:.2}, {:.1}% of values changed\n\
         adv loss     {}\n\
         files        {} hashed, {}\n\
         verdict      {}",
        manifest.tool,
        manifest.craft_step,
        manifest.config.surrogate.net.name(),
        manifest.dataset.name,
        manifest.device,
        manifest.plan.poison_class,
        name(manifest.plan.poison_class),
        h,
        w,
        c,
        manifest.plan.target_ids,
        name(manifest.plan.target_class),
        name(manifest.plan.adv_class),
        manifest.norms.linf_bound,
        manifest.norms.mean_l2,
        manifest.norms.changed_fraction * 100.0,
        manifest
            .final_adv_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "-".into()),
        manifest.files.len(),
        if problems.iter().any(|p| p.contains("SHA-256")) {
            "some do not match"
        } else {
            "all match"
        },
        if problems.is_empty() {
            "OK".to_string()
        } else {
            format!("{} problem(s)", problems.len())
        }
    );
    Ok(Verified { summary, problems })
}
