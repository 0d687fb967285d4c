//! Every architecture builds, has the parameter count of its reference definition, and trains:
//! finite logits of the right shape and gradients for every weight, grey and RGB inputs.

use metapoison::config::NetKind;
use metapoison::model::{InputNorm, Mode, Network};
use tch::{Device, Kind, Tensor};

fn count(kind: NetKind, channels: usize) -> i64 {
    Network::new(kind, channels, 10, 1, InputNorm::for_dataset("x", channels)).param_count()
}

#[test]
fn parameter_counts_match_the_reference_definitions() {
    // ConvNetBN on grey input: conv weights 144+4608+9216+18432+36864, conv biases 208,
    // BN 2 x 208, linear 64 x 10 + 10.
    assert_eq!(count(NetKind::ConvnetBn, 1), 69_264 + 208 + 416 + 650);
    // The CIFAR ResNet-18 of the poisoning literature (kuangliu / forest): 11,173,962.
    assert_eq!(count(NetKind::Resnet18, 3), 11_173_962);
    // ResNet-20 with 1x1 projection shortcuts: the 269,722 of He et al.'s option-A net plus
    // the two projections (16x32 + 32x64 weights, their BN 2 x 96).
    assert_eq!(count(NetKind::Resnet20, 3), 269_722 + 512 + 2048 + 192);
    // VGG with BN and one linear layer on 512 features (kuangliu's CIFAR VGG: 9,231,114 and
    // 9,416,010), without the conv biases that batch norm makes redundant.
    assert_eq!(
        count(NetKind::Vgg11, 3),
        9_231_114 - (64 + 128 + 2 * 256 + 4 * 512)
    );
    assert_eq!(
        count(NetKind::Vgg13, 3),
        9_416_010 - (2 * 64 + 2 * 128 + 2 * 256 + 4 * 512)
    );
}

#[test]
fn every_network_trains_on_grey_and_rgb() {
    for kind in [
        NetKind::ConvnetBn,
        NetKind::Resnet20,
        NetKind::Resnet18,
        NetKind::Vgg11,
        NetKind::Vgg13,
    ] {
        for (c, side) in [(1usize, 28i64), (3, 32)] {
            let net = Network::new(
                kind,
                c,
                10,
                1,
                InputNorm::for_dataset(if c == 1 { "fashion-mnist" } else { "cifar10" }, c),
            );
            let s = net.init(Device::Cpu, Kind::Float, 3);
            let w: Vec<Tensor> = s
                .weights
                .iter()
                .map(|t| t.set_requires_grad(true))
                .collect();
            let x = Tensor::rand([4, c as i64, side, side], (Kind::Float, Device::Cpu)) * 255.0;
            let logits = net.forward(&w, &s.buffers, &x, Mode::TrainUpdateStats);
            assert_eq!(logits.size(), vec![4, 10], "{kind:?}");
            assert!(logits.isfinite().all().int64_value(&[]) == 1);
            let loss = logits
                .log_softmax(1, Kind::Float)
                .nll_loss(&Tensor::from_slice(&[0i64, 1, 2, 3]));
            let grads = Tensor::run_backward(&[loss], &w, false, false);
            assert!(
                grads
                    .iter()
                    .all(|g| g.isfinite().all().int64_value(&[]) == 1),
                "{kind:?}"
            );
            // Running statistics moved away from their initial values.
            assert!(
                s.buffers[0].abs().sum(Kind::Double).double_value(&[]) > 0.0,
                "{kind:?}"
            );
            // Eval mode uses them and gives finite logits too.
            let eval = net.forward(&w, &s.buffers, &x, Mode::Eval);
            assert!(eval.isfinite().all().int64_value(&[]) == 1);
        }
    }
}
