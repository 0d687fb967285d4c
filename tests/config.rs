//! The example config parses, documents exactly the defaults, and bad input is rejected with a
//! message naming the field and the allowed range.

use metapoison::config::{Auto, Config, Subset};
use metapoison::model::OwnOps;
use std::path::Path;

const EXAMPLE: &str = include_str!("../config.example.toml");

fn parse(text: &str) -> Result<Config, String> {
    Config::from_toml_str(text, Path::new("test.toml")).map_err(|e| e.to_string())
}

#[test]
fn example_parses_and_equals_the_defaults() {
    let example = parse(EXAMPLE).expect("example parses");
    assert_eq!(example, Config::default());
}

#[test]
fn example_mentions_every_field() {
    // Every key of the serialised defaults appears in the example (commented or not).
    let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
    for (section, table) in &defaults {
        let start = EXAMPLE
            .find(&format!("\n[{section}]\n"))
            .unwrap_or_else(|| panic!("section [{section}] missing"));
        let body = &EXAMPLE[start + section.len() + 3..];
        let body = &body[..body.find("\n[").unwrap_or(body.len())];
        for key in table.as_table().unwrap().keys() {
            assert!(
                body.contains(&format!("\n{key} = ")),
                "{section}.{key} missing from the example"
            );
        }
    }
    for optional in ["# path = ", "# output_dir = "] {
        assert!(EXAMPLE.contains(optional), "{optional} missing");
    }
}

#[test]
fn defaults_settled_for_cuda_are_the_published_ones() {
    let mut c = Config::default();
    let notes = c.settle(true);
    assert_eq!(c.threat.npoison, Auto::Value(200));
    assert_eq!(c.threat.eps, 8.0);
    assert_eq!(c.threat.color_eps, 0.04);
    assert_eq!(c.threat.color_grid, 10);
    assert_eq!(c.threat.smooth_coef, 1.0);
    assert_eq!(c.craft.unroll_steps, 2);
    assert_eq!(c.craft.steps, Auto::Value(61));
    assert_eq!(c.craft.outer_lr, 200.0);
    assert_eq!(c.craft.warmup_steps, 5);
    assert_eq!(c.craft.lr_drops(), &[20, 40]);
    assert_eq!(c.craft.ensemble_size, Auto::Value(24));
    assert_eq!(c.craft.stagger, Auto::Value(1));
    assert_eq!(c.craft.meta_batch_fraction, Auto::Value(1.0));
    assert_eq!(c.craft.parallel_surrogates, Auto::Value(1));
    assert_eq!(c.surrogate.lr, 0.1);
    assert_eq!(c.surrogate.batch_size, 125);
    assert_eq!(c.surrogate.warmup_epochs, 5);
    assert_eq!(c.victim.epochs, Auto::Value(200));
    assert_eq!(c.data.train_limit, Auto::Value(5000));
    assert_eq!(c.data.subset, Auto::Value(Subset::Balanced));
    // The crate's own ops stay off on CUDA until timed there, but may serve it when asked.
    assert_eq!(c.run.fused_batch_norm, Auto::Value(false));
    assert_eq!(c.run.direct_conv_double_backward, Auto::Value(false));
    let ops = OwnOps::from(&c.run);
    assert!(!ops.fused_batch_norm && !ops.direct_conv_double_backward && ops.cuda);
    let mut asked = parse("[run]\nfused_batch_norm = true\n").unwrap();
    asked.settle(true);
    let ops = OwnOps::from(&asked.run);
    assert!(ops.fused_batch_norm && !ops.direct_conv_double_backward && ops.cuda);
    // One note per field decided, naming it and the hardware.
    assert_eq!(notes.len(), 14, "{notes:?}");
    assert!(
        notes.contains(&"craft.steps = auto -> 61 (on CUDA)".to_string()),
        "{notes:?}"
    );
    // Settling twice changes nothing and says nothing.
    let again = c.clone();
    assert!(c.settle(false).is_empty());
    assert_eq!(c, again);
}

