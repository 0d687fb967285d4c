//! The poisoned training split in the data set's own format, so standard loaders train on it
//! unchanged: CIFAR-10 binary batches, or gzipped IDX files.

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;
use std::path::Path;

/// CIFAR-10 records (label, R plane, G plane, B plane) from HWC images.
pub fn cifar_records(images: &[u8], labels: &[u8], side: usize) -> Vec<u8> {
    let plane = side * side;
    let mut out = Vec::with_capacity(labels.len() * (1 + 3 * plane));
    for (i, &y) in labels.iter().enumerate() {
        out.push(y);
        let img = &images[i * 3 * plane..(i + 1) * 3 * plane];
        for c in 0..3 {
            out.extend((0..plane).map(|p| img[p * 3 + c]));
        }
    }
    out
}

/// Writes `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`. The training split is
/// cut into five even batches, whatever its size (10,000 images each for the whole of
/// CIFAR-10, as the original): loaders open all five files, so a subset such as the 5,000 images
/// of `train_limit = "auto"` must still come as five.
pub fn write_cifar(
    dir: &Path,
    train: (&[u8], &[u8]),
    test: (&[u8], &[u8]),
) -> std::io::Result<Vec<String>> {
    const BATCHES: usize = 5;
    let per_image = 32 * 32 * 3;
    let n = train.1.len();
    let mut names = Vec::new();
    for k in 0..BATCHES {
        let (start, end) = (k * n / BATCHES, (k + 1) * n / BATCHES);
        let images = &train.0[start * per_image..end * per_image];
        let name = format!("data_batch_{}.bin", k + 1);
        std::fs::write(
            dir.join(&name),
            cifar_records(images, &train.1[start..end], 32),
        )?;
        names.push(name);
    }
    std::fs::write(
        dir.join("test_batch.bin"),
        cifar_records(test.0, test.1, 32),
    )?;
    names.push("test_batch.bin".into());
    Ok(names)
}

fn write_gz(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut gz = GzEncoder::new(std::fs::File::create(path)?, Compression::default());
    for p in parts {
        gz.write_all(p)?;
    }
    gz.finish()?.sync_all()
}

/// Writes the four gzipped IDX files of an MNIST-style data set.
pub fn write_idx(
    dir: &Path,
    train: (&[u8], &[u8]),
    test: (&[u8], &[u8]),
    side: (usize, usize),
) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for (prefix, (images, labels)) in [("train", train), ("t10k", test)] {
        let n = labels.len() as u32;
        let mut h = vec![0, 0, 8, 3];
        for d in [n, side.0 as u32, side.1 as u32] {
            h.extend_from_slice(&d.to_be_bytes());
        }
        let img_name = format!("{prefix}-images-idx3-ubyte.gz");
        write_gz(&dir.join(&img_name), &[&h, images])?;
        let mut lh = vec![0, 0, 8, 1];
        lh.extend_from_slice(&n.to_be_bytes());
        let lab_name = format!("{prefix}-labels-idx1-ubyte.gz");
        write_gz(&dir.join(&lab_name), &[&lh, labels])?;
        names.push(img_name);
        names.push(lab_name);
    }
    Ok(names)
}
