//! What a campaign records and prints: each target's evaluations, totals per victim kind
//! (architecture and recipe) over all targets, the CSV, the Markdown tables (the benchmark
//! table of a protocol campaign, or one row per target and victim kind) and the printed
//! summary.

use super::protocol::Protocol;
use crate::victim::eval::{mean_shift, t_interval95, wilson95, EvalReport};
use serde::{Deserialize, Serialize};

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
    /// Per victim kind: the evaluation (the surrogates' architecture first).
    pub evals: Vec<EvalReport>,
    /// Pretraining and craft steps, from the run's checkpoint (0 for results recorded
    /// before it was).
    #[serde(default)]
    pub craft_seconds: f64,
    /// The crafting objective over its last 5 steps (`CheckpointState::final_loss`); `None`
    /// for results recorded before it was.
    #[serde(default)]
    pub craft_loss: Option<f64>,
}

/// One victim kind's outcomes over every target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmTotals {
    pub victim_net: String,
    /// The victims' recipe ("crafter", "standard" or "custom").
    #[serde(default = "crafter")]
    pub recipe: String,
    pub setting: String,
    /// Poisoned victims that flipped their target, over all targets.
    pub successes: usize,
    pub victims: usize,
    pub success_rate: f64,
    pub success_ci95: (f64, f64),
    /// Poisoned victims flipped the authors' way (the target's verdict in training mode).
    #[serde(default)]
    pub train_mode_successes: usize,
    /// Targets flipped by a majority of their poisoned victims.
    pub targets_flipped: usize,
    pub targets: usize,
    pub control_successes: usize,
    pub control_victims: usize,
    /// The noise arm, where it was trained.
    #[serde(default)]
    pub noise_successes: usize,
    #[serde(default)]
    pub noise_victims: usize,
    pub accuracy_poisoned: f64,
    pub accuracy_control: f64,
    /// Mean probability of the adversarial class in the poisoned and the control victims.
    #[serde(default)]
    pub p_adv_poisoned: f64,
    #[serde(default)]
    pub p_adv_control: f64,
    /// How far the poisons move the target toward the adversarial class, in logits: per
    /// target, the mean over seeds of the poisoned victim's adversarial margin minus the
    /// control victim's with the same seed (`margin_shift`); here the mean over targets.
    /// A finer measure than flips: it sees poisons that move a target without flipping it.
    #[serde(default)]
    pub margin_shift: Option<f64>,
    /// Its 95% Student-t interval: over targets (the unit that varies most) when there are
    /// at least `MIN_TARGETS_FOR_INTERVAL`, else over these targets' victims (what the
    /// poisons do to these targets, not to others).
    #[serde(default)]
    pub margin_shift_ci95: Option<(f64, f64)>,
    /// "targets" or "victims": what the interval is taken over.
    #[serde(default)]
    pub margin_shift_ci_over: String,
    /// The same for the noise victims (random +-eps in place of the poisons' perturbations):
    /// what the budget does when spent at random.
    #[serde(default)]
    pub noise_margin_shift: Option<f64>,
    /// The poisoned victims' margin beyond the noise victims' with the same seed, mean over
    /// targets, and its interval (taken as `margin_shift_ci95` is): what the crafting adds to
    /// the same budget spent at random. `None` without a noise arm.
    #[serde(default)]
    pub beyond_noise: Option<f64>,
    #[serde(default)]
    pub beyond_noise_ci95: Option<(f64, f64)>,
    /// The same shift for the other test images of the target's class (their mean margin,
    /// `Trial::class_margin`), mean over targets: the part of the target's shift that is the
    /// whole class moving. `None` for evaluations recorded before it was.
    #[serde(default)]
    pub class_margin_shift: Option<f64>,
    /// Wall-clock seconds of these evaluations.
    #[serde(default)]
    pub eval_seconds: f64,
}

/// Targets from which the margin shift's interval is taken over targets.
pub const MIN_TARGETS_FOR_INTERVAL: usize = 5;

