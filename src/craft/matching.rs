//! Gradient matching (Witches' Brew, Geiping et al., ICLR 2021), the second recipe of the
//! engine: surrogates are trained once on the clean split; each step the poisons' training
//! gradient (with its graph) is aligned with the target's adversarial gradient, by the loss
//! 1 - cos over all parameters averaged over the surrogates, and the perturbation takes a
//! signed Adam step; R restarts from fresh random perturbations keep the one with the lowest
//! final loss. As in forest, the surrogates are in eval mode while crafting and the poisons
//! are augmented (crop + flip, differentiably) at every step.
//!
//! The crafter (crafter.rs) owns the state and drives the steps; this module holds the maths
//! and the restart schedule.

use super::objective::cross_entropy;
use crate::model::{Mode, Network, State};
use tch::{Kind, Tensor};

/// The target's adversarial gradient on one surrogate, computed once.
pub struct TargetGradient {
    /// d/dw of the cross-entropy of the targets toward their adversarial class, per weight.
    pub grads: Vec<Tensor>,
    /// Its norm over all weights.
    pub norm: f64,
}

/// The targets' adversarial gradient on `state` (eval mode, as forest's crafting).
pub fn target_gradient(
    net: &Network,
    state: &State,
    targets: &Tensor,
    adversarial: &Tensor,
) -> TargetGradient {
    let logits = net.forward(&state.weights, &state.buffers, targets, Mode::Eval);
    let loss = cross_entropy(&logits, adversarial);
    let grads: Vec<Tensor> = Tensor::run_backward(&[loss], &state.weights, false, false)
        .into_iter()
        .map(|g| g.detach())
        .collect();
    let norm = squared_norm(&grads).sqrt().double_value(&[]);
    TargetGradient { grads, norm }
}

fn squared_norm(ts: &[Tensor]) -> Tensor {
    ts.iter()
        .map(|t| t.square().sum(t.kind()))
        .reduce(|a, b| a + b)
        .expect("a network has weights")
}

/// 1 - cos(target gradient, the poisons' training gradient), over all weights at once: the
/// poisons (0-255, [P, C, H, W]) with their true `labels` on `state` in eval mode. A
/// differentiable function of the poisons (the training gradient keeps its graph).
pub fn matching_loss(
    net: &Network,
    state: &State,
    poisons: &Tensor,
    labels: &Tensor,
    target: &TargetGradient,
) -> Tensor {
    let logits = net.forward(&state.weights, &state.buffers, poisons, Mode::Eval);
    let loss = cross_entropy(&logits, labels);
    let grads = Tensor::run_backward(&[loss], &state.weights, true, true);
    let dot = grads
        .iter()
        .zip(&target.grads)
        .map(|(g, t)| (g * t).sum(g.kind()))
        .reduce(|a, b| a + b)
        .expect("a network has weights");
    let cosine = dot / (squared_norm(&grads).sqrt() * target.norm);
    cosine.neg() + 1.0
}

/// Where a gradient-matching run stands: `steps` craft steps shared evenly by `restarts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restarts {
    pub restarts: usize,
    pub steps: usize,
}

impl Restarts {
    pub fn per_restart(&self) -> usize {
        self.steps / self.restarts.max(1)
    }

    /// (restart, step within it) of craft step `step`, both 0-based.
    pub fn locate(&self, step: usize) -> (usize, usize) {
        let n = self.per_restart().max(1);
        (step / n, step % n)
    }

    /// The step-size factor at step `i` of a restart: x0.1 at 3/8, 5/8 and 7/8 of it (forest's
    /// milestones).
    pub fn factor(&self, i: usize) -> f64 {
        let n = self.per_restart();
        let passed = [3, 5, 7].iter().filter(|&&k| i >= n * k / 8).count();
        0.1f64.powi(passed as i32)
    }
}

/// The best restart so far: its final (unaugmented) matching loss and its perturbation.
#[derive(Debug)]
pub struct BestRestart {
    /// 0-based.
    pub restart: usize,
    pub loss: f64,
    pub delta: Tensor,
    pub offsets: Tensor,
}

/// What the crafter keeps for gradient matching besides the shared state.
#[derive(Default)]
pub struct MatchingState {
    /// Per surrogate; computed on first use after pretraining or a restore.
    pub targets: Vec<TargetGradient>,
    pub best: Option<BestRestart>,
}

impl MatchingState {
    /// Keeps `loss` and the perturbation if they beat the best restart so far.
    pub fn offer(&mut self, restart: usize, loss: f64, delta: &Tensor, offsets: &Tensor) -> bool {
        if self.best.as_ref().is_some_and(|b| b.loss <= loss) || !loss.is_finite() {
            return false;
        }
        self.best = Some(BestRestart {
            restart,
            loss,
            delta: delta.detach().copy(),
            offsets: offsets.detach().copy(),
        });
        true
    }
}

/// The matching loss averaged over `surrogates` (each with its target gradient), as a
/// differentiable tensor, and each surrogate's value: what a step differentiates and a
/// restart's end scores.
pub fn ensemble_loss(
    net: &Network,
    surrogates: &[State],
    targets: &[TargetGradient],
    poisons: &Tensor,
    labels: &Tensor,
) -> (Tensor, Vec<f64>) {
    let losses: Vec<Tensor> = surrogates
        .iter()
        .zip(targets)
        .map(|(s, t)| matching_loss(net, s, poisons, labels, t))
        .collect();
    let each = losses.iter().map(|l| l.double_value(&[])).collect();
    let mean = Tensor::stack(&losses, 0).mean(Kind::Double);
    (mean, each)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_share_the_steps_and_drop_at_three_five_and_seven_eighths() {
        let r = Restarts {
            restarts: 4,
            steps: 960,
        };
        assert_eq!(r.per_restart(), 240);
        assert_eq!(r.locate(0), (0, 0));
        assert_eq!(r.locate(239), (0, 239));
        assert_eq!(r.locate(240), (1, 0));
        assert_eq!(r.locate(959), (3, 239));
        assert_eq!(r.factor(0), 1.0);
        assert_eq!(r.factor(89), 1.0);
        assert!((r.factor(90) - 0.1).abs() < 1e-15);
        assert!((r.factor(150) - 0.01).abs() < 1e-15);
        assert!((r.factor(210) - 0.001).abs() < 1e-15);
    }

    #[test]
    fn the_best_restart_is_the_lowest_finite_loss() {
        let mut m = MatchingState::default();
        let t = |v: f64| Tensor::from_slice(&[v]);
        assert!(m.offer(0, 0.5, &t(1.0), &t(0.0)));
        assert!(!m.offer(1, 0.7, &t(2.0), &t(0.0)));
        assert!(!m.offer(2, f64::NAN, &t(3.0), &t(0.0)));
        assert!(m.offer(3, 0.2, &t(4.0), &t(0.0)));
        let best = m.best.unwrap();
        assert_eq!((best.restart, best.delta.double_value(&[0])), (3, 4.0));
    }
}
