//! Run configuration: serde structs read from TOML, every field defaulting to MetaPoison's
//! published setting (see config.example.toml), validated with messages that name the field.

mod auto;
mod profile;
mod validate;

pub use auto::Auto;
pub use profile::HardwareProfile;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a crafting run needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: DataConfig,
    pub threat: ThreatConfig,
    pub craft: CraftConfig,
    pub surrogate: TrainConfig,
    pub victim: VictimConfig,
    /// Gradient matching's settings (`craft.recipe = "gradient-matching"`).
    pub matching: MatchingConfig,
    pub run: RunConfig,
    pub keys: KeysConfig,
}

/// The dashboard's keys: one character each, or "space".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    pub pause: String,
    pub params: String,
    pub checkpoint: String,
    pub export: String,
    pub evaluate: String,
    pub help: String,
    pub log_scale: String,
    pub ascii: String,
    pub next_poison: String,
    pub prev_poison: String,
    pub quit: String,
}

impl Default for KeysConfig {
    fn default() -> Self {
        let k = |s: &str| s.to_string();
        KeysConfig {
            pause: k("space"),
            params: k("p"),
            checkpoint: k("c"),
            export: k("e"),
            evaluate: k("v"),
            help: k("?"),
            log_scale: k("g"),
            ascii: k("a"),
            next_poison: k("]"),
            prev_poison: k("["),
            quit: k("q"),
        }
    }
}

