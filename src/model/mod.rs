//! Functional networks: weights and batch-norm statistics are plain tensors passed to `forward`,
//! so an unrolled SGD step is ordinary code that produces new weight tensors.
//!
//! Each architecture is written once, as a function over a [`Layers`] context. Run in *build*
//! mode the context creates and initialises the weights as it meets them; run in *apply* mode it
//! consumes the weights given, in the same order. So the parameter list can never drift from the
//! forward pass.

pub mod augment;
mod conv2d;
mod ffi;
mod fused_bn;
mod layers;
mod max_pool;
mod nets;
pub mod schedule;
pub mod sgd;
pub mod train;

pub use layers::{Layers, Mode};

use crate::config::NetKind;
use crate::data::Split;
use tch::{Device, Kind, Tensor};

/// For the C++ ops' tests: asserts that each of `ours` equals the same-index tensor of
/// `libtorch` to `bound` in max-abs error relative to libtorch's max-abs (at least 1e-3);
/// `case` names the case in the failure message.
#[cfg(test)]
pub(crate) fn assert_all_close(ours: &[Tensor], libtorch: &[Tensor], bound: f64, case: &str) {
    assert_eq!(ours.len(), libtorch.len(), "{case}: output count");
    for (i, (a, b)) in ours.iter().zip(libtorch.iter()).enumerate() {
        let scale = b.abs().max().double_value(&[]).max(1e-3);
        let err = (a - b).abs().max().double_value(&[]) / scale;
        assert!(err < bound, "{case} output {i}: relative error {err}");
    }
}

/// How raw 0-255 images are turned into network inputs.
#[derive(Debug, Clone)]
pub struct InputNorm {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Images smaller than this are zero-padded (centred) to it: 28x28 Fashion-MNIST -> 32x32.
    pub side: i64,
}

impl InputNorm {
    /// Standard per-data-set statistics.
    pub fn for_dataset(name: &str, channels: usize) -> InputNorm {
        let (mean, std) = if name.starts_with("fashion-mnist") {
            (vec![0.2860], vec![0.3530])
        } else if name.starts_with("mnist") {
            (vec![0.1307], vec![0.3081])
        } else if channels == 3 {
            (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616])
        } else {
            (vec![0.5; channels], vec![0.25; channels])
        };
        InputNorm {
            mean,
            std,
            side: 32,
        }
    }

    /// `x`: [N, C, H, W] on the 0-255 scale -> padded, standardised input.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let (_, c, h, w) = x.size4().expect("images are [N, C, H, W]");
        let x = if h < self.side || w < self.side {
            let (top, left) = ((self.side - h) / 2, (self.side - w) / 2);
            x.constant_pad_nd([left, self.side - w - left, top, self.side - h - top])
        } else {
            x.shallow_clone()
        };
        let opts = (x.kind(), x.device());
        let mean = Tensor::from_slice(&self.mean)
            .to_kind(opts.0)
            .to_device(opts.1)
            .view([1, c, 1, 1]);
        let std = Tensor::from_slice(&self.std)
            .to_kind(opts.0)
            .to_device(opts.1)
            .view([1, c, 1, 1]);
        (x / 255.0 - mean) / std
    }
}

/// The same values with NHWC strides (PyTorch's channels-last format: convolutions on such an
/// input produce channels-last outputs, and element-wise ops keep the layout). Tensors that
/// are not 4-D are returned as they are. Differentiable: a permuted copy, permuted back.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    let out = t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    if t.requires_grad() && t.is_leaf() {
        // Keep a leaf a leaf (the weights are what training differentiates).
        out.detach().set_requires_grad(true)
    } else {
        out
    }
}

/// Weights (trained) and batch-norm running statistics (not trained) of one network instance,
/// and the velocity its SGD keeps per weight when it trains with momentum.
#[derive(Debug)]
pub struct State {
    pub weights: Vec<Tensor>,
    pub buffers: Vec<Tensor>,
    /// One tensor per weight (SGD with momentum), or empty (plain SGD).
    pub velocity: Vec<Tensor>,
}

