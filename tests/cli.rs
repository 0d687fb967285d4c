//! The binary itself: `--version` reports libtorch, config and data commands answer with one
//! clear line on bad input, and a tensor op with backward runs (the libtorch smoke test).

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_metapoison"))
}

#[test]
fn version_reports_libtorch_and_cuda() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("metapoison 0.1.0"), "{s}");
    assert!(s.contains("libtorch 2.11.0"), "{s}");
    assert!(s.contains("CUDA available: "), "{s}");
}

#[test]
fn tch_smoke_tensor_op_with_backward() {
    let x = tch::Tensor::from_slice(&[1.0f64, 2.0, 3.0]).set_requires_grad(true);
    let y = (&x * &x).sum(tch::Kind::Double);
    let g = tch::Tensor::run_backward(&[y], &[&x], false, false);
    assert_eq!(Vec::<f64>::try_from(&g[0]).unwrap(), vec![2.0, 4.0, 6.0]);
}

#[test]
fn config_check_accepts_the_example_and_names_bad_fields() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = bin().args(["config", "check", example]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[threat]\neps = 300.0\n").unwrap();
    let out = bin()
        .args(["config", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("threat.eps") && err.contains("300") && err.contains("[0, 255]"),
        "{err}"
    );
    let out = bin()
        .args(["config", "check", "/nonexistent/x.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/x.toml"),
        "{err}"
    );
}

#[test]
fn config_init_writes_once_and_show_prints_the_effective_config() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let run = |args: &[&str]| {
        bin()
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join("cfg"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["config", "init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = home.join("cfg/metapoison/config.toml");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        include_str!("../config.example.toml")
    );
    let again = run(&["config", "init"]);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("not overwritten")
    );
    std::fs::write(&written, "[craft]\nunroll_steps = 3\n").unwrap();
    let shown = String::from_utf8_lossy(&run(&["config", "show"]).stdout).into_owned();
    assert!(
        shown.contains("unroll_steps = 3") && shown.contains("npoison = \"auto\""),
        "{shown}"
    );
    // This machine has no GPU: the comments give the CPU profile, and the output still parses.
    assert!(
        shown.contains("# threat.npoison = auto -> 150 (on CPU)"),
        "{shown}"
    );
    assert!(toml::from_str::<toml::Table>(&shown).is_ok(), "{shown}");
}

#[test]
fn data_info_lists_the_embedded_counts() {
    let out = bin()
        .args(["data", "info"])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    // The default config on a CPU trains on the first 2,000 images (data.train_limit auto).
    assert!(
        s.contains("train    2000 images") && s.contains("test     2000 images"),
        "{s}"
    );
    assert!(
        s.contains("fashion-mnist-subset") && s.contains(" 6 Shirt"),
        "{s}"
    );
    let counts: usize = s
        .lines()
        .skip_while(|l| !l.starts_with("class"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().rev().nth(1)?.parse::<usize>().ok())
        .sum();
    assert_eq!(counts, 2000, "{s}");
    assert!(
        s.contains("subset   data.train_limit 2000, data.subset first"),
        "{s}"
    );
}

/// Counts of zero are refused by name before any victim is trained.
#[test]
fn targets_suggest_refuses_zero_victims() {
    let data = tempfile::tempdir().unwrap();
    for flag in ["--victims", "--top"] {
        let out = bin()
            .args(["--data-dir", data.path().to_str().unwrap()])
            .args(["targets", "suggest", flag, "0"])
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.trim_end()
                .ends_with("error: --victims and --top must be at least 1"),
            "{err}"
        );
        assert!(!err.contains("training"), "{err}");
    }
}

/// A campaign's target choice is checked before its folder is made.
#[test]
fn campaign_refuses_a_bad_target_choice_before_making_its_folder() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("campaign");
    for (args, message) in [
        (
            vec!["--count", "0"],
            "--count and --suggest-victims must be at least 1 (or give --targets)",
        ),
        (
            vec!["--min-margin=-1"],
            "--min-margin -1 must be a finite number >= 0 (logits)",
        ),
    ] {
        let out = bin()
            .args(["--data-dir", data.path().to_str().unwrap()])
            .args(["campaign", "--dir", dir.to_str().unwrap()])
            .args(&args)
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end(), format!("error: {message}"));
        assert!(!dir.exists(), "{args:?}");
    }
}

/// `bench --profile`: a tiny step's operators reach the report and the trace; an unwritable
/// trace path is one line before any timing.
#[test]
fn bench_profile_reports_operators_and_names_a_bad_trace_path() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.json");
    let tiny = [
        "bench",
        "--device",
        "cpu",
        "--no-reference",
        "--batch",
        "8",
        "--poisons-in-batch",
        "3",
        "--npoison",
        "6",
        "--ensemble",
        "1",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--profile",
    ];
    let out = bin().args(tiny).arg(&trace).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ops = report["profile"]["summary"]["host_by_op"]
        .as_array()
        .unwrap();
    assert!(
        ops.iter()
            .any(|r| r["name"] == "aten::convolution_backward" && r["ms"].as_f64().unwrap() > 0.0),
        "{ops:?}"
    );
    assert!(std::fs::read_to_string(&trace)
        .unwrap()
        .contains("aten::convolution_backward"));

    let out = bin()
        .args(tiny)
        .arg(tmp.path().join("missing/trace.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot write the profile trace") && stderr.contains("missing/trace.json"),
        "{stderr}"
    );
}

/// `compare` names the file it cannot read, or the two campaigns that share nothing, in one line.
#[test]
fn compare_names_a_missing_report_and_campaigns_with_nothing_shared() {
    let dir = tempfile::tempdir().unwrap();
    let run = |a: &std::path::Path, b: &std::path::Path| {
        let out = bin().arg("compare").arg(a).arg(b).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    let missing = dir.path().join("nothing");
    let err = run(&missing, &missing);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("nothing/campaign.json") || err.contains("nothing (give"),
        "{err}"
    );
    assert!(err.contains("give a campaign folder"), "{err}");
    let empty = r#"{"started":"","selection":{"method":"m","targets":[]},"results":[],"totals":[],"seconds":0}"#;
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&a, empty).unwrap();
    std::fs::write(&b, empty).unwrap();
    let err = run(&a, &b);
    assert!(
        err.ends_with("share no target evaluated by the same kind of victim"),
        "{err}"
    );
    std::fs::write(&b, "{").unwrap();
    assert!(run(&a, &b).contains("b.json is not a campaign's report"));
    // A CSV table that is not a campaign's, or has a cell that is not a number.
    let table = dir.path().join("t.csv");
    std::fs::write(&table, "target_id,victim_net\n1,convnet-bn\n").unwrap();
    let err = run(&table, &table);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("t.csv: no column `recipe`"), "{err}");
    let header =
        "target_id,victim_net,recipe,epochs,poisoned_successes,poisoned_victims,margin_shift";
    std::fs::write(
        &table,
        format!("{header}\n26,convnet-bn,crafter,20,2,8,1.5x\n"),
    )
    .unwrap();
    let err = run(&table, &table);
    assert!(
        err.contains("t.csv: line 2: `1.5x` is not a number (margin_shift)"),
        "{err}"
    );
}
