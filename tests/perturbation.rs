//! ReColor identity, projections, smoothness, schedules.

use metapoison::craft::perturbation::Perturbation;
use metapoison::craft::recolor::{Recolor, YUV_MAX, YUV_MIN};
use metapoison::craft::schedule::{inner_lr, outer_lr, surrogate_epoch, surrogate_generation};
use tch::{Device, Kind, Tensor};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn zero_grid_is_the_identity_rgb_and_grey() {
    tch::manual_seed(1);
    for (c, g) in [(3i64, 10usize), (1, 10), (3, 4)] {
        let imgs = Tensor::rand([4, c, 8, 8], (Kind::Double, Device::Cpu)) * 255.0;
        let r = Recolor::new(c as usize, g);
        let zero = Tensor::zeros(r.offset_shape(4), (Kind::Double, Device::Cpu));
        let out = r.apply(&imgs, &zero);
        // 0-255 scale: 1e-6 of the unit range is 2.55e-4 here.
        assert!(max_abs(&(out - &imgs)) < 255.0 * 1e-6, "C={c} G={g}");
    }
}

#[test]
fn grey_grid_shifts_luminance_as_interpolated() {
    // A 1-D grid of 3 points over [0, 1]: raising the middle point by 0.04 raises a mid-grey
    // pixel (0.5) by exactly 0.04 and a pixel at 0.25 by half of that.
    let r = Recolor::new(1, 3);
    let imgs = Tensor::from_slice(&[0.5 * 255.0, 0.25 * 255.0, 0.0, 255.0])
        .to_kind(Kind::Double)
        .view([1, 1, 2, 2]);
    let offsets = Tensor::from_slice(&[0.0, 0.04, 0.0])
        .to_kind(Kind::Double)
        .view([1, 3]);
    let out = (r.apply(&imgs, &offsets) - &imgs).view(-1) / 255.0;
    let got: Vec<f64> = Vec::try_from(out).unwrap();
    let want = [0.04, 0.02, 0.0, 0.0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
}

#[test]
fn projection_keeps_every_bound() {
    tch::manual_seed(2);
    for c in [3i64, 1] {
        let base = Tensor::rand([5, c, 6, 6], (Kind::Float, Device::Cpu)) * 255.0;
        let mut p =
            Perturbation::zeros(base.shallow_clone(), Recolor::new(c as usize, 5), 8.0, 0.04);
        {
            let _g = tch::no_grad_guard();
            p.delta.copy_(&(p.delta.rand_like() * 100.0 - 50.0));
            p.offsets.copy_(&(p.offsets.rand_like() * 2.0 - 1.0));
        }
        p.project(true);
        assert!(max_abs(&p.delta) <= 8.0 + 1e-4);
        let widest = (0..3).map(|c| YUV_MAX[c] - YUV_MIN[c]).fold(0.0, f64::max);
        assert!(max_abs(&p.offsets) <= 0.04 * widest + 1e-6);
        if c == 3 {
            for ch in 0..3 {
                let bound = 0.04 * (YUV_MAX[ch] - YUV_MIN[ch]);
                assert!(
                    max_abs(&p.offsets.select(-1, ch as i64)) <= bound + 1e-6,
                    "channel {ch}"
                );
            }
        }
        let poisons = p.poisons_detached();
        assert!(
            poisons.min().double_value(&[]) >= -1e-3
                && poisons.max().double_value(&[]) <= 255.0 + 1e-3
        );
        // The perturbed grid stays inside each channel's range.
        if c == 3 {
            let g = 5;
            for ch in 0..3 {
                let axis =
                    Tensor::linspace(YUV_MIN[ch], YUV_MAX[ch], g, (Kind::Float, Device::Cpu));
                let shape: Vec<i64> = (0..3).map(|a| if a == ch { g } else { 1 }).collect();
                let id = axis.view(&shape[..]);
                let total = p.offsets.select(-1, ch as i64) + id;
                assert!(total.min().double_value(&[]) >= YUV_MIN[ch] - 1e-6);
                assert!(total.max().double_value(&[]) <= YUV_MAX[ch] + 1e-6);
            }
        }
        let norms = p.norms();
        assert!(norms.delta_linf <= 8.0 + 1e-4 && norms.linf > 0.0);
        // The quantised poisons are whole numbers inside the image range.
        let q = p.quantised();
        assert_eq!(max_abs(&(&q - q.round())), 0.0);
    }
}

#[test]
fn randomised_delta_is_uniform_within_eps_and_image_range() {
    tch::manual_seed(3);
    let base = Tensor::full([50, 1, 10, 10], 128.0, (Kind::Float, Device::Cpu));
    let mut p = Perturbation::zeros(base, Recolor::new(1, 10), 8.0, 0.04);
    p.randomise(3);
    let d = &p.delta;
    assert!(max_abs(d) <= 8.0);
    let mean = d.mean(Kind::Double).double_value(&[]);
    let frac_big = d
        .abs()
        .gt(4.0)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!(mean.abs() < 0.2, "mean {mean}");
    assert!(
        (frac_big - 0.5).abs() < 0.03,
        "fraction above eps/2: {frac_big}"
    );
}

#[test]
fn smoothness_is_zero_for_constant_offsets_and_matches_hand_value() {
    let r = Recolor::new(1, 3);
    let flat = Tensor::full([2, 3], 0.02, (Kind::Double, Device::Cpu));
    assert_eq!(r.smoothness(&flat).double_value(&[]), 0.0);
    // Offsets (0, 0.01, 0.03): differences 0.01, 0.02; times G=3: 0.03, 0.06; mean of squares.
    let o = Tensor::from_slice(&[0.0, 0.01, 0.03])
        .to_kind(Kind::Double)
        .view([1, 3]);
    let want = (0.03f64.powi(2) + 0.06f64.powi(2)) / 2.0;
    assert!((r.smoothness(&o).double_value(&[]) - want).abs() < 1e-15);
}

#[test]
fn outer_schedule_warms_up_quadratically_and_drops() {
    let lr = |s| outer_lr(200.0, s, 5, &[20, 40], 0.1);
    assert!((lr(0) - 200.0 * 0.04).abs() < 1e-12);
    assert!((lr(2) - 200.0 * 0.36).abs() < 1e-12);
    assert_eq!(lr(4), 200.0);
    assert_eq!(lr(19), 200.0);
    assert!((lr(20) - 20.0).abs() < 1e-12);
    assert!((lr(40) - 2.0).abs() < 1e-12);
    assert!((inner_lr(0.1, 0, 5, &[100, 150]) - 0.02).abs() < 1e-15);
    assert_eq!(inner_lr(0.1, 4, 5, &[100, 150]), 0.1);
    assert!((inner_lr(0.1, 120, 5, &[100, 150]) - 0.01).abs() < 1e-15);
}

#[test]
fn ensemble_schedule_matches_the_formula() {
    // M = 3, stagger 2: a cycle of 6 epochs.
    let (m_count, stagger) = (3, 2);
    let table: Vec<Vec<usize>> = (0..8)
        .map(|s| {
            (0..m_count)
                .map(|m| surrogate_epoch(m, s, m_count, stagger))
                .collect()
        })
        .collect();
    assert_eq!(table[0], vec![0, 2, 4]);
    assert_eq!(table[1], vec![1, 3, 5]);
    assert_eq!(table[2], vec![2, 4, 0]); // surrogate 2 wraps: re-initialised
    assert_eq!(table[5], vec![5, 1, 3]);
    assert_eq!(table[6], vec![0, 2, 4]);
    // Generations count the re-initialisations.
    assert_eq!(surrogate_generation(2, 1, 3, 2), 0);
    assert_eq!(surrogate_generation(2, 2, 3, 2), 1);
    assert_eq!(surrogate_generation(0, 6, 3, 2), 1);
    assert_eq!(surrogate_generation(0, 12, 3, 2), 2);
}