#[test]
fn defaults_settled_for_a_cpu_are_the_dense_profile_and_explicit_values_stay() {
    let mut c = parse("[craft]\nsteps = 7\n[victim]\nepochs = 3\n").unwrap();
    // Unsettled `auto` fields already read as the CPU profile.
    assert_eq!(c.data.train_limit(), 2000);
    let notes = c.settle(false);
    assert_eq!(c.data.train_limit, Auto::Value(2000));
    assert_eq!(c.data.subset, Auto::Value(Subset::First));
    assert_eq!(c.threat.npoison, Auto::Value(150));
    assert_eq!(c.craft.steps, Auto::Value(7));
    assert_eq!(c.craft.lr_drops(), &[15, 30]);
    assert_eq!(c.craft.ensemble_size(), 4);
    assert_eq!(c.craft.stagger(), 5);
    assert_eq!(c.craft.meta_batch_fraction(), 1.0);
    assert_eq!(c.craft.parallel_surrogates(), 2);
    assert_eq!(c.victim.epochs, Auto::Value(3));
    assert_eq!(c.run.fused_batch_norm, Auto::Value(true));
    assert_eq!(c.run.direct_conv_double_backward, Auto::Value(true));
    assert_eq!(notes.len(), 12, "{notes:?}");
    assert!(
        !notes.iter().any(|n| n.starts_with("craft.steps")),
        "{notes:?}"
    );
    // Gradient matching's `auto` steps: 240 for each restart, whatever the hardware.
    let mut gm =
        parse("[craft]\nrecipe = \"gradient-matching\"\n[matching]\nrestarts = 3\n").unwrap();
    gm.settle(true);
    assert_eq!(gm.craft.steps, Auto::Value(720));
    // Its surrogates train as long as the victims.
    assert_eq!(gm.matching.surrogate_epochs, Auto::Value(200));
    // Explicit steps must share evenly among the restarts, named in one line.
    let e = parse("[craft]\nrecipe = \"gradient-matching\"\nsteps = 10\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("craft.steps") && e.contains("matching.restarts = 4"),
        "{e}"
    );
    // The settled config round-trips through TOML with numbers, not "auto".
    let text = c.to_toml();
    assert!(text.contains("train_limit = 2000"), "{text}");
    let back = Config::from_toml_str(&text, Path::new("x.toml")).unwrap();
    assert_eq!(back, c);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = parse("[craft]\nunrol_steps = 3\n").unwrap_err();
    assert!(e.contains("unknown field `unrol_steps`"), "{e}");
    assert!(e.contains("test.toml"), "{e}");
    let e = parse("[crafting]\n").unwrap_err();
    assert!(e.contains("unknown field `crafting`"), "{e}");
}

#[test]
fn invalid_values_name_field_value_and_range() {
    let cases = [
        (
            "[craft]\nunroll_steps = 0\n",
            "`craft.unroll_steps` = 0",
            "1..=16",
        ),
        ("[threat]\neps = -1.0\n", "`threat.eps` = -1", "[0, 255]"),
        (
            "[threat]\ncolor_eps = 0.9\n",
            "`threat.color_eps` = 0.9",
            "[0, 0.5]",
        ),
        (
            "[craft]\nmeta_batch_fraction = 0.0\n",
            "`craft.meta_batch_fraction` = 0",
            "(0, 1]",
        ),
        (
            "[craft]\nensemble_size = 0\n",
            "`craft.ensemble_size` = 0",
            "1..=1024",
        ),
        (
            "[run]\nsurrogate_devices = [\"cuda:0\", \"auto\"]\n",
            "`run.surrogate_devices` = \"auto\"",
            "must name a device",
        ),
        (
            "[run]\nsurrogate_devices = [\"gpu1\"]\n",
            "`run.surrogate_devices` = \"gpu1\"",
            "cuda:N",
        ),
        (
            "[craft]\nlr_drops = [40, 20]\n",
            "`craft.lr_drops` = [40, 20]",
            "strictly increasing",
        ),
        ("[surrogate]\nlr = 0.0\n", "`surrogate.lr` = 0", "(0, 10]"),
        (
            "[run]\ndevice = \"gpu\"\n",
            "`run.device` = \"gpu\"",
            "cuda:N",
        ),
        (
            "[threat]\ntarget_class = 1000\n",
            "`threat.target_class` = 1000",
            "0..=999",
        ),
        ("[data]\ndataset = \"cifar10\"\n", "`data.path`", "folder"),
    ];
    for (text, field, allowed) in cases {
        let e = parse(text).unwrap_err();
        assert!(
            e.contains(field) && e.contains(allowed),
            "for {text:?} got: {e}"
        );
    }
}

