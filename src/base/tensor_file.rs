//! Safetensors files written atomically with a SHA-256 over their tensors and metadata: the
//! storage of checkpoints, poison snapshots and cached victims. Any safetensors reader opens
//! them; no pickle.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
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

pub fn bytes_of(t: &Tensor) -> RawTensor {
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

/// Writes named tensors (and optional string metadata) as one safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    named: &[(String, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TensorFileError> {
    let raw: Vec<(String, RawTensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), bytes_of(t)))
        .collect();
    let corrupt = |message: String| TensorFileError::Corrupt {
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
    write_atomic(path, &bytes).map_err(|source| TensorFileError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The metadata key of a SHA-256 over every tensor of the file (name, dtype, shape and bytes,
/// in name order) and the rest of its metadata (the run's state). safetensors itself checks
/// only the layout, so without it a file damaged after it was written (a bad disk, a copy cut
/// short and padded) would be resumed from.
pub const CHECKSUM_KEY: &str = "sha256";

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
pub fn deserialize_checked<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<(SafeTensors<'a>, HashMap<String, String>), TensorFileError> {
    let corrupt = |message: String| TensorFileError::Corrupt {
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

/// Every tensor of a safetensors file written by `save_tensors`.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>, TensorFileError> {
    let bytes = std::fs::read(path).map_err(|source| TensorFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    tensors_of(&deserialize_checked(&bytes, path)?.0, path)
}

pub fn tensors_of(
    st: &SafeTensors,
    path: &Path,
) -> Result<HashMap<String, Tensor>, TensorFileError> {
    let corrupt = |message: String| TensorFileError::Corrupt {
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

#[cfg(test)]
mod tests {
    use super::*;

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
