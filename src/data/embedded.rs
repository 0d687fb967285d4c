//! The Fashion-MNIST subset compiled into the binary (assets/fashion-mnist-subset/), so the
//! default run needs no files and no network.

use super::{idx, DataError, Dataset, FASHION_MNIST_CLASSES};
use std::path::Path;

const TRAIN_IMAGES: &[u8] =
    include_bytes!("../../assets/fashion-mnist-subset/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] =
    include_bytes!("../../assets/fashion-mnist-subset/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] =
    include_bytes!("../../assets/fashion-mnist-subset/test-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] =
    include_bytes!("../../assets/fashion-mnist-subset/test-labels-idx1-ubyte.gz");
const TRAIN_INDICES: &str = include_str!("../../assets/fashion-mnist-subset/train-indices.txt");
const TEST_INDICES: &str = include_str!("../../assets/fashion-mnist-subset/test-indices.txt");

fn origin(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

pub fn load() -> Result<Dataset, DataError> {
    let path = |name: &str| Path::new("assets/fashion-mnist-subset").join(name);
    let split = |img: &[u8], img_name: &str, lab: &[u8], lab_name: &str| {
        let (ip, lp) = (path(img_name), path(lab_name));
        idx::split_from_bytes(
            &idx::decode_maybe_gz(img, &ip)?,
            &ip,
            &idx::decode_maybe_gz(lab, &lp)?,
            &lp,
            10,
        )
    };
    Ok(Dataset {
        name: "fashion-mnist-subset".into(),
        source: "embedded: class-balanced subset of Fashion-MNIST (MIT, Zalando SE); see assets/fashion-mnist-subset/ATTRIBUTION.md".into(),
        class_names: FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
        format: super::Format::Idx,
        train: split(TRAIN_IMAGES, "train-images-idx3-ubyte.gz", TRAIN_LABELS, "train-labels-idx1-ubyte.gz")?,
        test: split(TEST_IMAGES, "test-images-idx3-ubyte.gz", TEST_LABELS, "test-labels-idx1-ubyte.gz")?,
        train_origin: Some(origin(TRAIN_INDICES)),
        test_origin: Some(origin(TEST_INDICES)),
    })
}
