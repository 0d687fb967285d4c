//! Export round trips: a real (tiny) crafting run exported, read back in Rust (and in numpy
//! when it is installed), verified; failures leave no partial folder.

mod common;

use metapoison::config::{Auto, Config};
use metapoison::data;
use metapoison::export::npz::read_npz;
use metapoison::export::{export, verify::verify, ExportRequest, Formats};
use metapoison::victim::eval::{load_export, run_trial, victim_network, Arm};
use metapoison::victim::VictimTraining;
use std::path::{Path, PathBuf};
use tch::Device;

fn craft_tiny(dir: &Path) -> Config {
    let mut c = common::tiny_config(300, 10, 3);
    c.run.checkpoint_every = 2;
    // Two surrogates two epochs apart on a 4-epoch cycle: one re-initialised at step 2.
    c.craft.ensemble_size = Auto::Value(2);
    c.craft.stagger = Auto::Value(2);
    common::craft_to_end(&c, dir);
    c
}

fn request(run: &Path, out: PathBuf) -> ExportRequest {
    ExportRequest {
        run_dir: run.to_path_buf(),
        step: None,
        out: Some(out),
        formats: Formats::ALL,
        force: false,
    }
}

#[test]
fn export_round_trip_verify_and_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = craft_tiny(&run);
    let out = tmp.path().join("exp");
    let folder = export(&request(&run, out.clone())).unwrap();
    assert_eq!(folder, out);

    let v = verify(&out).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert!(v.summary.contains("verdict      OK"), "{}", v.summary);

    // Shapes, dtypes and values read back.
    let data = data::load(&config.data).unwrap();
    let p = read_npz(&out.join("poisons.npz")).unwrap();
    assert_eq!(p["poison_images"].shape, vec![10, 28, 28, 1]);
    assert_eq!(p["poison_images"].descr, "|u1");
    let idx = p["poison_indices"].as_i64().unwrap();
    let first_tshirts: Vec<i64> = data
        .train
        .indices_of_class(0)
        .into_iter()
        .take(10)
        .map(|i| i as i64)
        .collect();
    assert_eq!(idx, first_tshirts);
    assert_eq!(p["poison_labels"].as_i64().unwrap(), vec![0; 10]);
    assert_eq!(p["target_labels"].as_i64().unwrap(), vec![6]);
    assert_eq!(p["target_adv_labels"].as_i64().unwrap(), vec![0]);
    let base = &p["base_images"].data;
    assert_eq!(&base[..784], data.train.image(idx[0] as usize));
    let poisons = &p["poison_images"].data;
    assert_ne!(poisons, base, "the poisons were perturbed");
    let linf = poisons
        .iter()
        .zip(base)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(linf as f64 <= 8.0 + 10.2 + 0.5, "L-inf {linf}");

    // The poisoned split differs from the clean one exactly at poison indices.
    let t = read_npz(&out.join("poisoned_train.npz")).unwrap();
    assert_eq!(t["images"].shape, vec![300, 28, 28, 1]);
    assert_eq!(
        t["labels"].as_i64().unwrap(),
        data.train
            .labels
            .iter()
            .map(|&y| y as i64)
            .collect::<Vec<_>>()
    );
    for i in 0..300 {
        let differs = t["images"].data[i * 784..(i + 1) * 784] != *data.train.image(i);
        if differs {
            assert!(
                idx.contains(&(i as i64)),
                "image {i} changed but is no poison"
            );
        }
    }
    let native = out.join("native/train-images-idx3-ubyte.gz");
    let reread =
        metapoison::data::idx::load_dir(&out.join("native"), "fashion-mnist", vec!["c".into(); 10])
            .unwrap();
    assert!(native.exists());
    assert_eq!(reread.train.images, t["images"].data);
    assert_eq!(reread.test.len(), 2000);
    for f in [
        "png/poison_0000.png",
        "png/delta_0009.png",
        "png/contact_sheet.png",
        "png/target_00.png",
        "curves.svg",
        "curves.csv",
        "surrogates.csv",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 steps");
    // Per surrogate: the schedule's epochs, each instance's birth step, and losses whose mean
    // is the step's loss in curves.csv.
    let per = std::fs::read_to_string(out.join("surrogates.csv")).unwrap();
    let rows: Vec<Vec<String>> = per
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 3 * 2, "3 steps x 2 surrogates");
    for (step, line) in csv.lines().skip(1).enumerate() {
        let step_loss: f64 = line.split(',').nth(1).unwrap().parse().unwrap();
        let mine: Vec<&Vec<String>> = rows.iter().filter(|r| r[0] == step.to_string()).collect();
        let mut sum = 0.0;
        for (m, r) in mine.iter().enumerate() {
            let epoch = metapoison::craft::schedule::surrogate_epoch(m, step, 2, 2);
            assert_eq!(r[1], m.to_string());
            assert_eq!(r[2], epoch.to_string(), "step {step} surrogate {m}");
            assert_eq!(r[3], (step as i64 - epoch as i64).to_string());
            sum += r[4].parse::<f64>().unwrap();
        }
        assert!((sum / 2.0 - step_loss).abs() < 1e-9 * step_loss.abs().max(1.0));
    }
    // Surrogate 1 (epochs 2, 3, then 0) was pretrained two epochs before step 0 and
    // re-initialised at step 2.
    let born: Vec<&str> = rows
        .iter()
        .filter(|r| r[1] == "1")
        .map(|r| r[3].as_str())
        .collect();
    assert_eq!(born, ["-2", "-2", "2"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["craft_step"], 3);
    assert_eq!(
        manifest["files"].as_object().unwrap().len(),
        10 * 3 + 1 + 1 + 3 + 4 + 3
    );

    // numpy reads it with the documented keys, when numpy is there.
    let numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !common::skip_without("numpy", numpy) {
        let script = format!(
            "import numpy as np; p = np.load('{0}/poisons.npz'); t = np.load('{0}/poisoned_train.npz'); \
             assert p['poison_images'].shape == (10, 28, 28, 1) and p['poison_images'].dtype == np.uint8; \
             assert p['poison_indices'].dtype == np.int64; \
             assert (t['images'][p['poison_indices']] == p['poison_images']).all(); print('numpy ok')",
            out.display()
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    // Refuses to overwrite without --force; --force replaces.
    let e = export(&request(&run, out.clone())).unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    let mut forced = request(&run, out.clone());
    forced.force = true;
    forced.step = Some(2);
    export(&forced).unwrap();
    let v = verify(&out).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);

    // A tampered file is caught.
    let csv_path = out.join("curves.csv");
    std::fs::write(&csv_path, "tampered").unwrap();
    let v = verify(&out).unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("curves.csv") && p.contains("SHA-256")),
        "{:?}",
        v.problems
    );

    // An impossible destination: the parent is a file. Nothing partial is left.
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let e = export(&request(&run, blocker.join("exp")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocker"), "{e}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A step without saved poisons is named.
    let mut missing = request(&run, tmp.path().join("e2"));
    missing.step = Some(1);
    let e = export(&missing).unwrap_err().to_string();
    assert!(e.contains("step 1") && e.contains("step-0002"), "{e}");
}

/// Crafts 2 steps on a CIFAR-10 folder in `tmp` (`folder` holding the six batches, each a copy
/// of `fixture`: 20 real test images, so a 100-image training split) and exports everything.
/// Returns the config and the export folder.
fn craft_and_export_cifar(
    tmp: &Path,
    folder: &str,
    fixture: &str,
    suffix: &str,
) -> (Config, PathBuf) {
    let batches = tmp.join("cifar").join(folder);
    std::fs::create_dir_all(&batches).unwrap();
    let batch = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    for name in data::cifar::BATCH_STEMS {
        std::fs::copy(&batch, batches.join(format!("{name}{suffix}"))).unwrap();
    }
    let mut c = common::tiny_config(100, 5, 2);
    c.data.dataset = metapoison::config::DatasetKind::Cifar10;
    c.data.path = Some(tmp.join("cifar"));
    // Labels 3, 8, 8, 0, 6, ...: the first ship is the target, frogs (4 per batch) the poisons.
    c.threat.target_class = Auto::Value(8);
    c.threat.target_ids = Auto::Value(vec![0]);
    c.threat.poison_class = Auto::Value(6);
    let run = tmp.join("run");
    common::craft_to_end(&c, &run);
    let out = tmp.join("exp");
    export(&request(&run, out.clone())).unwrap();
    let v = verify(&out).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    (c, out)
}

#[test]
fn a_cifar_binary_run_exports_five_native_binary_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, out) = craft_and_export_cifar(
        tmp.path(),
        "cifar-10-batches-bin",
        "cifar10/test_batch.bin",
        ".bin",
    );
    let data = data::load(&c.data).unwrap();
    let t = read_npz(&out.join("poisoned_train.npz")).unwrap();
    // Five even batches as loaders expect (the 100 images once went into one file).
    for k in 1..=5 {
        let batch = out.join(format!("native/data_batch_{k}.bin"));
        assert_eq!(std::fs::metadata(&batch).unwrap().len(), 20 * 3073, "{k}");
    }
    let native = data::cifar::load(&out.join("native")).unwrap();
    assert!(
        native.source.ends_with("native (binary version)"),
        "{}",
        native.source
    );
    assert_eq!(native.train.images, t["images"].data);
    assert_eq!(native.train.labels, data.train.labels);
    assert_eq!(native.test.images, data.test.images);
}

