//! The dashboard: owns the terminal, shows the engine's telemetry, turns keys into commands.
//! It never calls libtorch; it can be driven by a live engine or by a recorded telemetry file.

pub mod app;
pub mod draw;
pub mod image;

use crate::engine::client::Attached;
use crate::engine::protocol::{Command, Telemetry, PROTOCOL_VERSION};
use crate::engine::{EngineHandle, EngineThread};
use crate::telemetry::{spawn_sampler, SystemSample};
use app::{App, Palette};
use crossterm::event::{self, Event};
use crossterm::terminal::{BeginSynchronizedUpdate, EndSynchronizedUpdate};
use std::io::BufRead;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::time::{Instant, MissedTickBehavior};

/// Where the telemetry comes from.
pub enum Source {
    Engine(EngineHandle),
    /// A run in another process, over its socket (`metapoison attach`): quitting detaches.
    Remote(Attached),
    /// Recorded JSON lines (the output of `craft`), played back a few lines per tick.
    Replay(Vec<Telemetry>),
}

pub fn read_replay(path: &std::path::Path) -> Result<Vec<Telemetry>, TuiError> {
    let f = std::fs::File::open(path).map_err(crate::base::fs::failed("open", path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| TuiError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Telemetry =
            serde_json::from_str(&line).map_err(|source| TuiError::NotTelemetry {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
        if let Telemetry::Started { protocol, .. } = &record {
            if *protocol > PROTOCOL_VERSION {
                return Err(TuiError::NewerProtocol {
                    path: path.to_path_buf(),
                    protocol: *protocol,
                });
            }
        }
        out.push(record);
    }
    Ok(out)
}

/// At most this often a frame.
const FRAME: Duration = Duration::from_millis(100);
/// How often the terminal's size is read again: tmux does not always report a resize.
const SIZE_CHECK: Duration = Duration::from_secs(1);
/// Recorded telemetry is played back this many records...
const REPLAY_BATCH: usize = 5;
/// ...this often.
const REPLAY_TICK: Duration = Duration::from_millis(50);

/// Runs the dashboard until the user quits (and, with an engine, until it has stopped).
/// Returns the engine's result.
pub fn run(source: Source, keys: app::Keymap) -> Result<(), TuiError> {
    // One thread is enough for the event loop: it only waits on channels and timers, and
    // everything heavy runs on the engine's thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(TuiError::EventLoop)?;
    let mut terminal = ratatui::try_init().map_err(TuiError::Terminal)?;
    let engine = runtime.block_on(run_loop(&mut terminal, source, keys));
    ratatui::restore();
    // The loop ends only once the engine's telemetry has closed, so this wait is short.
    Ok(engine.map_or(Ok(()), EngineThread::join)?)
}

/// Why the dashboard could not run, or the engine's failure it watched.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("cannot start the dashboard's event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("cannot set up the terminal: {0}")]
    Terminal(std::io::Error),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a telemetry record: {source}")]
    NotTelemetry {
        path: std::path::PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{path} was written by a newer metapoison (protocol {protocol}; this build reads up to {PROTOCOL_VERSION}): replay it with that version")]
    NewerProtocol {
        path: std::path::PathBuf,
        protocol: u32,
    },
}

/// The event loop: telemetry, system samples, keys and timers, whichever comes first.
/// Returns the engine's thread, to be waited for.
async fn run_loop(
    terminal: &mut ratatui::DefaultTerminal,
    source: Source,
    keys: app::Keymap,
) -> Option<EngineThread> {
    let mut app = App::with_keys(Palette::detect(), keys);
    app.attached = matches!(source, Source::Remote(_));
    let (system_tx, mut system) = unbounded_channel::<SystemSample>();
    spawn_sampler(move |s| system_tx.send(s).is_ok(), Duration::from_secs(1));
    let (key_tx, mut key_events) = unbounded_channel::<Event>();
    // Keys (and resizes) on a thread of their own: crossterm's read blocks, and on a terminal
    // that went away (an SSH drop) it can spin without returning, so the loop never waits on it
    // alone. The channel closes when reading fails.
    forward("input", std::iter::from_fn(|| event::read().ok()), key_tx);
    let (telemetry_tx, mut telemetry) = unbounded_channel::<Telemetry>();
    let (commands, engine, mut replay) = match source {
        Source::Engine(EngineHandle {
            commands,
            telemetry: from_engine,
            thread,
        }) => {
            forward("telemetry-in", from_engine, telemetry_tx);
            (Some(commands), Some(thread), Vec::new().into_iter())
        }
        Source::Remote(Attached {
            commands,
            telemetry: from_engine,
            ..
        }) => {
            forward("telemetry-in", from_engine, telemetry_tx);
            (Some(commands), None, Vec::new().into_iter())
        }
        Source::Replay(records) => (None, None, records.into_iter()),
    };
    let send = |cmds: Vec<Command>, app: &mut App| {
        for c in cmds {
            match &commands {
                Some(to_engine) => {
                    let _ = to_engine.send(c);
                }
                None => app.log(format!("replay: {c:?} not sent (no engine)")),
            }
        }
    };
    let remote = app.attached;
    let mut engine_gone = engine.is_none() && !remote;
    // The terminal went away (draws fail, no more keys): ask the engine to checkpoint and stop,
    // and wait for it; nothing crafted is lost to an SSH drop.
    let mut terminal_gone = false;
    let mut last_draw: Option<Instant> = None;
    let mut last_size = terminal.size().ok();
    let mut size_check = tokio::time::interval(SIZE_CHECK);
    let mut replay_tick = tokio::time::interval(REPLAY_TICK);
    // After a slow frame, carry on at the usual pace rather than catching up in a burst.
    size_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    replay_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let next_frame = last_draw.map_or_else(Instant::now, |t| t + FRAME);
        tokio::select! {
            received = telemetry.recv(), if !engine_gone => match received {
                Some(t) => {
                    let refresh = matches!(t, Telemetry::Step(_) | Telemetry::Started { .. });
                    app.on_telemetry(t);
                    if refresh {
                        send(vec![Command::Preview { slot: app.slot }], &mut app);
                    }
                }
                None => engine_gone = true,
            },
            _ = replay_tick.tick(), if replay.len() > 0 => {
                for t in replay.by_ref().take(REPLAY_BATCH) {
                    app.on_telemetry(t);
                }
            }
            Some(sample) = system.recv() => app.on_system(sample),
            key = key_events.recv(), if !terminal_gone => match key {
                Some(Event::Key(k)) => {
                    let cmds = app.on_key(k);
                    send(cmds, &mut app);
                }
                Some(Event::Resize(_, _)) => app.dirty = true,
                Some(_) => {}
                None => {
                    // No more keys: the terminal is gone. A run in this process checkpoints
                    // and stops; a run in its own process goes on without its viewer.
                    terminal_gone = true;
                    if !remote {
                        send(vec![Command::Stop], &mut app);
                    }
                }
            },
            _ = size_check.tick() => {
                let size = terminal.size().ok();
                if size != last_size {
                    app.dirty = true;
                    last_size = size;
                }
            }
            _ = tokio::time::sleep_until(next_frame), if app.dirty && !terminal_gone => {
                let _ = crossterm::execute!(std::io::stdout(), BeginSynchronizedUpdate);
                if terminal.draw(|f| draw::draw(f, &app)).is_err() {
                    terminal_gone = true;
                    if !remote {
                        send(vec![Command::Stop], &mut app);
                    }
                }
                let _ = crossterm::execute!(std::io::stdout(), EndSynchronizedUpdate);
                app.dirty = false;
                last_draw = Some(Instant::now());
            }
        }
        // The engine stopped by itself (a signal, a failure after its checkpoint, or the user's
        // quit): nothing is left to show. A finished run stays on screen until q; a replay
        // until q or until its terminal goes away.
        let finished = matches!(app.phase, crate::engine::protocol::Phase::Done);
        if remote && (app.detach || terminal_gone) {
            return None;
        }
        if remote && engine_gone && (app.quit || !finished || app.signalled) {
            return None;
        }
        if engine_gone
            && (app.quit || terminal_gone || (engine.is_some() && (!finished || app.signalled)))
        {
            return engine;
        }
    }
}

/// Moves what a blocking source yields into the event loop, on a thread of its own; it ends
/// when the source does or the loop stops listening, and `to` closes with it.
fn forward<T: Send + 'static>(
    name: &str,
    from: impl IntoIterator<Item = T> + Send + 'static,
    to: UnboundedSender<T>,
) {
    let _ = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for item in from {
                if to.send(item).is_err() {
                    break;
                }
            }
        });
}
