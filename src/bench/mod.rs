//! `metapoison bench`. Every build has the finite-difference check of the meta-gradient
//! (`bench --gradcheck`, for users who want to check their GPU). The speed harness (one
//! craft step timed beside a PyTorch-eager reference, its profiler and the embedded Python)
//! is built only with the `timing` feature, so it stays out of the user binary:
//! `cargo build --release --features timing`.

pub mod command;
pub mod gradcheck;
#[cfg(feature = "timing")]
pub mod profile;
#[cfg(feature = "timing")]
pub mod reference;
#[cfg(feature = "timing")]
mod timed_command;
#[cfg(feature = "timing")]
pub mod timing;

#[cfg(feature = "timing")]
pub use timing::*;
