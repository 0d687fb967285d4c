//! ReColor (Laidlaw & Feizi 2019) as MetaPoison uses it: each poison has its own lookup grid
//! over YUV colour space; the image goes RGB -> YUV, through the perturbed grid by trilinear
//! interpolation, and back to RGB. With a zero offset the grid is the identity (trilinear
//! interpolation reproduces a linear map exactly). One-channel images get a 1-D grid over
//! luminance.

use tch::{Kind, Tensor};

/// Channel ranges of the grid: exactly the YUV images of the RGB cube under the matrix below
/// (Y in [0, 1], U in +-0.436, V in +-0.615), so every pixel falls inside the grid.
pub const YUV_MIN: [f64; 3] = [0.0, -0.43601035, -0.61497538];
pub const YUV_MAX: [f64; 3] = [1.0, 0.43601035, 0.61497538];

/// TensorFlow's `rgb_to_yuv` matrix (rows: Y, U, V), as the authors used.
const RGB_TO_YUV: [[f64; 3]; 3] = [
    [0.299, 0.587, 0.114],
    [-0.14714119, -0.28886916, 0.43601035],
    [0.61497538, -0.51496512, -0.10001026],
];

/// The colour model for one data set shape.
#[derive(Debug, Clone)]
pub struct Recolor {
    pub channels: i64,
    pub grid: i64,
}

impl Recolor {
    pub fn new(channels: usize, grid: usize) -> Recolor {
        Recolor {
            channels: channels as i64,
            grid: grid as i64,
        }
    }

    /// Shape of the per-poison offsets: [P, G, G, G, 3] for RGB (axes Y, U, V), [P, G] for grey.
    pub fn offset_shape(&self, poisons: i64) -> Vec<i64> {
        if self.channels == 3 {
            vec![poisons, self.grid, self.grid, self.grid, 3]
        } else {
            vec![poisons, self.grid]
        }
    }

    /// The identity grid (grid point coordinates), [G, G, G, 3] or [G].
    fn identity(&self, kind: Kind, device: tch::Device) -> Tensor {
        let axis = |c: usize| Tensor::linspace(YUV_MIN[c], YUV_MAX[c], self.grid, (kind, device));
        if self.channels == 3 {
            let g = Tensor::meshgrid_indexing(&[axis(0), axis(1), axis(2)], "ij");
            Tensor::stack(&g, -1)
        } else {
            axis(0)
        }
    }

    /// Applies the recolouring to `images` [P, C, H, W] (0-255 scale) with `offsets`.
    pub fn apply(&self, images: &Tensor, offsets: &Tensor) -> Tensor {
        let (p, c, h, w) = images.size4().expect("[P, C, H, W]");
        let x = images / 255.0;
        let kind = images.kind();
        let device = images.device();
        let lut = self.identity(kind, device).unsqueeze(0) + offsets;
        if self.channels == 3 {
            let m = Tensor::from_slice(&RGB_TO_YUV.concat())
                .to_kind(kind)
                .to_device(device)
                .view([3, 3]);
            // [P, 3, HW] in YUV
            let yuv = m.matmul(&x.view([p, 3, h * w]));
            // grid_sample wants input [P, C_out=3, D, H, W] and coordinates [P, 1, 1, HW, 3]
            // ordered (x -> W, y -> H, z -> D). Our grid axes are (Y, U, V), so put V on D,
            // U on H and Y on W, and pass coordinates in (Y, U, V) order.
            let input = lut.permute([0, 4, 3, 2, 1]);
            let lo = Tensor::from_slice(&YUV_MIN)
                .to_kind(kind)
                .to_device(device)
                .view([1, 3, 1]);
            let hi = Tensor::from_slice(&YUV_MAX)
                .to_kind(kind)
                .to_device(device)
                .view([1, 3, 1]);
            let coords = ((&yuv - &lo) / (&hi - &lo) * 2.0 - 1.0)
                .transpose(1, 2)
                .view([p, 1, 1, h * w, 3]);
            // mode 0 = (tri)linear, padding 1 = border, align_corners: grid ends at the ranges.
            let out = input.grid_sampler(&coords, 0, 1, true).view([p, 3, h * w]);
            let rgb = m.inverse().matmul(&out);
            rgb.view([p, c, h, w]) * 255.0
        } else {
            // 1-D: a [P, 1, 1, G] image sampled at (y, 0).
            let input = lut.view([p, 1, 1, self.grid]);
            let xs = x.view([p, 1, h * w, 1]) * 2.0 - 1.0;
            let coords = Tensor::cat(&[xs.shallow_clone(), xs.zeros_like()], 3);
            let out = input.grid_sampler(&coords, 0, 1, true);
            out.view([p, c, h, w]) * 255.0
        }
    }

    /// The largest change (0-1 scale) the colour grid can make to any pixel channel when each
    /// offset is within +-`bound` of its channel's range: the bound for |recolored - base|.
    pub fn max_shift(&self, bound: f64) -> f64 {
        if self.channels != 3 {
            return bound * (YUV_MAX[0] - YUV_MIN[0]);
        }
        let m = Tensor::from_slice(&RGB_TO_YUV.concat())
            .view([3, 3])
            .to_kind(Kind::Double);
        let inv = m.inverse();
        (0..3)
            .map(|c| {
                (0..3)
                    .map(|j| {
                        inv.double_value(&[c, j]).abs()
                            * bound
                            * (YUV_MAX[j as usize] - YUV_MIN[j as usize])
                    })
                    .sum::<f64>()
            })
            .fold(0.0, f64::max)
    }

    /// Projects offsets in place: each channel within +-`bound` (a fraction of the channel's
    /// range) and the perturbed grid inside the channel ranges.
    pub fn project(&self, offsets: &mut Tensor, bound: f64) {
        let _guard = tch::no_grad_guard();
        let id = self.identity(offsets.kind(), offsets.device()).unsqueeze(0);
        let channels = if self.channels == 3 { 3 } else { 1 };
        let mut parts = Vec::with_capacity(channels);
        for ch in 0..channels {
            let (o, i) = if self.channels == 3 {
                (offsets.select(-1, ch as i64), id.select(-1, ch as i64))
            } else {
                (offsets.shallow_clone(), id.shallow_clone())
            };
            let span = YUV_MAX[ch] - YUV_MIN[ch];
            let o = o.clamp(-bound * span, bound * span);
            let o = (&i + o).clamp(YUV_MIN[ch], YUV_MAX[ch]) - &i;
            parts.push(o);
        }
        let projected = if self.channels == 3 {
            Tensor::stack(&parts, -1)
        } else {
            parts.pop().unwrap()
        };
        offsets.copy_(&projected);
    }

    /// The authors' smoothness penalty: mean over every neighbouring pair of grid points, along
    /// each axis, of (difference x grid resolution)^2.
    pub fn smoothness(&self, offsets: &Tensor) -> Tensor {
        let g = self.grid as f64;
        let dims: &[i64] = if self.channels == 3 { &[1, 2, 3] } else { &[1] };
        let mut parts = Vec::new();
        for &d in dims {
            let n = offsets.size()[d as usize];
            let diff = offsets.narrow(d, 0, n - 1) - offsets.narrow(d, 1, n - 1);
            parts.push((diff * g).square().flatten(0, -1));
        }
        Tensor::cat(&parts, 0).mean(offsets.kind())
    }
}
