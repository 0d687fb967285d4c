//! The dashboard: owns the terminal, shows the engine's telemetry, turns keys into commands.
//! It never calls libtorch; it can be driven by a live engine or by a recorded telemetry file.

pub mod app;
pub mod draw;
pub mod image;

use crate::craft::engine::EngineHandle;
use crate::craft::messages::{Command, Telemetry};
use crate::telemetry::{spawn_sampler, SystemSample};
use app::{App, Palette};
use crossterm::event::{self, Event};
use crossterm::terminal::{BeginSynchronizedUpdate, EndSynchronizedUpdate};
use std::io::BufRead;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// Where the telemetry comes from.
pub enum Source {
    Engine(EngineHandle),
    /// Recorded JSON lines (the output of `craft`), played back a few lines per tick.
    Replay(Vec<Telemetry>),
}

pub fn read_replay(path: &std::path::Path) -> Result<Vec<Telemetry>, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            format!(
                "{} line {}: not a telemetry record: {e}",
                path.display(),
                i + 1
            )
        })?);
    }
    Ok(out)
}

const FRAME: Duration = Duration::from_millis(100);

/// Runs the dashboard until the user quits (and, with an engine, until it has stopped).
/// Returns the engine's result.
pub fn run(source: Source, keys: app::Keymap) -> Result<(), String> {
    let mut terminal =
        ratatui::try_init().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let result = run_loop(&mut terminal, source, keys);
    ratatui::restore();
    result
}

fn run_loop(
    terminal: &mut ratatui::DefaultTerminal,
    source: Source,
    keys: app::Keymap,
) -> Result<(), String> {
    let mut app = App::with_keys(Palette::detect(), keys);
    let (sys_tx, sys_rx) = mpsc::channel::<SystemSample>();
    spawn_sampler(sys_tx, Duration::from_secs(1));
    let (engine, mut replay) = match source {
        Source::Engine(h) => (Some(h), Vec::new().into_iter()),
        Source::Replay(v) => (None, v.into_iter()),
    };
    let send = |cmds: Vec<Command>, app: &mut App| {
        for c in cmds {
            match &engine {
                Some(h) => {
                    let _ = h.commands.send(c);
                }
                None => app.log(format!("replay: {c:?} not sent (no engine)")),
            }
        }
    };
    // Keys come from a thread of their own: on a terminal that went away (an SSH drop)
    // crossterm's read can spin without returning, and the loop must still see the engine stop.
    let (key_tx, key_rx) = mpsc::channel::<Event>();
    let _ = std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            while let Ok(ev) = event::read() {
                if key_tx.send(ev).is_err() {
                    break;
                }
            }
        });
    let mut engine_gone = engine.is_none();
    // The terminal went away (draws fail, no more keys): ask the engine to checkpoint and stop,
    // and wait for it; nothing crafted is lost to an SSH drop.
    let mut terminal_gone = false;
    let mut last_draw = Instant::now() - FRAME;
    let mut last_size = terminal.size().ok();
    let mut last_size_check = Instant::now();
    loop {
        // Telemetry in.
        let mut incoming = Vec::new();
        if let Some(h) = &engine {
            loop {
                match h.telemetry.try_recv() {
                    Ok(t) => incoming.push(t),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        engine_gone = true;
                        break;
                    }
                }
            }
        } else {
            incoming.extend(replay.by_ref().take(5));
        }
        for t in incoming {
            let refresh = matches!(t, Telemetry::Step(_) | Telemetry::Started { .. });
            app.on_telemetry(t);
            if refresh && engine.is_some() {
                send(vec![Command::Preview { slot: app.slot }], &mut app);
            }
        }
        drain(&sys_rx, &mut app);
        // The engine stopped by itself (a signal, a failure after its checkpoint, or the user's
        // quit): nothing is left to show. A finished run stays on screen until q.
        let finished = matches!(app.phase, crate::craft::messages::Phase::Done);
        if engine_gone
            && (app.quit || terminal_gone || (engine.is_some() && (!finished || app.signalled)))
        {
            break;
        }
        // Keys in.
        match key_rx.recv_timeout(FRAME / 2) {
            Ok(Event::Key(k)) => {
                let cmds = app.on_key(k);
                send(cmds, &mut app);
                if app.quit && engine.is_none() {
                    break;
                }
            }
            Ok(Event::Resize(_, _)) => app.dirty = true,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) if engine.is_none() => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // No more keys: the terminal is gone. Wait for the engine without spinning.
                if !terminal_gone {
                    terminal_gone = true;
                    send(vec![Command::Stop], &mut app);
                }
                std::thread::sleep(FRAME / 2);
            }
        }
        // tmux does not always report a resize: look now and then.
        if last_size_check.elapsed() > Duration::from_secs(1) {
            let size = terminal.size().ok();
            if size != last_size {
                app.dirty = true;
                last_size = size;
            }
            last_size_check = Instant::now();
        }
        if app.dirty && last_draw.elapsed() >= FRAME && !terminal_gone {
            let _ = crossterm::execute!(std::io::stdout(), BeginSynchronizedUpdate);
            if terminal.draw(|f| draw::draw(f, &app)).is_err() {
                terminal_gone = true;
                if engine.is_none() {
                    break;
                }
                send(vec![Command::Stop], &mut app);
            }
            let _ = crossterm::execute!(std::io::stdout(), EndSynchronizedUpdate);
            app.dirty = false;
            last_draw = Instant::now();
        }
    }
    match engine {
        Some(h) => h.join(),
        None => Ok(()),
    }
}

fn drain(rx: &Receiver<SystemSample>, app: &mut App) {
    while let Ok(s) = rx.try_recv() {
        app.on_system(s);
    }
}
