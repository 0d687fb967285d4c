//! Data sets as plain bytes: images in HWC order on the 0-255 scale, labels as class indices.
//! Loaders never panic on bad files; they name the file and what was wrong with it.

pub mod cifar;
pub mod embedded;
pub mod idx;
pub mod pickle;

use crate::config::{DataConfig, DatasetKind, Subset};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{0}")]
    Mismatch(String),
}

impl DataError {
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// One split (train or test) of a data set.
#[derive(Debug, Clone)]
pub struct Split {
    /// `len * height * width * channels` bytes, image by image, each in HWC order.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_bytes(&self) -> usize {
        self.height * self.width * self.channels
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.images[i * n..(i + 1) * n]
    }
    pub fn class_counts(&self, num_classes: usize) -> Vec<usize> {
        let mut counts = vec![0; num_classes];
        for &y in &self.labels {
            if (y as usize) < num_classes {
                counts[y as usize] += 1;
            }
        }
        counts
    }
    /// Indices of the images of one class, in split order.
    pub fn indices_of_class(&self, class: u8) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.labels[i] == class)
            .collect()
    }
}

/// The files a data set came as; an export's `native/` writes the poisoned split back in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// MNIST-style IDX files (Fashion-MNIST, MNIST, the embedded subset).
    Idx,
    /// CIFAR-10's binary version.
    CifarBinary,
    /// CIFAR-10's python version (pickled batches).
    CifarPython,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// Short name, e.g. "fashion-mnist-subset".
    pub name: String,
    /// Where the data came from (files read, or the embedded asset).
    pub source: String,
    pub class_names: Vec<String>,
    pub format: Format,
    pub train: Split,
    pub test: Split,
    /// For subsets: the official index of each training / test image.
    pub train_origin: Option<Vec<u32>>,
    pub test_origin: Option<Vec<u32>>,
}

impl Dataset {
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Keeps the training images at `keep` (ascending), recording each one's index in the
    /// full set (or, for a set that is itself a subset, in the official one).
    pub fn keep_train(&mut self, keep: &[usize]) {
        let n = self.train.image_bytes();
        let mut images = Vec::with_capacity(keep.len() * n);
        for &i in keep {
            images.extend_from_slice(self.train.image(i));
        }
        self.train.images = images;
        self.train.labels = keep.iter().map(|&i| self.train.labels[i]).collect();
        self.train_origin = Some(match &self.train_origin {
            Some(origin) => keep.iter().map(|&i| origin[i]).collect(),
            None => keep.iter().map(|&i| i as u32).collect(),
        });
    }

    /// The per-data-set defaults for the `auto` threat fields:
    /// (target class, target ids, poison class).
    pub fn default_pair(&self) -> (i64, Vec<usize>, i64) {
        if self.name.starts_with("fashion-mnist") {
            // Shirt targets, T-shirt poisons: the closest pair of classes, where a clean-label
            // attack on a small CPU budget has a chance (shared/METAPOISON.md, "Measured here").
            // Id 81: of the shirts that 6 clean 20-epoch ConvNetBN victims all classify
            // correctly by at least 1.5 logits, the one closest to the T-shirt class; the CPU
            // default run flips it in some victims and controls leave it (docs/configuration.md, "The default target").
            (6, vec![81], 0)
        } else {
            // The authors' default: bird targets, dog poisons, target id 0.
            (2, vec![0], 5)
        }
    }

    /// Human-readable summary used by `metapoison data info`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "data set {}\nsource   {}\nimages   {}x{}x{} (HxWxC), {} classes\n",
            self.name,
            self.source,
            self.train.height,
            self.train.width,
            self.train.channels,
            self.num_classes()
        );
        s += &format!(
            "train    {} images\ntest     {} images\n",
            self.train.len(),
            self.test.len()
        );
        let train_counts = self.train.class_counts(self.num_classes());
        let test_counts = self.test.class_counts(self.num_classes());
        s += "class                 train    test\n";
        for (c, name) in self.class_names.iter().enumerate() {
            s += &format!(
                "{c:>2} {name:<16} {:>7} {:>7}\n",
                train_counts[c], test_counts[c]
            );
        }
        s
    }
}

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Loads the data set a config asks for, applying `train_limit`.
pub fn load(config: &DataConfig) -> Result<Dataset, DataError> {
    let mut ds = match config.dataset {
        DatasetKind::Embedded => embedded::load()?,
        DatasetKind::FashionMnist | DatasetKind::Mnist => {
            let dir = config.path.as_deref().unwrap_or(Path::new("."));
            let (name, classes) = if config.dataset == DatasetKind::Mnist {
                ("mnist", names(&MNIST_CLASSES))
            } else {
                ("fashion-mnist", names(&FASHION_MNIST_CLASSES))
            };
            idx::load_dir(dir, name, classes)?
        }
        DatasetKind::Cifar10 => cifar::load(config.path.as_deref().unwrap_or(Path::new(".")))?,
    };
    let limit = config.train_limit();
    if limit > 0 && limit < ds.train.len() {
        let keep = match config.subset() {
            Subset::First => (0..limit).collect(),
            Subset::Balanced => balanced(&ds.train.labels, ds.num_classes(), limit),
        };
        ds.keep_train(&keep);
    }
    Ok(ds)
}

/// Indices of the first `limit / classes` images of each class, in order; the remainder goes
/// one image each to the lowest classes, so that `limit` images are kept where every class has
/// enough. The authors' code takes the same images (it then sorts them by label, an order
/// that does not matter: every epoch shuffles).
pub fn balanced(labels: &[u8], classes: usize, limit: usize) -> Vec<usize> {
    let quota: Vec<usize> = (0..classes)
        .map(|c| limit / classes + usize::from(c < limit % classes))
        .collect();
    let mut taken = vec![0; classes];
    let mut keep = Vec::with_capacity(limit);
    for (i, &y) in labels.iter().enumerate() {
        let c = y as usize;
        if taken[c] < quota[c] {
            taken[c] += 1;
            keep.push(i);
        }
    }
    keep
}