impl State {
    pub fn new(weights: Vec<Tensor>, buffers: Vec<Tensor>) -> State {
        State {
            weights,
            buffers,
            velocity: Vec::new(),
        }
    }

    /// The same tensors with the weights marked as autograd leaves (what training and the
    /// unrolled meta-gradient differentiate with respect to).
    pub fn trainable(self) -> State {
        State {
            weights: self
                .weights
                .into_iter()
                .map(|w| w.set_requires_grad(true))
                .collect(),
            ..self
        }
    }

    /// With a zero velocity per weight when `rule` keeps one (and none has been made yet), so
    /// that in-place training through any handle on this state updates it.
    pub fn with_velocity(mut self, rule: &sgd::SgdRule) -> State {
        if rule.has_velocity() && self.velocity.is_empty() {
            self.velocity = self
                .weights
                .iter()
                .map(|w| w.detach().zeros_like())
                .collect();
        }
        self
    }

    /// Another handle on the same tensors: in-place training through it updates this state.
    pub fn shallow_clone(&self) -> State {
        let handles = |ts: &[Tensor]| ts.iter().map(|t| t.shallow_clone()).collect();
        State {
            weights: handles(&self.weights),
            buffers: handles(&self.buffers),
            velocity: handles(&self.velocity),
        }
    }

    /// Several networks' states as one, each tensor concatenated along dim 0 (what
    /// `Network::forward_grouped` reads). A copy: train it, then `unstack_into` the originals.
    pub fn stack(states: &[&State]) -> State {
        let cat = |pick: &dyn Fn(&State) -> &Vec<Tensor>| -> Vec<Tensor> {
            (0..pick(states[0]).len())
                .map(|j| {
                    let parts: Vec<Tensor> = states.iter().map(|s| pick(s)[j].detach()).collect();
                    Tensor::cat(&parts, 0)
                })
                .collect()
        };
        assert!(
            states
                .iter()
                .all(|s| s.velocity.is_empty() == states[0].velocity.is_empty()),
            "stacked states all keep a velocity or none does"
        );
        State {
            weights: cat(&|s| &s.weights),
            buffers: cat(&|s| &s.buffers),
            velocity: cat(&|s| &s.velocity),
        }
    }

    /// Copies network i's share of a stacked state back into `states[i]`, in place.
    pub fn unstack_into(&self, states: &[State]) {
        let _guard = tch::no_grad_guard();
        let m = states.len() as i64;
        let copy = |stacked: &[Tensor], pick: &dyn Fn(&State) -> &Vec<Tensor>| {
            for (j, t) in stacked.iter().enumerate() {
                for (i, part) in t.chunk(m, 0).iter().enumerate() {
                    let mut dst = pick(&states[i])[j].shallow_clone();
                    dst.copy_(part);
                }
            }
        };
        copy(&self.weights, &|s| &s.weights);
        copy(&self.buffers, &|s| &s.buffers);
        copy(&self.velocity, &|s| &s.velocity);
    }

    /// A deep copy (fresh storage), so updating one never touches the other.
    pub fn deep_clone(&self) -> State {
        let copies = |ts: &[Tensor]| ts.iter().map(|t| t.detach().copy()).collect();
        State {
            weights: copies(&self.weights),
            buffers: copies(&self.buffers),
            velocity: copies(&self.velocity),
        }
    }
}

/// An architecture bound to a data set's shape.
#[derive(Debug, Clone)]
pub struct Network {
    pub kind: NetKind,
    pub in_channels: i64,
    pub num_classes: i64,
    pub width: i64,
    pub norm: InputNorm,
    /// Run the convolutions on channels-last (NHWC) tensors: cuDNN's tensor-core kernels want
    /// that layout. The maths is unchanged; only the memory order of activations and conv
    /// weights differs.
    pub channels_last: bool,
    /// Which of the crate's own ops the layers use where they serve.
    pub ops: OwnOps,
}

