//! Where tensors live: `auto` picks CUDA when libtorch sees a GPU, else the CPU.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"".to_string()),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Resolves to a libtorch device, failing with a readable message when CUDA was asked
    /// for but is not there.
    pub fn resolve(self) -> Result<tch::Device, String> {
        let gpus = tch::Cuda::device_count() as usize;
        match self {
            DeviceChoice::Auto if gpus > 0 => Ok(tch::Device::Cuda(0)),
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Cuda(n) if n < gpus => Ok(tch::Device::Cuda(n)),
            DeviceChoice::Cuda(n) => Err(format!(
                "run.device = \"cuda:{n}\" but libtorch sees {gpus} CUDA device(s); use \"auto\" or \"cpu\""
            )),
        }
    }
}

pub fn describe(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    }
}

/// The libtorch version this binary was built against and runs with.
pub fn libtorch_version() -> String {
    // torch-sys exposes no version call; the build-version file sits beside lib/ in PyPI
    // installs (written by scripts/setup.sh) and in the official zip.
    env!("METAPOISON_LIBTORCH_VERSION").to_string()
}

/// Per-device libtorch settings for speed: on CUDA, cuDNN picks the fastest convolution
/// algorithm for each shape (the shapes of a crafting run repeat, so the search pays off once).
pub fn tune(device: tch::Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
}
