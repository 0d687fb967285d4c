//! Training-mode batch norm whose double backward is one fused CPU kernel
//! (`src/model/fused_bn.cpp`, compiled by build.rs). The values and first derivatives are
//! libtorch's own kernels; only the second derivative, which the unrolled meta-gradient takes
//! through every batch norm of every unrolled step, is computed in two passes over the
//! activations instead of libtorch's composite of some thirty kernels.

use std::ffi::{c_char, CStr};
use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn mp_fused_batch_norm(
        x: *const C_tensor,
        gamma: *const C_tensor,
        beta: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        momentum: f64,
        eps: f64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mp_free_error(message: *mut c_char);
}

/// Whether the fused kernel serves `x`: float32 or float64 on the CPU, at least 2-d.
pub fn applies_to(x: &Tensor) -> bool {
    x.device() == Device::Cpu && matches!(x.kind(), Kind::Float | Kind::Double) && x.dim() >= 2
}

/// `x.batch_norm(gamma, beta, running_mean, running_var, training = true, momentum, eps)`
/// with the fused double backward; `running` (mean, var) are updated in place when given.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    momentum: f64,
    eps: f64,
) -> Result<Tensor, TchError> {
    let (mean, var) = match running {
        Some((m, v)) => (m.as_ptr(), v.as_ptr()),
        None => (std::ptr::null(), std::ptr::null()),
    };
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors (or null where the C++ side accepts null);
    // on success `out` is a heap tensor whose ownership passes to the returned Tensor.
    unsafe {
        let err = mp_fused_batch_norm(
            x.as_ptr(),
            gamma.as_ptr(),
            beta.as_ptr(),
            mean,
            var,
            momentum,
            eps,
            &mut out,
        );
        if !err.is_null() {
            let text = CStr::from_ptr(err).to_string_lossy();
            // libtorch appends a C++ backtrace; its first line is the message.
            let first = text.lines().next().unwrap_or("").to_string();
            mp_free_error(err);
            return Err(TchError::Torch(format!("fused batch norm: {first}")));
        }
        Ok(Tensor::from_ptr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
        x.batch_norm(
            Some(gamma),
            Some(beta),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            1e-5,
            false,
        )
    }

    /// Test inputs from the crate's own generator (libtorch's global one is shared by the
    /// tests running in parallel): x, gamma, beta, the upstream weights that shape gO, and the
    /// weights u, p, q of the objective built from the first-order gradients.
    fn inputs(shape: &[i64], seed: u64) -> Vec<Tensor> {
        let mut rng = crate::craft::rng::SplitMix64::new(seed);
        let opts = (Kind::Double, Device::Cpu);
        let c = shape[1];
        vec![
            rng.normal_tensor(shape, 3.0, opts) + 1.5,
            rng.uniform_tensor(&[c], 0.5, 1.5, opts),
            rng.normal_tensor(&[c], 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
            rng.normal_tensor(&[c], 1.0, opts),
            rng.normal_tensor(&[c], 1.0, opts),
        ]
    }

    /// First and second derivatives of a loss through batch norm, in float64: the gradient
    /// of an objective built from the first-order gradients (as the unrolled meta-gradient
    /// is) wrt x, gamma, beta and the upstream weights that shape gO. Without `with_gx` the
    /// objective leaves out x's first-order gradient, so its adjoint reaches the fused
    /// kernel undefined.
    fn derivatives(fused: bool, inputs: &[Tensor], with_gx: bool) -> Vec<Tensor> {
        let [x, gamma, beta, upstream] =
            [0, 1, 2, 3].map(|i| inputs[i].copy().set_requires_grad(true));
        let (u, p, q) = (&inputs[4], &inputs[5], &inputs[6]);
        let y = if fused {
            batch_norm_train(&x, &gamma, &beta, None, 0.1, 1e-5).unwrap()
        } else {
            native(&x, &gamma, &beta)
        };
        // gO = 2 y upstream + ..., so it depends on x, gamma, beta and upstream.
        let loss = (&y * &y * &upstream).sum(Kind::Double) + y.tanh().sum(Kind::Double);
        let first = Tensor::run_backward(&[loss], &[&x, &gamma, &beta], true, true);
        let objective = (&first[1] * p).sum(Kind::Double) + (&first[2] * q).sum(Kind::Double);
        let objective = if with_gx {
            objective + (&first[0] * u).sum(Kind::Double)
        } else {
            objective
        };
        let second =
            Tensor::run_backward(&[objective], &[&x, &gamma, &beta, &upstream], false, false);
        first
            .into_iter()
            .map(|t| t.detach())
            .chain(second)
            .collect()
    }

    /// Fused against libtorch's composite; a wrong term in the fused kernel's second
    /// derivative (dropping the r^2 term of x's adjoint) gives errors of 0.006-0.1 here.
    #[test]
    fn fused_derivatives_match_libtorch_to_float64_precision() {
        for (shape, seed) in [
            (&[6i64, 3, 4, 5][..], 1),
            (&[5, 4][..], 2),
            (&[2, 2, 1, 1][..], 3),
        ] {
            let inputs = inputs(shape, seed);
            for with_gx in [true, false] {
                let fused = derivatives(true, &inputs, with_gx);
                let native = derivatives(false, &inputs, with_gx);
                for (i, (a, b)) in fused.iter().zip(native.iter()).enumerate() {
                    let scale = b.abs().max().double_value(&[]).max(1e-3);
                    let err = (a - b).abs().max().double_value(&[]) / scale;
                    assert!(
                        err < 1e-10,
                        "shape {shape:?} with_gx {with_gx} derivative {i}: relative error {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn running_statistics_move_as_libtorch_moves_them() {
        let mut rng = crate::craft::rng::SplitMix64::new(4);
        let x = rng.normal_tensor(&[8, 3, 5, 5], 2.0, (Kind::Float, Device::Cpu)) + 1.0;
        let (gamma, beta) = (
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        let (m1, v1) = (
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
        let (m2, v2) = (m1.copy(), v1.copy());
        let y1 = batch_norm_train(&x, &gamma, &beta, Some((&m1, &v1)), 0.1, 1e-5).unwrap();
        let y2 = x.batch_norm(
            Some(&gamma),
            Some(&beta),
            Some(&m2),
            Some(&v2),
            true,
            0.1,
            1e-5,
            false,
        );
        assert!(y1.allclose(&y2, 1e-6, 1e-6, false));
        assert!(m1.allclose(&m2, 1e-7, 1e-7, false) && v1.allclose(&v2, 1e-7, 1e-7, false));
        assert!(
            m1.abs().sum(Kind::Float).double_value(&[]) > 0.1,
            "the running mean moved"
        );
    }

    #[test]
    fn a_bad_input_is_an_error_not_a_crash() {
        let x = Tensor::zeros([4, 3, 2, 2], (Kind::Float, Device::Cpu));
        let wrong = Tensor::ones([5], (Kind::Float, Device::Cpu));
        let err = batch_norm_train(&x, &wrong, &wrong, None, 0.1, 1e-5).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("fused batch norm: gamma must be [3] for an input of 3 channels"),
            "{text}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
    }
}
