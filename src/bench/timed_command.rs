//! `metapoison bench`'s timed step (the `timing` feature): the spec from the flags, the
//! side-by-side timing with the PyTorch reference, the profile and the report.

use super::command::{append_line, device_report, BenchArgs, Setting};
use super::{
    check_agreement, peak_rss_bytes, reference, synchronize, time_side_by_side, Reference,
    StepInputs, StepSpec, Timing,
};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The timed part of `bench`: built with the `timing` feature only.
pub(super) fn run(args: &BenchArgs, device: tch::Device, threads: i32) -> Result<()> {
    let spec = args.spec(device.is_cuda());
    spec.validate()?;
    if let Some(path) = &args.profile {
        if spec.workers > 1 {
            bail!("--profile records one thread: use --workers 1 (or leave --workers out)");
        }
        // Before the timing: libtorch's trace writer only logs a failure.
        std::fs::File::create(path).with_context(|| {
            format!(
                "cannot write the profile trace {}: choose a writable path",
                path.display()
            )
        })?;
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("metapoison-bench-")
        .tempdir()
        .context("cannot create a temporary folder for the bench inputs")?;
    let device_name = match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let mut reference = if args.no_reference {
        None
    } else {
        let python = args
            .python
            .clone()
            .unwrap_or_else(reference::default_python);
        Some(Reference::start(
            &python,
            dir.path(),
            &device_name,
            threads,
        )?)
    };
    let agreement = match reference.as_mut() {
        Some(r) => {
            let a = check_agreement(&spec, device, r, dir.path())?;
            let worst = a.max_rel_error_delta.max(a.max_rel_error_grid);
            // NaN counts as a disagreement.
            if worst.is_nan() || worst >= 1e-6 {
                bail!(
                    "the reference's float64 meta-gradient differs from ours (max relative error {worst:e}); no ratio is reported for different maths"
                );
            }
            Some(a)
        }
        None => None,
    };
    eprintln!(
        "bench: {} {}x{}x{} batch {}, {} poisons in batch, K {}, M {} ({}{}) on {}",
        spec.net.name(),
        spec.channels,
        spec.side,
        spec.side,
        spec.batch,
        spec.poisons_in_batch,
        spec.unroll_steps,
        spec.ensemble,
        if spec.grouped && spec.group_size > 0 {
            format!("grouped, {} a group", spec.group_size)
        } else if spec.grouped {
            "grouped".to_string()
        } else {
            format!("{} at once", spec.workers)
        },
        if spec.channels_last {
            ", channels-last"
        } else {
            ""
        },
        crate::device::describe(device)
    );
    // Our side runs `workers` surrogates at once, each with its share of the cores (the
    // reference process keeps all of them).
    let _intra_op = (!device.is_cuda())
        .then(|| crate::craft::parallel::IntraOpThreads::share_among(spec.workers));
    let mut inputs = StepInputs::new(&spec, device);
    if let Some(path) = &args.save_inputs {
        inputs.save(path, &[])?;
    }
    if let Some(r) = reference.as_mut() {
        let path = dir.path().join("inputs.safetensors");
        inputs.save(&path, &[])?;
        r.load(&path)?;
    }
    let (ours, theirs) = time_side_by_side(
        &mut inputs,
        device,
        reference.as_mut(),
        args.warmup,
        args.reps,
    )?;
    let profile = match &args.profile {
        Some(path) => Some(profile_one_step(&mut inputs, device, path)?),
        None => None,
    };
    let (label, ours_gpu) = device_report(device);
    let (stats, peak) = match reference.as_mut() {
        Some(r) => (Some(r.stats()?), Some(r.peak()?)),
        None => (None, None),
    };
    let mut report = report_json(
        &spec,
        &label,
        threads,
        &ours,
        theirs.as_ref(),
        agreement.as_ref(),
        stats.as_ref(),
        peak.as_ref(),
        ours_gpu,
        reference.as_ref().map(|r| r.about.clone()),
    );
    if let Some(p) = profile {
        report["profile"] = p;
    }
    print_summary(&report);
    println!("{report}");
    if let Some(path) = &args.out {
        append_line(path, &report)?;
    }
    Ok(())
}

impl BenchArgs {
    fn spec(&self, on_gpu: bool) -> StepSpec {
        let mut s = match self.setting {
            Setting::Default => StepSpec::default_config(),
            Setting::CifarResnet18 => StepSpec::cifar_resnet18(),
        };
        if let Some(n) = self.net {
            s.net = n;
        }
        if let Some(b) = self.batch {
            s.batch = b;
        }
        if let Some(p) = self.poisons_in_batch {
            s.poisons_in_batch = p;
        }
        if let Some(p) = self.npoison {
            s.npoison = p;
        }
        if let Some(k) = self.unroll {
            s.unroll_steps = k;
        }
        if let Some(m) = self.ensemble {
            s.ensemble = m;
        }
        // As the crafter: never more at once than there are surrogates (a surplus worker
        // would only take its share of the cores away).
        // The profiler records this thread (and autograd's), not worker threads.
        let default_workers = if self.profile.is_some() {
            1
        } else {
            crate::config::HardwareProfile::for_device(on_gpu).parallel_surrogates
        };
        let workers = self.workers.unwrap_or(default_workers);
        s.workers = workers.min(s.ensemble.max(1));
        s.channels_last = self.channels_last;
        s.reference_channels_last = self.reference_channels_last;
        s.native_batch_norm = self.native_batch_norm;
        s.libtorch_conv_double_backward = self.libtorch_conv_double_backward;
        s.batch_norm_aten_ops = self.batch_norm_aten_ops;
        s.own_ops_on_cuda = self.own_ops_on_cuda;
        s.libtorch_max_pool = self.libtorch_max_pool;
        s.grouped = self.grouped;
        s.group_size = self.group_size.unwrap_or(0);
        if s.grouped {
            s.workers = 1; // one grouped network for all M
        }
        s
    }
}

/// One more of our steps under the profiler: its trace written to `path`, its tables printed,
/// and returned for the report (with the step's wall time).
fn profile_one_step(
    inputs: &mut StepInputs,
    device: tch::Device,
    path: &std::path::Path,
) -> Result<Value> {
    synchronize(device);
    let session = super::profile::start(device.is_cuda())?;
    let t = std::time::Instant::now();
    inputs.step();
    synchronize(device);
    let wall_s = t.elapsed().as_secs_f64();
    let events = session.stop(Some(path))?;
    let summary = super::profile::summarize(&events, 25);
    eprint!(
        "profiled step: {:.1} ms (trace: {})\n{}",
        wall_s * 1e3,
        path.display(),
        super::profile::render(&summary)
    );
    Ok(json!({ "wall_s": wall_s, "trace": path, "summary": summary }))
}

#[allow(clippy::too_many_arguments)]
fn report_json(
    spec: &StepSpec,
    device: &str,
    threads: i32,
    ours: &Timing,
    theirs: Option<&Timing>,
    agreement: Option<&super::Agreement>,
    stats: Option<&Value>,
    peak: Option<&Value>,
    ours_gpu_bytes: Option<u64>,
    reference_about: Option<Value>,
) -> Value {
    let flops = stats.and_then(|s| s["flops_per_step"].as_f64());
    let achieved = flops.map(|f| f / ours.median_s);
    let fraction = |key: &str| Some(achieved? / peak?.get(key)?.as_f64()?);
    json!({
        "kind": "bench",
        "version": env!("CARGO_PKG_VERSION"),
        "libtorch": crate::device::libtorch_version(),
        "device": device,
        "threads": threads,
        "spec": spec,
        "ours": ours,
        "reference": theirs,
        "reference_about": reference_about,
        "ratio_reference_over_ours": theirs.map(|t| t.median_s / ours.median_s),
        "agreement_float64": agreement,
        "flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "device_peak_flops_per_s": peak,
        "fraction_of_peak_tf32": fraction("tf32"),
        "fraction_of_peak_fp32": fraction("fp32"),
        "ours_peak_rss_bytes": peak_rss_bytes(),
        "ours_gpu_memory_bytes": ours_gpu_bytes,
        "reference_memory": stats.map(|s| json!({
            "peak_rss_bytes": s["peak_rss_bytes"],
            "peak_allocated_bytes": s["peak_allocated_bytes"],
            "peak_reserved_bytes": s["peak_reserved_bytes"],
        })),
    })
}

fn print_summary(r: &Value) {
    let ms = |v: &Value| {
        v.as_f64()
            .map(|s| format!("{:.1} ms", s * 1e3))
            .unwrap_or("-".into())
    };
    eprintln!(
        "ours: median {} (min {}, max {}, {} reps)",
        ms(&r["ours"]["median_s"]),
        ms(&r["ours"]["min_s"]),
        ms(&r["ours"]["max_s"]),
        r["ours"]["reps"]
    );
    if !r["reference"].is_null() {
        eprintln!(
            "PyTorch eager: median {} (min {}, max {})  ratio reference/ours {:.2}",
            ms(&r["reference"]["median_s"]),
            ms(&r["reference"]["min_s"]),
            ms(&r["reference"]["max_s"]),
            r["ratio_reference_over_ours"].as_f64().unwrap_or(f64::NAN)
        );
        eprintln!(
            "float64 meta-gradient agreement: delta {:.1e}, grid {:.1e}",
            r["agreement_float64"]["max_rel_error_delta"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["agreement_float64"]["max_rel_error_grid"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    if let Some(f) = r["achieved_flops_per_s"].as_f64() {
        eprintln!(
            "{:.2} GFLOP a step, {:.1} GFLOP/s achieved; fraction of measured matmul peak: tf32 {}, fp32 {}",
            r["flops_per_step"].as_f64().unwrap_or(0.0) / 1e9,
            f / 1e9,
            r["fraction_of_peak_tf32"].as_f64().map(|x| format!("{:.1}%", x * 100.0)).unwrap_or("-".into()),
            r["fraction_of_peak_fp32"].as_f64().map(|x| format!("{:.1}%", x * 100.0)).unwrap_or("-".into()),
        );
    }
}

/// `bench --crafter-steps N`: the crafter's own craft steps on `config`'s setting, timed one
/// by one after the staggered pretraining, as a run on this device would take them.
pub(super) fn run_crafter(
    config: &crate::config::Config,
    steps: usize,
    device: tch::Device,
    out: Option<&std::path::PathBuf>,
) -> Result<()> {
    if steps == 0 {
        bail!("--crafter-steps must be at least 1");
    }
    config.validate()?;
    // The data as a run on this device loads it; then the engine's own preparation (settled
    // config, plan, surrogate devices, the CPU's threads), so that this times what a run does.
    let mut settled = config.clone();
    settled.settle(device.is_cuda());
    let data = crate::data::load(&settled.data)?;
    let crate::engine::Prepared {
        mut crafter,
        config,
        intra_op: _intra_op,
    } = crate::engine::prepare(
        config,
        &data,
        device,
        tch::Kind::Float,
        &crate::ranks::Ranks::solo(),
    )?;
    let plan = &crafter.plan;
    let summary = format!(
        "{} on {}, {} poisons, M {} stagger {}, K {}, {:?}",
        config.surrogate.net.name(),
        data.name,
        plan.poison_indices.len(),
        plan.ensemble_size,
        plan.stagger,
        config.craft.unroll_steps,
        plan.recipe
    );
    eprintln!("bench: the crafter's own steps: {summary}");
    let started = std::time::Instant::now();
    crafter.pretrain(|_, _, _| true);
    synchronize(device);
    let pretrain_s = started.elapsed().as_secs_f64();
    let mut seconds = Vec::new();
    let mut meta_batches = Vec::new();
    for _ in 0..steps {
        let started = std::time::Instant::now();
        let report = crafter
            .craft_step(&|| false)
            .context("the craft step was cancelled")?;
        synchronize(device);
        seconds.push(started.elapsed().as_secs_f64());
        meta_batches.push(report.meta_batches);
        eprintln!(
            "  step {}: {:.2} s, {} meta batches",
            report.step + 1,
            seconds.last().unwrap_or(&0.0),
            report.meta_batches
        );
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let (label, gpu_memory) = match device {
        tch::Device::Cpu => (
            crate::device::describe_cpu_workers(crafter.plan.parallel_surrogates),
            None,
        ),
        other => device_report(other),
    };
    let report = json!({
        "kind": "crafter_step",
        "device": label,
        "libtorch": crate::device::libtorch_version(),
        "setting": summary,
        "pretrain_s": pretrain_s,
        "step_s": seconds,
        "median_s": median,
        "meta_batches": meta_batches,
        "peak_rss_bytes": peak_rss_bytes(),
        "gpu_memory_bytes": gpu_memory,
    });
    eprintln!(
        "crafter: pretraining {pretrain_s:.1} s, craft step median {median:.2} s over {steps}"
    );
    println!("{report}");
    if let Some(path) = out {
        append_line(path, &report)?;
    }
    Ok(())
}
