//! Machine telemetry for the dashboard: NVIDIA GPUs through NVML (loaded at run time; no
//! driver means "no NVIDIA GPU", never an error), and otherwise CPU use and this process's
//! memory from /proc. Sampled on its own thread about once a second.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    /// Percent; `None` where the driver would not say.
    pub utilisation: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SystemSample {
    /// Empty when there is no NVIDIA GPU (or no driver).
    pub gpus: Vec<GpuSample>,
    /// Why there are no GPU figures, e.g. "no NVIDIA GPU (NVML not found)".
    pub gpu_note: Option<String>,
    /// Whole-machine CPU use, percent, since the previous sample.
    pub cpu_percent: Option<f64>,
    pub cores: usize,
    /// Resident memory of this process, MiB.
    pub process_rss_mib: Option<f64>,
}

/// CPU counters from /proc/stat: (busy, total) jiffies.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    let total: u64 = v.iter().sum();
    Some((total - idle, total))
}

fn rss_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Sampler {
    nvml: Result<nvml_wrapper::Nvml, nvml_wrapper::error::NvmlError>,
    last_cpu: Option<(u64, u64)>,
}

impl Sampler {
    fn new() -> Sampler {
        let nvml = nvml_wrapper::Nvml::init();
        Sampler {
            nvml,
            last_cpu: cpu_times(),
        }
    }

    fn sample(&mut self) -> SystemSample {
        let mut s = SystemSample {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            process_rss_mib: rss_mib(),
            ..Default::default()
        };
        let now = cpu_times();
        if let (Some((b0, t0)), Some((b1, t1))) = (self.last_cpu, now) {
            if t1 > t0 {
                s.cpu_percent = Some(100.0 * (b1 - b0) as f64 / (t1 - t0) as f64);
            }
        }
        self.last_cpu = now;
        match &self.nvml {
            Err(e) => {
                s.gpu_note = Some(match e {
                    nvml_wrapper::error::NvmlError::LibloadingError(_) => {
                        "no NVIDIA GPU (NVML library not found)".to_string()
                    }
                    other => format!("no NVIDIA GPU ({other})"),
                })
            }
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                if count == 0 {
                    s.gpu_note = Some("no NVIDIA GPU (driver reports none)".into());
                }
                for i in 0..count {
                    let Ok(d) = nvml.device_by_index(i) else {
                        continue;
                    };
                    let mem = d.memory_info().ok();
                    s.gpus.push(GpuSample {
                        index: i,
                        name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                        utilisation: d.utilization_rates().ok().map(|u| u.gpu),
                        memory_used_mib: mem.as_ref().map(|m| m.used / (1 << 20)),
                        memory_total_mib: mem.as_ref().map(|m| m.total / (1 << 20)),
                        temperature_c: d
                            .temperature(
                                nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu,
                            )
                            .ok(),
                        power_w: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                    });
                }
            }
        }
        s
    }
}

/// Starts the sampler thread. Each sample goes to `out`, which returns false once nobody
/// listens any more; then the thread stops.
pub fn spawn_sampler(mut out: impl FnMut(SystemSample) -> bool + Send + 'static, every: Duration) {
    let _ = std::thread::Builder::new()
        .name("telemetry".into())
        .spawn(move || {
            let mut sampler = Sampler::new();
            while out(sampler.sample()) {
                std::thread::sleep(every);
            }
        });
}

/// GPU memory this process holds on device `index` (what the driver reports, so libtorch's
/// cached blocks included), and the device's name; `None` without NVML or a matching entry.
pub fn process_gpu_memory(index: u32) -> Option<(String, u64)> {
    let nvml = nvml_wrapper::Nvml::init().ok()?;
    let device = nvml.device_by_index(index).ok()?;
    let pid = std::process::id();
    let used = device
        .running_compute_processes()
        .ok()?
        .into_iter()
        .find(|p| p.pid == pid)
        .and_then(|p| match p.used_gpu_memory {
            nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
        })?;
    Some((device.name().unwrap_or_default(), used))
}
