//! Ordinary (non-unrolled) training: one plain SGD step, shared by the surrogates' clean
//! trajectory and by victims trained from scratch.

use super::{Mode, Network, State};
use crate::craft::objective::cross_entropy;
use tch::Tensor;

/// One SGD step on a batch of 0-255 images; batch-norm running statistics are updated.
/// Returns the loss (no host sync). `state.weights` must require grad.
pub fn sgd_step(
    net: &Network,
    state: &State,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
    weight_decay: f64,
) -> Tensor {
    let logits = net.forward(&state.weights, &state.buffers, x, Mode::TrainUpdateStats);
    let loss = cross_entropy(&logits, y);
    let grads = Tensor::run_backward(&[&loss], &state.weights, false, false);
    let rates = GroupRates::new(&[lr], &state.weights);
    update_in_place(&state.weights, &grads, &rates, weight_decay);
    loss.detach()
}

/// Logits in eval mode, in chunks (no autograd).
pub fn predict(net: &Network, state: &State, x: &Tensor, chunk: i64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(chunk.max(1) as usize)
        .map(|s| {
            let xb = x.narrow(0, s, chunk.min(n - s));
            net.forward(
                &state.weights,
                &state.buffers,
                &xb.to_kind(state.weights[0].kind()),
                Mode::Eval,
            )
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Top-1 accuracy of `state` on images `x` (any numeric kind, 0-255) with labels `y`.
pub fn accuracy(net: &Network, state: &State, x: &Tensor, y: &Tensor) -> f64 {
    let logits = predict(net, state, x, 500);
    logits
        .argmax(1, false)
        .eq_tensor(y)
        .to_kind(tch::Kind::Double)
        .mean(tch::Kind::Double)
        .double_value(&[])
}

/// The learning rates of m stacked networks (`State::stack`), one per network, as factors
/// that broadcast over each stacked weight; a plain scalar when they are all equal.
pub struct GroupRates {
    scalar: Option<f64>,
    /// Per weight tensor [m * d0, 1, ...]: network i's rate on its d0 rows.
    per_weight: Vec<Tensor>,
}

impl GroupRates {
    pub fn new(lrs: &[f64], weights: &[Tensor]) -> GroupRates {
        if lrs.iter().all(|&lr| lr == lrs[0]) {
            return GroupRates {
                scalar: Some(lrs[0]),
                per_weight: Vec::new(),
            };
        }
        let m = lrs.len() as i64;
        let per_weight = weights
            .iter()
            .map(|w| {
                let rows = w.size()[0] / m;
                let mut shape = vec![w.size()[0]];
                shape.extend(std::iter::repeat_n(1, w.dim() - 1));
                Tensor::from_slice(lrs)
                    .to_kind(w.kind())
                    .to_device(w.device())
                    .repeat_interleave_self_int(rows, 0, None)
                    .view(shape.as_slice())
            })
            .collect();
        GroupRates {
            scalar: None,
            per_weight,
        }
    }

    /// `t` (a step for weight tensor `j`) times each network's rate.
    pub fn scale(&self, j: usize, t: &Tensor) -> Tensor {
        match self.scalar {
            Some(lr) => t * lr,
            None => t * &self.per_weight[j],
        }
    }

    /// The SGD update of weight tensor `j`, `w`, with gradient `g`: rate x (g + decay x w).
    /// What every plain, unrolled and grouped step subtracts.
    pub fn update(&self, j: usize, w: &Tensor, g: &Tensor, weight_decay: f64) -> Tensor {
        if weight_decay > 0.0 {
            self.scale(j, &(g + w * weight_decay))
        } else {
            self.scale(j, g)
        }
    }
}

/// Subtracts each weight's SGD update in place (outside autograd).
fn update_in_place(weights: &[Tensor], grads: &[Tensor], rates: &GroupRates, weight_decay: f64) {
    let _guard = tch::no_grad_guard();
    for (j, (w, g)) in weights.iter().zip(grads).enumerate() {
        let update = rates.update(j, w, g, weight_decay);
        let mut w = w.shallow_clone();
        let _ = w.f_sub_(&update).expect("sgd update");
    }
}

/// `sgd_step` of m networks at once (stacked state, `Network::forward_grouped`), network i on
/// `xs[i]` / `ys[i]` ([m, N, C, H, W] and [m, N]) with learning rate `lrs[i]`. Returns the
/// mean of the m losses (no host sync).
pub fn sgd_step_grouped(
    net: &Network,
    state: &State,
    xs: &Tensor,
    ys: &Tensor,
    lrs: &[f64],
    weight_decay: f64,
) -> Tensor {
    let rates = GroupRates::new(lrs, &state.weights);
    let logits = net.forward_grouped(&state.weights, &state.buffers, xs, Mode::TrainUpdateStats);
    let (m, n, classes) = logits.size3().expect("[m, N, classes]");
    // Mean over all m * N, times m: the sum of the m mean losses (each network's own gradient).
    let loss = cross_entropy(&logits.reshape([m * n, classes]), &ys.reshape([m * n])) * m as f64;
    let grads = Tensor::run_backward(&[&loss], &state.weights, false, false);
    update_in_place(&state.weights, &grads, &rates, weight_decay);
    loss.detach() / m as f64
}
