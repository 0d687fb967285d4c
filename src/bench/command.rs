//! `metapoison bench`: the speed harness's command line and report.

use super::gradcheck;
use crate::config::NetKind;
use crate::device::DeviceChoice;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Setting {
    /// The default config's step: Fashion-MNIST shape, ConvNetBN, B 125, 5 poisons a batch, M 4.
    Default,
    /// The seed's setting: CIFAR shape, ResNet-18, B 125, 12 poisons a batch (10%), 5,000 poisons.
    CifarResnet18,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The step shape to start from; the flags below override single fields.
    #[arg(long, value_enum, default_value_t = Setting::Default)]
    pub(super) setting: Setting,
    /// Network: convnet-bn, resnet20, resnet18, vgg11, vgg13.
    #[arg(long, value_parser = parse_net)]
    pub(super) net: Option<NetKind>,
    /// Images per batch.
    #[arg(long)]
    pub(super) batch: Option<i64>,
    /// Poisons in the first unrolled batch.
    #[arg(long)]
    pub(super) poisons_in_batch: Option<i64>,
    /// Poisons in the whole perturbation.
    #[arg(long)]
    pub(super) npoison: Option<i64>,
    /// Unrolled steps K.
    #[arg(long)]
    pub(super) unroll: Option<usize>,
    /// Surrogates M.
    #[arg(long)]
    pub(super) ensemble: Option<usize>,
    /// Surrogates run at once, each on its own thread with its share of the cores (the
    /// crafter's `craft.parallel_surrogates`; default: what its `auto` is on the device, 2 on
    /// a CPU, 1 on CUDA). The reference always runs them one after another.
    #[arg(long)]
    pub(super) workers: Option<usize>,
    /// Our convolutions on channels-last (NHWC) tensors.
    #[arg(long)]
    pub(super) channels_last: bool,
    /// The reference's convolutions on channels-last tensors too (default: PyTorch's NCHW).
    #[arg(long)]
    pub(super) reference_channels_last: bool,
    /// Our batch norm (and the ReLU after it) through libtorch's kernels, not the fused op
    /// (`run.fused_batch_norm = false`).
    #[arg(long)]
    pub(super) native_batch_norm: bool,
    /// The fused batch norm as ATen operations on the CPU too, as it runs on CUDA.
    #[arg(long, conflicts_with = "native_batch_norm")]
    pub(super) batch_norm_aten_ops: bool,
    /// Our convolutions' second derivative through libtorch's own double backward, not the
    /// direct one (`run.direct_conv_double_backward = false`).
    #[arg(long)]
    pub(super) libtorch_conv_double_backward: bool,
    /// The fused batch norm and the direct convolution double backward on CUDA too (their
    /// `auto` is off there until timed).
    #[arg(long)]
    pub(super) own_ops_on_cuda: bool,
    /// Our 2x2 max pooling through libtorch's CPU kernel, not the crate's.
    #[arg(long)]
    pub(super) libtorch_max_pool: bool,
    /// Our surrogates batched into one grouped network (one kernel a layer for all M); the
    /// reference still runs them one after another, as a PyTorch loop does.
    #[arg(long)]
    pub(super) grouped: bool,
    /// With --grouped: surrogates in one grouped network (default all M), the groups one after
    /// another, as the crafter runs them when a GPU's memory holds fewer.
    #[arg(long, requires = "grouped")]
    pub(super) group_size: Option<usize>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub(super) device: DeviceChoice,
    /// CPU threads for both sides (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub(super) threads: i32,
    /// Untimed steps first (each side).
    #[arg(long, default_value_t = 2)]
    pub(super) warmup: usize,
    /// Timed steps (each side, alternating).
    #[arg(long, default_value_t = 5)]
    pub(super) reps: usize,
    /// Time our step only.
    #[arg(long)]
    pub(super) no_reference: bool,
    /// Python with torch for the reference (default: $METAPOISON_PYTHON, ./.venv, python3).
    #[arg(long)]
    pub(super) python: Option<PathBuf>,
    /// Instead of timing: the meta-gradient against finite differences in float64 on the device.
    #[arg(long)]
    pub(super) gradcheck: bool,
    /// Append the JSON report as one line to this file.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Also keep the timed inputs (safetensors, read by reference.py) at this path, e.g. to
    /// profile the reference on them.
    #[arg(long)]
    pub(super) save_inputs: Option<PathBuf>,
    /// After the timed steps, one more of ours under libtorch's profiler: its trace (Chrome's
    /// format, for chrome://tracing or Perfetto) goes to this path, and tables of host time by
    /// operator and, on CUDA, device time by kernel and by launching operator to the terminal
    /// and the JSON report. Runs the surrogates on this thread (`--workers 1`).
    #[arg(long)]
    pub(super) profile: Option<PathBuf>,
    /// Times N craft steps of the crafter itself (the tool's own step: every surrogate's epoch
    /// with its meta batches, the outer update and the targets' evaluation) on the config's
    /// setting (global --config, `auto` fields settled for the device), after its staggered
    /// pretraining; the other flags shape only the side-by-side unit.
    #[arg(long, value_name = "N")]
    pub(super) crafter_steps: Option<usize>,
}

