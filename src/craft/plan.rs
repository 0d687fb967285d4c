//! Turns a (settled) config plus a data set into concrete choices: the data set's default
//! classes and targets, poison and target indices picked and checked.

use crate::config::{Config, CraftRecipe, ObjectiveKind};
use crate::data::Dataset;
use serde::{Deserialize, Serialize};

/// Everything `auto` in the config, decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub target_class: i64,
    /// Indices among the target class's test images (as configured).
    pub target_ids: Vec<usize>,
    /// The same targets as indices into the test split.
    pub target_indices: Vec<usize>,
    pub poison_class: i64,
    pub adv_class: i64,
    /// Training-split indices of the poisons, slot by slot.
    pub poison_indices: Vec<usize>,
    pub ensemble_size: usize,
    pub stagger: usize,
    pub meta_batch_fraction: f64,
    /// Surrogates crafted at once on their own threads (speed only).
    #[serde(default = "one")]
    pub parallel_surrogates: usize,
    /// All surrogates as one grouped network (speed only).
    #[serde(default)]
    pub grouped_surrogates: bool,
    pub objective: ObjectiveKind,
    /// The attack (runs recorded before there was a choice are MetaPoison).
    #[serde(default = "metapoison")]
    pub recipe: CraftRecipe,
    /// Why each `auto` value came out as it did (logged and shown).
    pub notes: Vec<String>,
}

fn metapoison() -> CraftRecipe {
    CraftRecipe::Metapoison
}

fn one() -> usize {
    1
}

/// A config that cannot be turned into a plan for this data set: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct PlanError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, msg: impl std::fmt::Display) -> PlanError {
    PlanError {
        field: field.to_string(),
        message: msg.to_string(),
    }
}

impl Plan {
    pub fn resolve(config: &Config, data: &Dataset) -> Result<Plan, PlanError> {
        let th = &config.threat;
        let classes = data.num_classes() as i64;
        let (dt, dids, dp) = data.default_pair();
        let target_class = th.target_class.resolve(dt);
        let poison_class = th.poison_class.resolve(dp);
        let adv_class = th.adv_class.resolve(poison_class);
        for (field, c) in [
            ("threat.target_class", target_class),
            ("threat.poison_class", poison_class),
            ("threat.adv_class", adv_class),
        ] {
            if c < 0 || c >= classes {
                return Err(err(
                    field,
                    format!(
                        "class {c} does not exist in {} (classes 0..{})",
                        data.name,
                        classes - 1
                    ),
                ));
            }
        }
        if target_class == adv_class {
            return Err(err(
                "threat.adv_class",
                format!(
                    "equals the target class {target_class}: the attack would have nothing to do"
                ),
            ));
        }
        let target_ids = th.target_ids.resolve(dids);
        let of_class = data.test.indices_of_class(target_class as u8);
        let mut target_indices = Vec::new();
        for &id in &target_ids {
            let Some(&i) = of_class.get(id) else {
                return Err(err(
                    "threat.target_ids",
                    format!("id {id} is out of range: the test split has {} images of class {target_class}", of_class.len()),
                ));
            };
            target_indices.push(i);
        }

        let poison_indices: Vec<usize> = if th.multiclass {
            // Round robin over the classes, first images of each in split order.
            let per: Vec<Vec<usize>> = (0..classes)
                .map(|c| data.train.indices_of_class(c as u8))
                .collect();
            let mut out = Vec::with_capacity(th.npoison());
            let mut depth = 0;
            while out.len() < th.npoison() && depth < data.train.len() {
                for list in &per {
                    if out.len() < th.npoison() {
                        if let Some(&i) = list.get(depth) {
                            out.push(i);
                        }
                    }
                }
                depth += 1;
            }
            out
        } else {
            data.train
                .indices_of_class(poison_class as u8)
                .into_iter()
                .take(th.npoison())
                .collect()
        };
        if poison_indices.len() < th.npoison() {
            return Err(err(
                "threat.npoison",
                format!(
                    "{} poisons asked for, but the training split holds only {} eligible images",
                    th.npoison(),
                    poison_indices.len()
                ),
            ));
        }

        // Hardware-dependent `auto` fields were settled by `Config::settle` (its notes are
        // the caller's to add); unsettled ones read as the CPU profile.
        let recipe = config.craft.recipe;
        let matching = recipe == CraftRecipe::GradientMatching;
        // Gradient matching's surrogates are trained once, not staggered: one after another.
        let ensemble_size = if matching {
            config.matching.surrogates
        } else {
            config.craft.ensemble_size()
        };
        let stagger = if matching { 1 } else { config.craft.stagger() };
        let meta_batch_fraction = config.craft.meta_batch_fraction();
        let parallel_surrogates = if matching {
            1
        } else {
            config.craft.parallel_surrogates().min(ensemble_size)
        };
        let b = config.surrogate.batch_size;
        let batches = data.train.len() / b;
        if batches < config.craft.unroll_steps + 1 {
            return Err(err(
                "surrogate.batch_size",
                format!(
                    "{b} leaves {batches} full batches in {} training images; K = {} unrolled steps need at least {}",
                    data.train.len(),
                    config.craft.unroll_steps,
                    config.craft.unroll_steps + 1
                ),
            ));
        }
        Ok(Plan {
            target_class,
            target_ids,
            target_indices,
            poison_class,
            adv_class,
            poison_indices,
            ensemble_size,
            stagger,
            meta_batch_fraction,
            parallel_surrogates,
            grouped_surrogates: !matching && config.craft.grouped_surrogates() && ensemble_size > 1,
            objective: config.craft.objective,
            recipe,
            notes: Vec::new(),
        })
    }
}
