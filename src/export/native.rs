//! The poisoned training split in the data set's own format, so standard loaders train on it
//! unchanged: CIFAR-10 binary batches, or gzipped IDX files.

use crate::data::pickle::op;
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

/// Protocol-2 pickles written as Python 2's cPickle wrote CIFAR-10's python version (its
/// strings are Python 2 `str`s, so readers load them with `encoding="bytes"`, as the
/// official files): every object memoised with BINPUT, opcodes by pickletools' names.
struct Py2Pickle {
    out: Vec<u8>,
    memo: u32,
}

impl Py2Pickle {
    fn new() -> Self {
        Py2Pickle {
            out: vec![op::PROTO, 2],
            memo: 0,
        }
    }
    fn emit(&mut self, code: u8) {
        self.out.push(code);
    }
    fn put(&mut self) {
        self.memo += 1;
        if self.memo < 256 {
            self.out.extend_from_slice(&[op::BINPUT, self.memo as u8]);
        } else {
            self.emit(op::LONG_BINPUT);
            self.out.extend_from_slice(&self.memo.to_le_bytes());
        }
    }
    fn int(&mut self, v: i32) {
        match v {
            0..=255 => self.out.extend_from_slice(&[op::BININT1, v as u8]),
            256..=65535 => {
                self.emit(op::BININT2);
                self.out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            _ => {
                self.emit(op::BININT);
                self.out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    fn string(&mut self, s: &[u8]) {
        if s.len() < 256 {
            self.out
                .extend_from_slice(&[op::SHORT_BINSTRING, s.len() as u8]);
        } else {
            self.emit(op::BINSTRING);
            self.out.extend_from_slice(&(s.len() as i32).to_le_bytes());
        }
        self.out.extend_from_slice(s);
        self.put();
    }
    fn global(&mut self, module: &str, name: &str) {
        self.emit(op::GLOBAL);
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self.put();
    }
    /// A list, appended in runs of 1000 as cPickle does.
    fn list<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.emit(op::EMPTY_LIST);
        self.put();
        for run in items.chunks(1000) {
            self.emit(op::MARK);
            for x in run {
                item(self, x);
            }
            self.emit(op::APPENDS);
        }
    }
    /// numpy's `uint8` array [rows, cols] of `data`, as numpy pickles one.
    fn uint8_array(&mut self, data: &[u8], rows: usize, cols: usize) {
        self.global("numpy.core.multiarray", "_reconstruct");
        self.global("numpy", "ndarray");
        self.int(0);
        self.emit(op::TUPLE1);
        self.put();
        self.string(b"b");
        self.emit(op::TUPLE3);
        self.put();
        self.emit(op::REDUCE);
        self.put();
        self.emit(op::MARK);
        self.int(1);
        self.int(rows as i32);
        self.int(cols as i32);
        self.emit(op::TUPLE2);
        self.put();
        self.global("numpy", "dtype");
        self.string(b"u1");
        self.int(0);
        self.int(1);
        self.emit(op::TUPLE3);
        self.put();
        self.emit(op::REDUCE);
        self.put();
        self.emit(op::MARK);
        self.int(3);
        self.string(b"|");
        self.out.extend_from_slice(&[op::NONE; 3]);
        self.int(-1);
        self.int(-1);
        self.int(0);
        self.emit(op::TUPLE);
        self.put();
        self.emit(op::BUILD);
        self.emit(op::NEWFALSE);
        self.string(data);
        self.emit(op::TUPLE);
        self.put();
        self.emit(op::BUILD);
    }
    /// Opens the pickle's top-level dict; `key` then a value, for each item; `finish` closes it.
    fn dict() -> Self {
        let mut p = Py2Pickle::new();
        p.emit(op::EMPTY_DICT);
        p.put();
        p.emit(op::MARK);
        p
    }
    fn key(&mut self, key: &str) {
        self.string(key.as_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        self.emit(op::SETITEMS);
        self.emit(op::STOP);
        self.out
    }
}

/// One batch of CIFAR-10's python version: `data` [N, 3072] in plane order, `labels`,
/// `batch_label`, and `filenames` (`{prefix}_{index}.png`, the index in the whole split).
fn python_batch(
    images: &[u8],
    labels: &[u8],
    batch_label: &str,
    prefix: &str,
    first: usize,
) -> Vec<u8> {
    let planes: Vec<u8> = cifar_records(images, labels, 32)
        .chunks_exact(1 + 3072)
        .flat_map(|r| r[1..].to_vec())
        .collect();
    let mut p = Py2Pickle::dict();
    p.key("data");
    p.uint8_array(&planes, labels.len(), 3072);
    p.key("labels");
    p.list(labels, |p, &y| p.int(y as i32));
    p.key("batch_label");
    p.string(batch_label.as_bytes());
    p.key("filenames");
    let indices: Vec<usize> = (first..first + labels.len()).collect();
    p.list(&indices, |p, i| {
        p.string(format!("{prefix}_{i:05}.png").as_bytes())
    });
    p.finish()
}

/// Writes CIFAR-10's python version into `dir/cifar-10-batches-py`: `data_batch_1` ..
/// `data_batch_5` (the split cut as for the binary version), `test_batch` and `batches.meta`,
/// so that a loader given `dir` as its root (torchvision's `CIFAR10`, once its checksum check of
/// the official files is bypassed) or the folder itself (Keras, the CIFAR-10 page's recipe)
/// reads the poisoned split.
pub fn write_cifar_python(
    dir: &Path,
    train: (&[u8], &[u8]),
    test: (&[u8], &[u8]),
    class_names: &[String],
) -> std::io::Result<Vec<String>> {
    const FOLDER: &str = "cifar-10-batches-py";
    std::fs::create_dir_all(dir.join(FOLDER))?;
    let per_image = 32 * 32 * 3;
    let n = train.1.len();
    let mut names = Vec::new();
    let mut write = |name: String, bytes: Vec<u8>| -> std::io::Result<()> {
        let name = format!("{FOLDER}/{name}");
        std::fs::write(dir.join(&name), bytes)?;
        names.push(name);
        Ok(())
    };
    for k in 0..5 {
        let (start, end) = (k * n / 5, (k + 1) * n / 5);
        let batch = python_batch(
            &train.0[start * per_image..end * per_image],
            &train.1[start..end],
            &format!("training batch {} of 5 (poisoned)", k + 1),
            "train",
            start,
        );
        write(format!("data_batch_{}", k + 1), batch)?;
    }
    write(
        "test_batch".into(),
        python_batch(test.0, test.1, "testing batch 1 of 1", "test", 0),
    )?;
    let mut meta = Py2Pickle::dict();
    meta.key("num_cases_per_batch");
    meta.int((n / 5) as i32);
    meta.key("label_names");
    meta.list(class_names, |p, c| p.string(c.as_bytes()));
    meta.key("num_vis");
    meta.int(3072);
    let meta = meta.finish();
    write("batches.meta".into(), meta)?;
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
