//! The MetaPoison attack: perturbation model, objectives, unrolled meta-gradient, staggered
//! ensemble and outer optimiser. No UI code lives here.

pub mod adam;
pub mod checkpoint;
pub mod crafter;
mod epoch;
pub mod matching;
pub mod objective;
pub mod parallel;
pub mod perturbation;
pub mod plan;
pub mod recolor;
pub mod report;
pub mod schedule;
pub mod unroll;
