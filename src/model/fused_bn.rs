//! Training-mode batch norm, optionally followed by a residual add and a ReLU, as one op whose
//! forward, backward and double backward are fused CPU kernels (`src/model/fused_bn.cpp`,
//! compiled by build.rs). The unrolled meta-gradient differentiates every batch norm of every
//! unrolled step twice; each direction here is two passes over the activations per channel,
//! where libtorch runs a scalar statistics loop, a separate ReLU pass each way, and a
//! composite of some thirty kernels for the second derivative.
//!
//! Off the CPU (CUDA) the same op runs as a short chain of ATen operations
//! ([`Backend::AtenOps`]): one reduction pass gives each pair of channel sums, and each output
//! is a few broadcast multiply-adds, where libtorch's second derivative is about thirty kernels.

use std::ffi::c_char;
use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn mp_fused_batch_norm(
        x: *const C_tensor,
        gamma: *const C_tensor,
        beta: *const C_tensor,
        residual: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        momentum: f64,
        eps: f64,
        relu: std::ffi::c_int,
        as_ops: std::ffi::c_int,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Whether the op serves `x`: float32 or float64, at least 2-d, on the CPU (fused kernels) or
/// CUDA (ATen operations). The CPU kernels run on contiguous (NCHW) and channels-last (NHWC)
/// tensors; any other strides are copied to NCHW first.
pub fn applies_to(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu | Device::Cuda(_))
        && matches!(x.kind(), Kind::Float | Kind::Double)
        && x.dim() >= 2
}

/// How the op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The fused CPU kernels (CPU tensors only).
    Kernels,
    /// ATen operations, on any device: what CUDA runs.
    AtenOps,
}

impl Backend {
    /// The kernels on the CPU, ATen operations elsewhere.
    pub fn for_tensor(x: &Tensor) -> Backend {
        if x.device() == Device::Cpu {
            Backend::Kernels
        } else {
            Backend::AtenOps
        }
    }
}

/// What follows the batch norm inside the fused op.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added to the normalised output (a residual block's shortcut), same shape as x.
    pub residual: Option<&'a Tensor>,
    /// A ReLU on the result.
    pub relu: bool,
}

/// Running statistics, moved in place by each training-mode call: stat = (1 - momentum) stat +
/// momentum batch_stat (the variance unbiased), as libtorch moves them.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    pub mean: &'a Tensor,
    pub var: &'a Tensor,
    pub momentum: f64,
}

