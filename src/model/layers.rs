//! The layer context shared by weight construction and the forward pass.

use super::OwnOps;
use crate::base::rng::SplitMix64;
use crate::config::NetKind;
use tch::{Device, Kind, Tensor};

/// Batch-norm behaviour of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running statistics untouched (unrolled steps).
    Train,
    /// Batch statistics, and running statistics updated in place (a real training step).
    TrainUpdateStats,
    /// Running statistics.
    Eval,
}

/// Batch-norm momentum in libtorch's convention (new = 0.9 old + 0.1 batch): the authors'
/// TensorFlow momentum 0.9.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

enum Source<'a> {
    Build {
        init: Init,
        weights: Vec<Tensor>,
        buffers: Vec<Tensor>,
    },
    Apply {
        weights: &'a [Tensor],
        buffers: &'a [Tensor],
        mode: Mode,
        wi: usize,
        bi: usize,
        /// Surrogates batched along the channel axis (see `Network::forward_grouped`).
        groups: i64,
        /// The crate's own ops to use where they serve.
        ops: OwnOps,
    },
}

/// What weight initialisation needs: the architecture (which scheme), dtype and device, and
/// the run's own random stream (never libtorch's global generator, which concurrent jobs share).
pub(crate) struct Init {
    pub net: NetKind,
    pub dtype: Kind,
    pub device: Device,
    pub rng: SplitMix64,
}

impl Init {
    fn uniform(&mut self, shape: &[i64], bound: f64) -> Tensor {
        self.rng
            .uniform_tensor(shape, -bound, bound, (self.dtype, self.device))
    }
    fn normal(&mut self, shape: &[i64], std: f64) -> Tensor {
        self.rng
            .normal_tensor(shape, std, (self.dtype, self.device))
    }
    fn zeros(&self, shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (self.dtype, self.device))
    }
    fn ones(&self, shape: &[i64]) -> Tensor {
        Tensor::ones(shape, (self.dtype, self.device))
    }
}

/// A batch norm's weights, taken from the network's tensors, and where its running statistics
/// are in the buffers.
struct BatchNormParams {
    gamma: Tensor,
    beta: Tensor,
    buffer: usize,
}

pub struct Layers<'a> {
    source: Source<'a>,
}

