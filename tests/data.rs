//! Loaders on real bytes: the embedded Fashion-MNIST subset, the CIFAR-10 fixture built from 20
//! real test images, and corrupt or truncated files.

mod common;

use metapoison::config::{Auto, DataConfig, DatasetKind, Subset};
use metapoison::data::{self, cifar, idx};
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar10")
}

#[test]
fn embedded_subset_sizes_counts_and_labels() {
    let ds = data::embedded::load().unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (10_000, 2_000));
    assert_eq!(
        (ds.train.height, ds.train.width, ds.train.channels),
        (28, 28, 1)
    );
    assert_eq!(ds.train.class_counts(10), vec![1000; 10]);
    assert_eq!(ds.test.class_counts(10), vec![200; 10]);
    // The first labels of the official files (the subset keeps their order).
    assert_eq!(&ds.test.labels[..10], &[9, 2, 1, 1, 6, 1, 4, 6, 5, 7]);
    assert_eq!(&ds.train.labels[..10], &[9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
    let origin = ds.train_origin.as_ref().unwrap();
    assert_eq!(origin.len(), 10_000);
    assert_eq!(&origin[..3], &[0, 1, 2]);
    assert!(origin.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*ds.test_origin.as_ref().unwrap().last().unwrap(), 2087);
    // Real image content: a non-blank first image with values over the whole range.
    let img = ds.train.image(0);
    assert_eq!(img.len(), 784);
    assert_eq!(*img.iter().max().unwrap(), 255);
    assert_eq!(img[0], 0);
}

#[test]
fn train_limit_keeps_a_balanced_subset_or_the_first_images() {
    let full = data::embedded::load().unwrap();
    let load = |subset| {
        data::load(&DataConfig {
            dataset: DatasetKind::Embedded,
            path: None,
            train_limit: 5000.into(),
            subset: Auto::Value(subset),
        })
        .unwrap()
    };
    // Balanced (the authors' way, `auto` on CUDA): the first 500 of each class, in order.
    let ds = load(Subset::Balanced);
    assert_eq!(ds.train.len(), 5000);
    assert_eq!(ds.train.class_counts(10), vec![500; 10]);
    assert_eq!(ds.test.len(), 2000);
    let origin = ds.train_origin.as_ref().unwrap();
    let full_origin = full.train_origin.as_ref().unwrap();
    let mut expected: Vec<usize> = (0..10u8)
        .flat_map(|c| full.train.indices_of_class(c).into_iter().take(500))
        .collect();
    expected.sort();
    assert_eq!(origin.len(), 5000);
    for (k, &i) in expected.iter().enumerate() {
        assert_eq!(origin[k], full_origin[i], "image {k}");
        assert_eq!(ds.train.image(k), full.train.image(i), "image {k}");
        assert_eq!(ds.train.labels[k], full.train.labels[i]);
    }
    // First (`auto` on a CPU): the first 5000 images, whatever their classes.
    let ds = load(Subset::First);
    assert_eq!(ds.train.images, full.train.images[..5000 * 784]);
    assert_eq!(ds.train_origin.unwrap(), full_origin[..5000]);
    assert_ne!(ds.train.class_counts(10), vec![500; 10]);
}

#[test]
fn a_balanced_subset_spreads_the_remainder_and_keeps_what_a_short_class_has() {
    // Classes 0..3; class 2 has only one image.
    let labels = [0u8, 1, 0, 2, 1, 0, 1, 0, 1, 0];
    assert_eq!(data::balanced(&labels, 3, 5), vec![0, 1, 2, 3, 4]);
    // 7 = 3 + 2 + 2: class 0 takes the extra one; class 2 has only 1, so 6 are kept.
    assert_eq!(data::balanced(&labels, 3, 7), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(data::balanced(&labels, 3, 4), vec![0, 1, 2, 3]);
    assert_eq!(data::balanced(&labels, 3, 3), vec![0, 1, 3]);
}

#[test]
fn cifar_fixture_labels_and_pixels() {
    let path = fixture_dir().join("test_batch.bin");
    let split = cifar::parse_batch(&std::fs::read(&path).unwrap(), &path).unwrap();
    assert_eq!(split.len(), 20);
    assert_eq!(
        split.labels,
        vec![3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    );
    let img = split.image(0);
    assert_eq!(&img[0..3], &[158, 112, 49]); // pixel (0, 0), RGB
    let last = (31 * 32 + 31) * 3;
    assert_eq!(&img[last..last + 3], &[21, 67, 110]); // pixel (31, 31)
    let p = (10 * 32 + 5) * 3;
    assert_eq!(&img[p..p + 3], &[155, 112, 50]); // pixel (row 10, col 5)
}

#[test]
fn cifar_folder_loads_and_names_missing_batches() {
    let dir = tempfile::tempdir().unwrap();
    let batch = std::fs::read(fixture_dir().join("test_batch.bin")).unwrap();
    for k in 1..=5 {
        std::fs::write(dir.path().join(format!("data_batch_{k}.bin")), &batch).unwrap();
    }
    std::fs::write(dir.path().join("test_batch.bin"), &batch).unwrap();
    let ds = cifar::load(dir.path()).unwrap();
    assert_eq!(
        (ds.train.len(), ds.test.len(), ds.num_classes()),
        (100, 20, 10)
    );
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    let e = cifar::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("data_batch_3.bin"), "{e}");
}

#[test]
fn cifar_truncated_and_bad_label() {
    let path = fixture_dir().join("test_batch.bin");
    let bytes = std::fs::read(&path).unwrap();
    let e = cifar::parse_batch(&bytes[..bytes.len() - 10], Path::new("x.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.bin") && e.contains("multiple of 3073") && e.contains("61450"),
        "{e}"
    );
    let mut bad = bytes.clone();
    bad[3073] = 12;
    let e = cifar::parse_batch(&bad, Path::new("y.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("y.bin") && e.contains("record 1") && e.contains("label 12"),
        "{e}"
    );
}

fn py_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cifar10-py")
        .join(name)
}

fn binary_fixture() -> metapoison::data::Split {
    let path = fixture_dir().join("test_batch.bin");
    cifar::parse_batch(&std::fs::read(&path).unwrap(), &path).unwrap()
}

#[test]
fn cifar_python_batches_hold_the_same_images_as_the_binary_ones() {
    let binary = binary_fixture();
    // The official python version's form (Python 2 cPickle, protocol 2): all 20 images.
    let path = py_fixture("test_batch");
    let python = cifar::parse_python_batch(&std::fs::read(&path).unwrap(), &path).unwrap();
    assert_eq!(python.labels, binary.labels);
    assert_eq!(python.images, binary.images);
    assert_eq!(python.image_bytes(), 32 * 32 * 3);
    // Re-pickled by Python 3 with numpy at protocols 2, 4 and 5: the first 3 images.
    for name in ["py3-proto2", "py3-proto4", "py3-proto5"] {
        let path = py_fixture(name);
        let s = cifar::parse_python_batch(&std::fs::read(&path).unwrap(), &path).unwrap();
        assert_eq!(s.labels, &binary.labels[..3], "{name}");
        assert_eq!(s.images, &binary.images[..3 * 3072], "{name}");
    }
}

#[test]
fn cifar_folders_of_either_version_load_from_the_folder_or_its_parent() {
    let batch = std::fs::read(py_fixture("test_batch")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("cifar-10-batches-py");
    std::fs::create_dir(&py).unwrap();
    for k in 1..=5 {
        std::fs::write(py.join(format!("data_batch_{k}")), &batch).unwrap();
    }
    std::fs::write(py.join("test_batch"), &batch).unwrap();
    let config = |path: &Path| DataConfig {
        dataset: DatasetKind::Cifar10,
        path: Some(path.to_path_buf()),
        train_limit: 1000.into(),
        ..Default::default()
    };
    // torchvision's root (the parent) and the batches folder itself give the same data.
    for path in [dir.path(), py.as_path()] {
        let ds = data::load(&config(path)).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (100, 20));
        assert_eq!(&ds.train.images[..3072 * 20], &binary_fixture().images[..]);
        assert!(
            ds.source.ends_with("cifar-10-batches-py (python version)"),
            "{}",
            ds.source
        );
    }
    // A missing batch is named.
    std::fs::remove_file(py.join("data_batch_4")).unwrap();
    let e = data::load(&config(dir.path())).unwrap_err().to_string();
    assert!(e.contains("data_batch_4") && !e.contains(".bin"), "{e}");
    // A folder with neither version says what it looked for and which field to set.
    let empty = tempfile::tempdir().unwrap();
    let e = data::load(&config(empty.path())).unwrap_err().to_string();
    assert!(
        e.contains("no CIFAR-10 batches")
            && e.contains("cifar-10-batches-py")
            && e.contains("data.path"),
        "{e}"
    );
    let e = data::load(&config(&empty.path().join("nope")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("no such folder"), "{e}");
}

#[test]
fn damaged_cifar_python_batches_are_one_line_errors() {
    let good = std::fs::read(py_fixture("test_batch")).unwrap();
    let check = |bytes: &[u8], wants: &[&str]| {
        let e = cifar::parse_python_batch(bytes, Path::new("b/data_batch_2"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        for w in wants {
            assert!(e.contains("b/data_batch_2") && e.contains(w), "{w}: {e}");
        }
    };
    let edit = |from: &[u8], to: &[u8]| {
        let at = good.windows(from.len()).position(|w| w == from).unwrap();
        let mut b = good.clone();
        b[at..at + to.len()].copy_from_slice(to);
        b
    };
    check(
        &good[..good.len() / 2],
        &["not a readable pickle", "truncated"],
    );
    check(&edit(b"U\x04data", b"U\x04date"), &["no `data` entry"]);
    check(&edit(b"U\x02u1", b"U\x02i1"), &["dtype i1", "uint8"]);
    // The labels list starts 3, 8, 8: make the second one 12.
    check(
        &edit(b"(K\x03K\x08K\x08", b"(K\x03K\x0c"),
        &["image 1 has label 12"],
    );
    // Shape 20 x 3072 claimed as 21 x 3072, and as 2^62 x 3072 (whose byte count overflows).
    check(&edit(b"K\x14M\x00\x0c", b"K\x15"), &["shape [21, 3072]"]);
    let huge = [b"\x8a\x08".as_slice(), &(1u64 << 62).to_le_bytes()].concat();
    let at = good
        .windows(5)
        .position(|w| w == b"K\x14M\x00\x0c")
        .unwrap();
    let mut b = good[..at].to_vec();
    b.extend_from_slice(&huge);
    b.extend_from_slice(&good[at + 2..]);
    check(&b, &["shape [4611686018427387904, 3072]"]);
    // CIFAR-100 keeps its classes under fine_labels.
    check(
        &edit(b"U\x0bbatch_label", b"U\x0bfine_labels"),
        &["CIFAR-100"],
    );
    // Not a pickle at all: a binary batch given to the python reader.
    check(
        &std::fs::read(fixture_dir().join("test_batch.bin")).unwrap(),
        &["not a readable pickle"],
    );
}

#[test]
fn no_damage_to_a_python_batch_makes_the_reader_panic() {
    // Flipped bytes in the pickle's opcodes and headers (the first 400 bytes and the tail
    // after the pixel data), and truncations anywhere: each gives Ok or an error, never a
    // panic or an allocation the file cannot back.
    let good = std::fs::read(py_fixture("test_batch")).unwrap();
    let path = Path::new("fuzzed");
    let mut rng = metapoison::base::rng::SplitMix64::new(2026);
    let tail = good.len() - 400;
    let (mut ok, mut errors) = (0, 0);
    for round in 0..3000 {
        let mut bytes = good.clone();
        let flips = 1 + (rng.next_u64() % 3) as usize;
        for _ in 0..flips {
            let r = rng.next_u64() as usize;
            let at = if r % 2 == 0 {
                r / 2 % 400
            } else {
                tail + r / 2 % 400
            };
            bytes[at] = rng.next_u64() as u8;
        }
        if round % 10 == 0 {
            bytes.truncate(rng.next_u64() as usize % good.len());
        }
        match cifar::parse_python_batch(&bytes, path) {
            Ok(s) => {
                assert_eq!(s.images.len(), s.len() * 3072);
                ok += 1;
            }
            Err(e) => {
                assert!(e.to_string().starts_with("fuzzed: "), "{e}");
                errors += 1;
            }
        }
    }
    // Both outcomes happen: the damage is neither always harmless nor always fatal.
    assert!(ok > 100 && errors > 100, "{ok} read, {errors} refused");
}

/// A tar archive (gzipped unless `name` ends in .tar) of `files` under `folder/`, as the
/// official CIFAR-10 archives are laid out.
fn archive(dir: &Path, name: &str, folder: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let write = |w: &mut dyn std::io::Write| {
        let mut tar = tar::Builder::new(w);
        for (file_name, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("{folder}/{file_name}"), *bytes)
                .unwrap();
        }
        tar.finish().unwrap();
    };
    if name.ends_with(".tar") {
        write(&mut &file);
    } else {
        let mut gz = flate2::write::GzEncoder::new(&file, flate2::Compression::fast());
        write(&mut gz);
        gz.finish().unwrap();
    }
    path
}

#[test]
fn cifar_loads_straight_from_either_official_archive() {
    let dir = tempfile::tempdir().unwrap();
    let py = std::fs::read(py_fixture("test_batch")).unwrap();
    let bin = std::fs::read(fixture_dir().join("test_batch.bin")).unwrap();
    let stems = cifar::BATCH_STEMS;
    let py_names: Vec<String> = stems.iter().map(|s| s.to_string()).collect();
    let bin_names: Vec<String> = stems.iter().map(|s| format!("{s}.bin")).collect();
    let mut py_files: Vec<(&str, &[u8])> = py_names.iter().map(|n| (n.as_str(), &py[..])).collect();
    py_files.insert(0, ("batches.meta", b"not a batch"));
    py_files.push(("readme.html", b"<html>"));
    let bin_files: Vec<(&str, &[u8])> = bin_names.iter().map(|n| (n.as_str(), &bin[..])).collect();
    let binary = binary_fixture();
    for path in [
        archive(
            dir.path(),
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            &py_files,
        ),
        archive(
            dir.path(),
            "cifar-10-binary.tar",
            "cifar-10-batches-bin",
            &bin_files,
        ),
    ] {
        let ds = cifar::load(&path).unwrap();
        assert_eq!(
            (ds.train.len(), ds.test.len()),
            (100, 20),
            "{}",
            path.display()
        );
        assert_eq!(ds.test.images, binary.images);
        assert_eq!(&ds.train.labels[80..], &binary.labels[..]);
        assert!(
            ds.source.starts_with(&path.display().to_string()),
            "{}",
            ds.source
        );
    }
    // A batch missing from the archive, a damaged batch inside it, a truncated archive, and
    // an archive that is not there: one line each, naming the archive.
    let gz = archive(dir.path(), "short.tar.gz", "x", &py_files[..5]);
    let e = cifar::load(&gz).unwrap_err().to_string();
    assert!(
        e.contains("short.tar.gz") && e.contains("has no data_batch_5"),
        "{e}"
    );
    let mut damaged = py_files.clone();
    damaged[3].1 = &py[..1000];
    let gz = archive(dir.path(), "damaged.tgz", "x", &damaged);
    let e = cifar::load(&gz).unwrap_err().to_string();
    assert!(
        e.contains("damaged.tgz/data_batch_3") && e.contains("truncated"),
        "{e}"
    );
    let whole = std::fs::read(dir.path().join("cifar-10-python.tar.gz")).unwrap();
    let cut = dir.path().join("cut.tar.gz");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = cifar::load(&cut).unwrap_err().to_string();
    assert!(
        e.contains("cut.tar.gz") && e.contains("not a readable tar archive"),
        "{e}"
    );
    let e = cifar::load(&dir.path().join("absent.tar.gz"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.tar.gz") && e.contains("No such file"),
        "{e}"
    );
}

fn idx_images(n: u32, h: u32, w: u32) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend((0..n * h * w).map(|i| (i % 251) as u8));
    v
}

#[test]
fn idx_bad_magic_truncated_and_corrupt_gzip() {
    let good = idx_images(3, 4, 4);
    assert_eq!(idx::parse_images(&good, Path::new("a")).unwrap().1, 3);
    let mut bad = good.clone();
    bad[3] = 1;
    let e = idx::parse_images(&bad, Path::new("imgs.idx"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("imgs.idx")
            && e.contains("magic")
            && e.contains("0x00000803")
            && e.contains("0x00000801"),
        "{e}"
    );
    let e = idx::parse_images(&good[..good.len() - 5], Path::new("t.idx"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.idx") && e.contains("expected 64 bytes") && e.contains("found 59"),
        "{e}"
    );
    let e = idx::parse_images(&good[..6], Path::new("h.idx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated IDX header"), "{e}");
    let e = idx::decode_maybe_gz(&[0x1f, 0x8b, 8, 0, 1, 2, 3], Path::new("z.gz"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("z.gz") && e.contains("corrupt gzip"), "{e}");
}

#[test]
fn idx_folder_with_mismatched_counts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("train-images-idx3-ubyte"), idx_images(3, 2, 2)).unwrap();
    std::fs::write(
        p.join("train-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 2, 1, 2],
    )
    .unwrap();
    std::fs::write(p.join("t10k-images-idx3-ubyte"), idx_images(1, 2, 2)).unwrap();
    std::fs::write(
        p.join("t10k-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 1, 4],
    )
    .unwrap();
    let e = idx::load_dir(p, "fashion-mnist", vec!["c".into(); 10])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds 3 images") && e.contains("2 labels"),
        "{e}"
    );
    let e = idx::load_dir(&p.join("nowhere"), "mnist", vec!["c".into(); 10])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("data.path"),
        "{e}"
    );
}

#[test]
fn fashion_mnist_from_the_debian_package() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if common::skip_without("Debian's dataset-fashion-mnist", dir.exists()) {
        return;
    }
    let ds = data::load(&DataConfig {
        dataset: DatasetKind::FashionMnist,
        path: Some(dir.into()),
        train_limit: 0.into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (60_000, 10_000));
    assert_eq!(&ds.test.labels[..10], &[9, 2, 1, 1, 6, 1, 4, 6, 5, 7]);
    // The embedded subset is exactly the official images at the recorded indices.
    let sub = data::embedded::load().unwrap();
    for (k, &orig) in sub
        .train_origin
        .as_ref()
        .unwrap()
        .iter()
        .enumerate()
        .step_by(997)
    {
        assert_eq!(sub.train.image(k), ds.train.image(orig as usize));
        assert_eq!(sub.train.labels[k], ds.train.labels[orig as usize]);
    }
}

/// Under CI a test never skips for a missing tool or data set: it fails, naming what is missing.
#[test]
fn a_missing_tool_fails_under_ci_and_skips_elsewhere() {
    assert!(!common::skip_without_under("x", true, true));
    assert!(common::skip_without_under("x", false, false));
    let under_ci = std::panic::catch_unwind(|| common::skip_without_under("tmux", false, true));
    let message = under_ci.unwrap_err();
    let text = message.downcast_ref::<String>().unwrap();
    assert!(text.contains("tmux is missing"), "{text}");
}