impl KeysConfig {
    /// Every binding with its config field name, in display order.
    pub fn bindings(&self) -> [(&'static str, &str); 11] {
        [
            ("keys.pause", &self.pause),
            ("keys.params", &self.params),
            ("keys.checkpoint", &self.checkpoint),
            ("keys.export", &self.export),
            ("keys.evaluate", &self.evaluate),
            ("keys.help", &self.help),
            ("keys.log_scale", &self.log_scale),
            ("keys.ascii", &self.ascii),
            ("keys.next_poison", &self.next_poison),
            ("keys.prev_poison", &self.prev_poison),
            ("keys.quit", &self.quit),
        ]
    }

    /// The character a binding stands for ("space" is ' '); None if it is not one character.
    pub fn key_char(binding: &str) -> Option<char> {
        if binding == "space" {
            return Some(' ');
        }
        let mut chars = binding.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if !c.is_control() && !c.is_whitespace() => Some(c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The Fashion-MNIST subset vendored under assets/ (no download, no path needed).
    Embedded,
    /// Fashion-MNIST IDX files (gzipped or raw) in `data.path`.
    FashionMnist,
    /// MNIST IDX files in `data.path`.
    Mnist,
    /// CIFAR-10 in `data.path`: the binary or the python version, or an official archive.
    Cifar10,
}

/// Which training images `data.train_limit` keeps.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subset {
    /// The first `train_limit / classes` images of each class, in the data set's order: the
    /// authors' class-balanced subset (500 of each CIFAR-10 class for 5000 images).
    Balanced,
    /// The first `train_limit` images, whatever their classes. Runs recorded before this field
    /// existed used this.
    First,
}

/// As the config spells it (settle's notes print values with `{:?}`).
impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Subset::Balanced => "balanced",
            Subset::First => "first",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    /// Folder holding the data set's files (unused for `embedded`).
    pub path: Option<PathBuf>,
    /// Train on N training images only; 0 = the whole training split. `auto` = the authors'
    /// nbatch 40 x batch 125 = 5000 (10% of CIFAR-10) on CUDA, 2000 on CPU.
    pub train_limit: Auto<usize>,
    /// Which N images: class-balanced (the authors') or the first N. `auto` = balanced on
    /// CUDA, the first N on a CPU (the setting the CPU figures were measured with).
    pub subset: Auto<Subset>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Embedded,
            path: None,
            train_limit: Auto::Auto,
            subset: Auto::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThreatConfig {
    /// Class of the target image(s); `auto` = the data set's default pair (CIFAR-10: 2 bird).
    pub target_class: Auto<i64>,
    /// Indices among the test images of the target class; `auto` = the data set's default.
    pub target_ids: Auto<Vec<usize>>,
    /// Class whose training images become poisons; `auto` = data set default (CIFAR-10: 5 dog).
    pub poison_class: Auto<i64>,
    /// Class the target should be classified as; `auto` = the poison class.
    pub adv_class: Auto<i64>,
    /// Number of poisons (the first `npoison` training images of the poison class); `auto` =
    /// 200 on CUDA, 150 on CPU.
    pub npoison: Auto<usize>,
    /// Draw poisons from all classes instead of the poison class.
    pub multiclass: bool,
    /// L-inf bound of the additive perturbation, on the 0-255 pixel scale.
    pub eps: f64,
    /// Bound of the colour-grid offsets, as a fraction of each YUV channel's range.
    pub color_eps: f64,
    /// Points per axis of the ReColor lookup grid.
    pub color_grid: usize,
    /// Weight of the colour grid's smoothness penalty.
    pub smooth_coef: f64,
}

impl Default for ThreatConfig {
    fn default() -> Self {
        Self {
            target_class: Auto::Auto,
            target_ids: Auto::Auto,
            poison_class: Auto::Auto,
            adv_class: Auto::Auto,
            npoison: Auto::Auto,
            multiclass: false,
            eps: 8.0,
            color_eps: 0.04,
            color_grid: 10,
            smooth_coef: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    Cw,
    Xent,
    XentC,
    Dualxent,
    Indis3,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CraftConfig {
    /// Outer (craft) steps; `auto` = the authors' 61 (they keep the poisons of step 60) on
    /// CUDA, 35 on CPU.
    pub steps: Auto<usize>,
    /// K: unrolled SGD steps kept in the graph.
    pub unroll_steps: usize,
    /// M: surrogates in the staggered ensemble; `auto` = 24 on CUDA, 4 on CPU.
    pub ensemble_size: Auto<usize>,
    /// Epochs between successive surrogates; `auto` = 1 on CUDA, 5 on CPU.
    pub stagger: Auto<usize>,
    /// Fraction of the poison-holding batches of an epoch at which the meta-gradient is taken;
    /// `auto` = 1.0 (the authors' every batch) on both; lower it on small machines.
    pub meta_batch_fraction: Auto<f64>,
    /// Surrogates crafted at the same time, each on its own thread with its share of the CPU
    /// cores. Speed only: the maths is the same (float rounding aside). 1 = one after another;
    /// `auto` = 2 on CPU, 1 on CUDA.
    pub parallel_surrogates: Auto<usize>,
    /// All surrogates batched into one grouped network (one kernel a layer for all of them,
    /// walking their epochs in lockstep). Speed only: the same maths (float rounding aside).
    /// `auto` = on CUDA (ConvNetBN is kernel-launch bound there), off on a CPU.
    pub grouped_surrogates: Auto<bool>,
    pub objective: ObjectiveKind,
    /// Adam learning rate on the 0-255 scale (also applied to the colour grid).
    pub outer_lr: f64,
    /// Quadratic warm-up of the outer lr over this many steps.
    pub warmup_steps: usize,
    /// Steps at which the outer lr is multiplied by `lr_drop_factor`; `auto` = the authors'
    /// [20, 40] on CUDA, [15, 30] on CPU.
    pub lr_drops: Auto<Vec<usize>>,
    pub lr_drop_factor: f64,
    /// Re-initialise the perturbation every N steps; 0 = never.
    pub restart_period: usize,
    /// Random crop + flip of the unrolled batches, inside the graph (so gradients flow
    /// through it), and of the surrogates' own training batches.
    pub augment: bool,
    /// What the surrogates themselves train on while crafting (the authors' `-trajectory`).
    pub trajectory: Trajectory,
    /// The attack: MetaPoison (this tool's purpose) or gradient matching.
    pub recipe: CraftRecipe,
}

/// Which attack crafts the poisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CraftRecipe {
    /// Meta-learning through unrolled SGD steps over a staggered ensemble (Huang et al. 2020).
    Metapoison,
    /// Witches' Brew (Geiping et al. 2021): the poisons' training gradient aligned with the
    /// target's adversarial gradient on surrogates trained on the clean data; see [matching].
    GradientMatching,
}

impl CraftRecipe {
    pub fn name(self) -> &'static str {
        match self {
            CraftRecipe::Metapoison => "metapoison",
            CraftRecipe::GradientMatching => "gradient-matching",
        }
    }
}

/// Steps of one gradient-matching restart when `craft.steps` is `auto` (forest's 250, rounded
/// so that the step-size drops at 3/8, 5/8 and 7/8 fall on whole steps).
pub const MATCHING_STEPS_PER_RESTART: usize = 240;

/// Gradient matching (Witches' Brew, Geiping et al., ICLR 2021; forest's defaults where this
/// does not say otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchingConfig {
    /// Restarts from fresh random perturbations; the poisons of the restart with the lowest
    /// final matching loss are kept. `craft.steps` are shared evenly among them (`auto`:
    /// `MATCHING_STEPS_PER_RESTART` each).
    pub restarts: usize,
    /// Surrogates trained from scratch on the clean split; their matching losses are averaged.
    pub surrogates: usize,
    /// Signed-Adam step, as a fraction of `threat.eps` (forest's tau 0.1 at eps 16 on CIFAR-10
    /// is 0.4 eps); x0.1 at 3/8, 5/8 and 7/8 of each restart.
    pub step_size: f64,
    /// How the surrogates are trained: "standard" (SGD with Nesterov momentum, weight decay,
    /// one cycle, as `eval --recipe standard`) or "crafter" (the `[victim]` protocol), with
    /// the surrogates' architecture.
    pub surrogate_recipe: Recipe,
    /// Epochs of that training; `auto` = `victim.epochs`.
    pub surrogate_epochs: Auto<usize>,
    /// Differentiable random crop and flip of the poisons at every step.
    pub augment: bool,
    /// Also optimise each poison's colour grid (ReColor), within `threat.color_eps`.
    pub recolor: bool,
}

impl Default for MatchingConfig {
    fn default() -> Self {
        Self {
            restarts: 4,
            surrogates: 1,
            step_size: 0.4,
            surrogate_recipe: Recipe::Standard,
            surrogate_epochs: Auto::Auto,
            augment: true,
            recolor: false,
        }
    }
}

/// The surrogates' own training batches during crafting. Pretraining is always clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trajectory {
    /// The clean batches (the authors' default): the surrogates never learn the poisons.
    Clean,
    /// The batches with the poisons as they stand at this craft step in place of their clean
    /// originals, as a victim trains: the surrogates carry what the poisons did so far.
    Poison,
}

impl Default for CraftConfig {
    fn default() -> Self {
        Self {
            steps: Auto::Auto,
            unroll_steps: 2,
            ensemble_size: Auto::Auto,
            stagger: Auto::Auto,
            meta_batch_fraction: Auto::Auto,
            parallel_surrogates: Auto::Auto,
            grouped_surrogates: Auto::Auto,
            objective: ObjectiveKind::Cw,
            outer_lr: 200.0,
            warmup_steps: 5,
            lr_drops: Auto::Auto,
            lr_drop_factor: 0.1,
            restart_period: 0,
            augment: false,
            trajectory: Trajectory::Clean,
            recipe: CraftRecipe::Metapoison,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetKind {
    ConvnetBn,
    Resnet20,
    Resnet18,
    Vgg11,
    Vgg13,
}

impl NetKind {
    pub fn name(self) -> &'static str {
        match self {
            NetKind::ConvnetBn => "convnet-bn",
            NetKind::Resnet20 => "resnet20",
            NetKind::Resnet18 => "resnet18",
            NetKind::Vgg11 => "vgg11",
            NetKind::Vgg13 => "vgg13",
        }
    }
}

/// How the learning rate moves over a network's training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Linear warm-up over `warmup_epochs`, then x0.1 at each of `lr_drops` (the authors').
    Step,
    /// One cycle (PyTorch's OneCycleLR defaults): from lr/25 up to lr over the first 30% of
    /// training, then down to lr/250000, both halves cosine; `warmup_epochs` and `lr_drops`
    /// are not used.
    OneCycle,
}

impl LrSchedule {
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Step => "step",
            LrSchedule::OneCycle => "one-cycle",
        }
    }
}

