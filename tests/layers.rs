//! The crate's layers (docs/architecture.md): every module may use only modules ranked below
//! it, so dependencies point one way and there are no cycles. Reads each `crate::` path in
//! `src/` (comments left out); a new top-level module must be given a rank here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lowest first. A module may use the modules of earlier rows only.
const LAYERS: &[&[&str]] = &[
    &["device", "digest", "failure", "paths", "ranks", "telemetry"],
    &["base"],
    &["config"],
    &["data"],
    &["model"],
    &["craft"],
    &["export"],
    &["victim"],
    &["engine"],
    &["app"],
    &["bench", "campaign"],
    &["tui"],
    &["cli"],
];

/// Uses forbidden although the ranks allow them: the dashboard knows only the engine's
/// protocol, not the attack's internals.
const FORBIDDEN: &[(&str, &str)] = &[("tui", "craft")];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules each module's source names through `crate::`, comments removed.
fn uses_of(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `metapoison::crate::` does not occur; `$crate::` (macros) and `crate::{` do not
            // name a module.
            let before = rest[..at].chars().last();
            if !name.is_empty()
                && before != Some('$')
                && before.is_none_or(|c| !c.is_alphanumeric())
            {
                found.push(name);
            }
            rest = after;
        }
    }
    found
}

/// Every module's uses, by the top-level module its file belongs to.
fn crate_uses(src: &Path) -> BTreeMap<String, Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut uses: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let entry = uses.entry(module.clone()).or_default();
        for used in uses_of(&std::fs::read_to_string(&file).unwrap()) {
            if used != module {
                entry.push((used, rel.to_path_buf()));
            }
        }
    }
    uses
}

/// One line per module without a rank and per use that points up, sideways or is forbidden.
fn violations(uses: &BTreeMap<String, Vec<(String, PathBuf)>>) -> Vec<String> {
    let mut out = Vec::new();
    for (module, used) in uses {
        let Some(mine) = rank(module) else {
            out.push(format!("module {module} has no rank in tests/layers.rs"));
            continue;
        };
        for (other, file) in used {
            let theirs = rank(other);
            let upward = theirs.is_some_and(|r| r >= mine);
            let forbidden = FORBIDDEN.contains(&(module.as_str(), other.as_str()));
            if upward || forbidden {
                out.push(format!("{module} uses {other} ({})", file.display()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn no_module_uses_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let uses = crate_uses(&src);
    // The walk saw the crate: the engine, for one, uses the attack.
    assert!(uses["engine"].iter().any(|(m, _)| m == "craft"));
    assert!(uses.len() >= 17, "{:?}", uses.keys().collect::<Vec<_>>());
    let found = violations(&uses);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// The check itself can fail: an upward use, a sideways one, a forbidden one and an unranked
/// module are each reported.
#[test]
fn the_check_reports_upward_sideways_forbidden_and_unranked_uses() {
    let file = PathBuf::from("x.rs");
    let uses: BTreeMap<String, Vec<(String, PathBuf)>> = [
        ("model", vec![("craft".to_string(), file.clone())]),
        ("bench", vec![("campaign".to_string(), file.clone())]),
        ("tui", vec![("craft".to_string(), file.clone())]),
        ("engine", vec![("craft".to_string(), file.clone())]),
        ("newcomer", vec![]),
    ]
    .into_iter()
    .map(|(m, u)| (m.to_string(), u))
    .collect();
    assert_eq!(
        violations(&uses),
        vec![
            "bench uses campaign (x.rs)",
            "model uses craft (x.rs)",
            "module newcomer has no rank in tests/layers.rs",
            "tui uses craft (x.rs)",
        ]
    );
    assert_eq!(
        uses_of("use crate::model::{Network};\n// crate::cli in a comment\nlet x = crate::base::fmt::f(); $crate::y"),
        vec!["model", "base"]
    );
}
