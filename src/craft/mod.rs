//! The MetaPoison attack: perturbation model, objectives, unrolled meta-gradient, staggered
//! ensemble and outer optimiser. No UI code lives here.

pub mod objective;
pub mod perturbation;
pub mod recolor;
pub mod rng;
pub mod schedule;
pub mod unroll;
