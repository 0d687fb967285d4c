//! The engine's protocol on a Unix domain socket, for viewers in other processes
//! (`metapoison attach`): one JSON object a line each way, and where the sockets live.
//!
//! A viewer opens with [`ToEngine::Hello`]; the engine answers [`ToViewer::Hello`], then the
//! run's history (every telemetry message so far but previews), then [`ToViewer::Live`], then
//! each new message as it happens. Commands go the other way as [`ToEngine::Command`]. A
//! message that cannot be read gets a [`ToViewer::Error`] and changes nothing.

use super::protocol::{Command, Telemetry, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The longest line a viewer may send (commands are a few dozen bytes).
pub const MAX_TO_ENGINE: usize = 64 * 1024;
/// The longest line a viewer accepts (a preview is a few tens of kilobytes).
pub const MAX_TO_VIEWER: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "wire", rename_all = "snake_case")]
pub enum ToEngine {
    /// The first line of a connection.
    Hello {
        protocol: u32,
        /// What the viewer is, for the engine's log.
        #[serde(default)]
        client: String,
    },
    Command {
        command: Command,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "wire", rename_all = "snake_case")]
pub enum ToViewer {
    Hello {
        protocol: u32,
        /// The engine's process.
        pid: u32,
        run_dir: String,
        /// How many history messages follow before [`ToViewer::Live`].
        history: usize,
        /// Viewers attached now, this one included.
        viewers: usize,
    },
    Telemetry {
        message: Box<Telemetry>,
    },
    /// The history is complete; what follows happens now.
    Live,
    /// A message was refused; the connection stays unless the reason says otherwise.
    Error {
        message: String,
    },
}

impl ToViewer {
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"wire\":\"error\",\"message\":\"cannot encode a message: {e}\"}}")
        });
        s.push('\n');
        s
    }
}

impl ToEngine {
    pub fn hello(client: &str) -> ToEngine {
        ToEngine::Hello {
            protocol: PROTOCOL_VERSION,
            client: client.into(),
        }
    }

    pub fn line(&self) -> String {
        // Commands and hellos are plain data: encoding cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// What a version mismatch says, from the engine's side.
pub fn version_message(engine: u32, viewer: u32) -> String {
    format!(
        "this run's engine speaks protocol {engine} and the viewer {viewer}: attach with the metapoison build that started the run"
    )
}

/// Why the socket folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketDirError {
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("{path} belongs to user {owner}, not to this user ({me}): set XDG_RUNTIME_DIR to a folder of your own")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is not a folder: remove it, or set XDG_RUNTIME_DIR to another folder")]
    NotAFolder { path: PathBuf },
}

/// The folder that holds this user's engine sockets: `$XDG_RUNTIME_DIR/metapoison`, else
/// `/tmp/metapoison-UID`. Created 0700; an existing one must be this user's (its mode is
/// put back to 0700), so that nobody else can reach a socket through it.
pub fn socket_dir() -> Result<PathBuf, SocketDirError> {
    let me = effective_uid();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(runtime) if Path::new(&runtime).is_dir() => PathBuf::from(runtime).join("metapoison"),
        _ => std::env::temp_dir().join(format!("metapoison-{me}")),
    };
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            if let Err(e) = builder.create(&dir) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(crate::base::fs::failed("create", &dir)(e).into());
                }
            }
        }
        Err(e) => return Err(crate::base::fs::failed("inspect", &dir)(e).into()),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(crate::base::fs::failed("inspect", &dir))?;
    if !meta.is_dir() {
        return Err(SocketDirError::NotAFolder { path: dir });
    }
    if meta.uid() != me {
        return Err(SocketDirError::NotOwned {
            path: dir,
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(crate::base::fs::failed("restrict", &dir))?;
    }
    Ok(dir)
}

/// The socket of the engine in process `pid`.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("engine-{pid}.sock"))
}

/// The process a socket in the socket folder belongs to, from its name.
pub fn socket_pid(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("engine-")?
        .strip_suffix(".sock")?
        .parse()
        .ok()
}

/// Removes the sockets of engines whose process is gone (killed before they could clean
/// up); returns the ones removed.
pub fn remove_stale_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if let Some(pid) = socket_pid(&path) {
            if !super::status::process_alive(pid) && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
