//! What every layer may use: seeded random streams, safetensors files written atomically,
//! and small formatting helpers. Nothing here knows about poisons, networks or the UI.

pub mod fmt;
pub mod fs;
pub mod rng;
pub mod tensor_file;
