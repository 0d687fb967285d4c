//! IDX files (MNIST, Fashion-MNIST), gzipped or raw.

use super::{DataError, Dataset, Split};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads a file, gunzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    decode_maybe_gz(&raw, path)
}

pub fn decode_maybe_gz(raw: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(raw)
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw.to_vec())
    }
}

fn header(bytes: &[u8], path: &Path, magic: u32, ndim: usize) -> Result<Vec<usize>, DataError> {
    let need = 4 + 4 * ndim;
    if bytes.len() < need {
        return Err(DataError::format(
            path,
            format!(
                "truncated IDX header: expected at least {need} bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let found = u32::from_be_bytes(bytes[0..4].try_into().unwrap());
    if found != magic {
        return Err(DataError::format(
            path,
            format!("bad IDX magic number: expected {magic:#010x}, found {found:#010x}"),
        ));
    }
    Ok((0..ndim)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().unwrap()) as usize)
        .collect())
}

fn check_size(bytes: &[u8], path: &Path, expected: usize) -> Result<(), DataError> {
    if bytes.len() != expected {
        return Err(DataError::format(
            path,
            format!(
                "wrong size: expected {expected} bytes from its header, found {}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Parses IDX image bytes (u8, 3 dims) into (images, count, height, width).
pub fn parse_images(
    bytes: &[u8],
    path: &Path,
) -> Result<(Vec<u8>, usize, usize, usize), DataError> {
    let dims = header(bytes, path, IMAGES_MAGIC, 3)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    check_size(bytes, path, 16 + n * h * w)?;
    Ok((bytes[16..].to_vec(), n, h, w))
}

pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    let dims = header(bytes, path, LABELS_MAGIC, 1)?;
    check_size(bytes, path, 8 + dims[0])?;
    Ok(bytes[8..].to_vec())
}

/// Builds a split from image and label bytes, checking they agree.
pub fn split_from_bytes(
    images: &[u8],
    images_path: &Path,
    labels: &[u8],
    labels_path: &Path,
    num_classes: usize,
) -> Result<Split, DataError> {
    let (pixels, n, h, w) = parse_images(images, images_path)?;
    let labels = parse_labels(labels, labels_path)?;
    if labels.len() != n {
        return Err(DataError::Mismatch(format!(
            "{} holds {n} images but {} holds {} labels",
            images_path.display(),
            labels_path.display(),
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= num_classes) {
        return Err(DataError::format(
            labels_path,
            format!("label {bad} is not a class in 0..{num_classes}"),
        ));
    }
    Ok(Split {
        images: pixels,
        labels,
        height: h,
        width: w,
        channels: 1,
    })
}

/// Finds `stem` or `stem.gz` in `dir`.
fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(DataError::Io {
        path: dir.join(format!("{stem}[.gz]")),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "file not found (set data.path to the folder holding the IDX files)",
        ),
    })
}

/// Loads `train-images-idx3-ubyte[.gz]` etc. from a folder.
pub fn load_dir(dir: &Path, name: &str, class_names: Vec<String>) -> Result<Dataset, DataError> {
    let k = class_names.len();
    let load = |img: &str, lab: &str| -> Result<Split, DataError> {
        let (ip, lp) = (find(dir, img)?, find(dir, lab)?);
        split_from_bytes(&read_maybe_gz(&ip)?, &ip, &read_maybe_gz(&lp)?, &lp, k)
    };
    Ok(Dataset {
        name: name.to_string(),
        source: dir.display().to_string(),
        class_names,
        format: super::Format::Idx,
        train: load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        test: load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
        train_origin: None,
        test_origin: None,
    })
}
