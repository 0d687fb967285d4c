//! 2-d convolution whose second derivative runs on the backend's backward kernels
//! (`src/model/conv2d.cpp`). libtorch differentiates a convolution's backward by convolving
//! batch-transposed copies of the activations, with the output map as the kernel; the unrolled
//! meta-gradient does that for every convolution of every unrolled step. Here the weight's
//! term is a backward-weights call on the tensors as they are. Values and first derivatives
//! are libtorch's own kernels.

use std::ffi::c_char;
use tch::{Kind, TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn mp_conv2d(
        x: *const C_tensor,
        w: *const C_tensor,
        stride: i64,
        padding: i64,
        groups: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Whether the op serves `x`: a 4-d float32 or float64 tensor on the CPU or CUDA (the C++ is
/// ATen calls, device-agnostic).
pub fn applies_to(x: &Tensor) -> bool {
    matches!(x.device(), tch::Device::Cpu | tch::Device::Cuda(_))
        && matches!(x.kind(), Kind::Float | Kind::Double)
        && x.dim() == 4
}

/// `x.conv2d(w, None, [stride], [padding], [1], groups)` with the second derivative above.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: i64,
    padding: i64,
    groups: i64,
) -> Result<Tensor, TchError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors; on success `out` is a heap tensor whose
    // ownership passes to the returned Tensor.
    unsafe {
        let err = mp_conv2d(x.as_ptr(), w.as_ptr(), stride, padding, groups, &mut out);
        super::ffi::output("conv2d", err, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// y, the first derivatives of a loss wrt x, w and the upstream weights that shape gO, and
    /// the second derivatives of an objective built from those first derivatives (as the
    /// unrolled meta-gradient is), wrt x, w and the upstream weights. `with_gx` false leaves
    /// x's first derivative out of the objective (its adjoint arrives undefined).
    fn derivatives(
        ours: bool,
        inputs: &[Tensor],
        (stride, padding, groups): (i64, i64, i64),
        with_gx: bool,
    ) -> Vec<Tensor> {
        let [x, w, upstream] = [0, 1, 2].map(|i| inputs[i].copy().set_requires_grad(true));
        let (u, v) = (&inputs[3], &inputs[4]);
        let y = if ours {
            conv2d(&x, &w, stride, padding, groups).unwrap()
        } else {
            x.conv2d(&w, None::<Tensor>, [stride], [padding], [1], groups)
        };
        // gO depends on x, w and upstream.
        let loss = (&y * &y * &upstream).sum(Kind::Double) + y.sin().sum(Kind::Double);
        let first = Tensor::run_backward(&[loss], &[&x, &w, &upstream], true, true);
        let mut objective = (&first[1] * v).sum(Kind::Double);
        if with_gx {
            objective += (&first[0] * u).sum(Kind::Double);
        }
        let second = Tensor::run_backward(&[objective], &[&x, &w, &upstream], false, false);
        std::iter::once(y.detach())
            .chain(first.into_iter().map(|t| t.detach()))
            .chain(second)
            .collect()
    }

    /// Against libtorch's convolution in float64: plain, strided, 1x1 strided (a ResNet
    /// shortcut), grouped, and channels-last. Dropping the conv(X, ggW) term of gO's adjoint
    /// fails here by 0.77, scaling the weight's term by 1.0001 by 4e-5.
    #[test]
    fn derivatives_match_libtorch_to_float64_precision() {
        // x's shape, w's shape, (stride, padding, groups), channels-last.
        type Case = (&'static [i64], &'static [i64], (i64, i64, i64), bool);
        let cases: [Case; 5] = [
            (&[3, 4, 7, 6], &[5, 4, 3, 3], (1, 1, 1), false),
            (&[2, 3, 8, 8], &[4, 3, 3, 3], (2, 1, 1), false),
            (&[2, 4, 8, 8], &[6, 4, 1, 1], (2, 0, 1), false),
            (&[2, 6, 5, 5], &[4, 3, 3, 3], (1, 1, 2), false),
            (&[3, 4, 6, 6], &[8, 4, 3, 3], (1, 1, 1), true),
        ];
        for (seed, (xs, ws, conv, nhwc)) in cases.into_iter().enumerate() {
            let mut rng = crate::base::rng::SplitMix64::new(40 + seed as u64);
            let opts = (Kind::Double, Device::Cpu);
            let x = rng.normal_tensor(xs, 1.0, opts);
            let w = rng.normal_tensor(ws, 0.5, opts);
            let y_shape = x
                .conv2d(&w, None::<Tensor>, [conv.0], [conv.1], [1], conv.2)
                .size();
            let mut inputs = vec![
                x,
                w.copy(),
                rng.normal_tensor(&y_shape, 1.0, opts),
                rng.normal_tensor(xs, 1.0, opts),
                rng.normal_tensor(ws, 1.0, opts),
            ];
            if nhwc {
                for i in [0, 1, 2] {
                    inputs[i] = crate::model::to_channels_last(&inputs[i]);
                }
            }
            for with_gx in [true, false] {
                let ours = derivatives(true, &inputs, conv, with_gx);
                let libtorch = derivatives(false, &inputs, conv, with_gx);
                let case = format!(
                    "x {xs:?} w {ws:?} (stride, padding, groups) {conv:?} nhwc {nhwc} \
                     with_gx {with_gx}"
                );
                crate::model::assert_all_close(&ours, &libtorch, 1e-11, &case);
            }
        }
    }

    /// An input that needs no gradient (the first layer outside the meta-gradient): the
    /// backward then returns the weight's gradient alone, and its derivative is still right.
    #[test]
    fn an_input_without_gradient_gives_the_weight_term_alone() {
        let mut rng = crate::base::rng::SplitMix64::new(50);
        let opts = (Kind::Double, Device::Cpu);
        let x = rng.normal_tensor(&[3, 4, 6, 6], 1.0, opts);
        let w0 = rng.normal_tensor(&[5, 4, 3, 3], 0.5, opts);
        let up0 = rng.normal_tensor(&[3, 5, 6, 6], 1.0, opts);
        let v = rng.normal_tensor(&[5, 4, 3, 3], 1.0, opts);
        let run = |ours: bool| {
            let (w, up) = (
                w0.copy().set_requires_grad(true),
                up0.copy().set_requires_grad(true),
            );
            let y = if ours {
                conv2d(&x, &w, 1, 1, 1).unwrap()
            } else {
                x.conv2d(&w, None::<Tensor>, [1], [1], [1], 1)
            };
            let loss = (&y * &y * &up).sum(Kind::Double);
            let gw = Tensor::run_backward(&[loss], &[&w], true, true);
            let objective = (&gw[0] * &v).sum(Kind::Double);
            let second = Tensor::run_backward(&[objective], &[&w, &up], false, false);
            [
                gw[0].detach(),
                second[0].shallow_clone(),
                second[1].shallow_clone(),
            ]
        };
        crate::model::assert_all_close(&run(true), &run(false), 1e-11, "input without gradient");
    }

    #[test]
    fn a_bad_input_is_an_error_not_a_crash() {
        let x = Tensor::zeros([2, 3, 5, 5], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([4, 2, 3, 3], (Kind::Float, Device::Cpu));
        let err = conv2d(&x, &w, 1, 1, 1).unwrap_err().to_string();
        assert!(err.contains("conv2d: Given groups=1"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
