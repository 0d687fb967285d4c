//! Learning-rate schedules and the staggered ensemble's epoch schedule.

/// Outer (craft) learning rate at `step`: quadratic warm-up min(((step+1)/warmup)^2, 1), then
/// multiplied by `factor` at each drop step passed.
pub fn outer_lr(base: f64, step: usize, warmup: usize, drops: &[usize], factor: f64) -> f64 {
    let warm = if warmup == 0 {
        1.0
    } else {
        (((step + 1) as f64) / warmup as f64).powi(2).min(1.0)
    };
    let dropped = drops.iter().filter(|&&d| step >= d).count() as i32;
    base * warm * factor.powi(dropped)
}

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

/// The epoch surrogate `m` of `ensemble` sits at during craft step `step`:
/// (m * stagger + step) mod (ensemble * stagger). It is re-initialised whenever this is 0.
pub fn surrogate_epoch(m: usize, step: usize, ensemble: usize, stagger: usize) -> usize {
    (m * stagger + step) % (ensemble * stagger)
}

/// How many times surrogate `m` has been re-initialised by the start of craft step `step`
/// (its generation): used to derive fresh, reproducible initial weights each time.
pub fn surrogate_generation(m: usize, step: usize, ensemble: usize, stagger: usize) -> usize {
    let cycle = ensemble * stagger;
    (m * stagger + step) / cycle
}
