//! Standard data augmentation as tensor operations, so gradients flow through it when it is
//! applied inside the unrolled graph: zero-pad by 4, a random crop back to the original size
//! at a random offset per image, a random horizontal flip.

use crate::base::rng::SplitMix64;
use tch::Tensor;

pub fn crop_flip(x: &Tensor, rng: &mut SplitMix64) -> Tensor {
    let (n, _, h, w) = x.size4().expect("[N, C, H, W]");
    let padded = x.constant_pad_nd([4, 4, 4, 4]);
    let crops: Vec<Tensor> = (0..n)
        .map(|i| {
            let (dy, dx) = (rng.below(9) as i64, rng.below(9) as i64);
            let img = padded.get(i).narrow(1, dy, h).narrow(2, dx, w);
            if rng.below(2) == 1 {
                img.flip([2])
            } else {
                img
            }
        })
        .collect();
    Tensor::stack(&crops, 0)
}
