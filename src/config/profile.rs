//! What `auto` means on each kind of hardware, and `Config::settle`, which writes those choices
//! into a config once the device is known (so a run folder records what actually ran, and a
//! later export or resume on other hardware reads the same numbers).
//!
//! CUDA gets the authors' setting. A CPU gets a poison-dense setting measured to move some
//! targets on 2 cores: 2,000 training images with 150 poisons, every
//! poison-holding batch unrolled, 4 surrogates staggered by 5 epochs so that the ensemble spans
//! the 20 epochs a CPU victim trains (docs/efficacy.md has how it was found and how well it works).

use super::{Auto, Config, NetKind, Subset};

/// The values `auto` fields take on one kind of hardware.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HardwareProfile {
    pub name: &'static str,
    pub train_limit: usize,
    pub subset: Subset,
    pub npoison: usize,
    pub steps: usize,
    pub craft_lr_drops: &'static [usize],
    pub ensemble_size: usize,
    pub stagger: usize,
    pub meta_batch_fraction: f64,
    /// Surrogates crafted at once on their own threads (a CPU's cores are used better by two
    /// surrogates on one core each than by one on both; a GPU runs them one after another).
    pub parallel_surrogates: usize,
    /// All surrogates as one grouped network (BENCHMARKS.md: several times faster on a GPU,
    /// no faster with oneDNN on a CPU).
    pub grouped_surrogates: bool,
    /// Convolutions on channels-last tensors (BENCHMARKS.md: no faster with cuDNN on an H100;
    /// with oneDNN on a CPU no faster for ConvNetBN, so off there).
    pub channels_last: bool,
    /// The same for the ResNets: on a CPU, with the channels-last batch-norm kernels and the
    /// direct convolution double backward, a ResNet-20 step takes 3.1-3.5 s against 3.7-4.2 s
    /// in NCHW, whose every convolution converts its activations to oneDNN's layout and back.
    pub channels_last_resnet: bool,
    /// The crate's fused batch norm and direct convolution double backward (`model::OwnOps`):
    /// measured faster on a CPU; on CUDA checked by the gradcheck but not yet timed.
    pub own_ops: bool,
    pub victim_epochs: usize,
}

/// The authors' setting (paper and code): 10% of CIFAR-10's batches, 24 surrogates, stagger 1,
/// the meta step at every poison-holding batch, 61 steps, 200-epoch victims.
pub const CUDA: HardwareProfile = HardwareProfile {
    name: "CUDA",
    train_limit: 5000,
    subset: Subset::Balanced,
    npoison: 200,
    steps: 61,
    craft_lr_drops: &[20, 40],
    ensemble_size: 24,
    stagger: 1,
    meta_batch_fraction: 1.0,
    parallel_surrogates: 1,
    grouped_surrogates: true,
    channels_last: false,
    channels_last_resnet: false,
    own_ops: false,
    victim_epochs: 200,
};

/// The poison-dense CPU setting (benches/dense-cpu.toml spells it out).
pub const CPU: HardwareProfile = HardwareProfile {
    name: "CPU",
    train_limit: 2000,
    subset: Subset::First,
    npoison: 150,
    steps: 35,
    craft_lr_drops: &[15, 30],
    ensemble_size: 4,
    stagger: 5,
    meta_batch_fraction: 1.0,
    parallel_surrogates: 2,
    grouped_surrogates: false,
    channels_last: false,
    channels_last_resnet: true,
    own_ops: true,
    victim_epochs: 20,
};

impl HardwareProfile {
    pub fn for_device(on_gpu: bool) -> HardwareProfile {
        if on_gpu {
            CUDA
        } else {
            CPU
        }
    }
}

/// Replaces `auto` by `value`; returns the line that says so (None when a value was given).
fn settle<T: std::fmt::Debug>(
    field: &str,
    slot: &mut Auto<T>,
    value: T,
    hw: &str,
) -> Option<String> {
    if !matches!(slot, Auto::Auto) {
        return None;
    }
    let note = format!("{field} = auto -> {value:?} (on {hw})");
    *slot = Auto::Value(value);
    Some(note)
}