/// The crate's own C++ ops, each on where it serves (libtorch's kernels otherwise, with the
/// same maths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnOps {
    /// Training-mode batch norm (with the ReLU and residual add after it) as `fused_bn`'s op:
    /// fused kernels on the CPU, ATen operations on CUDA.
    pub fused_batch_norm: bool,
    /// `fused_bn`'s op as ATen operations on the CPU too (what CUDA runs; tests and `bench`).
    pub batch_norm_as_aten_ops: bool,
    /// Convolutions through `conv2d`, whose second derivative runs on the backend's backward
    /// kernels instead of convolving transposed copies.
    pub direct_conv_double_backward: bool,
    /// 2x2 max pooling through `max_pool`'s CPU kernel (values, indices and derivatives equal
    /// to libtorch's bit for bit, so no config switch; CPU only).
    pub max_pool: bool,
    /// The ops above serve CUDA tensors too. Off by default: on CUDA they are tested by
    /// `bench --gradcheck` but not yet timed, so victims and pretraining keep libtorch's
    /// kernels there; the crafter sets it from the settled `run.*` switches.
    pub cuda: bool,
}

impl From<&crate::config::RunConfig> for OwnOps {
    /// The crafter's own ops. The switches are settled for the run's device, so they may
    /// serve CUDA tensors: there they are on only when a config asks for them.
    fn from(run: &crate::config::RunConfig) -> OwnOps {
        OwnOps {
            fused_batch_norm: run.fused_batch_norm(),
            batch_norm_as_aten_ops: false,
            direct_conv_double_backward: run.direct_conv_double_backward(),
            max_pool: true,
            cuda: true,
        }
    }
}

impl Default for OwnOps {
    fn default() -> Self {
        OwnOps {
            fused_batch_norm: true,
            batch_norm_as_aten_ops: false,
            direct_conv_double_backward: true,
            max_pool: true,
            cuda: false,
        }
    }
}

impl OwnOps {
    /// libtorch's kernels throughout.
    pub const LIBTORCH: OwnOps = OwnOps {
        fused_batch_norm: false,
        batch_norm_as_aten_ops: false,
        direct_conv_double_backward: false,
        max_pool: false,
        cuda: false,
    };

    /// Ours wherever they apply, CUDA included.
    pub fn everywhere() -> OwnOps {
        OwnOps {
            cuda: true,
            ..OwnOps::default()
        }
    }

    /// Whether the ops may serve a tensor on `device`.
    pub fn serve(&self, device: Device) -> bool {
        device == Device::Cpu || self.cuda
    }

    /// A short description for reports: "libtorch", "ours", or the departures from "ours"
    /// ("batch norm as ATen ops", "libtorch max pool, CPU only", ...).
    pub fn describe(&self) -> String {
        if !self.fused_batch_norm && !self.direct_conv_double_backward && !self.max_pool {
            return "libtorch".into();
        }
        let mut parts = Vec::new();
        if !self.fused_batch_norm {
            parts.push("libtorch batch norm");
        } else if self.batch_norm_as_aten_ops {
            parts.push("batch norm as ATen ops");
        }
        if !self.direct_conv_double_backward {
            parts.push("libtorch conv double backward");
        }
        if !self.max_pool {
            parts.push("libtorch max pool");
        }
        if !self.cuda {
            parts.push("CPU only");
        }
        if parts.is_empty() {
            "ours".into()
        } else {
            parts.join(", ")
        }
    }
}

impl Network {
    pub fn new(
        kind: NetKind,
        in_channels: usize,
        num_classes: usize,
        width: usize,
        norm: InputNorm,
    ) -> Self {
        Network {
            kind,
            in_channels: in_channels as i64,
            num_classes: num_classes as i64,
            width: width as i64,
            norm,
            channels_last: false,
            ops: OwnOps::default(),
        }
    }

