//! The poison parameters: per poison an additive perturbation `delta` (0-255 scale, L-inf
//! bounded) and a ReColor grid offset. poison = recolor(base, offsets) + delta.

use super::recolor::Recolor;
use crate::base::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct Perturbation {
    /// Clean poison bases [P, C, H, W], 0-255.
    pub base: Tensor,
    /// Additive perturbation [P, C, H, W], 0-255 scale; a leaf that requires grad.
    pub delta: Tensor,
    /// Colour-grid offsets (see [`Recolor::offset_shape`]); a leaf that requires grad.
    pub offsets: Tensor,
    pub recolor: Recolor,
    pub eps: f64,
    pub color_eps: f64,
}

/// Sizes of the perturbation, all on the 0-255 scale except the grid norm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Norms {
    /// max |poison - base| over all pixels.
    pub linf: f64,
    /// mean over poisons of ||poison - base||_2.
    pub mean_l2: f64,
    /// max |delta| (the additive part alone).
    pub delta_linf: f64,
    /// mean over poisons of the L2 norm of the grid offsets (0-1 colour units).
    pub grid_l2: f64,
    /// fraction of delta entries within 1% of the eps bound.
    pub frac_at_bound: f64,
}

impl Perturbation {
    /// Zero perturbation on `base`.
    pub fn zeros(base: Tensor, recolor: Recolor, eps: f64, color_eps: f64) -> Perturbation {
        let p = base.size()[0];
        let delta = base.zeros_like().set_requires_grad(true);
        let offsets = Tensor::zeros(recolor.offset_shape(p), (base.kind(), base.device()))
            .set_requires_grad(true);
        Perturbation {
            base,
            delta,
            offsets,
            recolor,
            eps,
            color_eps,
        }
    }

    /// Another handle on the same tensors (same storage, same autograd leaves), for a worker
    /// thread: tensors can move between threads but not be shared by reference.
    pub fn shallow_clone(&self) -> Perturbation {
        Perturbation {
            base: self.base.shallow_clone(),
            delta: self.delta.shallow_clone(),
            offsets: self.offsets.shallow_clone(),
            recolor: self.recolor.clone(),
            eps: self.eps,
            color_eps: self.color_eps,
        }
    }

    /// The authors' initialisation: delta uniform in [-eps, eps], then clipped so base + delta
    /// stays an image; offsets zero. `seed` fixes the draw.
    pub fn randomise(&mut self, seed: u64) {
        let _guard = tch::no_grad_guard();
        let opts = (self.base.kind(), self.base.device());
        let u = SplitMix64::new(seed).uniform_tensor(&self.base.size(), -self.eps, self.eps, opts);
        let u = (&self.base + u).clamp(0.0, 255.0) - &self.base;
        self.delta.copy_(&u);
        let _ = self.offsets.zero_();
    }

    /// The recoloured bases, clipped to the image range (a recoloured image is still an image).
    fn recolored(&self, slots: Option<&Tensor>) -> Tensor {
        let out = match slots {
            None => self.recolor.apply(&self.base, &self.offsets),
            Some(s) => self.recolor.apply(
                &self.base.index_select(0, s),
                &self.offsets.index_select(0, s),
            ),
        };
        out.clamp(0.0, 255.0)
    }

    /// Poisons for the slots given (all when `None`), differentiable in delta and offsets.
    pub fn poisons(&self, slots: Option<&Tensor>) -> Tensor {
        match slots {
            None => self.recolored(None) + &self.delta,
            Some(s) => self.recolored(Some(s)) + self.delta.index_select(0, s),
        }
    }

    /// A copy on `device` whose delta and offsets are fresh leaves: a surrogate on another
    /// device differentiates with respect to them, and its gradients are moved back.
    pub fn detached_on(&self, device: Device) -> Perturbation {
        let _guard = tch::no_grad_guard();
        let leaf = |t: &Tensor| t.detach().to_device(device).set_requires_grad(true);
        Perturbation {
            base: self.base.to_device(device),
            delta: leaf(&self.delta),
            offsets: leaf(&self.offsets),
            recolor: self.recolor.clone(),
            eps: self.eps,
            color_eps: self.color_eps,
        }
    }

    /// All poisons, detached.
    pub fn poisons_detached(&self) -> Tensor {
        let _guard = tch::no_grad_guard();
        self.poisons(None).detach()
    }

    /// Keeps every bound: offsets within the colour bound and channel ranges, delta within
    /// [-eps, eps], and (when `clip_to_image`) the poison inside [0, 255].
    pub fn project(&mut self, clip_to_image: bool) {
        let _guard = tch::no_grad_guard();
        self.recolor.project(&mut self.offsets, self.color_eps);
        let mut d = self.delta.clamp(-self.eps, self.eps);
        if clip_to_image {
            let recolored = self.recolored(None);
            d = (&recolored + d).clamp(0.0, 255.0) - recolored;
        }
        self.delta.copy_(&d);
    }

    pub fn norms(&self) -> Norms {
        let _guard = tch::no_grad_guard();
        let diff = (self.poisons(None) - &self.base).to_kind(Kind::Double);
        let p = diff.size()[0];
        let abs_delta = self.delta.abs().to_kind(Kind::Double);
        Norms {
            linf: diff.abs().max().double_value(&[]),
            mean_l2: diff
                .view([p, -1])
                .norm_scalaropt_dim(2.0, [1i64], false)
                .mean(Kind::Double)
                .double_value(&[]),
            delta_linf: abs_delta.max().double_value(&[]),
            grid_l2: self
                .offsets
                .to_kind(Kind::Double)
                .view([p, -1])
                .norm_scalaropt_dim(2.0, [1i64], false)
                .mean(Kind::Double)
                .double_value(&[]),
            frac_at_bound: if self.eps > 0.0 {
                abs_delta
                    .ge(self.eps * 0.99)
                    .to_kind(Kind::Double)
                    .mean(Kind::Double)
                    .double_value(&[])
            } else {
                0.0
            },
        }
    }

    /// The poisons as they would be saved: clipped to [0, 255] and rounded to integers.
    pub fn quantised(&self) -> Tensor {
        self.poisons_detached().clamp(0.0, 255.0).round()
    }
}
