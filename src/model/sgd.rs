//! Ordinary (non-unrolled) training: one SGD step, shared by the surrogates' trajectory and
//! by victims trained from scratch; and the SGD rule every step applies, the unrolled ones too.

use super::cross_entropy;
use super::{Mode, Network, State};
use tch::Tensor;

/// SGD's update rule, as PyTorch's `torch.optim.SGD` without dampening: the weight decay is
/// added to the gradient, d = g + wd w; with momentum mu the velocity becomes v' = mu v + d
/// (v starts at zero) and the weight moves along v' (heavy ball) or along d + mu v'
/// (Nesterov); then times the learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SgdRule {
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

impl From<&crate::config::TrainConfig> for SgdRule {
    fn from(t: &crate::config::TrainConfig) -> SgdRule {
        SgdRule {
            weight_decay: t.weight_decay,
            momentum: t.momentum,
            nesterov: t.nesterov,
        }
    }
}

impl From<&crate::config::VictimConfig> for SgdRule {
    fn from(v: &crate::config::VictimConfig) -> SgdRule {
        SgdRule {
            weight_decay: v.weight_decay,
            momentum: v.momentum,
            nesterov: v.nesterov,
        }
    }
}

impl SgdRule {
    /// Plain SGD (the authors' surrogates and victims), with weight decay.
    pub fn plain(weight_decay: f64) -> SgdRule {
        SgdRule {
            weight_decay,
            ..SgdRule::default()
        }
    }

    /// Whether the rule keeps a velocity per weight (`State::velocity`).
    pub fn has_velocity(&self) -> bool {
        self.momentum > 0.0
    }

    /// The direction weight `w` with gradient `g` moves along (before the rate), and its new
    /// velocity (None without momentum). `v`: the velocity so far (None = zero). Differentiable:
    /// the unrolled steps take it inside the graph.
    pub fn direction(
        &self,
        w: &Tensor,
        g: &Tensor,
        v: Option<&Tensor>,
    ) -> (Tensor, Option<Tensor>) {
        let d = if self.weight_decay > 0.0 {
            g + w * self.weight_decay
        } else {
            g.shallow_clone()
        };
        if !self.has_velocity() {
            return (d, None);
        }
        let v_new = match v {
            Some(v) => v * self.momentum + &d,
            None => d.shallow_clone(),
        };
        let direction = if self.nesterov {
            &d + &v_new * self.momentum
        } else {
            v_new.shallow_clone()
        };
        (direction, Some(v_new))
    }
}

/// One SGD step on a batch of 0-255 images; batch-norm running statistics are updated.
/// Returns the loss (no host sync). `state.weights` must require grad; with momentum,
/// `state.velocity` must be there (`State::with_velocity`).
pub fn sgd_step(
    net: &Network,
    state: &State,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
    rule: &SgdRule,
) -> Tensor {
    let logits = net.forward(&state.weights, &state.buffers, x, Mode::TrainUpdateStats);
    let loss = cross_entropy(&logits, y);
    let grads = Tensor::run_backward(&[&loss], &state.weights, false, false);
    let rates = GroupRates::new(&[lr], &state.weights);
    update_in_place(state, &grads, &rates, rule);
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

    /// One step of weight tensor `j`, `w`, with gradient `g` and velocity `v`: the new
    /// weight and velocity. What every plain, unrolled and grouped step computes.
    pub fn step(
        &self,
        rule: &SgdRule,
        j: usize,
        w: &Tensor,
        g: &Tensor,
        v: Option<&Tensor>,
    ) -> (Tensor, Option<Tensor>) {
        let (direction, v_new) = rule.direction(w, g, v);
        (w - self.scale(j, &direction), v_new)
    }
}

/// Moves each weight (and its velocity) one SGD step, in place (outside autograd).
fn update_in_place(state: &State, grads: &[Tensor], rates: &GroupRates, rule: &SgdRule) {
    let _guard = tch::no_grad_guard();
    assert!(
        !rule.has_velocity() || state.velocity.len() == state.weights.len(),
        "SGD with momentum needs the state's velocity (State::with_velocity)"
    );
    for (j, (w, g)) in state.weights.iter().zip(grads).enumerate() {
        let (direction, v_new) = rule.direction(w, g, state.velocity.get(j));
        if let (Some(v), Some(v_new)) = (state.velocity.get(j), v_new) {
            let mut v = v.shallow_clone();
            v.copy_(&v_new);
        }
        let mut w = w.shallow_clone();
        let _ = w.f_sub_(&rates.scale(j, &direction)).expect("sgd update");
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
    rule: &SgdRule,
) -> Tensor {
    let rates = GroupRates::new(lrs, &state.weights);
    let logits = net.forward_grouped(&state.weights, &state.buffers, xs, Mode::TrainUpdateStats);
    let (m, n, classes) = logits.size3().expect("[m, N, classes]");
    // Mean over all m * N, times m: the sum of the m mean losses (each network's own gradient).
    let loss = cross_entropy(&logits.reshape([m * n, classes]), &ys.reshape([m * n])) * m as f64;
    let grads = Tensor::run_backward(&[&loss], &state.weights, false, false);
    update_in_place(state, &grads, &rates, rule);
    loss.detach() / m as f64
}