    /// The same network with its convolutions on channels-last tensors (or not).
    pub fn with_channels_last(mut self, on: bool) -> Self {
        self.channels_last = on;
        self
    }

    /// The same network with these ops.
    pub fn with_ops(mut self, ops: OwnOps) -> Self {
        self.ops = ops;
        self
    }

    /// Fresh weights; `seed` fixes them.
    pub fn init(&self, device: Device, kind: Kind, seed: u64) -> State {
        let _guard = tch::no_grad_guard();
        let mut layers = Layers::build(layers::Init {
            net: self.kind,
            dtype: kind,
            device,
            rng: crate::base::rng::SplitMix64::new(seed),
        });
        let x = Tensor::zeros(
            [2, self.in_channels, self.norm.side, self.norm.side],
            (kind, device),
        );
        let _ = nets::body(self, &mut layers, &x);
        let mut state = layers.into_state();
        if self.channels_last {
            state.weights = state.weights.iter().map(to_channels_last).collect();
        }
        state
    }

    /// Logits for raw 0-255 images `x` [N, C, H, W].
    ///
    /// `Mode::Train` normalises with batch statistics; with `update_stats` it also moves the
    /// running statistics in `state.buffers` (in place, outside autograd), as one ordinary
    /// training step does. `Mode::Eval` uses the running statistics.
    pub fn forward(
        &self,
        weights: &[Tensor],
        buffers: &[Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Tensor {
        let mut layers = Layers::apply(weights, buffers, mode, self.ops);
        let input = self.layout(self.norm.apply(x));
        let out = nets::body(self, &mut layers, &input);
        layers.finish();
        out
    }

    /// Logits of `m` networks at once for raw 0-255 images `x` [m, N, C, H, W] (network i sees
    /// `x[i]`), as [m, N, classes]. `weights` and `buffers` hold the m networks' tensors
    /// concatenated along dim 0 (`State::stack`). The same maths as m calls of `forward`, in
    /// one grouped kernel per layer: on a GPU, where small networks are bound by kernel
    /// launches, that is several times faster (BENCHMARKS.md).
    pub fn forward_grouped(
        &self,
        weights: &[Tensor],
        buffers: &[Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Tensor {
        let (m, n, c, h, w) = x.size5().expect("grouped images are [m, N, C, H, W]");
        let input = self.norm.apply(&x.reshape([m * n, c, h, w]));
        let (c, h, w) = (input.size()[1], input.size()[2], input.size()[3]);
        let input =
            self.layout(
                input
                    .view([m, n, c, h, w])
                    .transpose(0, 1)
                    .reshape([n, m * c, h, w]),
            );
        let mut layers = Layers::apply_grouped(weights, buffers, mode, m, self.ops);
        let out = nets::body(self, &mut layers, &input);
        layers.finish();
        if m == 1 {
            out.unsqueeze(0)
        } else {
            out
        }
    }

    /// The network input in the memory layout its convolutions run on.
    fn layout(&self, input: Tensor) -> Tensor {
        if self.channels_last {
            to_channels_last(&input)
        } else {
            input
        }
    }

    pub fn param_count(&self) -> i64 {
        self.init(Device::Cpu, Kind::Float, 0)
            .weights
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

/// Cross-entropy of a batch (mean), in the logits' own precision.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.log_softmax(1, logits.kind()).nll_loss(labels)
}

/// Images of a split as a [N, C, H, W] u8 tensor.
pub fn split_tensor(split: &Split, device: Device) -> Tensor {
    Tensor::from_slice(&split.images)
        .view([
            split.len() as i64,
            split.height as i64,
            split.width as i64,
            split.channels as i64,
        ])
        .permute([0, 3, 1, 2])
        .contiguous()
        .to_device(device)
}