/// `relu(x.batch_norm(gamma, beta, running_mean, running_var, training = true, momentum, eps)
/// + residual)` (the residual and the ReLU as `epilogue` says) with fused derivatives, on
/// `backend`; the `running` statistics move when given.
pub fn batch_norm_train(
    backend: Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: Option<Running>,
    eps: f64,
    epilogue: Epilogue,
) -> Result<Tensor, TchError> {
    let (mean, var, momentum) = match running {
        Some(r) => (r.mean.as_ptr(), r.var.as_ptr(), r.momentum),
        None => (std::ptr::null(), std::ptr::null(), 0.0),
    };
    let residual = epilogue.residual.map_or(std::ptr::null(), Tensor::as_ptr);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors (or null where the C++ side accepts null);
    // on success `out` is a heap tensor whose ownership passes to the returned Tensor.
    unsafe {
        let err = mp_fused_batch_norm(
            x.as_ptr(),
            gamma.as_ptr(),
            beta.as_ptr(),
            residual,
            mean,
            var,
            momentum,
            eps,
            std::ffi::c_int::from(epilogue.relu),
            std::ffi::c_int::from(backend == Backend::AtenOps),
            &mut out,
        );
        super::ffi::output("fused batch norm", err, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's composite of the same op.
    fn native(x: &Tensor, gamma: &Tensor, beta: &Tensor, epilogue: Epilogue) -> Tensor {
        let y = x.batch_norm(
            Some(gamma),
            Some(beta),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            1e-5,
            false,
        );
        let y = match epilogue.residual {
            Some(r) => y + r,
            None => y,
        };
        if epilogue.relu {
            y.relu()
        } else {
            y
        }
    }

    /// Test inputs from the crate's own generator (libtorch's global one is shared by the
    /// tests running in parallel): x, gamma, beta, the residual, the upstream weights that
    /// shape gO, and the weights u, p, q, w of the objective built from the first-order
    /// gradients.
    fn inputs(shape: &[i64], seed: u64) -> Vec<Tensor> {
        let mut rng = crate::base::rng::SplitMix64::new(seed);
        let opts = (Kind::Double, Device::Cpu);
        let c = shape[1];
        vec![
            rng.normal_tensor(shape, 3.0, opts) + 1.5,
            rng.uniform_tensor(&[c], 0.5, 1.5, opts),
            rng.normal_tensor(&[c], 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
            rng.normal_tensor(&[c], 1.0, opts),
            rng.normal_tensor(&[c], 1.0, opts),
            rng.normal_tensor(shape, 1.0, opts),
        ]
    }

    /// The epilogue variants: plain, ReLU, residual + ReLU, residual alone.
    const EPILOGUES: [(bool, bool); 4] =
        [(false, false), (false, true), (true, true), (true, false)];

    /// First and second derivatives of a loss through the op, in float64: the gradient of an
    /// objective built from the first-order gradients (as the unrolled meta-gradient is) wrt
    /// x, gamma, beta, the residual and the upstream weights that shape gO. Without `with_gx`
    /// the objective leaves out x's first-order gradient, so its adjoint reaches the fused
    /// kernel undefined. `backend` None is libtorch's composite.
    fn derivatives(
        backend: Option<Backend>,
        inputs: &[Tensor],
        (with_residual, relu): (bool, bool),
        with_gx: bool,
    ) -> Vec<Tensor> {
        let [x, gamma, beta, residual, upstream] =
            [0, 1, 2, 3, 4].map(|i| inputs[i].copy().set_requires_grad(true));
        let (u, p, q, w) = (&inputs[5], &inputs[6], &inputs[7], &inputs[8]);
        let epilogue = Epilogue {
            residual: with_residual.then_some(&residual),
            relu,
        };
        let y = match backend {
            Some(b) => batch_norm_train(b, &x, &gamma, &beta, None, 1e-5, epilogue).unwrap(),
            None => native(&x, &gamma, &beta, epilogue),
        };
        // gO = (2 y + 1) upstream + ..., so it depends on x, gamma, beta and upstream, and
        // its adjoint reaches upstream also where the ReLU is off.
        let loss = (&y * (&y + 1.0) * &upstream).sum(Kind::Double) + y.tanh().sum(Kind::Double);
        let mut wrt = vec![&x, &gamma, &beta];
        if with_residual {
            wrt.push(&residual);
        }
        let first = Tensor::run_backward(&[loss], &wrt, true, true);
        let mut objective = (&first[1] * p).sum(Kind::Double) + (&first[2] * q).sum(Kind::Double);
        if with_gx {
            objective += (&first[0] * u).sum(Kind::Double);
        }
        if with_residual {
            objective += (&first[3] * w).sum(Kind::Double);
        }
        wrt.push(&upstream);
        let second = Tensor::run_backward(&[objective], &wrt, false, false);
        std::iter::once(y.detach())
            .chain(first.into_iter().map(|t| t.detach()))
            .chain(second)
            .collect()
    }

    const BACKENDS: [Backend; 2] = [Backend::Kernels, Backend::AtenOps];

    /// Fused (both backends) against libtorch's composite: values, first and second
    /// derivatives of every epilogue. A wrong term in the double backward (dropping the r^2
    /// term of x's adjoint, or the ReLU mask on gO's adjoint) gives errors of 1e-3 to 0.1 here.
    #[test]
    fn fused_derivatives_match_libtorch_to_float64_precision() {
        for (shape, seed) in [
            (&[6i64, 3, 4, 5][..], 1),
            (&[5, 4][..], 2),
            (&[2, 2, 1, 1][..], 3),
        ] {
            let inputs = inputs(shape, seed);
            for epilogue in EPILOGUES {
                for with_gx in [true, false] {
                    let native = derivatives(None, &inputs, epilogue, with_gx);
                    for backend in BACKENDS {
                        let fused = derivatives(Some(backend), &inputs, epilogue, with_gx);
                        let case = format!(
                            "{backend:?} shape {shape:?} (residual, relu) {epilogue:?} \
                             with_gx {with_gx}"
                        );
                        crate::model::assert_all_close(&fused, &native, 1e-10, &case);
                    }
                }
            }
        }
    }

    /// The channels-last kernels (row chunks, vectors of channels, single channels past the
    /// last full vector) against libtorch's composite on the same NHWC inputs, float64. The
    /// shapes give one and several chunks, whole vectors only and vectors plus single
    /// channels; the residual comes in NCHW, so it is converted.
    #[test]
    fn channels_last_derivatives_match_libtorch_to_float64_precision() {
        for (shape, seed) in [
            (&[3i64, 19, 5, 4][..], 6),
            (&[2, 8, 3, 3][..], 7),
            (&[4, 11, 9, 10][..], 8),
        ] {
            let mut inputs = inputs(shape, seed);
            for i in [0, 4, 5, 8] {
                inputs[i] = crate::model::to_channels_last(&inputs[i]);
            }
            assert_eq!(inputs[0].stride()[1], 1, "x is channels-last");
            for epilogue in EPILOGUES {
                for with_gx in [true, false] {
                    let native = derivatives(None, &inputs, epilogue, with_gx);
                    for backend in BACKENDS {
                        let fused = derivatives(Some(backend), &inputs, epilogue, with_gx);
                        assert_eq!(fused[0].stride()[1], 1, "{backend:?} kept NHWC");
                        let case = format!(
                            "{backend:?} channels-last shape {shape:?} (residual, relu) \
                             {epilogue:?} with_gx {with_gx}"
                        );
                        crate::model::assert_all_close(&fused, &native, 1e-10, &case);
                    }
                }
            }
        }
    }

    /// In float32 (the crafting dtype) the fused op keeps to libtorch's composite within
    /// float32 rounding, for activations whose mean is far from zero.
    #[test]
    fn float32_values_and_gradients_match_libtorch() {
        // NCHW, then channels-last with a vector of 16 channels and 4 single ones.
        for (shape, nhwc) in [([16i64, 4, 8, 8], false), ([16, 20, 8, 8], true)] {
            for backend in BACKENDS {
                float32_case(backend, shape, nhwc);
            }
        }
    }

    fn float32_case(backend: Backend, shape: [i64; 4], nhwc: bool) {
        let mut rng = crate::base::rng::SplitMix64::new(5);
        let opts = (Kind::Float, Device::Cpu);
        let layout = |t: Tensor| {
            if nhwc {
                crate::model::to_channels_last(&t)
            } else {
                t
            }
        };
        let x = layout(rng.normal_tensor(&shape, 2.0, opts) + 20.0).set_requires_grad(true);
        let gamma = rng.uniform_tensor(&[shape[1]], 0.5, 1.5, opts);
        let beta = rng.normal_tensor(&[shape[1]], 1.0, opts);
        let upstream = layout(rng.normal_tensor(&shape, 1.0, opts));
        let epilogue = Epilogue {
            residual: None,
            relu: true,
        };
        let grad = |fused: bool| {
            let y = if fused {
                batch_norm_train(backend, &x, &gamma, &beta, None, 1e-5, epilogue).unwrap()
            } else {
                native(&x, &gamma, &beta, epilogue)
            };
            let g = Tensor::run_backward(&[(&y * &upstream).sum(Kind::Float)], &[&x], false, false);
            (y.detach(), g[0].shallow_clone())
        };
        let ((y1, g1), (y2, g2)) = (grad(true), grad(false));
        assert_eq!(
            y1.stride()[1] == 1,
            nhwc,
            "the output keeps the input's layout"
        );
        assert!(
            y1.allclose(&y2, 1e-4, 1e-4, false),
            "{backend:?} values, nhwc {nhwc}"
        );
        assert!(
            g1.allclose(&g2, 1e-3, 1e-4, false),
            "{backend:?} gradients, nhwc {nhwc}"
        );
    }

    #[test]
    fn running_statistics_move_as_libtorch_moves_them() {
        for backend in BACKENDS {
            running_statistics_case(backend);
        }
    }

    fn running_statistics_case(backend: Backend) {
        let mut rng = crate::base::rng::SplitMix64::new(4);
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
        let plain = Epilogue {
            residual: None,
            relu: false,
        };
        let y1 = batch_norm_train(
            backend,
            &x,
            &gamma,
            &beta,
            Some(Running {
                mean: &m1,
                var: &v1,
                momentum: 0.1,
            }),
            1e-5,
            plain,
        )
        .unwrap();
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
        assert!(y1.allclose(&y2, 1e-5, 1e-5, false));
        assert!(m1.allclose(&m2, 1e-6, 1e-6, false) && v1.allclose(&v2, 1e-6, 1e-6, false));
        assert!(
            m1.abs().sum(Kind::Float).double_value(&[]) > 0.1
                && (&v1 - 1.0).abs().sum(Kind::Float).double_value(&[]) > 0.1,
            "the running statistics moved"
        );
    }

    #[test]
    fn a_bad_input_is_an_error_not_a_crash() {
        for backend in BACKENDS {
            bad_input_case(backend);
        }
    }

    fn bad_input_case(backend: Backend) {
        let x = Tensor::zeros([4, 3, 2, 2], (Kind::Float, Device::Cpu));
        let plain = Epilogue {
            residual: None,
            relu: false,
        };
        let wrong = Tensor::ones([5], (Kind::Float, Device::Cpu));
        let err = batch_norm_train(backend, &x, &wrong, &wrong, None, 1e-5, plain).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("fused batch norm: gamma must be [3] for an input of 3 channels"),
            "{text}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
        let ok = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let short = Tensor::zeros([4, 3, 2, 1], (Kind::Float, Device::Cpu));
        let with_short = Epilogue {
            residual: Some(&short),
            relu: true,
        };
        let text = batch_norm_train(backend, &x, &ok, &ok, None, 1e-5, with_short)
            .unwrap_err()
            .to_string();
        assert!(text.contains("residual must be [4, 3, 2, 2]"), "{text}");
    }
}
