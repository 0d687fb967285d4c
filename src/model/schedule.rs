//! Learning-rate schedules of a network's training (surrogates and victims alike).

/// Surrogate (inner) learning rate at `epoch`: linear warm-up over `warmup` epochs to `base`
/// ((epoch+1)/warmup), divided by 10 at each drop epoch passed.
pub fn inner_lr(base: f64, epoch: usize, warmup: usize, drops: &[usize]) -> f64 {
    let warm = if warmup == 0 {
        1.0
    } else {
        (((epoch + 1) as f64) / warmup as f64).min(1.0)
    };
    let dropped = drops.iter().filter(|&&d| epoch >= d).count() as i32;
    base * warm * 0.1f64.powi(dropped)
}

/// Fraction of a one-cycle schedule spent rising (PyTorch's OneCycleLR `pct_start`).
const ONE_CYCLE_RISE: f64 = 0.3;

/// The learning rate of a network `progress` epochs into training (fractional: the schedule
/// may move within an epoch) out of `epochs`: the step schedule (`inner_lr`, per whole
/// epoch) or one cycle (PyTorch's OneCycleLR with its defaults: from base/25 up to base over
/// the first 30%, then down to base/250000, cosine both ways).
pub fn lr_at(
    schedule: crate::config::LrSchedule,
    base: f64,
    progress: f64,
    epochs: usize,
    warmup: usize,
    drops: &[usize],
) -> f64 {
    match schedule {
        crate::config::LrSchedule::Step => inner_lr(base, progress.floor() as usize, warmup, drops),
        crate::config::LrSchedule::OneCycle => {
            let t = (progress / epochs.max(1) as f64).clamp(0.0, 1.0);
            let (start, low) = (base / 25.0, base / 25.0 / 1e4);
            let cosine = |from: f64, to: f64, f: f64| {
                to + (from - to) * (1.0 + (std::f64::consts::PI * f).cos()) / 2.0
            };
            if t < ONE_CYCLE_RISE {
                cosine(start, base, t / ONE_CYCLE_RISE)
            } else {
                cosine(base, low, (t - ONE_CYCLE_RISE) / (1.0 - ONE_CYCLE_RISE))
            }
        }
    }
}
