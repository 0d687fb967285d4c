//! Adversarial objectives on the targets' logits, each averaged over the targets. Lower is
//! better for the attacker.

use crate::config::ObjectiveKind;
pub use crate::model::cross_entropy;
use tch::{Kind, Tensor};

/// Per-target classes an objective needs.
#[derive(Debug)]
pub struct TargetLabels {
    /// True classes [T].
    pub truth: Tensor,
    /// Adversarial classes [T].
    pub adversarial: Tensor,
    /// The poison class (for indis3).
    pub poison_class: i64,
}

impl TargetLabels {
    /// Another handle on the same tensors (for a worker thread).
    pub fn shallow_clone(&self) -> TargetLabels {
        TargetLabels {
            truth: self.truth.shallow_clone(),
            adversarial: self.adversarial.shallow_clone(),
            poison_class: self.poison_class,
        }
    }
}

/// Carlini-Wagner margin: max_{j != a} z_j - z_a, clamped below at -100.
fn cw(logits: &Tensor, adv: &Tensor) -> Tensor {
    let z_adv = logits.gather(1, &adv.unsqueeze(1), false).squeeze_dim(1);
    let others = logits.scatter_value(1, &adv.unsqueeze(1), f64::NEG_INFINITY);
    let best_other = others.amax(&[1i64][..], false);
    (best_other - z_adv).clamp_min(-100.0).mean(logits.kind())
}

/// Cross-entropy toward class `cls` per target: -log p_cls.
fn xent(logits: &Tensor, cls: &Tensor) -> Tensor {
    let logp = logits.log_softmax(1, logits.kind());
    -logp
        .gather(1, &cls.unsqueeze(1), false)
        .squeeze_dim(1)
        .mean(logits.kind())
}

/// -log(1 - p_cls), computed stably as logsumexp(z) - logsumexp(z without cls).
fn xent_complement(logits: &Tensor, cls: &Tensor) -> Tensor {
    let all = logits.logsumexp(&[1i64][..], false);
    let without = logits
        .scatter_value(1, &cls.unsqueeze(1), f64::NEG_INFINITY)
        .logsumexp(&[1i64][..], false);
    (all - without).mean(logits.kind())
}

pub fn adversarial_loss(kind: ObjectiveKind, logits: &Tensor, labels: &TargetLabels) -> Tensor {
    match kind {
        ObjectiveKind::Cw => cw(logits, &labels.adversarial),
        ObjectiveKind::Xent => xent(logits, &labels.adversarial),
        ObjectiveKind::XentC => xent_complement(logits, &labels.truth),
        ObjectiveKind::Dualxent => {
            xent(logits, &labels.adversarial) + xent_complement(logits, &labels.truth)
        }
        ObjectiveKind::Indis3 => {
            let poison = labels.truth.full_like(labels.poison_class);
            xent_complement(logits, &labels.truth) + xent_complement(logits, &poison)
        }
    }
}

/// Whether each target is currently classified as its adversarial class.
pub fn success(logits: &Tensor, labels: &TargetLabels) -> Vec<bool> {
    let pred = logits.argmax(1, false);
    let hits = pred.eq_tensor(&labels.adversarial).to_kind(Kind::Int64);
    Vec::<i64>::try_from(&hits)
        .unwrap_or_default()
        .into_iter()
        .map(|v| v != 0)
        .collect()
}
