//! CIFAR-10 in either of its official versions: the binary batches (records of a label byte and
//! 3072 pixel bytes) and the python version's pickled batches (what torchvision downloads).
//! Both store an image as its R, G, B planes of 32x32; the loader turns them into HWC.

use super::{pickle, DataError, Dataset, Split, CIFAR10_CLASSES};
use std::path::{Path, PathBuf};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

/// Appends one image given as CIFAR's three colour planes, in HWC order.
fn push_hwc(planes: &[u8], out: &mut Vec<u8>) {
    let plane = SIDE * SIDE;
    out.extend((0..PIXELS).map(|i| planes[(i % 3) * plane + i / 3]));
}

fn split(images: Vec<u8>, labels: Vec<u8>) -> Split {
    Split {
        images,
        labels,
        height: SIDE,
        width: SIDE,
        channels: 3,
    }
}

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
    let mut images = Vec::with_capacity(n * PIXELS);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::format(
                path,
                format!("record {i} has label {}, not a class in 0..10", rec[0]),
            ));
        }
        labels.push(rec[0]);
        push_hwc(&rec[1..], &mut images);
    }
    Ok(split(images, labels))
}

/// Parses one batch of the python version (`cifar-10-batches-py/data_batch_1`): a pickled dict
/// whose `data` is a uint8 numpy array [N, 3072] in the binary version's plane order and whose
/// `labels` is a list of N classes. Read without Python; see [`pickle`].
pub fn parse_python_batch(bytes: &[u8], path: &Path) -> Result<Split, DataError> {
    let p = pickle::parse(bytes)
        .map_err(|e| DataError::format(path, format!("not a readable pickle: {e}")))?;
    let bad = |m: String| DataError::format(path, format!("not a CIFAR-10 python batch: {m}"));
    if !matches!(p.get(p.root), pickle::Obj::Dict(_)) {
        return Err(bad("the pickle does not hold a dict".into()));
    }
    if p.dict_get(p.root, "fine_labels").is_some() {
        return Err(bad("it has `fine_labels`, so it is CIFAR-100".into()));
    }
    let entry = |key: &str| {
        p.dict_get(p.root, key)
            .ok_or_else(|| bad(format!("no `{key}` entry")))
    };
    let (data, labels) = (entry("data")?, entry("labels")?);
    let array = p.array(data).map_err(|e| bad(format!("`data` is {e}")))?;
    if array.dtype.trim_start_matches('|') != "u1" {
        return Err(bad(format!(
            "`data` has dtype {}, expected uint8 (u1)",
            array.dtype
        )));
    }
    let [n, width] = array.shape[..] else {
        return Err(bad(format!(
            "`data` has shape {:?}, expected [N, {PIXELS}]",
            array.shape
        )));
    };
    if width != PIXELS || array.data.len() != n * PIXELS {
        return Err(bad(format!(
            "`data` has shape [{n}, {width}] and {} bytes, expected [N, {PIXELS}] and N*{PIXELS}",
            array.data.len()
        )));
    }
    let labels = p
        .ints(labels)
        .ok_or_else(|| bad("`labels` is not a list of integers".into()))?;
    if labels.len() != n {
        return Err(bad(format!("{} labels for {n} images", labels.len())));
    }
    let labels = labels
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            u8::try_from(y)
                .ok()
                .filter(|&y| y < 10)
                .ok_or_else(|| bad(format!("image {i} has label {y}, not a class in 0..10")))
        })
        .collect::<Result<Vec<u8>, _>>()?;
    let mut images = Vec::with_capacity(n * PIXELS);
    for planes in array.data.chunks_exact(PIXELS) {
        push_hwc(planes, &mut images);
    }
    Ok(split(images, labels))
}

/// The two versions the official archives hold.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    Binary,
    Python,
}

impl Version {
    fn file(self, stem: &str) -> String {
        match self {
            Version::Binary => format!("{stem}.bin"),
            Version::Python => stem.to_string(),
        }
    }
}

/// Where the batches are: `dir` itself, or the folder the archive unpacks to inside it
/// (`cifar-10-batches-bin`, or `cifar-10-batches-py`, which is what torchvision's `root` holds).
fn locate(dir: &Path) -> Result<(PathBuf, Version), DataError> {
    if !dir.is_dir() {
        return Err(DataError::format(
            dir,
            "no such folder; set data.path to the folder holding CIFAR-10's batches",
        ));
    }
    for folder in [
        dir.to_path_buf(),
        dir.join("cifar-10-batches-bin"),
        dir.join("cifar-10-batches-py"),
    ] {
        for version in [Version::Binary, Version::Python] {
            if folder.join(version.file("data_batch_1")).is_file() {
                return Ok((folder, version));
            }
        }
    }
    Err(DataError::format(
        dir,
        "no CIFAR-10 batches here: expected data_batch_1.bin .. data_batch_5.bin and test_batch.bin (binary version), data_batch_1 .. data_batch_5 and test_batch (python version), or a cifar-10-batches-bin or cifar-10-batches-py folder holding them; set data.path to that folder",
    ))
}

fn read(folder: &Path, version: Version, stem: &str) -> Result<Split, DataError> {
    let path = folder.join(version.file(stem));
    let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    match version {
        Version::Binary => parse_batch(&bytes, &path),
        Version::Python => parse_python_batch(&bytes, &path),
    }
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

/// Loads the five training batches and the test batch from a folder: the binary version's
/// `data_batch_1.bin` .. `test_batch.bin` or the python version's `data_batch_1` ..
/// `test_batch`, in `dir` or in its `cifar-10-batches-bin` / `cifar-10-batches-py`.
pub fn load_dir(dir: &Path) -> Result<Dataset, DataError> {
    let (folder, version) = locate(dir)?;
    let train = (1..=5)
        .map(|k| read(&folder, version, &format!("data_batch_{k}")))
        .collect::<Result<Vec<_>, _>>()?;
    let name = match version {
        Version::Binary => "binary",
        Version::Python => "python",
    };
    Ok(Dataset {
        name: "cifar10".into(),
        source: format!("{} ({name} version)", folder.display()),
        class_names: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        train: concat(train),
        test: read(&folder, version, "test_batch")?,
        train_origin: None,
        test_origin: None,
    })
}
