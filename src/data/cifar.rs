//! CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32).

use super::{DataError, Dataset, Split, CIFAR10_CLASSES};
use std::path::Path;

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;

/// Parses one batch file's bytes into a split (HWC order).
pub fn parse_batch(bytes: &[u8], path: &Path) -> Result<Split, DataError> {
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(DataError::format(
            path,
            format!(
                "wrong size: a CIFAR-10 batch is a multiple of {RECORD} bytes, found {} ({} whole records and {} bytes over)",
                bytes.len(),
                bytes.len() / RECORD,
                bytes.len() % RECORD
            ),
        ));
    }
    let n = bytes.len() / RECORD;
    let plane = SIDE * SIDE;
    let mut images = vec![0u8; n * 3 * plane];
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::format(
                path,
                format!("record {i} has label {}, not a class in 0..10", rec[0]),
            ));
        }
        labels.push(rec[0]);
        let out = &mut images[i * 3 * plane..(i + 1) * 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                out[p * 3 + c] = rec[1 + c * plane + p];
            }
        }
    }
    Ok(Split {
        images,
        labels,
        height: SIDE,
        width: SIDE,
        channels: 3,
    })
}

fn read(path: &Path) -> Result<Split, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    parse_batch(&bytes, path)
}

fn concat(parts: Vec<Split>) -> Split {
    let mut it = parts.into_iter();
    let mut first = it.next().expect("at least one part");
    for s in it {
        first.images.extend_from_slice(&s.images);
        first.labels.extend_from_slice(&s.labels);
    }
    first
}

/// Loads `data_batch_1.bin`..`data_batch_5.bin` and `test_batch.bin` from a folder (the
/// `cifar-10-batches-bin` folder of the official archive).
pub fn load_dir(dir: &Path) -> Result<Dataset, DataError> {
    let train = (1..=5)
        .map(|k| read(&dir.join(format!("data_batch_{k}.bin"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Dataset {
        name: "cifar10".into(),
        source: dir.display().to_string(),
        class_names: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        train: concat(train),
        test: read(&dir.join("test_batch.bin"))?,
        train_origin: None,
        test_origin: None,
    })
}
