//! `metapoison campaign`: one crafting run per target id, each exported and judged by fresh
//! victims, so that a success rate *over targets* can be measured (as the papers report it).
//!
//! Layout: CAMPAIGN_DIR/{campaign.json, campaign.csv, campaign.md, config.toml, victims,
//! target-ID/{run, export}}.
//! Every finished piece is kept, so re-running with the same --dir resumes: finished targets
//! are read back, an interrupted crafting run continues from its checkpoint.

use crate::cli::{
    progress_line, progress_text, spawn_engine, victim_protocol, watch_signals, VictimArgs,
};
use crate::config::Config;
use crate::craft::messages::{Phase, Telemetry};
use crate::paths::{timestamp, Paths};
use crate::victim::eval::{wilson95, EvalReport};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct CampaignArgs {
    /// Target ids (indices among the test images of the target class), comma separated.
    /// Default: the first --count candidates of `targets suggest`.
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
    #[command(flatten)]
    victim: VictimArgs,
}

/// How the targets were chosen, saved with the campaign.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    pub method: String,
    pub targets: Vec<usize>,
    /// Margin and clean correctness of each chosen target, when they were ranked.
    #[serde(default)]
    pub candidates: Vec<crate::victim::targets::Candidate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetResult {
    pub target_id: usize,
    pub run_dir: String,
    pub export_dir: String,
    /// Per victim architecture: the evaluation (gray-box first).
    pub evals: Vec<EvalReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmTotals {
    pub victim_net: String,
    pub setting: String,
    /// Poisoned victims that flipped their target, over all targets.
    pub successes: usize,
    pub victims: usize,
    pub success_rate: f64,
    pub success_ci95: (f64, f64),
    /// Targets flipped by a majority of their poisoned victims.
    pub targets_flipped: usize,
    pub targets: usize,
    pub control_successes: usize,
    pub control_victims: usize,
    pub accuracy_poisoned: f64,
    pub accuracy_control: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignReport {
    pub started: String,
    pub selection: Selection,
    pub results: Vec<TargetResult>,
    pub totals: Vec<ArmTotals>,
    pub seconds: f64,
}

fn eval_file(export: &Path, net: &str) -> PathBuf {
    export.join(format!("eval-{net}.json"))
}

/// Totals per victim architecture over the targets evaluated so far.
pub fn totals(results: &[TargetResult]) -> Vec<ArmTotals> {
    let mut nets: Vec<(String, String)> = Vec::new();
    for r in results {
        for e in &r.evals {
            if !nets.iter().any(|(n, _)| n == &e.victim_net) {
                nets.push((e.victim_net.clone(), e.setting.clone()));
            }
        }
    }
    nets.into_iter()
        .map(|(net, setting)| {
            let evals: Vec<&EvalReport> = results
                .iter()
                .flat_map(|r| r.evals.iter().filter(|e| e.victim_net == net))
                .collect();
            // (successes, victim x target outcomes) of one arm over every target.
            let arm = |name: &str| {
                let outcomes = evals
                    .iter()
                    .flat_map(|e| e.trials.iter().filter(|t| t.arm == name))
                    .flat_map(|t| t.success.iter());
                outcomes.fold((0, 0), |(k, n), &hit| (k + usize::from(hit), n + 1))
            };
            let (successes, victims) = arm("poisoned");
            let (control_successes, control_victims) = arm("control");
            let flipped = evals
                .iter()
                .filter(|e| e.poisoned.trials > 0 && e.poisoned.success_rate > 0.5)
                .count();
            let mean = |f: &dyn Fn(&EvalReport) -> f64| {
                evals.iter().map(|e| f(e)).sum::<f64>() / evals.len().max(1) as f64
            };
            ArmTotals {
                victim_net: net,
                setting,
                successes,
                victims,
                success_rate: successes as f64 / victims.max(1) as f64,
                success_ci95: wilson95(successes, victims),
                targets_flipped: flipped,
                targets: evals.len(),
                control_successes,
                control_victims,
                accuracy_poisoned: mean(&|e| e.poisoned.accuracy_mean),
                accuracy_control: mean(&|e| e.control.accuracy_mean),
            }
        })
        .collect()
}

/// Each victim's probability of the first target's adversarial class, for the victims of `arm`.
fn adv_probs(e: &EvalReport, arm: &str) -> Vec<f64> {
    e.trials
        .iter()
        .filter(|t| t.arm == arm)
        .filter_map(|t| {
            let cls = *e.adversarial.first()?;
            t.target_probs.first()?.get(cls as usize).copied()
        })
        .collect()
}

/// The campaign's table as printed and saved (CSV: one row per target and victim net).
pub fn csv(results: &[TargetResult]) -> String {
    let mut out = String::from(
        "target_id,victim_net,setting,epochs,poisoned_successes,poisoned_victims,control_successes,control_victims,accuracy_poisoned,accuracy_control,p_adv_poisoned,p_adv_control\n",
    );
    for r in results {
        for e in &r.evals {
            // Mean probability of the first target's adversarial class, per arm.
            let p_adv = |arm: &str| {
                let v = adv_probs(e, arm);
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            out += &format!(
                "{},{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4}\n",
                r.target_id,
                e.victim_net,
                e.setting,
                e.epochs,
                e.poisoned.successes,
                e.poisoned.trials,
                e.control.successes,
                e.control.trials,
                e.poisoned.accuracy_mean,
                e.control.accuracy_mean,
                p_adv("poisoned"),
                p_adv("control"),
            );
        }
    }
    out
}

/// The campaign as a Markdown table, one row per target and victim net (what a README or a
/// paper's appendix shows): the target's clean margins when it was ranked, each arm's flips and
/// every victim's probability of the adversarial class, clean accuracies; then the printed
/// summary of the totals.
pub fn markdown(report: &CampaignReport) -> String {
    let mut out = format!(
        "Targets: {:?} ({}).\n\n| target | victims | clean margin mean / worst | poisoned flipped | p(adv) poisoned | controls flipped | p(adv) controls | clean accuracy poisoned / control |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        report.selection.targets, report.selection.method
    );
    for r in &report.results {
        let margins = report
            .selection
            .candidates
            .iter()
            .find(|c| c.id == r.target_id)
            .map_or("-".to_string(), |c| {
                format!("{:.2} / {:.2}", c.margin, c.min_margin)
            });
        for e in &r.evals {
            let probs = |arm: &str| {
                let p: Vec<String> = adv_probs(e, arm)
                    .iter()
                    .map(|p| format!("{p:.2}"))
                    .collect();
                p.join(", ")
            };
            out += &format!(
                "| {} | {} ({}) | {margins} | {}/{} | {} | {}/{} | {} | {:.1}% / {:.1}% |\n",
                r.target_id,
                e.victim_net,
                e.setting,
                e.poisoned.successes,
                e.poisoned.trials,
                probs("poisoned"),
                e.control.successes,
                e.control.trials,
                probs("control"),
                e.poisoned.accuracy_mean * 100.0,
                e.control.accuracy_mean * 100.0,
            );
        }
    }
    // The totals as the command prints them.
    out += &format!("\n```\n{}```\n", summary(report));
    out
}

fn save(dir: &Path, report: &CampaignReport) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    crate::craft::checkpoint::write_atomic(&dir.join("campaign.json"), json.as_bytes())
        .with_context(|| format!("cannot write {}", dir.join("campaign.json").display()))?;
    crate::craft::checkpoint::write_atomic(
        &dir.join("campaign.csv"),
        csv(&report.results).as_bytes(),
    )
    .with_context(|| format!("cannot write {}", dir.join("campaign.csv").display()))?;
    crate::craft::checkpoint::write_atomic(&dir.join("campaign.md"), markdown(report).as_bytes())
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
    let (s, _, _) = crate::cli::rank_targets(config, args.suggest_victims)?;
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
    let handle = spawn_engine(config, run_dir.to_path_buf(), resume, stop.clone(), false)?;
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
    handle.join().map_err(anyhow::Error::msg)?;
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
    check_target_choice(&args)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| paths.data_dir.join("campaigns").join(timestamp()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let previous: Option<CampaignReport> = std::fs::read_to_string(dir.join("campaign.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
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
    let device = crate::cli::resolve_device(&config)?;
    if !resuming {
        for note in config.settle(device.is_cuda()) {
            eprintln!("{note}");
            tracing::info!("{note}");
        }
        crate::craft::checkpoint::write_atomic(&config_file, config.to_toml().as_bytes())
            .with_context(|| format!("cannot write {}", config_file.display()))?;
    }
    let selection = match &previous {
        Some(p) => p.selection.clone(),
        None => choose_targets(&config, &args)?,
    };
    eprintln!(
        "campaign in {}: targets {:?} ({})",
        dir.display(),
        selection.targets,
        selection.method
    );
    let mut nets: Vec<Option<String>> = vec![args.victim.victim_net.clone()];
    nets.extend(args.black_box.iter().cloned().map(Some));
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
                formats: crate::export::Formats::parse("npz").map_err(anyhow::Error::msg)?,
                force: true,
            })
            .map_err(anyhow::Error::msg)?;
        }
        let mut evals = Vec::new();
        for net in &nets {
            let mut victim_args = args.victim.clone();
            victim_args.victim_net = net.clone();
            // The control (and noise) victims are the same for every target: trained once.
            victim_args
                .victim_cache
                .get_or_insert_with(|| dir.join("victims"));
            let plan = victim_args.plan(victim_protocol(&target_config, &export_dir), false)?;
            let file = eval_file(&export_dir, plan.victim.net.name());
            let cached: Option<EvalReport> = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let e = match cached {
                Some(e) => e,
                None => {
                    let e = crate::victim::eval::evaluate(&export_dir, &plan, device, |p| {
                        eprintln!(
                            "  victim {}/{} ({} {}{}): target -> {:?}, clean accuracy {:.2}%",
                            p.done,
                            p.total,
                            plan.victim.net.name(),
                            p.trial.arm,
                            if p.trial.cached { ", reused" } else { "" },
                            p.trial.predicted,
                            p.trial.clean_accuracy * 100.0
                        );
                        !stop.load(Ordering::SeqCst)
                    })
                    .map_err(anyhow::Error::msg)?;
                    std::fs::rename(export_dir.join("eval.json"), &file)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    let _ = crate::cli::append_results_row(paths, &e);
                    e
                }
            };
            let noise = e.noise.as_ref().map_or(String::new(), |n| {
                format!(", noise {}/{}", n.successes, n.trials)
            });
            eprintln!(
                "  {} ({}): poisoned {}/{} flipped, control {}/{}{noise}",
                e.victim_net,
                e.setting,
                e.poisoned.successes,
                e.poisoned.trials,
                e.control.successes,
                e.control.trials
            );
            evals.push(e);
        }
        report.results.push(TargetResult {
            target_id: target,
            run_dir: run_dir.display().to_string(),
            export_dir: export_dir.display().to_string(),
            evals,
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

/// The printed summary: one line per victim architecture.
pub fn summary(report: &CampaignReport) -> String {
    let mut out = format!(
        "{} targets ({})\nvictims      setting    success over victims [95% Wilson]  targets flipped  control flips  clean acc poisoned / control\n",
        report.selection.targets.len(),
        report.selection.method
    );
    for t in &report.totals {
        out += &format!(
            "{:<12} {:<10} {:>3}/{:<3} {:>5.1}% [{:>5.1}%, {:>5.1}%]      {:>2}/{:<2}           {:>2}/{:<3}         {:.2}% / {:.2}%\n",
            t.victim_net,
            t.setting,
            t.successes,
            t.victims,
            t.success_rate * 100.0,
            t.success_ci95.0 * 100.0,
            t.success_ci95.1 * 100.0,
            t.targets_flipped,
            t.targets,
            t.control_successes,
            t.control_victims,
            t.accuracy_poisoned * 100.0,
            t.accuracy_control * 100.0
        );
    }
    out
}
