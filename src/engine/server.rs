//! The engine's socket: viewers in other processes attach to a run over a Unix domain socket
//! (wire.rs says what travels on it). The server runs on a thread of its own with a small
//! tokio event loop; the crafting thread only hands it each telemetry message.
//!
//! Security: the socket sits in a folder only this user can enter (0700) with mode 0600,
//! and a connection from another user id (SO_PEERCRED) is refused before it can read or
//! send anything. There is no TCP listener. Every attached viewer may send commands: they
//! are the same user, as in tmux.

use super::protocol::{Command, Telemetry, PROTOCOL_VERSION};
use super::wire::{self, ToEngine, ToViewer};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

/// A viewer must say hello within this time.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// After the engine ends, viewers get this long to receive the last messages.
const FLUSH_WITHIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    SocketDir(#[from] wire::SocketDirError),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the socket's thread: {0}")]
    Thread(std::io::Error),
}

/// How many viewers are attached, and since when none has been.
#[derive(Debug)]
pub struct Viewers {
    attached: AtomicUsize,
    none_since: Mutex<Option<Instant>>,
}

impl Viewers {
    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::SeqCst)
    }

    /// How long no viewer has been attached (zero while one is).
    pub fn idle_for(&self) -> Duration {
        match *self.none_since.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(t) if self.attached() == 0 => t.elapsed(),
            _ => Duration::ZERO,
        }
    }

    fn join(&self) {
        self.attached.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        if self.attached.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.none_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }
}

/// The running socket server. Dropping it (or [`Server::close`]) lets attached viewers
/// receive what was sent, then removes the socket.
pub struct Server {
    inbox: Option<mpsc::UnboundedSender<Telemetry>>,
    socket: PathBuf,
    viewers: Arc<Viewers>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Listens on `SOCKET_DIR/engine-PID.sock` for the run in `run_dir`; commands from
    /// viewers go to `commands`.
    pub fn start(
        run_dir: &Path,
        commands: std::sync::mpsc::Sender<Command>,
    ) -> Result<Server, ServerError> {
        let dir = wire::socket_dir()?;
        for stale in wire::remove_stale_sockets(&dir) {
            tracing::info!("removed the stale socket {}", stale.display());
        }
        let socket = wire::socket_path(&dir, std::process::id());
        // A socket of an earlier process with this pid (it is not alive: pids are ours).
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(|source| {
            ServerError::Bind {
                path: socket.clone(),
                source,
            }
        })?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ServerError::Bind {
                path: socket.clone(),
                source,
            },
        )?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: socket.clone(),
                source,
            })?;
        let viewers = Arc::new(Viewers {
            attached: AtomicUsize::new(0),
            none_since: Mutex::new(Some(Instant::now())),
        });
        let (inbox, from_engine) = mpsc::unbounded_channel();
        let hub = Hub {
            run_dir: run_dir.display().to_string(),
            commands,
            viewers: viewers.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("engine-socket".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("the engine's socket cannot start its event loop: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match UnixListener::from_std(listener) {
                        Ok(listener) => serve(listener, from_engine, hub).await,
                        Err(e) => tracing::error!("the engine's socket cannot listen: {e}"),
                    }
                });
            })
            .map_err(ServerError::Thread)?;
        tracing::info!("viewers can attach on {}", socket.display());
        Ok(Server {
            inbox: Some(inbox),
            socket,
            viewers,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn viewers(&self) -> &Arc<Viewers> {
        &self.viewers
    }

    /// Hands one telemetry message to every attached viewer (and to the history).
    pub fn publish(&self, t: &Telemetry) {
        if let Some(inbox) = &self.inbox {
            let _ = inbox.send(t.clone());
        }
    }

    /// Lets viewers receive what was sent, closes their connections and removes the socket.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.inbox = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

/// What every connection shares.
#[derive(Clone)]
struct Hub {
    run_dir: String,
    commands: std::sync::mpsc::Sender<Command>,
    viewers: Arc<Viewers>,
}

/// A new viewer asks to join: it gets the history so far and its live feed, atomically.
type Join = oneshot::Sender<(Arc<Vec<Arc<str>>>, mpsc::UnboundedReceiver<Arc<str>>)>;

async fn serve(
    listener: UnixListener,
    mut from_engine: mpsc::UnboundedReceiver<Telemetry>,
    hub: Hub,
) {
    let mut history: Arc<Vec<Arc<str>>> = Arc::new(Vec::new());
    let mut feeds: Vec<mpsc::UnboundedSender<Arc<str>>> = Vec::new();
    let (join_tx, mut joins) = mpsc::unbounded_channel::<Join>();
    let (ended_tx, ended) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            message = from_engine.recv() => match message {
                Some(t) => {
                    let keep = !matches!(t, Telemetry::Preview(_));
                    let line: Arc<str> = ToViewer::Telemetry {
                        message: Box::new(t),
                    }
                    .line().into();
                    if keep {
                        Arc::make_mut(&mut history).push(line.clone());
                    }
                    feeds.retain(|f| f.send(line.clone()).is_ok());
                }
                None => break,
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, hub.clone(), join_tx.clone(), ended.clone()));
                }
                Err(e) => {
                    tracing::warn!("the engine's socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(join) = joins.recv() => {
                let (feed, rx) = mpsc::unbounded_channel();
                feeds.push(feed);
                let _ = join.send((history.clone(), rx));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // The engine has ended: viewers receive the rest, then their connections close.
    drop(feeds);
    let _ = ended_tx.send(true);
    let _ = tokio::time::timeout(FLUSH_WITHIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Reads one line of at most `limit` bytes into `buf` (without its newline). Ok(false) at
/// the end of the stream; an error when the line is longer.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    buf.clear();
    let n = reader.take(limit as u64 + 1).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message over {limit} bytes"),
        ));
    }
    Ok(true)
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, m: &ToViewer) -> std::io::Result<()> {
    w.write_all(m.line().as_bytes()).await
}

