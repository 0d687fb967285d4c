//! Target selection: rank the test images of the target class by how clean victims see them.
//! A good target is classified correctly by every clean victim (otherwise the control run
//! "succeeds" too) yet sits close to the adversarial class.

use super::{train_from_scratch, VictimTraining};
use crate::data::Dataset;
use crate::model::split_tensor;
use crate::model::{sgd, InputNorm, Network};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    /// Index among the test images of the target class (what `threat.target_ids` takes).
    pub id: usize,
    /// Index in the test split.
    pub test_index: usize,
    /// Fraction of clean victims that classify it correctly.
    pub correct: f64,
    /// Mean over victims of z_true - z_adv (logits): small and positive is near the boundary.
    pub margin: f64,
    /// Smallest z_true - z_adv over the victims: how close the least sure victim came to
    /// flipping it. Selecting on the mean alone favours targets that only looked correct.
    #[serde(default)]
    pub min_margin: f64,
    /// Mean probability of the adversarial class.
    pub p_adv: f64,
}

pub struct Suggestion {
    pub candidates: Vec<Candidate>,
    /// Clean test accuracy of each victim.
    pub accuracies: Vec<f64>,
}

impl Suggestion {
    /// The candidates fit to attack, in rank order: classified correctly by every clean victim
    /// with at least `min_margin` logits to spare in each. A floor above 0 skips targets that
    /// a fresh clean victim would often flip on its own (the control would "succeed").
    pub fn eligible(&self, min_margin: f64) -> impl Iterator<Item = &Candidate> {
        self.candidates
            .iter()
            .filter(move |c| c.correct >= 1.0 && c.min_margin >= min_margin)
    }
}

/// Trains `victims` clean models and ranks every test image of the target class by its margin
/// to the adversarial class.
pub fn suggest(
    data: &Dataset,
    spec: &VictimTraining,
    (target_class, adv_class): (i64, i64),
    victims: usize,
    seed: u64,
    device: Device,
    mut progress: impl FnMut(usize, usize),
) -> Suggestion {
    let norm = InputNorm::for_dataset(&data.name, data.train.channels);
    let net = Network::new(
        spec.net,
        data.train.channels,
        data.num_classes(),
        spec.width,
        norm,
    );
    let train_x = split_tensor(&data.train, device);
    let train_y = Tensor::from_slice(&data.train.labels)
        .to_kind(Kind::Int64)
        .to_device(device);
    let test_x = split_tensor(&data.test, device);
    let test_y = Tensor::from_slice(&data.test.labels)
        .to_kind(Kind::Int64)
        .to_device(device);
    let of_class = data.test.indices_of_class(target_class as u8);
    let idx = Tensor::from_slice(&of_class.iter().map(|&i| i as i64).collect::<Vec<_>>())
        .to_device(device);
    let targets = test_x.index_select(0, &idx);
    let n = of_class.len();
    let (mut correct, mut margin, mut p_adv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut min_margin = vec![f64::INFINITY; n];
    let mut accuracies = Vec::new();
    for v in 0..victims {
        let state = train_from_scratch(
            &net,
            spec,
            &train_x,
            &train_y,
            seed.wrapping_add(v as u64),
            Kind::Float,
            |_| true,
        );
        accuracies.push(sgd::accuracy(&net, &state, &test_x, &test_y));
        let logits = sgd::predict(&net, &state, &targets, 500)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        let probs = logits.softmax(1, Kind::Double);
        let pred = logits.argmax(1, false);
        for i in 0..n {
            let i64_ = i as i64;
            if pred.int64_value(&[i64_]) == target_class {
                correct[i] += 1.0;
            }
            let m = logits.double_value(&[i64_, target_class])
                - logits.double_value(&[i64_, adv_class]);
            margin[i] += m;
            min_margin[i] = min_margin[i].min(m);
            p_adv[i] += probs.double_value(&[i64_, adv_class]);
        }
        progress(v + 1, victims);
    }
    let k = victims.max(1) as f64;
    let mut candidates: Vec<Candidate> = (0..n)
        .map(|i| Candidate {
            id: i,
            test_index: of_class[i],
            correct: correct[i] / k,
            margin: margin[i] / k,
            min_margin: min_margin[i],
            p_adv: p_adv[i] / k,
        })
        .collect();
    // Always-correct first; among those the smallest positive margin (closest to the boundary).
    candidates.sort_by(|a, b| {
        b.correct
            .total_cmp(&a.correct)
            .then(a.margin.total_cmp(&b.margin))
    });
    Suggestion {
        candidates,
        accuracies,
    }
}