fn crafter() -> String {
    "crafter".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignReport {
    pub started: String,
    pub selection: Selection,
    /// The protocol the campaign follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    pub results: Vec<TargetResult>,
    pub totals: Vec<ArmTotals>,
    pub seconds: f64,
}

/// (successes, outcomes) of one arm in `evals`: every victim and target.
fn arm_count(evals: &[&EvalReport], arm: &str, train_mode: bool) -> (usize, usize) {
    evals
        .iter()
        .flat_map(|e| e.trials.iter().filter(|t| t.arm == arm))
        .flat_map(|t| {
            if train_mode {
                t.train_mode_success()
            } else {
                t.success.clone()
            }
        })
        .fold((0, 0), |(k, n), hit| (k + usize::from(hit), n + 1))
}

/// Totals per victim kind (architecture and recipe) over the targets evaluated so far, in the
/// order the kinds first appear.
pub fn totals(results: &[TargetResult]) -> Vec<ArmTotals> {
    let mut kinds: Vec<(String, &'static str, String)> = Vec::new();
    for e in results.iter().flat_map(|r| &r.evals) {
        if !kinds
            .iter()
            .any(|(n, r, _)| n == &e.victim_net && *r == e.recipe())
        {
            kinds.push((e.victim_net.clone(), e.recipe(), e.setting.clone()));
        }
    }
    kinds
        .into_iter()
        .map(|(net, recipe, setting)| {
            let evals: Vec<&EvalReport> = results
                .iter()
                .flat_map(|r| {
                    r.evals
                        .iter()
                        .filter(|e| e.victim_net == net && e.recipe() == recipe)
                })
                .collect();
            let (successes, victims) = arm_count(&evals, "poisoned", false);
            let (train_mode_successes, _) = arm_count(&evals, "poisoned", true);
            let (control_successes, control_victims) = arm_count(&evals, "control", false);
            let (noise_successes, noise_victims) = arm_count(&evals, "noise", false);
            let flipped = evals
                .iter()
                .filter(|e| e.poisoned.trials > 0 && e.poisoned.success_rate > 0.5)
                .count();
            let per_target: Vec<Vec<f64>> = evals
                .iter()
                .map(|e| margin_shifts(e, "poisoned"))
                .filter(|v| !v.is_empty())
                .collect();
            let (shifts, margin_shift_ci95, ci_over) = means_and_interval(&per_target);
            let noise_shifts: Vec<f64> = evals
                .iter()
                .filter_map(|e| e.margin_shift("noise"))
                .collect();
            let beyond: Vec<Vec<f64>> = evals
                .iter()
                .map(|e| beyond_noise(e))
                .filter(|v| !v.is_empty())
                .collect();
            // Only when every target has a noise arm, so that its interval is taken over
            // what the margin shift's is.
            let (beyond_means, ci, _) = means_and_interval(&beyond);
            let (beyond_noise, beyond_noise_ci95) = if beyond_means.len() == shifts.len() {
                (mean_of(&beyond_means), ci)
            } else {
                (None, None)
            };
            let class_shifts: Vec<f64> = evals
                .iter()
                .filter_map(|e| e.class_shift("poisoned"))
                .collect();
            let mean = |f: &dyn Fn(&EvalReport) -> f64| {
                evals.iter().map(|e| f(e)).sum::<f64>() / evals.len().max(1) as f64
            };
            ArmTotals {
                victim_net: net,
                recipe: recipe.into(),
                setting,
                successes,
                victims,
                success_rate: successes as f64 / victims.max(1) as f64,
                success_ci95: wilson95(successes, victims),
                train_mode_successes,
                targets_flipped: flipped,
                targets: evals.len(),
                control_successes,
                control_victims,
                noise_successes,
                noise_victims,
                accuracy_poisoned: mean(&|e| e.poisoned.accuracy_mean),
                accuracy_control: mean(&|e| e.control.accuracy_mean),
                p_adv_poisoned: mean(&|e| mean_p_adv(e, "poisoned")),
                p_adv_control: mean(&|e| mean_p_adv(e, "control")),
                margin_shift: mean_of(&shifts),
                margin_shift_ci95,
                margin_shift_ci_over: ci_over.into(),
                noise_margin_shift: mean_of(&noise_shifts),
                beyond_noise,
                beyond_noise_ci95,
                // Only when every target has it, so that it sits beside the same targets' mean.
                class_margin_shift: (class_shifts.len() == shifts.len())
                    .then(|| mean_of(&class_shifts))
                    .flatten(),
                eval_seconds: evals.iter().map(|e| e.seconds).sum(),
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

/// The mean of `adv_probs` (0 when the arm has no victims).
fn mean_p_adv(e: &EvalReport, arm: &str) -> f64 {
    let v = adv_probs(e, arm);
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Per seed, the adversarial margin (`adv_margin`, first target) of the victim of `arm` minus
/// that of the control victim trained with the same seed, in the order of `arm`'s victims.
pub fn margin_shifts(e: &EvalReport, arm: &str) -> Vec<f64> {
    e.seeded_margin_shifts(arm)
        .into_iter()
        .map(|(_, d)| d)
        .collect()
}

/// Per seed, the poisoned victim's adversarial margin minus the noise victim's trained with
/// the same seed (both less their control twin's, which cancels); empty without a noise arm.
pub fn beyond_noise(e: &EvalReport) -> Vec<f64> {
    let noise = e.seeded_margin_shifts("noise");
    e.seeded_margin_shifts("poisoned")
        .into_iter()
        .filter_map(|(seed, p)| Some(p - noise.iter().find(|(s, _)| *s == seed)?.1))
        .collect()
}

/// Two campaigns compared for one victim kind over the targets both evaluated with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub victim_net: String,
    pub recipe: String,
    /// Targets both campaigns evaluated with this victim kind, in the first one's order.
    pub targets: Vec<usize>,
    /// Poisoned victims flipped and their number, in the first and in the second campaign.
    pub flipped: [(usize, usize); 2],
    /// The mean margin shift (`margin_shift`) over these targets, in each campaign.
    pub margin_shift: [f64; 2],
    /// Second minus first, per target: the mean over the victim seeds both campaigns trained.
    pub per_target: Vec<(usize, f64)>,
    /// Second minus first over the targets, and its 95% Student-t interval, over targets or
    /// over the victims (as for `ArmTotals::margin_shift_ci95`).
    pub difference: f64,
    pub difference_ci95: Option<(f64, f64)>,
    pub ci_over: String,
}

impl Comparison {
    /// On how many targets the second campaign moved the target further than the first: a
    /// sign count, which one target's large difference cannot carry as it can the mean.
    pub fn targets_higher(&self) -> usize {
        self.per_target.iter().filter(|(_, d)| *d > 0.0).count()
    }
}

/// One target's evaluation by one victim kind, as `compare` reads it: from a campaign's
/// report, with every poisoned victim's shift by seed, or from its CSV table, which keeps
/// only the per-target mean (a table committed beside the results outlives the campaign
/// folder, and the machine it ran on).
#[derive(Debug, Clone, PartialEq)]
pub struct JudgedTarget {
    pub target_id: usize,
    pub victim_net: String,
    pub recipe: String,
    pub epochs: usize,
    /// How the victims were trained, whatever their number (a CSV table does not say).
    pub training: Option<crate::config::VictimConfig>,
    /// Poisoned victims flipped and their number.
    pub flipped: (usize, usize),
    /// The poisoned victims' mean margin shift (`None` without control twins).
    pub margin_shift: Option<f64>,
    /// Each poisoned victim's margin shift by seed; `None` from a CSV table.
    pub victims: Option<Vec<(u64, f64)>>,
}

impl JudgedTarget {
    /// The same kind of victim trained as long, so that seeds pair like with like; the
    /// training config is compared where both sides record it.
    fn same_kind(&self, other: &JudgedTarget) -> bool {
        self.victim_net == other.victim_net
            && self.recipe == other.recipe
            && self.epochs == other.epochs
            && match (&self.training, &other.training) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Every evaluation of a campaign's report, target by target.
pub fn judged_targets(report: &CampaignReport) -> Vec<JudgedTarget> {
    let mut out = Vec::new();
    for r in &report.results {
        for e in &r.evals {
            let victims = e.seeded_margin_shifts("poisoned");
            out.push(JudgedTarget {
                target_id: r.target_id,
                victim_net: e.victim_net.clone(),
                recipe: e.recipe().into(),
                epochs: e.epochs,
                training: e
                    .protocol
                    .clone()
                    .map(|p| crate::config::VictimConfig { trials: 0, ..p }),
                flipped: (e.poisoned.successes, e.poisoned.trials),
                margin_shift: mean_shift(&victims),
                victims: Some(victims),
            });
        }
    }
    out
}

/// Why a CSV table could not be read as a campaign's `campaign.csv`; lines count from 1.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CsvTableError {
    #[error("empty file, no header line")]
    Empty,
    #[error("no column `{column}` in the header (is this a campaign's campaign.csv?)")]
    MissingColumn { column: &'static str },
    #[error("line {line}: {cells} cells where the header names {columns}")]
    CellCount {
        line: usize,
        cells: usize,
        columns: usize,
    },
    #[error("line {line}: `{value}` is not {expected} ({column})")]
    BadCell {
        line: usize,
        column: String,
        value: String,
        /// "a count" or "a number".
        expected: &'static str,
    },
}

/// The rows of a campaign's CSV table (`csv`), read by their header's names, so that tables
/// written before some columns existed still read. Errors name the line and the column.
pub fn judged_targets_from_csv(text: &str) -> Result<Vec<JudgedTarget>, CsvTableError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(CsvTableError::Empty);
    };
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &'static str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or(CsvTableError::MissingColumn { column: name })
    };
    let [target, net, recipe, epochs, flipped, victims, shift] = [
        "target_id",
        "victim_net",
        "recipe",
        "epochs",
        "poisoned_successes",
        "poisoned_victims",
        "margin_shift",
    ]
    .map(column);
    let (target, net, recipe, epochs, flipped, victims, shift) =
        (target?, net?, recipe?, epochs?, flipped?, victims?, shift?);
    let mut out = Vec::new();
    for (i, line) in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != names.len() {
            return Err(CsvTableError::CellCount {
                line: i + 1,
                cells: cells.len(),
                columns: names.len(),
            });
        }
        let bad_cell = |c: usize, expected| CsvTableError::BadCell {
            line: i + 1,
            column: names[c].into(),
            value: cells[c].into(),
            expected,
        };
        let count = |c: usize| {
            cells[c]
                .parse::<usize>()
                .map_err(|_| bad_cell(c, "a count"))
        };
        let margin_shift = match cells[shift] {
            "" => None,
            v => Some(v.parse::<f64>().map_err(|_| bad_cell(shift, "a number"))?),
        };
        out.push(JudgedTarget {
            target_id: count(target)?,
            victim_net: cells[net].into(),
            recipe: cells[recipe].into(),
            epochs: count(epochs)?,
            training: None,
            flipped: (count(flipped)?, count(victims)?),
            margin_shift,
            victims: None,
        });
    }
    Ok(out)
}

/// Compares two campaigns (for instance two settings judged by the same protocol) on their
/// shared targets, victim kind by victim kind. Victims are paired by seed, so that a victim
/// of the second campaign is set against the one of the first that began from the same
/// weights and batch order: the difference of their margin shifts is what the second
/// setting's poisons do beyond the first's, free of the victims' own spread.
pub fn compare(first: &CampaignReport, second: &CampaignReport) -> Vec<Comparison> {
    compare_judged(&judged_targets(first), &judged_targets(second))
}

/// `compare` on evaluations from reports or CSV tables. Where either side is a table, a
/// target's difference is the difference of its two means (the same number when every seed
/// pairs, as under a protocol), and the interval can only be taken over targets: from
/// `MIN_TARGETS_FOR_INTERVAL` targets on, else there is none.
pub fn compare_judged(first: &[JudgedTarget], second: &[JudgedTarget]) -> Vec<Comparison> {
    let mut out: Vec<Comparison> = Vec::new();
    // Per comparison, every paired victim's difference (for the interval over victims);
    // `None` once a target came from a table.
    let mut victims: Vec<Option<Vec<f64>>> = Vec::new();
    for ja in first {
        let Some(jb) = second
            .iter()
            .find(|j| j.target_id == ja.target_id && j.same_kind(ja))
        else {
            continue;
        };
        let (d, a, b, paired) = match (&ja.victims, &jb.victims) {
            (Some(sa), Some(sb)) => {
                let paired: Vec<f64> = sa
                    .iter()
                    .filter_map(|&(seed, a)| Some(sb.iter().find(|(s, _)| *s == seed)?.1 - a))
                    .collect();
                let (Some(d), Some(a), Some(b)) =
                    (mean_of(&paired), ja.margin_shift, jb.margin_shift)
                else {
                    continue;
                };
                (d, a, b, Some(paired))
            }
            _ => {
                let (Some(a), Some(b)) = (ja.margin_shift, jb.margin_shift) else {
                    continue;
                };
                (b - a, a, b, None)
            }
        };
        let same_kind = |c: &Comparison| c.victim_net == ja.victim_net && c.recipe == ja.recipe;
        let i = out.iter().position(same_kind).unwrap_or_else(|| {
            out.push(Comparison {
                victim_net: ja.victim_net.clone(),
                recipe: ja.recipe.clone(),
                targets: vec![],
                flipped: [(0, 0); 2],
                margin_shift: [0.0; 2],
                per_target: vec![],
                difference: 0.0,
                difference_ci95: None,
                ci_over: String::new(),
            });
            victims.push(Some(Vec::new()));
            out.len() - 1
        });
        let c = &mut out[i];
        c.targets.push(ja.target_id);
        for (k, j) in [ja, jb].into_iter().enumerate() {
            c.flipped[k].0 += j.flipped.0;
            c.flipped[k].1 += j.flipped.1;
        }
        c.margin_shift[0] += a;
        c.margin_shift[1] += b;
        c.per_target.push((ja.target_id, d));
        victims[i] = match (victims[i].take(), paired) {
            (Some(mut all), Some(paired)) => {
                all.extend(paired);
                Some(all)
            }
            _ => None,
        };
    }
    for (c, victims) in out.iter_mut().zip(&victims) {
        let n = c.targets.len() as f64;
        c.margin_shift = c.margin_shift.map(|v| v / n);
        let means: Vec<f64> = c.per_target.iter().map(|&(_, d)| d).collect();
        c.difference = means.iter().sum::<f64>() / n;
        let (ci, over) = shift_interval(&means, victims.as_deref().unwrap_or(&[]));
        c.difference_ci95 = ci;
        c.ci_over = if ci.is_some() {
            over.into()
        } else {
            String::new()
        };
    }
    out
}

/// `compare`'s result as Markdown: a row per victim kind, then its per-target differences.
pub fn comparison_markdown(names: [&str; 2], comparisons: &[Comparison]) -> String {
    let [a, b] = names;
    let mut out = format!(
        "`{b}` against `{a}`, victims paired by seed (margin shift: the target's adversarial margin in a poisoned victim minus its control twin's, in logits).\n\n| victims | targets | flipped `{a}` | flipped `{b}` | margin shift `{a}` | margin shift `{b}` | difference [95% t] | per target |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for c in comparisons {
        let per_target: Vec<String> = c
            .per_target
            .iter()
            .map(|(t, d)| format!("{t}: {d:+.2}"))
            .collect();
        out += &format!(
            "| {} | higher on {} of {}: {} |\n",
            comparison_cells(c),
            c.targets_higher(),
            c.per_target.len(),
            per_target.join(", ")
        );
    }
    out
}

/// The cells both comparison tables share, from the victim kind to the difference with its
/// interval: "victims | targets | flipped | flipped | shift | shift | **difference** [..]".
fn comparison_cells(c: &Comparison) -> String {
    let interval = c.difference_ci95.map_or(String::new(), |(lo, hi)| {
        format!(" [{lo:+.2}, {hi:+.2}] over {}", c.ci_over)
    });
    format!(
        "{} | {} | {} | {} | {:+.2} | {:+.2} | **{:+.2}**{interval}",
        victims_label(&c.victim_net, &c.recipe),
        c.targets.len(),
        flips(c.flipped[0].0, c.flipped[0].1, false),
        flips(c.flipped[1].0, c.flipped[1].1, false),
        c.margin_shift[0],
        c.margin_shift[1],
        c.difference,
    )
}

/// Several campaigns each compared with one baseline (a sweep of settings judged by the same
/// protocol), as one Markdown table: a row per campaign and victim kind, on the targets that
/// campaign shares with the baseline, so a setting judged on fewer targets is set against the
/// baseline's victims of those targets only.
pub fn sweep_markdown(baseline: &str, rows: &[(String, Vec<Comparison>)]) -> String {
    let mut out = format!(
        "Each campaign against `{baseline}` on the targets both evaluated, victims paired by seed (margin shift: the target's adversarial margin in a poisoned victim minus its control twin's, in logits; higher on: the targets where the difference is above 0).\n\n| campaign | victims | targets | flipped `{baseline}` | flipped | margin shift `{baseline}` | margin shift | difference [95% t] | higher on |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for (name, comparisons) in rows {
        for c in comparisons {
            out += &format!(
                "| {name} | {} | {}/{} |\n",
                comparison_cells(c),
                c.targets_higher(),
                c.per_target.len()
            );
        }
    }
    out
}

/// The 95% t interval of shifts and what it is taken over: the per-target means from
/// `MIN_TARGETS_FOR_INTERVAL` targets on, else every victim of these few targets (which says
/// what the poisons do to them, not to other targets).
fn shift_interval(per_target: &[f64], victims: &[f64]) -> (Option<(f64, f64)>, &'static str) {
    let (values, over) = if per_target.len() >= MIN_TARGETS_FOR_INTERVAL {
        (per_target, "targets")
    } else {
        (victims, "victims")
    };
    (t_interval95(values).map(|(_, ci)| ci), over)
}

/// Per target, the mean of its victims' values (targets without any left out), and the 95%
/// interval of the mean over targets as `shift_interval` takes it, with what it is over.
fn means_and_interval(per_target: &[Vec<f64>]) -> (Vec<f64>, Option<(f64, f64)>, &'static str) {
    let means: Vec<f64> = per_target.iter().filter_map(|v| mean_of(v)).collect();
    let (ci, over) = shift_interval(&means, &per_target.concat());
    (means, ci, over)
}

fn mean_of(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// A signed margin shift with two decimals, or "-".
fn shift_text(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:+.2}"))
}

/// The totals' margin shift with its interval: "**+1.41** [+0.70, +2.12] over targets".
fn shift_with_interval(t: &ArmTotals) -> String {
    match (t.margin_shift, t.margin_shift_ci95) {
        (Some(m), Some((lo, hi))) => format!(
            "**{m:+.2}** [{lo:+.2}, {hi:+.2}] over {}",
            t.margin_shift_ci_over
        ),
        (m, _) => shift_text(m),
    }
}

/// The totals' margin beyond the noise victims' with its interval: "+0.16 [-0.46, +0.77]",
/// or "-" without a noise arm.
fn beyond_noise_text(t: &ArmTotals) -> String {
    match (t.beyond_noise, t.beyond_noise_ci95) {
        (Some(m), Some((lo, hi))) => format!("{m:+.2} [{lo:+.2}, {hi:+.2}]"),
        (m, _) => shift_text(m),
    }
}

/// "victim net" or, for another recipe than the crafter's, "victim net, recipe".
fn victims_label(net: &str, recipe: &str) -> String {
    if recipe == "crafter" {
        net.to_string()
    } else {
        format!("{net}, {recipe} recipe")
    }
}

/// The campaign's table as printed and saved (CSV: one row per target and victim kind).
pub fn csv(results: &[TargetResult]) -> String {
    let mut out = String::from(
        "target_id,victim_net,recipe,setting,epochs,poisoned_successes,poisoned_victims,train_mode_successes,control_successes,control_victims,noise_successes,noise_victims,accuracy_poisoned,accuracy_control,p_adv_poisoned,p_adv_control,margin_shift,noise_margin_shift,class_margin_shift,craft_seconds,eval_seconds,craft_loss\n",
    );
    for r in results {
        for e in &r.evals {
            let noise = e.noise.as_ref();
            out += &format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{},{},{},{:.1},{:.1},{}\n",
                r.target_id,
                e.victim_net,
                e.recipe(),
                e.setting,
                e.epochs,
                e.poisoned.successes,
                e.poisoned.trials,
                e.poisoned.train_mode_successes,
                e.control.successes,
                e.control.trials,
                noise.map_or(0, |n| n.successes),
                noise.map_or(0, |n| n.trials),
                e.poisoned.accuracy_mean,
                e.control.accuracy_mean,
                mean_p_adv(e, "poisoned"),
                mean_p_adv(e, "control"),
                e.margin_shift("poisoned").map_or(String::new(), |v| format!("{v:.4}")),
                e.margin_shift("noise").map_or(String::new(), |v| format!("{v:.4}")),
                e.class_shift("poisoned").map_or(String::new(), |v| format!("{v:.4}")),
                r.craft_seconds,
                e.seconds,
                r.craft_loss.map_or(String::new(), |l| format!("{l:.4}")),
            );
        }
    }
    out
}

/// Minutes, one decimal.
fn minutes(seconds: f64) -> String {
    format!("{:.1} min", seconds / 60.0)
}

/// "k/n" and, with `interval`, its rate and 95% Wilson interval.
fn flips(k: usize, n: usize, interval: bool) -> String {
    if !interval || n == 0 {
        return format!("{k}/{n}");
    }
    let (lo, hi) = wilson95(k, n);
    format!(
        "{k}/{n}, {:.0}% [{:.0}, {:.0}]",
        k as f64 / n as f64 * 100.0,
        lo * 100.0,
        hi * 100.0
    )
}

/// The benchmark table of a protocol campaign: a row per target and victim kind (poisoned
/// victims flipped, flipped the authors' way, controls, noise controls, the mean probability
/// of the adversarial class, clean accuracy, crafting and evaluation time), then a row per
/// victim kind over all targets with Wilson intervals.
fn benchmark_table(report: &CampaignReport, protocol: &Protocol) -> String {
    let (done, all) = (&report.selection.targets, &protocol.targets);
    let part = if done.len() >= all.len() {
        String::new()
    } else if all.starts_with(done) {
        format!(" Only its first {} targets so far: {done:?}.", done.len())
    } else {
        format!(
            " Only {} of its {} targets here: {done:?}.",
            done.len(),
            all.len()
        )
    };
    let mut out = format!(
        "Protocol `{}`: {}. Targets {:?}.{part}\n\n| target | victims | poisoned flipped | train mode | controls flipped | noise flipped | p(adv) poisoned / control | margin shift poisoned / noise | its class moved | clean accuracy poisoned / control | crafting | crafting loss, last 5 steps | evaluation |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        protocol.name, protocol.description, protocol.targets
    );
    let row = |target: &str, e: &EvalReport, craft: &str, loss: &str| {
        let noise = e
            .noise
            .as_ref()
            .map_or("-".to_string(), |n| flips(n.successes, n.trials, false));
        format!(
            "| {target} | {} ({}) | {} | {} | {} | {noise} | {:.2} / {:.2} | {} / {} | {} | {:.1}% / {:.1}% | {craft} | {loss} | {} |\n",
            victims_label(&e.victim_net, e.recipe()),
            e.setting,
            flips(e.poisoned.successes, e.poisoned.trials, false),
            flips(e.poisoned.train_mode_successes, e.poisoned.trials, false),
            flips(e.control.successes, e.control.trials, false),
            mean_p_adv(e, "poisoned"),
            mean_p_adv(e, "control"),
            shift_text(e.margin_shift("poisoned")),
            shift_text(e.margin_shift("noise")),
            shift_text(e.class_shift("poisoned")),
            e.poisoned.accuracy_mean * 100.0,
            e.control.accuracy_mean * 100.0,
            minutes(e.seconds),
        )
    };
    for r in &report.results {
        for (i, e) in r.evals.iter().enumerate() {
            let (craft, loss) = if i == 0 {
                (
                    minutes(r.craft_seconds),
                    r.craft_loss.map_or("-".to_string(), |l| format!("{l:.2}")),
                )
            } else {
                (String::new(), String::new())
            };
            out += &row(&r.target_id.to_string(), e, &craft, &loss);
        }
    }
    let craft_total: f64 = report.results.iter().map(|r| r.craft_seconds).sum();
    for (i, t) in report.totals.iter().enumerate() {
        out += &format!(
            "| **all {}** | {} ({}) | **{}** | {} | {} | {} | {:.2} / {:.2} | {} / {}{} | {} | {:.1}% / {:.1}% | {} |  | {} |\n",
            t.targets,
            victims_label(&t.victim_net, &t.recipe),
            t.setting,
            flips(t.successes, t.victims, true),
            flips(t.train_mode_successes, t.victims, true),
            flips(t.control_successes, t.control_victims, true),
            if t.noise_victims > 0 {
                flips(t.noise_successes, t.noise_victims, true)
            } else {
                "-".into()
            },
            t.p_adv_poisoned,
            t.p_adv_control,
            shift_with_interval(t),
            shift_text(t.noise_margin_shift),
            if t.beyond_noise.is_some() {
                format!("; poisoned beyond noise {}", beyond_noise_text(t))
            } else {
                String::new()
            },
            shift_text(t.class_margin_shift),
            t.accuracy_poisoned * 100.0,
            t.accuracy_control * 100.0,
            if i == 0 { minutes(craft_total) } else { String::new() },
            minutes(t.eval_seconds),
        );
    }
    out
}

/// The campaign as a Markdown table: a protocol campaign's benchmark table, or one row per
/// target and victim kind (the target's clean margins when it was ranked, each arm's flips and
/// every victim's probability of the adversarial class, clean accuracies); then the printed
/// summary of the totals.
pub fn markdown(report: &CampaignReport) -> String {
    let mut out = match &report.protocol {
        Some(p) => benchmark_table(report, p),
        None => per_target_table(report),
    };
    // The totals as the command prints them.
    out += &format!("\n```\n{}```\n", summary(report));
    out
}

fn per_target_table(report: &CampaignReport) -> String {
    let mut out = format!(
        "Targets: {:?} ({}).\n\n| target | victims | clean margin mean / worst | poisoned flipped | p(adv) poisoned | controls flipped | p(adv) controls | margin shift | clean accuracy poisoned / control |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
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
                "| {} | {} ({}) | {margins} | {}/{} | {} | {}/{} | {} | {} | {:.1}% / {:.1}% |\n",
                r.target_id,
                victims_label(&e.victim_net, e.recipe()),
                e.setting,
                e.poisoned.successes,
                e.poisoned.trials,
                probs("poisoned"),
                e.control.successes,
                e.control.trials,
                probs("control"),
                shift_text(e.margin_shift("poisoned")),
                e.poisoned.accuracy_mean * 100.0,
                e.control.accuracy_mean * 100.0,
            );
        }
    }
    out
}

/// The printed summary: one line per victim kind.
pub fn summary(report: &CampaignReport) -> String {
    let method = match &report.protocol {
        Some(p) => format!("protocol {}", p.name),
        None => report.selection.method.clone(),
    };
    let mut out = format!(
        "{} targets ({method})\nvictims      recipe    setting    success over victims [95% Wilson]  targets flipped  control flips  noise flips  train mode  clean acc poisoned / control  margin shift [95% t]  beyond noise [95% t]\n",
        report.selection.targets.len(),
    );
    for t in &report.totals {
        out += &format!(
            "{:<12} {:<9} {:<10} {:>3}/{:<3} {:>5.1}% [{:>5.1}%, {:>5.1}%]      {:>2}/{:<2}           {:>2}/{:<3}        {:>7}  {:>10}  {:.2}% / {:.2}%       {}  {}\n",
            t.victim_net,
            t.recipe,
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
            if t.noise_victims > 0 {
                format!("{}/{}", t.noise_successes, t.noise_victims)
            } else {
                "-".into()
            },
            format!("{}/{}", t.train_mode_successes, t.victims),
            t.accuracy_poisoned * 100.0,
            t.accuracy_control * 100.0,
            shift_with_interval(t).replace("**", ""),
            beyond_noise_text(t),
        );
    }
    out
}
