//! `metapoison campaign`: one crafting run per target id, each exported and judged by fresh
//! victims, so that a success rate *over targets* can be measured (as the papers report it).
//!
//! Layout: CAMPAIGN_DIR/{campaign.json, campaign.csv, campaign.md, config.toml, victims,
//! target-ID/{run, export}}.
//! Every finished piece is kept, so re-running with the same --dir resumes: finished targets
//! are read back, an interrupted crafting run continues from its checkpoint, and evaluations
//! already written are read back (so a campaign can be completed with more victim kinds).
//!
//! With `--protocol` (protocol.rs) the targets, arms and victim kinds are the protocol's: the
//! efficacy benchmark every crafting setting is judged by. Its targets may be run in shares
//! (`--first`, `--targets`); a folder holds the union of the shares run in it.

pub mod protocol;
mod report;

pub use protocol::{Protocol, VictimKind};
pub use report::{
    beyond_noise, compare, compare_judged, comparison_markdown, csv, judged_targets,
    judged_targets_from_csv, margin_shifts, markdown, summary, sweep_markdown, totals, ArmTotals,
    CampaignReport, Comparison, CsvTableError, JudgedTarget, Selection, TargetResult,
};

use crate::app::{
    progress_line, progress_text, spawn_engine, victim_protocol, watch_signals, VictimArgs,
};
use crate::config::{Config, VictimConfig};
use crate::engine::protocol::{Phase, Telemetry};
use crate::paths::{timestamp, Paths};
use crate::victim::eval::EvalReport;
use anyhow::{bail, Context, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct CampaignArgs {
    /// Target ids (indices among the test images of the target class), comma separated.
    /// Default: the first --count candidates of `targets suggest`. With --protocol: some of
    /// its targets (a share of the benchmark, e.g. for one machine or session).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<usize>,
    /// Targets to pick when --targets is not given.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Clean victims `targets suggest` trains to rank the candidates.
    #[arg(long, default_value_t = 2)]
    suggest_victims: usize,
    /// Skip candidates that some clean victim classifies with less than this logit margin
    /// over the adversarial class (0 = any target every clean victim gets right).
    #[arg(long, default_value_t = 0.0)]
    min_margin: f64,
    /// Campaign folder (default: DATA_DIR/campaigns/TIMESTAMP). An existing one resumes.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also evaluate with victims of these architectures (black-box), comma separated.
    #[arg(long, value_delimiter = ',')]
    black_box: Vec<String>,
    /// Override craft.steps for every run.
    #[arg(long)]
    steps: Option<usize>,
    /// Follow an efficacy protocol: `standard` (10 fixed targets, 8 victims an arm, poisoned,
    /// control and noise arms, ConvNetBN victims with the crafter's and the standard recipe,
    /// ResNet-20 victims with the standard recipe), `gray-box` (the same without ResNet-20),
    /// or a protocol file of that form. It fixes targets and victims, so the flags that choose
    /// them are refused.
    #[arg(long, value_name = "NAME|FILE")]
    protocol: Option<String>,
    /// With --protocol: only its first N targets (a cheaper tier for sweeps; run again
    /// without it in the same folder to complete the protocol).
    #[arg(
        long,
        value_name = "N",
        requires = "protocol",
        conflicts_with = "targets"
    )]
    first: Option<usize>,
    /// Score every evaluation already written again from the campaign's victim cache (the
    /// measures added since it was written, such as the class margin, are filled in; its
    /// flips, times and summaries stay as recorded). A victim missing from the cache is
    /// trained again.
    #[arg(long)]
    rescore: bool,
    #[command(flatten)]
    victim: VictimArgs,
}

impl CampaignArgs {
    /// The flags a protocol decides itself, of those given.
    fn protocol_conflicts(&self) -> Vec<&'static str> {
        let mut given = self.victim.flags_given();
        if !self.black_box.is_empty() {
            given.push("--black-box");
        }
        given
    }
}