/// CIFAR-10 end to end from a torchvision-style folder of the python version.
#[test]
fn cifar_python_folder_crafts_and_its_native_export_reads_back_as_the_poisoned_split() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, out) = craft_and_export_cifar(
        tmp.path(),
        "cifar-10-batches-py",
        "cifar10-py/test_batch",
        "",
    );
    let data = data::load(&c.data).unwrap();
    let p = read_npz(&out.join("poisons.npz")).unwrap();
    assert_eq!(p["poison_images"].shape, vec![5, 32, 32, 3]);
    assert_eq!(p["poison_indices"].as_i64().unwrap(), vec![4, 5, 7, 19, 24]);
    assert_eq!(p["target_indices"].as_i64().unwrap(), vec![1]);
    assert_eq!(p["target_images"].data, data.test.image(1));
    let t = read_npz(&out.join("poisoned_train.npz")).unwrap();
    assert_eq!(t["images"].shape, vec![100, 32, 32, 3]);
    assert_ne!(
        t["images"].data, data.train.images,
        "the poisons were perturbed"
    );
    // native/ holds the version the run read, python here, under the folder name torchvision
    // expects below its root: it loads and holds exactly the poisoned split.
    let native = data::cifar::load(&out.join("native")).unwrap();
    assert!(
        native
            .source
            .ends_with("native/cifar-10-batches-py (python version)"),
        "{}",
        native.source
    );
    assert_eq!(native.train.images, t["images"].data);
    assert_eq!(native.train.labels, data.train.labels);
    assert_eq!(native.test.images, data.test.images);
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("cifar-10-batches-py (python version)")
            && manifest.contains("native/cifar-10-batches-py/batches.meta"),
        "{manifest}"
    );
    // Python reads the batches the way the CIFAR-10 page says, when numpy is there.
    let numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !common::skip_without("numpy", numpy) {
        let script = format!(
            "import pickle, numpy as np\n\
             d = '{0}/native/cifar-10-batches-py/'\n\
             load = lambda n: pickle.load(open(d + n, 'rb'), encoding='bytes')\n\
             b = [load('data_batch_%d' % k) for k in range(1, 6)]\n\
             x = np.concatenate([e[b'data'] for e in b]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)\n\
             y = sum([e[b'labels'] for e in b], [])\n\
             t = np.load('{0}/poisoned_train.npz')\n\
             assert x.dtype == np.uint8 and (x == t['images']).all() and y == t['labels'].tolist()\n\
             m = load('batches.meta')\n\
             assert m[b'label_names'][0] == b'airplane' and m[b'num_cases_per_batch'] == 20\n\
             assert load('test_batch')[b'filenames'][19] == b'test_00019.png'\n\
             print('pickle ok')",
            out.display()
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("pickle ok"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // Victims read the export as RGB 32x32 and train on it.
    let eval = load_export(&out, Device::Cpu).unwrap();
    assert_eq!(eval.poisoned_x.size(), vec![100, 3, 32, 32]);
    assert_eq!(eval.adversarial, vec![6]);
    let differs = common::images_that_differ(&eval.poisoned_x, &eval.clean_x);
    assert!(differs > 0 && differs <= 5, "{differs} images differ");
    let spec = VictimTraining {
        augment: true,
        ..common::short_victim(1)
    };
    let (trial, _) = run_trial(
        &eval,
        &victim_network(&eval, &spec),
        &spec,
        Arm::Poisoned,
        1,
    );
    assert_eq!(trial.target_probs[0].len(), 10);
    let total: f64 = trial.target_probs[0].iter().sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
}
