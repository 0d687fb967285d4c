//! A viewer's side of the engine's socket: connect, say hello, then the run's telemetry
//! (history first) arrives on a channel and commands go out on another, as with an engine
//! thread in this process.

use super::protocol::{Command, Event, EventKind, Telemetry, PROTOCOL_VERSION};
use super::wire::{self, ToEngine, ToViewer};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

/// A run attached to from another process.
pub struct Attached {
    /// Commands to the run; dropping every copy detaches (the connection closes).
    pub commands: Sender<Command>,
    /// The history (every message so far but previews), then live messages; closes when the
    /// engine ends or the connection drops.
    pub telemetry: Receiver<Telemetry>,
    /// The engine's process.
    pub pid: u32,
    pub run_dir: PathBuf,
    /// How many of the first messages are history.
    pub history: usize,
    /// Viewers attached, this one included, when it attached.
    pub viewers: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the engine on {path} did not answer: {source}")]
    NoAnswer {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the engine on {path} refused: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("the engine on {path} answered something else than a hello: {line}")]
    NotAnEngine { path: PathBuf, line: String },
}

/// Connects to the engine listening on `socket` and starts the threads that carry messages.
pub fn attach(socket: &Path, client: &str) -> Result<Attached, AttachError> {
    let connect = |source| AttachError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let no_answer = |source| AttachError::NoAnswer {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(connect)?;
    stream
        .write_all(ToEngine::hello(client).line().as_bytes())
        .map_err(no_answer)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(no_answer)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(no_answer)?);
    let mut line = String::new();
    (&mut reader)
        .take(wire::MAX_TO_VIEWER as u64)
        .read_line(&mut line)
        .map_err(no_answer)?;
    let (pid, run_dir, history, viewers) = match serde_json::from_str::<ToViewer>(&line) {
        Ok(ToViewer::Hello {
            protocol,
            pid,
            run_dir,
            history,
            viewers,
        }) => {
            if protocol != PROTOCOL_VERSION {
                return Err(AttachError::Refused {
                    path: socket.to_path_buf(),
                    message: wire::version_message(protocol, PROTOCOL_VERSION),
                });
            }
            (pid, PathBuf::from(run_dir), history, viewers)
        }
        Ok(ToViewer::Error { message }) => {
            return Err(AttachError::Refused {
                path: socket.to_path_buf(),
                message,
            })
        }
        _ => {
            return Err(AttachError::NotAnEngine {
                path: socket.to_path_buf(),
                line: line.trim().chars().take(200).collect(),
            })
        }
    };
    // A quiet run (paused, finished) sends nothing for a long time: no timeout from here on.
    stream.set_read_timeout(None).map_err(no_answer)?;
    let (telemetry_tx, telemetry) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("attach-in".into())
        .spawn(move || receive(reader, telemetry_tx));
    let (commands, commands_rx) = mpsc::channel::<Command>();
    let _ = std::thread::Builder::new()
        .name("attach-out".into())
        .spawn(move || {
            for c in commands_rx {
                let line = ToEngine::Command { command: c }.line();
                if stream.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
            // The viewer let go of its commands: it has left. Closing both directions tells
            // the engine, and ends the receiving thread.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    Ok(Attached {
        commands,
        telemetry,
        pid,
        run_dir,
        history,
        viewers,
    })
}

/// Moves the engine's messages onto the channel until it ends; what the engine refuses
/// arrives as a `rejected` event, so that a viewer shows it like any other.
fn receive(mut reader: BufReader<UnixStream>, to: Sender<Telemetry>) {
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(wire::MAX_TO_VIEWER as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let t = match serde_json::from_str::<ToViewer>(&line) {
            Ok(ToViewer::Telemetry { message }) => *message,
            Ok(ToViewer::Error { message }) => {
                Telemetry::Event(Event::new(0, EventKind::Rejected, message))
            }
            Ok(ToViewer::Live | ToViewer::Hello { .. }) => continue,
            Err(e) => {
                tracing::warn!("an unreadable message from the engine: {e}");
                continue;
            }
        };
        if to.send(t).is_err() {
            return;
        }
    }
}