/// One viewer: check who it is and what it speaks, send the history, then relay both ways.
async fn connection(
    stream: UnixStream,
    hub: Hub,
    join: mpsc::UnboundedSender<Join>,
    mut ended: watch::Receiver<bool>,
) {
    let me = wire::effective_uid();
    let peer = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    match peer {
        Ok(uid) if uid == me => {}
        other => {
            tracing::warn!("refused a viewer of user {other:?} (this run belongs to user {me})");
            let _ = send(
                &mut write,
                &ToViewer::Error {
                    message: format!("refused: this run belongs to another user ({me})"),
                },
            )
            .await;
            return;
        }
    }
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    let hello = tokio::time::timeout(
        HELLO_WITHIN,
        read_line(&mut reader, &mut buf, wire::MAX_TO_ENGINE),
    )
    .await;
    let refuse = |message: String| ToViewer::Error { message };
    let client = match hello {
        Ok(Ok(true)) => match serde_json::from_slice::<ToEngine>(&buf) {
            Ok(ToEngine::Hello { protocol, client }) if protocol == PROTOCOL_VERSION => client,
            Ok(ToEngine::Hello { protocol, .. }) => {
                let _ = send(
                    &mut write,
                    &refuse(wire::version_message(PROTOCOL_VERSION, protocol)),
                )
                .await;
                return;
            }
            _ => {
                let _ = send(
                    &mut write,
                    &refuse("the first message must be a hello: not a metapoison viewer".into()),
                )
                .await;
                return;
            }
        },
        Ok(Ok(false)) => return,
        Ok(Err(e)) => {
            let _ = send(&mut write, &refuse(format!("{e}: closing"))).await;
            return;
        }
        Err(_) => {
            let _ = send(&mut write, &refuse("no hello within 10 s: closing".into())).await;
            return;
        }
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if join.send(reply_tx).is_err() {
        return;
    }
    let Ok((history, mut feed)) = reply_rx.await else {
        return;
    };
    hub.viewers.join();
    let viewers = hub.viewers.clone();
    let _left = scopeguard(move || viewers.leave());
    tracing::info!(
        "a viewer attached ({client}); {} now",
        hub.viewers.attached()
    );
    let hello = ToViewer::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        run_dir: hub.run_dir.clone(),
        history: history.len(),
        viewers: hub.viewers.attached(),
    };
    if send(&mut write, &hello).await.is_err() {
        return;
    }
    for line in history.iter() {
        if write.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
    drop(history);
    if send(&mut write, &ToViewer::Live).await.is_err() {
        return;
    }
    let (errors_tx, mut errors) = mpsc::unbounded_channel::<ToViewer>();
    // Reading on a task of its own: a partly read line survives while messages go out.
    let commands = hub.commands.clone();
    let reader_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match read_line(&mut reader, &mut buf, wire::MAX_TO_ENGINE).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = errors_tx.send(ToViewer::Error {
                        message: format!("{e}: closing"),
                    });
                    return;
                }
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<ToEngine>(&buf) {
                Ok(ToEngine::Command { command }) => {
                    if commands.send(command).is_err() {
                        return;
                    }
                }
                Ok(ToEngine::Hello { .. }) => {
                    let _ = errors_tx.send(ToViewer::Error {
                        message: "hello again: ignored".into(),
                    });
                }
                Err(e) => {
                    let _ = errors_tx.send(ToViewer::Error {
                        message: format!("not a command ({e}): ignored"),
                    });
                }
            }
        }
    });
    loop {
        tokio::select! {
            line = feed.recv() => match line {
                Some(line) => {
                    if write.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                }
                // The engine ended and everything it sent is out.
                None => break,
            },
            error = errors.recv() => match error {
                Some(e) => {
                    let closing = matches!(&e, ToViewer::Error { message } if message.ends_with("closing"));
                    if send(&mut write, &e).await.is_err() || closing {
                        break;
                    }
                }
                // The viewer hung up (or said something that ends it).
                None => break,
            },
            _ = ended.changed() => {
                // Nothing more will come: flush what is queued, then close.
                while let Ok(line) = feed.try_recv() {
                    if write.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    reader_task.abort();
    let _ = write.shutdown().await;
    tracing::info!("a viewer left ({client})");
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
