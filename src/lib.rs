//! metapoison: clean-label data poisoning with MetaPoison on libtorch.

pub mod app;
pub mod base;
pub mod bench;
pub mod campaign;
pub mod cli;
pub mod config;
pub mod craft;
pub mod data;
pub mod device;
pub mod digest;
pub mod engine;
pub mod export;
pub mod failure;
pub mod model;
pub mod paths;
pub mod ranks;
pub mod telemetry;
pub mod tui;
pub mod victim;
