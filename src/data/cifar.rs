//! CIFAR-10 in either of its official versions: the binary batches (records of a label byte and
//! 3072 pixel bytes) and the python version's pickled batches (what torchvision downloads).
//! Both store an image as its R, G, B planes of 32x32; the loader turns them into HWC.

use super::{pickle, DataError, Dataset, Format, Split, CIFAR10_CLASSES};
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
    if width != PIXELS || n.checked_mul(PIXELS) != Some(array.data.len()) {
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
    fn name(self) -> &'static str {
        match self {
            Version::Binary => "binary",
            Version::Python => "python",
        }
    }
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

fn parse(bytes: &[u8], path: &Path, version: Version) -> Result<Split, DataError> {
    match version {
        Version::Binary => parse_batch(bytes, path),
        Version::Python => parse_python_batch(bytes, path),
    }
}

fn read(folder: &Path, version: Version, stem: &str) -> Result<Split, DataError> {
    let path = folder.join(version.file(stem));
    let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    parse(&bytes, &path, version)
}

/// The six batch files of either version, without the binary version's `.bin`: five training
/// batches, then the test batch.
pub const BATCH_STEMS: [&str; 6] = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
];

/// Whether `path` names an archive (`.tar.gz`, `.tgz` or `.tar`) rather than a folder.
fn is_archive(path: &Path) -> bool {
    let name = path.to_string_lossy();
    [".tar.gz", ".tgz", ".tar"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// Reads the batches straight from an official archive (`cifar-10-binary.tar.gz` or
/// `cifar-10-python.tar.gz`), wherever in it they are, without unpacking it to disk.
fn load_archive(archive: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(archive).map_err(|source| DataError::Io {
        path: archive.into(),
        source,
    })?;
    let name = archive.to_string_lossy();
    let reader: Box<dyn std::io::Read> = if name.ends_with(".tar") {
        Box::new(std::io::BufReader::new(file))
    } else {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    };
    let broken =
        |e: std::io::Error| DataError::format(archive, format!("not a readable tar archive: {e}"));
    let mut found: std::collections::HashMap<String, Vec<u8>> = Default::default();
    for entry in tar::Archive::new(reader).entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let file_name = entry
            .path()
            .map_err(broken)?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let Some(file_name) = file_name else { continue };
        let wanted = BATCH_STEMS
            .iter()
            .any(|s| file_name == *s || file_name == format!("{s}.bin"));
        if wanted {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(broken)?;
            found.insert(file_name, bytes);
        }
    }
    let version = [Version::Binary, Version::Python]
        .into_iter()
        .find(|v| found.contains_key(&v.file("data_batch_1")))
        .ok_or_else(|| {
            DataError::format(
                archive,
                "no CIFAR-10 batches in this archive (data_batch_1.bin or data_batch_1); use cifar-10-binary.tar.gz or cifar-10-python.tar.gz",
            )
        })?;
    let mut splits = Vec::new();
    for stem in BATCH_STEMS {
        let file = version.file(stem);
        let bytes = found
            .get(&file)
            .ok_or_else(|| DataError::format(archive, format!("the archive has no {file}")))?;
        splits.push(parse(bytes, &archive.join(&file), version)?);
    }
    let test = splits.pop().expect("six batches");
    Ok(dataset(
        format!("{} ({} version)", archive.display(), version.name()),
        version,
        splits,
        test,
    ))
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

fn dataset(source: String, version: Version, train: Vec<Split>, test: Split) -> Dataset {
    Dataset {
        name: "cifar10".into(),
        source,
        class_names: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        format: match version {
            Version::Binary => Format::CifarBinary,
            Version::Python => Format::CifarPython,
        },
        train: concat(train),
        test,
        train_origin: None,
        test_origin: None,
    }
}

/// Loads the five training batches and the test batch from a folder (the binary version's
/// `data_batch_1.bin` .. `test_batch.bin` or the python version's `data_batch_1` ..
/// `test_batch`, in `path` or in its `cifar-10-batches-bin` / `cifar-10-batches-py`), or from
/// an official archive when `path` is a `.tar.gz`.
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    if is_archive(path) {
        return load_archive(path);
    }
    let (folder, version) = locate(path)?;
    let train = BATCH_STEMS[..5]
        .iter()
        .map(|stem| read(&folder, version, stem))
        .collect::<Result<Vec<_>, _>>()?;
    let test = read(&folder, version, BATCH_STEMS[5])?;
    Ok(dataset(
        format!("{} ({} version)", folder.display(), version.name()),
        version,
        train,
        test,
    ))
}
