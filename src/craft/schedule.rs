//! The outer optimiser's learning-rate schedule and the staggered ensemble's epoch schedule.
//! (The networks' own training schedules are `model::schedule`'s.)

pub use crate::model::schedule::{inner_lr, lr_at};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LrSchedule;

    #[test]
    fn one_cycle_rises_to_the_peak_at_30_percent_then_falls_to_base_over_250000() {
        let lr = |p: f64| lr_at(LrSchedule::OneCycle, 0.1, p, 10, 5, &[]);
        assert!((lr(0.0) - 0.004).abs() < 1e-12);
        assert!((lr(3.0) - 0.1).abs() < 1e-12);
        assert!((lr(10.0) - 0.1 / 25.0 / 1e4).abs() < 1e-15);
        // Halfway up and halfway down: the cosine's midpoints.
        assert!((lr(1.5) - (0.004 + 0.1) / 2.0).abs() < 1e-12);
        assert!((lr(6.5) - (0.1 + 0.1 / 25.0 / 1e4) / 2.0).abs() < 1e-12);
        // Monotone on each side.
        let rising: Vec<f64> = (0..30).map(|i| lr(i as f64 / 10.0)).collect();
        assert!(rising.windows(2).all(|w| w[0] < w[1]));
        let falling: Vec<f64> = (30..=100).map(|i| lr(i as f64 / 10.0)).collect();
        assert!(falling.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn the_step_schedule_is_the_authors_per_epoch_rate_whatever_the_fraction() {
        for p in [0.0, 0.5, 4.99, 5.0, 12.7] {
            assert_eq!(
                lr_at(LrSchedule::Step, 0.1, p, 20, 5, &[10]),
                inner_lr(0.1, p.floor() as usize, 5, &[10])
            );
        }
        assert!((lr_at(LrSchedule::Step, 0.1, 12.7, 20, 5, &[10]) - 0.01).abs() < 1e-12);
    }
}
