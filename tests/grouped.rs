//! Surrogates batched into one grouped network compute the same maths as one at a time:
//! logits, meta-gradients (the sum over surrogates) and clean SGD steps agree in float64.

use metapoison::bench::gradcheck::Case;
use metapoison::config::{LrSchedule, NetKind, ObjectiveKind};
use metapoison::craft::unroll::{
    meta_gradient, meta_gradient_grouped, GroupedSurrogates, Surrogate, Targets, UnrollBatches,
    UnrollSettings,
};
use metapoison::model::sgd::{sgd_step, sgd_step_grouped, SgdRule};
use metapoison::model::{InputNorm, Mode, Network, State};
use tch::{Device, Kind, Tensor};

/// Largest difference relative to the larger tensor's largest entry; a tensor that is zero
/// up to rounding (ConvNetBN's conv bias, whose gradient batch norm cancels) is compared in
/// absolute terms.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a
        .abs()
        .max()
        .double_value(&[])
        .max(b.abs().max().double_value(&[]));
    (a - b).abs().max().double_value(&[]) / scale.max(1e-6)
}

fn net(kind: NetKind, channels: usize) -> Network {
    Network::new(
        kind,
        channels,
        4,
        1,
        InputNorm::for_dataset("test", channels),
    )
}

fn states(net: &Network, m: usize) -> Vec<State> {
    (0..m)
        .map(|i| {
            net.init(Device::Cpu, Kind::Double, 11 + i as u64)
                .trainable()
        })
        .collect()
}

#[test]
fn grouped_logits_equal_one_network_at_a_time() {
    for (kind, channels) in [
        (NetKind::ConvnetBn, 1),
        (NetKind::Resnet20, 3),
        (NetKind::Vgg11, 3),
    ] {
        let net = net(kind, channels);
        let ss = states(&net, 3);
        let side = if channels == 1 { 28 } else { 32 };
        let x = Tensor::rand(
            [3, 5, channels as i64, side, side],
            (Kind::Double, Device::Cpu),
        ) * 255.0;
        let stacked = State::stack(&ss.iter().collect::<Vec<_>>());
        for mode in [Mode::Train, Mode::Eval] {
            let grouped = net.forward_grouped(&stacked.weights, &stacked.buffers, &x, mode);
            assert_eq!(grouped.size(), vec![3, 5, 4]);
            for (i, s) in ss.iter().enumerate() {
                let one = net.forward(&s.weights, &s.buffers, &x.get(i as i64), mode);
                let err = max_rel(&grouped.get(i as i64), &one);
                assert!(
                    err < 1e-10,
                    "{kind:?} {mode:?} network {i}: relative error {err:e}"
                );
            }
        }
    }
}

/// Three surrogates (own weights, own batches) sharing one perturbation and target.
/// Three unrolling cases; with `momentum` each surrogate comes with a velocity of its own.
fn three_cases(channels: usize, k: usize, augment: bool, momentum: bool) -> Vec<Case> {
    (0..3u64)
        .map(|i| {
            let mut c = Case::new(channels, k, 5 + i, Device::Cpu);
            c.batches.augment = augment.then_some(100 + i);
            if momentum {
                c = c.with_random_velocity(20 + i);
            }
            c
        })
        .collect()
}

/// Momentum as the surrogates' own training would carry into the unroll, or plain SGD.
fn rule(momentum: bool) -> SgdRule {
    if momentum {
        SgdRule {
            weight_decay: 5e-4,
            momentum: 0.9,
            nesterov: true,
        }
    } else {
        SgdRule::plain(5e-4)
    }
}