/// A `--net` that names no network.
#[derive(Debug, thiserror::Error)]
#[error("unknown network {0:?}: use convnet-bn, resnet20, resnet18, vgg11 or vgg13")]
struct UnknownNet(String);

fn parse_net(s: &str) -> Result<NetKind, UnknownNet> {
    serde_json::from_value(Value::String(s.into())).map_err(|_| UnknownNet(s.into()))
}

/// The device as reported ("cuda:0 (NVIDIA H200)") and, on CUDA, the GPU memory this process
/// holds: one NVML query, made after the device has been used (before that NVML does not list
/// the process).
pub(super) fn device_report(device: tch::Device) -> (String, Option<u64>) {
    match device {
        tch::Device::Cuda(i) => match crate::telemetry::process_gpu_memory(i as u32) {
            Some((name, bytes)) => (format!("cuda:{i} ({name})"), Some(bytes)),
            None => (format!("cuda:{i}"), None),
        },
        other => (crate::device::describe(other), None),
    }
}

pub(super) fn append_line(path: &PathBuf, report: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} to append the report", path.display()))?;
    writeln!(f, "{report}").with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: BenchArgs, config: &crate::config::Config) -> Result<()> {
    let device = args.device.resolve()?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    crate::device::tune(device);
    let threads = tch::get_num_threads();
    if args.gradcheck {
        return run_gradcheck(device, args.out.as_ref());
    }
    #[cfg(feature = "timing")]
    return match args.crafter_steps {
        Some(steps) => super::timed_command::run_crafter(config, steps, device, args.out.as_ref()),
        None => super::timed_command::run(&args, device, threads),
    };
    #[cfg(not(feature = "timing"))]
    {
        let _ = (threads, config);
        bail!(
            "this build has no timing harness (it stays out of the user binary): build with `cargo build --release --features timing` to time a step; `bench --gradcheck` works in every build"
        )
    }
}

fn run_gradcheck(device: tch::Device, out: Option<&PathBuf>) -> Result<()> {
    let checks = gradcheck::suite(device);
    let mut worst: f64 = 0.0;
    for c in &checks {
        eprintln!(
            "{:<9} K={} C={} augment={:<5} channels-last={:<5} ops={} worst relative error {:.2e}",
            c.objective,
            c.unroll_steps,
            c.channels,
            c.augment,
            c.channels_last,
            c.ops,
            c.worst_error
        );
        worst = worst.max(c.worst_error);
    }
    let dead = checks.iter().any(|c| c.delta_grad_l1 == 0.0);
    let pass = worst < 1e-4 && !dead;
    let (label, _) = device_report(device);
    let report = json!({
        "kind": "gradcheck",
        "device": label,
        "libtorch": crate::device::libtorch_version(),
        "worst_error": worst,
        "pass": pass,
        "checks": checks,
    });
    println!("{report}");
    if let Some(path) = out {
        append_line(path, &report)?;
    }
    if !pass {
        bail!("meta-gradient check failed on {label}: worst relative error {worst:e} (limit 1e-4)");
    }
    eprintln!(
        "gradcheck: {} checks on {label}, worst relative error {worst:.2e}: pass",
        checks.len()
    );
    Ok(())
}
