//! The architectures, each written once over [`Layers`].

use super::{Layers, Network};
use crate::config::NetKind;
use tch::Tensor;

pub(super) fn body(net: &Network, l: &mut Layers, x: &Tensor) -> Tensor {
    match net.kind {
        NetKind::ConvnetBn => convnet_bn(l, x, net.width, net.num_classes),
        NetKind::Resnet20 => resnet(l, x, &[16, 32, 64], 3, net.num_classes),
        NetKind::Resnet18 => resnet(l, x, &[64, 128, 256, 512], 2, net.num_classes),
        NetKind::Vgg11 => vgg(
            l,
            x,
            &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
            net.num_classes,
        ),
        NetKind::Vgg13 => vgg(
            l,
            x,
            &[
                64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0,
            ],
            net.num_classes,
        ),
    }
}

/// The MAML ConvNet with batch norm: 5 x (3x3 conv + bias, BN, ReLU, 2x2 max-pool), widths
/// 16-32-32-64-64 (times `width`), 32 px -> 1 px, then a linear layer.
fn convnet_bn(l: &mut Layers, x: &Tensor, width: i64, classes: i64) -> Tensor {
    let mut h = x.shallow_clone();
    for c in [16, 32, 32, 64, 64] {
        h = l.conv(&h, c * width, 3, 1);
        h = l.channel_bias(&h);
        h = l.batch_norm_relu(&h);
        h = l.max_pool_2x2(&h);
    }
    let h = h.flatten(1, -1);
    l.linear(&h, classes)
}

fn basic_block(l: &mut Layers, x: &Tensor, out: i64, stride: i64) -> Tensor {
    let h = l.conv(x, out, 3, stride);
    let h = l.batch_norm_relu(&h);
    let h = l.conv(&h, out, 3, 1);
    l.batch_norm_add_relu(&h, |l| {
        if stride != 1 || l.channels(x) != out {
            let s = l.conv(x, out, 1, stride);
            l.batch_norm(&s)
        } else {
            x.shallow_clone()
        }
    })
}

/// CIFAR ResNets: 3x3 stem, stages of basic blocks (stride 2 from the second stage on), global
/// average pooling, linear. ResNet-20: widths 16-32-64, 3 blocks a stage; ResNet-18: 64-512, 2.
fn resnet(l: &mut Layers, x: &Tensor, widths: &[i64], blocks: usize, classes: i64) -> Tensor {
    let h = l.conv(x, widths[0], 3, 1);
    let mut h = l.batch_norm_relu(&h);
    for (stage, &w) in widths.iter().enumerate() {
        for b in 0..blocks {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            h = basic_block(l, &h, w, stride);
        }
    }
    let h = h.mean_dim(&[2i64, 3][..], false, h.kind());
    l.linear(&h, classes)
}

/// VGG with batch norm, CIFAR variant (one linear layer on the 512 features); 0 = max-pool.
fn vgg(l: &mut Layers, x: &Tensor, cfg: &[i64], classes: i64) -> Tensor {
    let mut h = x.shallow_clone();
    for &c in cfg {
        if c == 0 {
            h = l.max_pool_2x2(&h);
        } else {
            h = l.conv(&h, c, 3, 1);
            h = l.batch_norm_relu(&h);
        }
    }
    let h = h.flatten(1, -1);
    l.linear(&h, classes)
}