/// `old` with the measures of `new` (the same victims scored again) that it lacks: each
/// victim's class margin, matched by arm and seed. What `old` recorded stays as it was.
fn with_new_scores(mut old: EvalReport, new: &EvalReport) -> EvalReport {
    for t in &mut old.trials {
        if t.class_margin.is_none() {
            t.class_margin = new
                .trials
                .iter()
                .find(|n| n.arm == t.arm && n.seed == t.seed)
                .and_then(|n| n.class_margin);
        }
    }
    old
}

/// Where a target's evaluation by victims of `victim`'s architecture and recipe is kept.
fn eval_file(export: &Path, victim: &VictimConfig) -> PathBuf {
    match victim.recipe_name() {
        // The name campaigns used before recipes existed.
        "crafter" => export.join(format!("eval-{}.json", victim.net.name())),
        recipe => export.join(format!("eval-{}-{recipe}.json", victim.net.name())),
    }
}

fn save(dir: &Path, report: &CampaignReport) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    crate::base::tensor_file::write_atomic(&dir.join("campaign.json"), json.as_bytes())
        .with_context(|| format!("cannot write {}", dir.join("campaign.json").display()))?;
    crate::base::tensor_file::write_atomic(
        &dir.join("campaign.csv"),
        csv(&report.results).as_bytes(),
    )
    .with_context(|| format!("cannot write {}", dir.join("campaign.csv").display()))?;
    crate::base::tensor_file::write_atomic(&dir.join("campaign.md"), markdown(report).as_bytes())
        .with_context(|| format!("cannot write {}", dir.join("campaign.md").display()))?;
    Ok(())
}

/// The arguments that choose targets, checked before the campaign folder is made.
fn check_target_choice(args: &CampaignArgs) -> Result<()> {
    if !args.targets.is_empty() {
        return Ok(());
    }
    if args.count == 0 || args.suggest_victims == 0 {
        bail!("--count and --suggest-victims must be at least 1 (or give --targets)");
    }
    if !(args.min_margin >= 0.0 && args.min_margin.is_finite()) {
        bail!(
            "--min-margin {} must be a finite number >= 0 (logits)",
            args.min_margin
        );
    }
    Ok(())
}

fn choose_targets(config: &Config, args: &CampaignArgs) -> Result<Selection> {
    if !args.targets.is_empty() {
        return Ok(Selection {
            method: "given on the command line (--targets)".into(),
            targets: args.targets.clone(),
            candidates: vec![],
        });
    }
    let (s, _, _) = crate::app::rank_targets(config, args.suggest_victims)?;
    let chosen: Vec<_> = s
        .eligible(args.min_margin)
        .take(args.count)
        .cloned()
        .collect();
    if chosen.is_empty() {
        bail!("no test image of the target class is classified correctly by every clean victim with --min-margin {} to spare; train the victims longer (victim.epochs) or lower --min-margin", args.min_margin);
    }
    let floor = if args.min_margin > 0.0 {
        format!(" by at least {} logits in each", args.min_margin)
    } else {
        String::new()
    };
    Ok(Selection {
        method: format!(
            "targets suggest: {} clean {} victims trained {} epochs; of the targets every victim classifies correctly{floor}, the {} with the smallest mean logit margin to the adversarial class",
            args.suggest_victims,
            config.victim.net.name(),
            config.victim.epochs(),
            chosen.len()
        ),
        targets: chosen.iter().map(|c| c.id).collect(),
        candidates: chosen,
    })
}