impl Config {
    /// Decides every hardware-dependent `auto` field for the device the run will use, and
    /// returns one line per decision (logged as run events). Fields given explicitly are
    /// kept. Before this is called, `auto` fields read as the CPU profile.
    pub fn settle(&mut self, on_gpu: bool) -> Vec<String> {
        let p = HardwareProfile::for_device(on_gpu);
        [
            settle(
                "data.train_limit",
                &mut self.data.train_limit,
                p.train_limit,
                p.name,
            ),
            settle("data.subset", &mut self.data.subset, p.subset, p.name),
            settle(
                "threat.npoison",
                &mut self.threat.npoison,
                p.npoison,
                p.name,
            ),
            settle(
                "craft.steps",
                &mut self.craft.steps,
                match self.craft.recipe {
                    super::CraftRecipe::Metapoison => p.steps,
                    super::CraftRecipe::GradientMatching => {
                        self.matching.restarts * super::MATCHING_STEPS_PER_RESTART
                    }
                },
                p.name,
            ),
            settle(
                "craft.lr_drops",
                &mut self.craft.lr_drops,
                p.craft_lr_drops.to_vec(),
                p.name,
            ),
            settle(
                "craft.ensemble_size",
                &mut self.craft.ensemble_size,
                p.ensemble_size,
                p.name,
            ),
            settle("craft.stagger", &mut self.craft.stagger, p.stagger, p.name),
            settle(
                "craft.meta_batch_fraction",
                &mut self.craft.meta_batch_fraction,
                p.meta_batch_fraction,
                p.name,
            ),
            settle(
                "craft.parallel_surrogates",
                &mut self.craft.parallel_surrogates,
                p.parallel_surrogates,
                p.name,
            ),
            settle(
                "craft.grouped_surrogates",
                &mut self.craft.grouped_surrogates,
                p.grouped_surrogates,
                p.name,
            ),
            settle(
                "run.channels_last",
                &mut self.run.channels_last,
                match self.surrogate.net {
                    NetKind::Resnet20 | NetKind::Resnet18 => p.channels_last_resnet,
                    _ => p.channels_last,
                },
                p.name,
            ),
            settle(
                "run.fused_batch_norm",
                &mut self.run.fused_batch_norm,
                p.own_ops,
                p.name,
            ),
            settle(
                "run.direct_conv_double_backward",
                &mut self.run.direct_conv_double_backward,
                p.own_ops,
                p.name,
            ),
            self.victim.settle(on_gpu),
            // Gradient matching's own field, settled (and noted) only where it is used.
            if self.craft.recipe == super::CraftRecipe::GradientMatching {
                settle(
                    "matching.surrogate_epochs",
                    &mut self.matching.surrogate_epochs,
                    self.victim.epochs(),
                    p.name,
                )
            } else {
                None
            },
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl super::VictimConfig {
    /// The victim protocol's part of `Config::settle` (evaluations of an export settle only this).
    pub fn settle(&mut self, on_gpu: bool) -> Option<String> {
        let p = HardwareProfile::for_device(on_gpu);
        settle("victim.epochs", &mut self.epochs, p.victim_epochs, p.name)
    }
}

// Readers of the hardware-dependent fields: the settled value, or the CPU profile's before
// `settle` (tests and tools that never pick a device run on the CPU).
impl super::DataConfig {
    pub fn train_limit(&self) -> usize {
        self.train_limit.resolve(CPU.train_limit)
    }
    pub fn subset(&self) -> Subset {
        self.subset.resolve(CPU.subset)
    }
}

impl super::ThreatConfig {
    pub fn npoison(&self) -> usize {
        self.npoison.resolve(CPU.npoison)
    }
}

impl super::CraftConfig {
    pub fn steps(&self) -> usize {
        self.steps.resolve(CPU.steps)
    }
    pub fn lr_drops(&self) -> &[usize] {
        self.lr_drops
            .value()
            .map_or(CPU.craft_lr_drops, |v| v.as_slice())
    }
    pub fn ensemble_size(&self) -> usize {
        self.ensemble_size.resolve(CPU.ensemble_size)
    }
    pub fn stagger(&self) -> usize {
        self.stagger.resolve(CPU.stagger)
    }
    pub fn meta_batch_fraction(&self) -> f64 {
        self.meta_batch_fraction.resolve(CPU.meta_batch_fraction)
    }
    pub fn parallel_surrogates(&self) -> usize {
        self.parallel_surrogates.resolve(CPU.parallel_surrogates)
    }
    pub fn grouped_surrogates(&self) -> bool {
        self.grouped_surrogates.resolve(CPU.grouped_surrogates)
    }
}

impl super::RunConfig {
    pub fn channels_last(&self) -> bool {
        self.channels_last.resolve(CPU.channels_last)
    }

    /// Whether batch norm runs as the crate's fused op (`model::OwnOps`), settled for the
    /// run's device: on CUDA only when a config asks for it.
    pub fn fused_batch_norm(&self) -> bool {
        self.fused_batch_norm.resolve(CPU.own_ops)
    }

    /// Whether convolutions take the crate's direct double backward, settled as above.
    pub fn direct_conv_double_backward(&self) -> bool {
        self.direct_conv_double_backward.resolve(CPU.own_ops)
    }
}

impl super::VictimConfig {
    pub fn epochs(&self) -> usize {
        self.epochs.resolve(CPU.victim_epochs)
    }
}

impl super::MatchingConfig {
    pub fn surrogate_epochs(&self) -> usize {
        self.surrogate_epochs.resolve(CPU.victim_epochs)
    }
}
