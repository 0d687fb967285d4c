//! Victims: networks trained from scratch on a (possibly poisoned) training split, the only
//! honest measure of a poison set.

use crate::model::sgd;
pub use crate::model::train::{train_from_scratch, train_from_scratch_grouped, VictimTraining};
use crate::model::{Network, State};
use tch::{Device, Kind, Tensor};

/// The training images with the poisons in place: `poisons` ([P, C, H, W], 0-255, already
/// quantised as they would be saved) replace the images at `indices`.
pub fn poisoned_training_set(train_x: &Tensor, indices: &[usize], poisons: &Tensor) -> Tensor {
    let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>())
        .to_device(train_x.device());
    train_x.to_kind(poisons.kind()).index_copy(0, &idx, poisons)
}

/// Softmax probabilities of each image (eval mode).
pub fn probabilities(net: &Network, state: &State, x: &Tensor) -> Vec<Vec<f64>> {
    let p = sgd::predict(net, state, x, 500)
        .softmax(1, Kind::Double)
        .to_device(Device::Cpu);
    (0..p.size()[0])
        .map(|i| Vec::<f64>::try_from(p.get(i)).unwrap_or_default())
        .collect()
}

pub mod cache;
pub mod eval;
pub mod targets;
