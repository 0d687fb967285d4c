//! 2x2 max pooling, stride 2, with kernels written for that one window in all three directions
//! (`src/model/max_pool.cpp`): libtorch's CPU kernel for NCHW tensors walks a general window and
//! took 21% of a default craft step (`bench --profile`). Values, first and second derivatives
//! equal libtorch's bit for bit.

use std::ffi::c_char;
use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn mp_max_pool_2x2(x: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
}

/// Whether the kernel serves `x`: a 4-d float32 or float64 CPU tensor of at least 2x2 that is
/// not channels-last (libtorch's NHWC kernel is vectorised over channels already).
pub fn applies_to(x: &Tensor) -> bool {
    let size = x.size();
    x.device() == Device::Cpu
        && matches!(x.kind(), Kind::Float | Kind::Double)
        && size.len() == 4
        && size[2] >= 2
        && size[3] >= 2
        && (x.is_contiguous() || !is_channels_last(x))
}

fn is_channels_last(x: &Tensor) -> bool {
    x.dim() == 4 && x.stride()[1] == 1 && x.size()[1] > 1
}

/// `x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)`.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor, TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `x` is a live tch tensor; on success `out` is a heap tensor whose ownership
    // passes to the returned Tensor.
    unsafe {
        let err = mp_max_pool_2x2(x.as_ptr(), &mut out);
        super::ffi::output("max pool", err, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::rng::SplitMix64;

    fn libtorch(x: &Tensor) -> Tensor {
        x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// Inputs with ties (a ReLU's zeros, and a coarse grid of values), odd sizes (the last row
    /// and column dropped), -inf, +inf and NaN at fixed places and sprinkled over every vector
    /// lane; output rows of whole vectors, of vectors and a redone last one, and shorter than a
    /// vector (the scalar path): the values, and which element each gradient reaches, equal
    /// libtorch's exactly.
    #[test]
    fn values_and_gradients_equal_libtorch_bit_for_bit() {
        let mut rng = SplitMix64::new(11);
        for (shape, kind) in [
            ([3i64, 4, 8, 8], Kind::Float),
            ([2, 3, 7, 9], Kind::Double),
            ([1, 2, 2, 3], Kind::Float),
            ([5, 16, 28, 28], Kind::Float),
            // Output rows of 35, 20, 5, 3 and 6 (4 floats or 2 doubles a vector).
            ([2, 3, 6, 70], Kind::Float),
            ([2, 3, 5, 40], Kind::Double),
            ([3, 5, 10, 11], Kind::Float),
            ([3, 5, 6, 7], Kind::Double),
            ([4, 8, 12, 13], Kind::Float),
            ([4, 6, 7, 7], Kind::Float),
            ([3, 4, 9, 18], Kind::Float),
        ] {
            let opts = (kind, Device::Cpu);
            // Rounded to halves: many windows hold equal values.
            let x = (rng.normal_tensor(&shape, 2.0, opts) * 2.0).round() / 2.0;
            let x = x.relu();
            let _ = x.view(-1).get(0).fill_(f64::NEG_INFINITY);
            let _ = x.view(-1).get(5).fill_(f64::NAN);
            let _ = x.view(-1).get(6).fill_(f64::NAN);
            // Row 1, column 3: the last element its window scans.
            let _ = x.view(-1).get(shape[3] + 3).fill_(f64::NAN);
            let numel = x.numel();
            for value in [f64::NAN, f64::NEG_INFINITY, f64::INFINITY] {
                for _ in 0..numel / 40 {
                    let _ = x.view(-1).get(rng.below(numel) as i64).fill_(value);
                }
            }
            let x = x.set_requires_grad(true);
            let ours = max_pool_2x2(&x).unwrap();
            let theirs = libtorch(&x);
            assert_eq!(ours.size(), theirs.size(), "{shape:?}");
            assert!(
                ours.isnan().equal(&theirs.isnan())
                    && ours
                        .nan_to_num(0.0, None, None)
                        .equal(&theirs.nan_to_num(0.0, None, None)),
                "values {shape:?}"
            );
            // A distinct weight per output: the input gradient shows which element won.
            let w = Tensor::arange(ours.numel() as i64, opts).view_(ours.size()) + 1.0;
            let g_ours = Tensor::run_backward(
                &[(&ours * &w).nansum(None::<&[i64]>, false, kind)],
                &[&x],
                false,
                false,
            );
            let g_theirs = Tensor::run_backward(
                &[(&theirs * &w).nansum(None::<&[i64]>, false, kind)],
                &[&x],
                false,
                false,
            );
            assert!(g_ours[0].equal(&g_theirs[0]), "gradients {shape:?}");
        }
    }

    /// Through a second derivative, as the meta-gradient takes it: equal to libtorch's, bit for
    /// bit (each adjoint is one element's value moved, never a sum), even and odd sizes.
    #[test]
    fn second_derivatives_equal_libtorch() {
        let mut rng = SplitMix64::new(12);
        for (shape, kind) in [
            ([2i64, 3, 6, 6], Kind::Double),
            ([2, 3, 7, 5], Kind::Double),
            ([2, 3, 10, 11], Kind::Float),
            ([3, 4, 9, 18], Kind::Float),
            ([2, 3, 6, 7], Kind::Float),
        ] {
            let opts = (kind, Device::Cpu);
            let x0 = rng.normal_tensor(&shape, 1.0, opts);
            let u = rng.normal_tensor(&shape, 1.0, opts);
            let run = |ours: bool| {
                let x = x0.copy().set_requires_grad(true);
                let s = x.sin();
                let y = if ours {
                    max_pool_2x2(&s).unwrap()
                } else {
                    libtorch(&s)
                };
                let loss = (&y * &y).sum(Kind::Double);
                let g = Tensor::run_backward(&[loss], &[&x], true, true);
                let objective = (&g[0] * &u).sum(Kind::Double);
                let second = Tensor::run_backward(&[objective], &[&x], false, false);
                (g[0].detach(), second[0].shallow_clone())
            };
            let ((g1, s1), (g2, s2)) = (run(true), run(false));
            assert!(s1.abs().sum(Kind::Double).double_value(&[]) > 0.1);
            assert!(g1.equal(&g2), "first derivative {shape:?}");
            assert!(s1.equal(&s2), "second derivative {shape:?}");
        }
    }

    #[test]
    fn layouts_and_bad_inputs() {
        let x = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        assert!(applies_to(&x));
        assert!(!applies_to(&crate::model::to_channels_last(&x)));
        assert!(!applies_to(&x.to_kind(Kind::Half)));
        let err = max_pool_2x2(&x.view([6, 16])).unwrap_err().to_string();
        assert!(err.contains("max pool: input must be 4-d"), "{err}");
        assert_eq!(err.lines().count(), 1);
    }
}
