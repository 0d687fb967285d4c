//! Where tensors live: `auto` picks CUDA when libtorch sees a GPU, else the CPU.

use std::fmt;
use std::str::FromStr;

/// A device name that is not one, or a CUDA device libtorch does not see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")]
    Unknown,
    #[error(
        "run.device = \"cuda:{asked}\" but libtorch sees {gpus} CUDA device(s); use \"auto\" or \"cpu\""
    )]
    NoSuchGpu { asked: usize, gpus: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or(DeviceError::Unknown),
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
    pub fn resolve(self) -> Result<tch::Device, DeviceError> {
        let gpus = tch::Cuda::device_count() as usize;
        match self {
            DeviceChoice::Auto if gpus > 0 => Ok(tch::Device::Cuda(0)),
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Cuda(n) if n < gpus => Ok(tch::Device::Cuda(n)),
            DeviceChoice::Cuda(asked) => Err(DeviceError::NoSuchGpu { asked, gpus }),
        }
    }
}

pub fn describe(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => describe_cpu_workers(1),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}"),
    }
}

/// A CPU running `workers` surrogates side by side, each on libtorch's current thread count
/// (set per worker): "cpu (2 surrogates x 1 thread)"; one worker: "cpu (2 threads)".
pub fn describe_cpu_workers(workers: usize) -> String {
    let each = threads(tch::get_num_threads());
    if workers > 1 {
        format!("cpu ({workers} surrogates x {each})")
    } else {
        format!("cpu ({each})")
    }
}

fn threads(n: i32) -> String {
    if n == 1 {
        "1 thread".to_string()
    } else {
        format!("{n} threads")
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

/// Tells glibc's allocator to keep freed memory instead of handing it back to the kernel.
///
/// A craft step allocates and frees the same few-megabyte activation buffers thousands of
/// times. By default glibc serves blocks that large with fresh mmaps or trims its heaps after
/// they are freed, so every reuse costs page faults that zero the pages again; with surrogates
/// on several threads (each with its own malloc arena) that ate the whole gain of running them
/// side by side. Measured on 2 cores, dense CPU setting with `craft.parallel_surrogates = 2`:
/// 30.0 s a step by default, 25.5-26.8 s with these settings (BENCHMARKS.md). The cost: the
/// process keeps its peak resident memory instead of shrinking after it. A user who sets
/// glibc's own MALLOC_* or GLIBC_TUNABLES variables keeps their choice.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_chose = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
        });
        if user_chose {
            return;
        }
        const MIB: libc::c_int = 1 << 20;
        for (param, value) in [
            (libc::M_MMAP_THRESHOLD, 1024 * MIB),
            (libc::M_TRIM_THRESHOLD, 1024 * MIB),
            (libc::M_TOP_PAD, 256 * MIB),
        ] {
            // SAFETY: mallopt only changes the allocator's thresholds; it is called before
            // any other thread exists.
            let ok = unsafe { libc::mallopt(param, value) };
            if ok != 1 {
                tracing::debug!("mallopt({param}, {value}) was refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_counts_read_as_words() {
        assert_eq!(super::threads(1), "1 thread");
        assert_eq!(super::threads(2), "2 threads");
    }
}