#[test]
fn grouped_meta_gradient_is_the_sum_of_the_surrogates_meta_gradients() {
    for (channels, k, augment, objective, momentum) in [
        (1, 2, false, ObjectiveKind::Cw, false),
        (3, 1, true, ObjectiveKind::Xent, false),
        (3, 2, false, ObjectiveKind::Cw, false),
        (1, 2, false, ObjectiveKind::Cw, true),
    ] {
        let cases = three_cases(channels, k, augment, momentum);
        let shared = &cases[0];
        let s = UnrollSettings {
            steps: k,
            lr: 0.1,
            rule: rule(momentum),
            objective,
            smooth_coef: 1.0,
        };
        let targets = Targets {
            images: &shared.targets,
            labels: &shared.labels,
        };
        let mut sum_d = shared.perturbation.delta.zeros_like();
        let mut sum_o = shared.perturbation.offsets.zeros_like();
        let mut advs = Vec::new();
        // Each surrogate at its own inner rate (they sit at different epochs of the schedule).
        let lrs = [0.1, 0.05, 0.2];
        for (c, &lr) in cases.iter().zip(&lrs) {
            let model = Surrogate {
                net: &shared.net,
                weights: &c.weights,
                buffers: &c.buffers,
                velocity: &c.velocity,
            };
            let one = UnrollSettings { lr, ..s };
            let (adv, gd, go) =
                meta_gradient(model, &shared.perturbation, &c.batches, targets, one);
            sum_d += gd;
            sum_o += go;
            advs.push(adv.double_value(&[]));
        }
        let states: Vec<State> = cases
            .iter()
            .map(|c| {
                let handles = |ts: &[Tensor]| ts.iter().map(|t| t.shallow_clone()).collect();
                State {
                    weights: handles(&c.weights),
                    buffers: handles(&c.buffers),
                    velocity: handles(&c.velocity),
                }
            })
            .collect();
        let stacked = State::stack(&states.iter().collect::<Vec<_>>()).trainable();
        let inputs: Vec<&UnrollBatches> = cases.iter().map(|c| &c.batches).collect();
        let (adv, gd, go) = meta_gradient_grouped(
            GroupedSurrogates {
                net: &shared.net,
                weights: &stacked.weights,
                buffers: &stacked.buffers,
                velocity: &stacked.velocity,
                lrs: &lrs,
            },
            &shared.perturbation,
            &inputs,
            targets,
            s,
        );
        let adv: Vec<f64> = Vec::<f64>::try_from(adv).unwrap();
        for (a, b) in adv.iter().zip(&advs) {
            assert!(
                (a - b).abs() < 1e-10 * b.abs().max(1.0),
                "{adv:?} vs {advs:?}"
            );
        }
        let (ed, eo) = (max_rel(&gd, &sum_d), max_rel(&go, &sum_o));
        assert!(sum_d.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        assert!(
            ed < 1e-9 && eo < 1e-9,
            "C {channels} K {k} augment {augment} momentum {momentum}: delta {ed:e}, grid {eo:e}"
        );
    }
}

#[test]
fn grouped_sgd_step_trains_each_network_as_its_own_step_would() {
    for momentum in [false, true] {
        let rule = rule(momentum);
        let net = net(NetKind::Resnet20, 3);
        let with_velocity = |ss: Vec<State>| -> Vec<State> {
            ss.into_iter().map(|s| s.with_velocity(&rule)).collect()
        };
        let ones = with_velocity(states(&net, 3));
        let stacked = State::stack(&ones.iter().collect::<Vec<_>>()).trainable();
        // Each network at its own rate (surrogates at different epochs of their schedule); two
        // steps, so that the velocity the first leaves is used by the second.
        let lrs = [0.1, 0.05, 0.2];
        for _ in 0..2 {
            let xs = Tensor::rand([3, 6, 3, 32, 32], (Kind::Double, Device::Cpu)) * 255.0;
            let ys = Tensor::randint(4, [3, 6], (Kind::Int64, Device::Cpu));
            let _ = sgd_step_grouped(&net, &stacked, &xs, &ys, &lrs, &rule);
            for (i, s) in ones.iter().enumerate() {
                let _ = sgd_step(&net, s, &xs.get(i as i64), &ys.get(i as i64), lrs[i], &rule);
            }
        }
        let back = with_velocity(states(&net, 3));
        stacked.unstack_into(&back);
        for (a, b) in back.iter().zip(&ones) {
            assert_eq!(a.velocity.len(), b.velocity.len());
            for (x, y) in a
                .weights
                .iter()
                .zip(&b.weights)
                .chain(a.buffers.iter().zip(&b.buffers))
                .chain(a.velocity.iter().zip(&b.velocity))
            {
                let err = max_rel(x, y);
                assert!(err < 1e-10, "momentum {momentum}: relative error {err:e}");
            }
        }
        // And the steps moved the weights (so the comparison means something).
        let fresh = states(&net, 1);
        assert!(max_rel(&back[0].weights[0], &fresh[0].weights[0]) > 1e-6);
    }
}

#[test]
fn victims_trained_grouped_equal_victims_trained_alone() {
    use metapoison::victim::VictimTraining;
    let net = net(NetKind::ConvnetBn, 1);
    let crafter = VictimTraining {
        net: NetKind::ConvnetBn,
        width: 1,
        epochs: 2,
        lr: 0.1,
        warmup_epochs: 1,
        lr_drops: vec![1],
        batch_size: 16,
        rule: SgdRule::plain(5e-4),
        schedule: LrSchedule::Step,
        augment: true,
    };
    let standard = VictimTraining {
        rule: rule(true),
        schedule: LrSchedule::OneCycle,
        ..crafter.clone()
    };
    for spec in [crafter, standard] {
        grouped_victims_equal_lone_ones(&net, &spec);
    }
}

fn grouped_victims_equal_lone_ones(net: &Network, spec: &metapoison::victim::VictimTraining) {
    use metapoison::victim::{train_from_scratch, train_from_scratch_grouped};
    let opts = (Kind::Double, Device::Cpu);
    // Two splits of 40 images (the last batch of 8 is dropped, as alone), shared labels.
    let a = Tensor::rand([40, 1, 28, 28], opts) * 255.0;
    let b = Tensor::rand([40, 1, 28, 28], opts) * 255.0;
    let y = Tensor::randint(4, [40], (Kind::Int64, Device::Cpu));
    let seeds = [3u64, 3, 9];
    let xs = [&a, &b, &a];
    let grouped = train_from_scratch_grouped(net, spec, &xs, &y, &seeds, Kind::Double);
    for ((x, &seed), g) in xs.iter().zip(&seeds).zip(&grouped) {
        let alone = train_from_scratch(net, spec, x, &y, seed, Kind::Double, |_| true);
        for (j, (p, q)) in g
            .weights
            .iter()
            .zip(&alone.weights)
            .chain(g.buffers.iter().zip(&alone.buffers))
            .enumerate()
        {
            let err = max_rel(p, q);
            assert!(
                err < 1e-9,
                "{:?} seed {seed} tensor {j}: relative error {err:e}",
                spec.rule
            );
        }
    }
    // Different splits from the same seed give different victims (the check has teeth).
    assert!(max_rel(&grouped[0].weights[0], &grouped[1].weights[0]) > 1e-6);
}