/// How a network is trained with SGD (used for the surrogates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub net: NetKind,
    /// Peak SGD learning rate.
    pub lr: f64,
    /// Linear warm-up of the lr over this many epochs.
    pub warmup_epochs: usize,
    /// Epochs at which the lr is divided by 10.
    pub lr_drops: Vec<usize>,
    pub batch_size: usize,
    pub weight_decay: f64,
    /// SGD momentum (0 = plain SGD, the authors' default; 0.9 = their `-optimizer mom`). The
    /// buffer is carried through the unrolled steps too.
    pub momentum: f64,
    /// Nesterov's form of momentum.
    pub nesterov: bool,
    /// The lr schedule over the surrogate's life (the ensemble's cycle of
    /// `ensemble_size x stagger` epochs).
    pub schedule: LrSchedule,
    /// Width multiplier for ConvNetBN (1 = 16-32-32-64-64).
    pub width: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            net: NetKind::ConvnetBn,
            lr: 0.1,
            warmup_epochs: 5,
            lr_drops: vec![100, 150],
            batch_size: 125,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            schedule: LrSchedule::Step,
            width: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VictimConfig {
    pub net: NetKind,
    /// `auto` = the authors' 200 on CUDA, 20 on CPU.
    pub epochs: Auto<usize>,
    pub lr: f64,
    /// Linear warm-up of the lr over this many epochs (as the authors' training).
    pub warmup_epochs: usize,
    pub lr_drops: Vec<usize>,
    pub batch_size: usize,
    pub weight_decay: f64,
    /// SGD momentum; 0 = plain SGD (the authors' victims).
    pub momentum: f64,
    /// Nesterov's form of momentum.
    pub nesterov: bool,
    pub schedule: LrSchedule,
    pub augment: bool,
    pub trials: usize,
}