/// The evaluations each target gets, as the flags of `eval` would give them: a protocol's victim
/// kinds, or the victims the flags name and each `--black-box` architecture. All keep their
/// victims in the campaign's cache, so the control (and noise) victims, the same for every
/// target, are trained once.
fn victim_kinds(args: &CampaignArgs, protocol: Option<&Protocol>, dir: &Path) -> Vec<VictimArgs> {
    let cache = Some(
        args.victim
            .victim_cache
            .clone()
            .unwrap_or_else(|| dir.join("victims")),
    );
    match protocol {
        Some(p) => p
            .victims
            .iter()
            .map(|kind| VictimArgs {
                trials: Some(p.trials),
                victim_net: Some(kind.net.name().into()),
                recipe: Some(kind.recipe),
                noise_control: p.noise_control,
                victim_cache: cache.clone(),
                ..VictimArgs::default()
            })
            .collect(),
        None => {
            let mut nets: Vec<Option<String>> = vec![args.victim.victim_net.clone()];
            nets.extend(args.black_box.iter().cloned().map(Some));
            nets.into_iter()
                .map(|net| VictimArgs {
                    victim_net: net,
                    victim_cache: cache.clone(),
                    ..args.victim.clone()
                })
                .collect()
        }
    }
}

/// Where a campaign's crafting runs report: on a terminal a progress line that rewrites
/// itself; otherwise (a log file, nohup) one plain line per craft step; with `--headless` also
/// every telemetry message as a JSON line on stdout, tagged with its target id.
#[derive(Clone, Copy)]
struct Reporting {
    terminal: bool,
    json: bool,
}

