//! A file-system operation that failed on a path, worded the same everywhere.

use std::path::{Path, PathBuf};

/// "cannot {action} {path}: {source}".
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct PathError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// For `map_err`: the error of `action` on `path`.
pub fn failed(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PathError {
    let path = path.to_path_buf();
    move |source| PathError {
        action,
        path,
        source,
    }
}