impl<'a> Layers<'a> {
    pub(crate) fn build(init: Init) -> Layers<'static> {
        Layers {
            source: Source::Build {
                init,
                weights: vec![],
                buffers: vec![],
            },
        }
    }

    pub(crate) fn apply(
        weights: &'a [Tensor],
        buffers: &'a [Tensor],
        mode: Mode,
        ops: OwnOps,
    ) -> Layers<'a> {
        Layers::apply_grouped(weights, buffers, mode, 1, ops)
    }

    /// Apply mode for `groups` networks at once: every weight holds the networks' tensors
    /// concatenated along dim 0 and activations hold their channels side by side
    /// ([N, groups * C, H, W]); convolutions run grouped, the linear layer as a batched matmul.
    pub(crate) fn apply_grouped(
        weights: &'a [Tensor],
        buffers: &'a [Tensor],
        mode: Mode,
        groups: i64,
        ops: OwnOps,
    ) -> Layers<'a> {
        Layers {
            source: Source::Apply {
                weights,
                buffers,
                mode,
                wi: 0,
                bi: 0,
                groups,
                ops,
            },
        }
    }

    fn groups(&self) -> i64 {
        match &self.source {
            Source::Build { .. } => 1,
            Source::Apply { groups, .. } => *groups,
        }
    }

    /// Channels of one network's share of an activation.
    pub fn channels(&self, x: &Tensor) -> i64 {
        x.size()[1] / self.groups()
    }

    pub(crate) fn into_state(self) -> super::State {
        match self.source {
            Source::Build {
                weights, buffers, ..
            } => super::State::new(weights, buffers),
            Source::Apply { .. } => unreachable!("into_state is only called on a build context"),
        }
    }

    /// Checks that the forward pass consumed exactly the weights it was given.
    pub(crate) fn finish(&self) {
        if let Source::Apply {
            weights,
            buffers,
            wi,
            bi,
            ..
        } = &self.source
        {
            assert_eq!(
                (*wi, *bi),
                (weights.len(), buffers.len()),
                "network consumed a different number of tensors than it was given"
            );
        }
    }

    fn take_weight(&mut self, make: impl FnOnce(&mut Init) -> Tensor) -> Tensor {
        match &mut self.source {
            Source::Build { init, weights, .. } => {
                let t = make(init);
                weights.push(t.shallow_clone());
                t
            }
            Source::Apply { weights, wi, .. } => {
                *wi += 1;
                weights[*wi - 1].shallow_clone()
            }
        }
    }

    /// Zero-padded square convolution without bias.
    pub fn conv(&mut self, x: &Tensor, out: i64, k: i64, stride: i64) -> Tensor {
        let cin = x.size()[1];
        let w = self.take_weight(|init| {
            let fan_in = (cin * k * k) as f64;
            let fan_out = (out * k * k) as f64;
            if init.net == NetKind::ConvnetBn {
                // Xavier (Glorot) uniform, as the authors' ConvNetBN.
                init.uniform(&[out, cin, k, k], (6.0 / (fan_in + fan_out)).sqrt())
            } else {
                // Kaiming normal, fan_out, for ReLU (torchvision's ResNet/VGG).
                init.normal(&[out, cin, k, k], (2.0 / fan_out).sqrt())
            }
        });
        let direct = match &self.source {
            Source::Apply { ops, .. } => ops.direct_conv_double_backward && ops.serve(x.device()),
            Source::Build { .. } => false,
        };
        if direct && super::conv2d::applies_to(x) {
            return super::conv2d::conv2d(x, &w, stride, k / 2, self.groups())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        x.conv2d(&w, None::<Tensor>, [stride], [k / 2], [1], self.groups())
    }

    /// 2x2 max pooling, stride 2 (the crate's kernel where it serves).
    pub fn max_pool_2x2(&self, x: &Tensor) -> Tensor {
        let ours = match &self.source {
            Source::Apply { ops, .. } => ops.max_pool,
            Source::Build { .. } => false,
        };
        if ours && super::max_pool::applies_to(x) {
            return super::max_pool::max_pool_2x2(x).unwrap_or_else(|e| panic!("{e}"));
        }
        x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// A bias added per channel (ConvNetBN's conv bias), initialised to zero.
    pub fn channel_bias(&mut self, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        let b = self.take_weight(|init| init.zeros(&[c]));
        x + b.view([1, c, 1, 1])
    }

    /// Batch norm.
    pub fn batch_norm(&mut self, x: &Tensor) -> Tensor {
        let bn = self.take_batch_norm(x);
        self.apply_batch_norm(&bn, x, None, false)
    }

    /// Batch norm, then a ReLU (one fused op where `fused_batch_norm` serves).
    pub fn batch_norm_relu(&mut self, x: &Tensor) -> Tensor {
        let bn = self.take_batch_norm(x);
        self.apply_batch_norm(&bn, x, None, true)
    }

    /// relu(batch_norm(x) + shortcut): a residual block's end. `shortcut` takes its own weights
    /// after the batch norm's, the order the network's tensors are stored in.
    pub fn batch_norm_add_relu(
        &mut self,
        x: &Tensor,
        shortcut: impl FnOnce(&mut Self) -> Tensor,
    ) -> Tensor {
        let bn = self.take_batch_norm(x);
        let residual = shortcut(self);
        self.apply_batch_norm(&bn, x, Some(&residual), true)
    }

    /// A batch norm's affine weights and the index of its running statistics in the buffers
    /// (created, when building, as mean 0 and variance 1).
    fn take_batch_norm(&mut self, x: &Tensor) -> BatchNormParams {
        let c = x.size()[1];
        let gamma = self.take_weight(|init| init.ones(&[c]));
        let beta = self.take_weight(|init| init.zeros(&[c]));
        let buffer = match &mut self.source {
            Source::Build { init, buffers, .. } => {
                buffers.push(init.zeros(&[c]));
                buffers.push(init.ones(&[c]));
                buffers.len() - 2
            }
            Source::Apply { bi, .. } => {
                *bi += 2;
                *bi - 2
            }
        };
        BatchNormParams {
            gamma,
            beta,
            buffer,
        }
    }

    /// relu(batch_norm(x) + residual), the residual and the ReLU optional.
    fn apply_batch_norm(
        &self,
        bn: &BatchNormParams,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        // (running mean, running var, training): training without running statistics while
        // building (the forward pass only finds the shapes).
        let (running, training) = match &self.source {
            Source::Build { .. } => (None, true),
            Source::Apply {
                buffers, mode, ops, ..
            } => {
                let running = (&buffers[bn.buffer], &buffers[bn.buffer + 1]);
                let fused = ops.fused_batch_norm
                    && ops.serve(x.device())
                    && *mode != Mode::Eval
                    && super::fused_bn::applies_to(x)
                    && residual.is_none_or(super::fused_bn::applies_to);
                if fused {
                    let backend = if ops.batch_norm_as_aten_ops {
                        super::fused_bn::Backend::AtenOps
                    } else {
                        super::fused_bn::Backend::for_tensor(x)
                    };
                    return super::fused_bn::batch_norm_train(
                        backend,
                        x,
                        &bn.gamma,
                        &bn.beta,
                        (*mode == Mode::TrainUpdateStats).then_some(super::fused_bn::Running {
                            mean: running.0,
                            var: running.1,
                            momentum: BN_MOMENTUM,
                        }),
                        BN_EPS,
                        super::fused_bn::Epilogue { residual, relu },
                    )
                    .unwrap_or_else(|e| panic!("{e}"));
                }
                match mode {
                    Mode::Train => (None, true),
                    Mode::TrainUpdateStats => (Some(running), true),
                    Mode::Eval => (Some(running), false),
                }
            }
        };
        let y = x.batch_norm(
            Some(&bn.gamma),
            Some(&bn.beta),
            running.map(|r| r.0),
            running.map(|r| r.1),
            training,
            BN_MOMENTUM,
            BN_EPS,
            true,
        );
        let y = match residual {
            Some(r) => y + r,
            None => y,
        };
        if relu {
            y.relu()
        } else {
            y
        }
    }

    /// Fully connected layer with bias; PyTorch's default uniform(+-1/sqrt(fan_in)) init, or
    /// Xavier for ConvNetBN.
    pub fn linear(&mut self, x: &Tensor, out: i64) -> Tensor {
        let fan_in = x.size()[1];
        let w = self.take_weight(|init| {
            let a = if init.net == NetKind::ConvnetBn {
                (6.0 / (fan_in + out) as f64).sqrt()
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            init.uniform(&[out, fan_in], a)
        });
        let b = self.take_weight(|init| {
            if init.net == NetKind::ConvnetBn {
                init.zeros(&[out])
            } else {
                init.uniform(&[out], 1.0 / (fan_in as f64).sqrt())
            }
        });
        let g = self.groups();
        if g == 1 {
            return x.linear(&w, Some(&b));
        }
        // [N, g * F] -> [g, N, F] @ [g, F, out] -> [g, N, out]: one matmul for all networks.
        let (n, f) = (x.size()[0], x.size()[1] / g);
        let out = w.size()[0] / g;
        x.view([n, g, f])
            .transpose(0, 1)
            .bmm(&w.view([g, out, f]).transpose(1, 2))
            + b.view([g, 1, out])
    }
}