impl Default for VictimConfig {
    fn default() -> Self {
        Self {
            net: NetKind::ConvnetBn,
            epochs: Auto::Auto,
            lr: 0.1,
            warmup_epochs: 5,
            lr_drops: vec![100, 150],
            batch_size: 125,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            schedule: LrSchedule::Step,
            augment: false,
            trials: 1,
        }
    }
}

impl VictimConfig {
    /// The standard recipe: how victims are commonly trained today, which the crafter does
    /// not simulate (SGD with Nesterov momentum 0.9, weight decay 5e-4, a one-cycle schedule
    /// peaking at `STANDARD_RECIPE_LR`), for as many epochs and the same batch, architecture
    /// and augmentation as this protocol.
    pub fn standard_recipe(&self) -> VictimConfig {
        VictimConfig {
            lr: STANDARD_RECIPE_LR,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            schedule: LrSchedule::OneCycle,
            ..self.clone()
        }
    }

    /// "standard" when this protocol is the standard recipe of its epochs, batch and
    /// augmentation, "crafter" when it trains as the surrogates do (plain SGD, step
    /// schedule), else "custom".
    pub fn recipe_name(&self) -> &'static str {
        if *self == self.standard_recipe() {
            "standard"
        } else if self.momentum == 0.0 && self.schedule == LrSchedule::Step {
            "crafter"
        } else {
            "custom"
        }
    }
}

/// How victims are trained, by name: what `eval --recipe` and a protocol's victims take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// The `[victim]` protocol as configured (by default the authors': plain SGD, as the
    /// surrogates train).
    Crafter,
    /// `VictimConfig::standard_recipe` of it.
    Standard,
}

impl Recipe {
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Crafter => "crafter",
            Recipe::Standard => "standard",
        }
    }

    /// The victim protocol this recipe makes of `victim`.
    pub fn apply(self, victim: VictimConfig) -> VictimConfig {
        match self {
            Recipe::Crafter => victim,
            Recipe::Standard => victim.standard_recipe(),
        }
    }
}

