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
    let _guard = tch::no_grad_guard();
    for (w, g) in state.weights.iter().zip(grads.iter()) {
        let update = if weight_decay > 0.0 {
            (g + w * weight_decay) * lr
        } else {
            g * lr
        };
        let mut w = w.shallow_clone();
        let _ = w.f_sub_(&update).expect("sgd update");
    }
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

/// `sgd_step` of m networks at once (stacked state, `Network::forward_grouped`), network i on
/// `xs[i]` / `ys[i]` ([m, N, C, H, W] and [m, N]). Returns the mean of the m losses (no host
/// sync).
pub fn sgd_step_grouped(
    net: &Network,
    state: &State,
    xs: &Tensor,
    ys: &Tensor,
    lr: f64,
    weight_decay: f64,
) -> Tensor {
    let logits = net.forward_grouped(&state.weights, &state.buffers, xs, Mode::TrainUpdateStats);
    let (m, n, classes) = logits.size3().expect("[m, N, classes]");
    // Mean over all m * N, times m: the sum of the m mean losses (each network's own gradient).
    let loss = cross_entropy(&logits.reshape([m * n, classes]), &ys.reshape([m * n])) * m as f64;
    let grads = Tensor::run_backward(&[&loss], &state.weights, false, false);
    let _guard = tch::no_grad_guard();
    for (w, g) in state.weights.iter().zip(grads.iter()) {
        let update = if weight_decay > 0.0 {
            (g + w * weight_decay) * lr
        } else {
            g * lr
        };
        let mut w = w.shallow_clone();
        let _ = w.f_sub_(&update).expect("sgd update");
    }
    loss.detach() / m as f64
}