#[test]
fn auto_fields_take_the_word_auto_or_a_value() {
    let c = parse("[craft]\nensemble_size = 8\nstagger = \"auto\"\n").unwrap();
    assert_eq!(c.craft.ensemble_size.value(), Some(&8));
    assert_eq!(c.craft.stagger.value(), None);
    let e = parse("[craft]\nensemble_size = \"many\"\n").unwrap_err();
    assert!(e.contains("auto"), "{e}");
}

#[test]
fn wrong_types_are_reported_with_field_and_line() {
    let e = parse("[craft]\nsteps = \"sixty\"\n").unwrap_err();
    assert!(e.contains("test.toml") && e.contains("(line 2)"), "{e}");
    assert!(e.contains("craft.steps:"), "{e}");
    let e = parse("[run]\nseed = 1\n\n[craft]\nobjective = \"cw\"\ntrajectory = \"dirty\"\n")
        .unwrap_err();
    assert!(
        e.contains("craft.trajectory: unknown variant `dirty`"),
        "{e}"
    );
    assert!(
        e.contains("`clean` or `poison`") && e.contains("(line 6)"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn round_trip_through_toml() {
    let mut c = Config::default();
    c.craft.unroll_steps = 3;
    c.threat.target_ids = metapoison::config::Auto::Value(vec![1, 4]);
    let back = parse(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn a_relative_data_path_is_made_absolute_from_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[data]\ndataset = \"cifar10\"\npath = \"data/cifar\"\n",
    )
    .unwrap();
    let c = Config::load(&file).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(c.data.path.unwrap(), cwd.join("data/cifar"));
    std::fs::write(
        &file,
        "[data]\ndataset = \"cifar10\"\npath = \"/srv/cifar\"\n",
    )
    .unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.data.path.unwrap(), std::path::PathBuf::from("/srv/cifar"));
}

#[test]
fn data_subset_takes_a_word_and_names_itself_when_wrong() {
    for (word, want) in [
        ("auto", Auto::Auto),
        ("balanced", Auto::Value(Subset::Balanced)),
        ("first", Auto::Value(Subset::First)),
    ] {
        let c = parse(&format!("[data]\nsubset = \"{word}\"\n")).unwrap();
        assert_eq!(c.data.subset, want, "{word}");
    }
    let e = parse("[data]\nsubset = \"sorted\"\n").unwrap_err();
    assert!(e.contains("data.subset") && e.contains("sorted"), "{e}");
}

#[test]
fn every_efficacy_setting_loads_and_says_what_its_name_says() {
    // The benchmark's settings are run on machines without a Rust toolchain (the GPU script),
    // where a typo would cost a device lease: each must load, keep its learning-rate drops
    // inside its steps, and match its name (mN = N surrogates, -61 = the authors' 61 steps).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/efficacy/settings");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
        if c.craft.recipe != metapoison::config::CraftRecipe::Metapoison {
            continue;
        }
        let steps = c.craft.steps();
        assert!(
            c.craft.lr_drops().iter().all(|&d| d > 0 && d < steps),
            "{name}: drops {:?} outside 1..{steps}",
            c.craft.lr_drops()
        );
        if name.ends_with("-61") || name == "steps61" {
            assert_eq!(steps, 61, "{name}");
        }
        let surrogates: Option<usize> = name
            .strip_prefix('m')
            .and_then(|m| m.split('-').next()?.parse().ok());
        if let Some(m) = surrogates {
            assert_eq!(c.craft.ensemble_size(), m, "{name}");
        }
    }
    assert!(seen >= 15, "only {seen} settings in {}", dir.display());
}