/// A recipe name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: use crafter or standard")]
pub struct UnknownRecipe(pub String);

impl std::str::FromStr for Recipe {
    type Err = UnknownRecipe;
    fn from_str(s: &str) -> Result<Recipe, UnknownRecipe> {
        match s {
            "crafter" => Ok(Recipe::Crafter),
            "standard" => Ok(Recipe::Standard),
            other => Err(UnknownRecipe(other.to_string())),
        }
    }
}

/// The standard recipe's peak lr (with Nesterov momentum 0.9: an effective step of 10x it).
pub const STANDARD_RECIPE_LR: f64 = 0.1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `auto` (CUDA when present, else CPU), `cpu`, or `cuda:N`.
    pub device: String,
    pub seed: u64,
    /// Folder under which run folders are created; absent = the data dir's `runs/`.
    pub output_dir: Option<PathBuf>,
    /// Write a checkpoint every N craft steps (and on exit signals); 0 = only at the end.
    pub checkpoint_every: usize,
    /// CPU threads for libtorch; 0 = all cores.
    pub threads: usize,
    /// Stop after this many consecutive non-finite meta-gradients.
    pub max_nonfinite_steps: usize,
    /// Convolutions on channels-last (NHWC) tensors: same maths, another memory layout.
    /// `auto` = on for ResNets on a CPU (faster: no layout conversions around oneDNN's
    /// convolutions), else off (no faster for ConvNetBN on a CPU, nor on an H100).
    pub channels_last: Auto<bool>,
    /// Batch norm with its ReLU and residual add as one op: fused CPU kernels in all three
    /// directions (the same maths as libtorch's kernels; a craft step 26.7 s -> about 14 s on
    /// 2 cores), on CUDA a short chain of ATen operations; false = libtorch's. `auto` = on for
    /// a CPU, off on CUDA (there checked by `bench --gradcheck` but not yet timed).
    pub fused_batch_norm: Auto<bool>,
    /// Convolutions whose second derivative runs on the backend's backward kernels: the
    /// weight's term as a backward-weights call, where libtorch convolves transposed copies of
    /// the activations (same maths; a ResNet-20 craft step 12-14% faster on 2 cores); false =
    /// libtorch's. `auto` = on for a CPU, off on CUDA (not yet timed there).
    pub direct_conv_double_backward: Auto<bool>,
    /// Devices the surrogates are spread over, round robin ("cuda:0", "cuda:1", ...); empty =
    /// all on `device`. The perturbation stays on `device`.
    pub surrogate_devices: Vec<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            device: "auto".into(),
            seed: 0,
            output_dir: None,
            checkpoint_every: 5,
            threads: 0,
            max_nonfinite_steps: 3,
            channels_last: Auto::Auto,
            fused_batch_norm: Auto::Auto,
            direct_conv_double_backward: Auto::Auto,
            surrogate_devices: Vec::new(),
        }
    }
}

/// A configuration problem, worded for the person who wrote the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}` = {value} is invalid: {allowed}")]
    Invalid {
        field: &'static str,
        value: String,
        allowed: String,
    },
}

impl Config {
    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: one_line_toml_error(&e, text),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a config file. A relative `data.path` is taken from the current
    /// folder, as typed, and made absolute here: the run folder keeps this config, and a resume,
    /// export or campaign started from another folder must find the same data.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text, path)?;
        if let Some(data) = config.data.path.as_mut() {
            if data.is_relative() {
                if let Ok(absolute) = std::path::absolute(&*data) {
                    *data = absolute;
                }
            }
        }
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }
}

/// toml's errors span several lines with a source excerpt; keep one line: the field (its
/// table and key, read from the text at the error), the message and the line number.
fn one_line_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text[..line_start]
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}: {message} (line {line_no})"),
        (None, Some(k)) => format!("{k}: {message} (line {line_no})"),
        _ => format!("{message} (line {line_no})"),
    }
}