impl Reporting {
    fn report(&self, target: usize, t: &Telemetry) -> Result<()> {
        use std::io::Write;
        if self.json
            && !matches!(
                t,
                Telemetry::Preview(_) | Telemetry::PretrainProgress { .. }
            )
        {
            let mut value = serde_json::to_value(t)?;
            if let Some(object) = value.as_object_mut() {
                object.insert("target".into(), target.into());
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{value}")?;
            out.flush()?;
        }
        if self.terminal {
            progress_line(t);
        } else if let (Telemetry::Step(_), Some(line)) = (t, progress_text(t)) {
            // stderr may be a file that went away: never fail the campaign on it.
            let _ = writeln!(std::io::stderr(), "  target {target}: {line}");
        }
        Ok(())
    }
}

/// Crafts (or resumes, or skips when finished) the run of one target. Returns false when a
/// signal stopped it.
fn craft_target(
    config: &Config,
    target: usize,
    run_dir: &Path,
    stop: &Arc<AtomicBool>,
    reporting: Reporting,
) -> Result<bool> {
    let checkpoint = run_dir.join(crate::craft::checkpoint::FILE_NAME);
    let (config, resume) = if checkpoint.exists() {
        let loaded = crate::craft::checkpoint::load(run_dir)?;
        // The campaign's step count decides: a run reused from a longer campaign is done once
        // it reached it (its earlier steps equal a shorter run's).
        let steps = config.craft.steps();
        if loaded.state.step >= steps {
            return Ok(true);
        }
        let mut resumed = loaded.state.config;
        resumed.craft.steps = steps.into();
        // Speed only: the campaign's current choice, which may differ from the machine that
        // started the run.
        resumed.craft.parallel_surrogates = config.craft.parallel_surrogates.clone();
        resumed.craft.grouped_surrogates = config.craft.grouped_surrogates.clone();
        (resumed, true)
    } else {
        (config.clone(), false)
    };
    let handle = spawn_engine(
        config,
        run_dir.to_path_buf(),
        resume,
        stop.clone(),
        crate::app::Hosting::default(),
        crate::ranks::Ranks::solo(),
    )?;
    let mut failure = None;
    for t in handle.telemetry.iter() {
        reporting.report(target, &t)?;
        if let Telemetry::Phase(Phase::Failed { message }) = &t {
            failure = Some(message.clone());
            break;
        }
    }
    if reporting.terminal {
        eprintln!();
    }
    handle.join()?;
    if let Some(m) = failure {
        bail!("crafting into {} failed: {m}", run_dir.display());
    }
    Ok(!stop.load(Ordering::SeqCst))
}

/// Runs (or resumes) a campaign; `json` (the `--headless` flag) puts every crafting run's
/// telemetry on stdout as JSON lines, and the final totals as one last JSON line.
pub fn run(config: Config, paths: &Paths, args: CampaignArgs, json: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let reporting = Reporting {
        terminal: std::io::stderr().is_terminal(),
        json,
    };
    let protocol = match &args.protocol {
        Some(name) => {
            let conflicts = args.protocol_conflicts();
            if !conflicts.is_empty() {
                bail!(
                    "{}: the protocol fixes the targets and victims; drop {}",
                    conflicts.join(", "),
                    if conflicts.len() == 1 { "it" } else { "them" }
                );
            }
            if args.first == Some(0) {
                bail!("--first must be at least 1");
            }
            let p = Protocol::load(name)?;
            let foreign: Vec<usize> = args
                .targets
                .iter()
                .copied()
                .filter(|t| !p.targets.contains(t))
                .collect();
            if !foreign.is_empty() {
                bail!(
                    "--targets {foreign:?}: not targets of protocol {}; give some of {:?}",
                    p.name,
                    p.targets
                );
            }
            Some(p)
        }
        None => {
            check_target_choice(&args)?;
            None
        }
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| paths.data_dir.join("campaigns").join(timestamp()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let previous: Option<CampaignReport> = std::fs::read_to_string(dir.join("campaign.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    // A resumed campaign follows the protocol it was started with, unless one is given now
    // (which may complete a campaign started with its targets, e.g. a gray-box tier).
    let protocol = protocol.or_else(|| previous.as_ref().and_then(|p| p.protocol.clone()));
    // The targets asked for now: a protocol's, its first few or some of them (--targets),
    // together with those the folder already holds, in the protocol's order, so that a
    // folder gathers one campaign however its targets were split between runs.
    let asked: Option<Vec<usize>> = match (&args.protocol, &protocol) {
        (Some(_), Some(p)) => {
            let done = previous
                .as_ref()
                .map_or(&[][..], |r| &r.selection.targets[..]);
            if let Some(t) = done.iter().find(|t| !p.targets.contains(t)) {
                bail!(
                    "{} holds a campaign on targets {done:?}, and {t} is not a target of protocol {} ({:?}): use another --dir",
                    dir.display(),
                    p.name,
                    p.targets
                );
            }
            let now: Vec<usize> = if args.targets.is_empty() {
                let n = args.first.unwrap_or(p.targets.len()).min(p.targets.len());
                p.targets[..n].to_vec()
            } else {
                args.targets.clone()
            };
            Some(
                p.targets
                    .iter()
                    .copied()
                    .filter(|t| now.contains(t) || done.contains(t))
                    .collect(),
            )
        }
        _ => None,
    };
    let mut config = config;
    if let Some(s) = args.steps {
        config.craft.steps = s.into();
    }
    config.validate()?;
    // A campaign keeps the config it started with, so resuming cannot mix settings; its
    // `auto` fields are settled for this device once, at the start.
    let config_file = dir.join("config.toml");
    let resuming = config_file.exists();
    if resuming {
        config = Config::load(&config_file)?;
        // A campaign started before `data.subset` existed ran on the first N images.
        let text = std::fs::read_to_string(&config_file).unwrap_or_default();
        let recorded: toml::Table = toml::from_str(&text).unwrap_or_default();
        let data = recorded.get("data").and_then(|d| d.as_table());
        if !data.is_some_and(|d| d.contains_key("subset")) {
            config.data.subset = crate::config::Auto::Value(crate::config::Subset::First);
        }
    }
    if let Some(p) = &protocol {
        p.fit(&mut config)?;
    }
    let device = crate::app::resolve_device(&config)?;
    if !resuming {
        for note in config.settle(device.is_cuda()) {
            eprintln!("{note}");
            tracing::info!("{note}");
        }
        crate::base::tensor_file::write_atomic(&config_file, config.to_toml().as_bytes())
            .with_context(|| format!("cannot write {}", config_file.display()))?;
    }
    let selection = match (asked, &previous, &protocol) {
        (Some(targets), _, Some(p)) => Selection {
            method: format!("protocol {}", p.name),
            targets,
            candidates: vec![],
        },
        (_, Some(prev), _) => prev.selection.clone(),
        _ => choose_targets(&config, &args)?,
    };
    eprintln!(
        "campaign in {}: targets {:?} ({})",
        dir.display(),
        selection.targets,
        selection.method
    );
    let victims = victim_kinds(&args, protocol.as_ref(), &dir);
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(&stop)?;
    // Time spent by earlier invocations of a resumed campaign.
    let earlier_seconds = previous.as_ref().map_or(0.0, |p| p.seconds);
    let mut report = CampaignReport {
        started: previous
            .as_ref()
            .map(|p| p.started.clone())
            .unwrap_or_else(timestamp),
        selection: selection.clone(),
        protocol: protocol.clone(),
        results: vec![],
        totals: vec![],
        seconds: earlier_seconds,
    };
    for (i, &target) in selection.targets.iter().enumerate() {
        let tdir = dir.join(format!("target-{target}"));
        let (run_dir, export_dir) = (tdir.join("run"), tdir.join("export"));
        let mut target_config = config.clone();
        target_config.threat.target_ids = crate::config::Auto::Value(vec![target]);
        eprintln!("target {}/{}: id {target}", i + 1, selection.targets.len());
        if !craft_target(&target_config, target, &run_dir, &stop, reporting)? {
            eprintln!("stopped by a signal; run the same command again to resume");
            save(&dir, &report)?;
            return Ok(());
        }
        if !export_dir.join("poisons.npz").exists() {
            // The poisons of the campaign's last step: the same as the run's last step, unless
            // the run went further (a run reused from a longer campaign; its checkpoints keep
            // every earlier step's poisons, which equal a shorter run's).
            crate::export::export(&crate::export::ExportRequest {
                run_dir: run_dir.clone(),
                step: Some(target_config.craft.steps()),
                out: Some(export_dir.clone()),
                formats: crate::export::Formats::parse("npz")?,
                force: true,
            })?;
        }
        let mut evals = Vec::new();
        for victim_args in &victims {
            let plan = victim_args.plan(victim_protocol(&target_config, &export_dir), false)?;
            let file = eval_file(&export_dir, &plan.victim);
            // An evaluation already written is read back if it has the arms and victims asked
            // for now (a campaign completed with a protocol may have been run with others).
            let cached: Option<EvalReport> = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str::<EvalReport>(&t).ok())
                .filter(|e| {
                    e.poisoned.trials == plan.trials
                        && e.control.trials == if plan.control { plan.trials } else { 0 }
                        && e.noise.as_ref().map(|n| n.trials)
                            == plan.noise_control.then_some(plan.trials)
                });
            let e = match cached {
                Some(old) if args.rescore => {
                    let new = crate::victim::eval::evaluate(&export_dir, &plan, device, |_| {
                        !stop.load(Ordering::SeqCst)
                    })?;
                    std::fs::remove_file(export_dir.join("eval.json")).ok();
                    let e = with_new_scores(old, &new);
                    let json = serde_json::to_string_pretty(&e)?;
                    crate::base::tensor_file::write_atomic(&file, json.as_bytes())
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    e
                }
                Some(e) => e,
                None => {
                    let e = crate::victim::eval::evaluate(&export_dir, &plan, device, |p| {
                        eprintln!(
                            "  victim {}/{} ({}, {} recipe, {}{}): target -> {:?}, clean accuracy {:.2}%",
                            p.done,
                            p.total,
                            plan.victim.net.name(),
                            plan.victim.recipe_name(),
                            p.trial.arm,
                            if p.trial.cached { ", reused" } else { "" },
                            p.trial.predicted,
                            p.trial.clean_accuracy * 100.0
                        );
                        !stop.load(Ordering::SeqCst)
                    })?;
                    std::fs::rename(export_dir.join("eval.json"), &file)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    let _ = crate::app::append_results_row(paths, &e);
                    e
                }
            };
            let noise = e.noise.as_ref().map_or(String::new(), |n| {
                format!(", noise {}/{}", n.successes, n.trials)
            });
            eprintln!(
                "  {} ({}, {} recipe): poisoned {}/{} flipped, control {}/{}{noise}",
                e.victim_net,
                e.setting,
                e.recipe(),
                e.poisoned.successes,
                e.poisoned.trials,
                e.control.successes,
                e.control.trials
            );
            evals.push(e);
        }
        let crafted = crate::craft::checkpoint::load(&run_dir)?.state;
        report.results.push(TargetResult {
            target_id: target,
            run_dir: run_dir.display().to_string(),
            export_dir: export_dir.display().to_string(),
            evals,
            craft_seconds: crafted.crafting_seconds(),
            craft_loss: crafted.final_loss(5),
        });
        report.totals = totals(&report.results);
        report.seconds = earlier_seconds + started.elapsed().as_secs_f64();
        save(&dir, &report)?;
    }
    if json {
        // stdout stays JSON lines: the table goes to stderr, the totals as the last line.
        eprint!("{}", summary(&report));
        let totals = serde_json::json!({"type": "campaign_totals", "totals": report.totals});
        println!("{totals}");
    } else {
        print!("{}", summary(&report));
    }
    eprintln!(
        "wrote {}, campaign.csv and campaign.md",
        dir.join("campaign.json").display()
    );
    Ok(())
}

/// `metapoison compare`: two campaign folders (or their campaign.json files, or their
/// campaign.csv tables, which keep only the per-target means) compared on their shared
/// targets (`compare_judged`), printed as Markdown or, with `json`, as one JSON line.
pub fn compare_folders(first: &Path, others: &[PathBuf], json: bool) -> Result<()> {
    let load = |p: &Path| -> Result<(Vec<JudgedTarget>, String)> {
        let file = if p.is_dir() {
            p.join("campaign.json")
        } else {
            p.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "cannot read {} (give a campaign folder, its campaign.json or its campaign.csv)",
                file.display()
            )
        })?;
        let is_table = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let judged = if is_table {
            judged_targets_from_csv(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        } else {
            let report: CampaignReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a campaign's report", file.display()))?;
            judged_targets(&report)
        };
        // A folder is named after itself, a report after its folder, a table after its file
        // (after its folder when it is the campaign's own campaign.csv).
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
        let name = if let Some(stem) = stem.filter(|s| is_table && s != "campaign") {
            stem
        } else {
            let folder = file.parent().filter(|_| !p.is_dir()).unwrap_or(p);
            std::path::absolute(folder)
                .ok()
                .and_then(|f| Some(f.file_name()?.to_string_lossy().into_owned()))
                .unwrap_or_else(|| folder.display().to_string())
        };
        Ok((judged, name))
    };
    let (a, name_a) = load(first)?;
    let mut rows = Vec::with_capacity(others.len());
    for second in others {
        let (b, name_b) = load(second)?;
        let comparisons = compare_judged(&a, &b);
        if comparisons.is_empty() {
            bail!(
                "{} and {} share no target evaluated by the same kind of victim",
                first.display(),
                second.display()
            );
        }
        rows.push((name_b, comparisons));
    }
    if json {
        // One line per campaign compared, in the order given.
        for (_, comparisons) in &rows {
            println!("{}", serde_json::to_string(comparisons)?);
        }
    } else if let [(name_b, comparisons)] = rows.as_slice() {
        print!(
            "{}",
            comparison_markdown([name_a.as_str(), name_b.as_str()], comparisons)
        );
    } else {
        print!("{}", sweep_markdown(&name_a, &rows));
    }
    Ok(())
}
