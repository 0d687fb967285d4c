//! Drawing the dashboard from [`App`] state. Layout adapts from 80x24 upwards.

use super::app::{App, Palette, Popup, EXPORT_PARTS};
use super::image::{self, Pixels};
use crate::engine::protocol::Phase;
use crate::telemetry::{GpuSample, SystemSample};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Clear, Dataset, GraphType, Paragraph, Wrap};
use ratatui::Frame;

pub const MIN_SIZE: (u16, u16) = (80, 24);

fn accent(app: &App, c: Color) -> Style {
    if app.palette == Palette::Mono {
        Style::default().add_modifier(Modifier::BOLD)
    } else {
        Style::default().fg(c)
    }
}

pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "terminal is {}x{}: metapoison needs at least {}x{} (q quits)",
            area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
        );
        frame.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(10),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(frame, app, header);
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(body);
    let [charts, target] =
        Layout::horizontal([Constraint::Percentage(62), Constraint::Percentage(38)]).areas(top);
    let [loss, norms] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(charts);
    draw_loss(frame, app, loss);
    draw_norms(frame, app, norms);
    draw_target(frame, app, target);
    let [preview, side] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    draw_preview(frame, app, preview);
    let machine = system_lines(
        app.system.as_ref(),
        side.width.saturating_sub(2) as usize,
        system_rows(side),
    );
    // Two rows at least, so the panel does not jump while the first sample is taken.
    let height = machine.len().max(2) as u16 + 2;
    let [system, events] = Layout::vertical([
        Constraint::Length(height),
        Constraint::Min(EVENTS_MIN_HEIGHT),
    ])
    .areas(side);
    draw_system(frame, app, machine, system);
    draw_events(frame, app, events);
    frame.render_widget(
        Paragraph::new(app.footer()).style(Style::default().add_modifier(Modifier::REVERSED)),
        footer,
    );
    if let Some(p) = &app.popup {
        draw_popup(frame, app, p, area);
    }
}

fn phase_text(app: &App) -> String {
    match &app.phase {
        Phase::Preparing => "preparing".into(),
        Phase::Pretraining { surrogate, of } => match app.pretrain {
            Some((_, _, e, es)) if es > 0 => {
                format!("pretraining {surrogate}/{of} (epoch {e}/{es})")
            }
            _ => format!("pretraining {surrogate}/{of}"),
        },
        Phase::Crafting => "crafting".into(),
        Phase::Paused => "PAUSED".into(),
        Phase::Done => "done".into(),
        Phase::Failed { .. } => "FAILED".into(),
    }
}

fn draw_header(frame: &mut Frame, app: &App, area: Rect) {
    let last = app.steps.last();
    let step = last.map(|r| r.step + 1).unwrap_or(0);
    let eta = last
        .map(|r| crate::base::fmt::format_duration(r.eta_seconds))
        .unwrap_or_else(|| "-".into());
    let fooled = last
        .and_then(|r| r.target_fooled.first())
        .map(|f| format!("{:.0}%", f * 100.0));
    let victims = match (&app.victims, app.evaluating) {
        (_, true) => "victims: training...  ".to_string(),
        (Some(v), false) => format!(
            "victims {}/{} flipped (control {}/{}), {}acc {:.1}%/{:.1}%  ",
            v.flipped,
            v.trials,
            v.control_flipped,
            v.control_trials,
            v.margin_shift
                .map_or(String::new(), |m| format!("target moved {m:+.1} logits, ")),
            v.accuracy * 100.0,
            v.control_accuracy * 100.0
        ),
        (None, false) => String::new(),
    };
    let phase = format!(" {} ", phase_text(app));
    let elapsed = crate::base::fmt::format_duration(app.elapsed);
    let device = if app.device.is_empty() {
        "-"
    } else {
        &app.device
    };
    // Shorter labels where the full line would be cut, and the device (also the machine
    // panel's title) left out where even that is too long.
    let room = (area.width as usize).saturating_sub(2 + phase.chars().count());
    let full = format!(
        " step {step}/{}  elapsed {elapsed}  ETA {eta}{}  {device}",
        app.total_steps,
        fooled
            .as_ref()
            .map(|f| format!("  surrogates fooled {f}"))
            .unwrap_or_default()
    );
    let short = format!(
        " step {step}/{}  {elapsed}, ETA {eta}{}",
        app.total_steps,
        fooled
            .as_ref()
            .map(|f| format!("  fooled {f}"))
            .unwrap_or_default()
    );
    let status = if full.chars().count() <= room {
        full
    } else if short.chars().count() + 2 + device.chars().count() <= room {
        format!("{short}  {device}")
    } else {
        short
    };
    let line1 = Line::from(vec![
        Span::styled(
            phase,
            accent(app, Color::Yellow).add_modifier(Modifier::BOLD),
        ),
        Span::raw(status),
    ]);
    let line2 = Line::from(vec![
        Span::styled(
            format!(" {victims}"),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw({
            // The run folder first where the whole line would be cut: it says where results go.
            let room = (area.width as usize).saturating_sub(3 + victims.chars().count());
            let full = format!("{}  run {}", app.summary, app.run_dir);
            if full.chars().count() <= room {
                full
            } else {
                format!("run {}  {}", app.run_dir, app.summary)
            }
        }),
    ]);
    frame.render_widget(
        Paragraph::new(vec![line1, line2]).block(Block::bordered().title(" metapoison ")),
        area,
    );
}

/// sign(x) log10(1 + |x|): a log scale that keeps the CW margin's sign.
fn symlog(x: f64) -> f64 {
    x.signum() * (1.0 + x.abs()).log10()
}

fn bounds(points: &[(f64, f64)]) -> [f64; 2] {
    let (lo, hi) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    if lo > hi {
        [0.0, 1.0]
    } else if (hi - lo).abs() < 1e-12 {
        [lo - 0.5, hi + 0.5]
    } else {
        let pad = (hi - lo) * 0.05;
        [lo - pad, hi + pad]
    }
}

fn draw_loss(frame: &mut Frame, app: &App, area: Rect) {
    let f = |v: f64| if app.log_scale { symlog(v) } else { v };
    let mean: Vec<(f64, f64)> = app
        .steps
        .iter()
        .filter_map(|r| r.adv_loss.map(|v| (r.step as f64, f(v))))
        .collect();
    let band = |pick: fn(f64, f64) -> f64| -> Vec<(f64, f64)> {
        app.steps
            .iter()
            .filter_map(|r| {
                let vals: Vec<f64> = r.adv_loss_per_surrogate.iter().flatten().copied().collect();
                vals.into_iter().reduce(pick).map(|v| (r.step as f64, f(v)))
            })
            .collect()
    };
    let (lo, hi) = (band(f64::min), band(f64::max));
    let mut all = mean.clone();
    all.extend(lo.iter().chain(hi.iter()).copied());
    let yb = bounds(&all);
    let xmax = (app.steps.len().max(2) - 1) as f64;
    let last = app.steps.last();
    let title = format!(
        " {}{}{} {} ",
        if app.matching {
            "matching loss"
        } else {
            "adversarial loss"
        },
        last.and_then(|r| r.restart)
            .map(|(r, n)| format!(", restart {r}/{n}"))
            .unwrap_or_default(),
        if app.log_scale { " (symlog)" } else { "" },
        last.and_then(|r| r.adv_loss)
            .map(|v| format!("now {v:.3}"))
            .unwrap_or_default()
    );
    let dim = accent(app, Color::DarkGray);
    let datasets = vec![
        Dataset::default()
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(dim)
            .data(&lo),
        Dataset::default()
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(dim)
            .data(&hi),
        Dataset::default()
            .name("mean")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(accent(app, Color::Red))
            .data(&mean),
    ];
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(title))
        .x_axis(
            Axis::default()
                .bounds([0.0, xmax])
                .labels(["0".to_string(), format!("{xmax:.0}")]),
        )
        .y_axis(
            Axis::default()
                .bounds(yb)
                .labels([format!("{:.2}", yb[0]), format!("{:.2}", yb[1])]),
        );
    frame.render_widget(chart, area);
}

fn draw_norms(frame: &mut Frame, app: &App, area: Rect) {
    // Each series scaled to its own maximum; the title gives the latest values.
    let series = |get: fn(&crate::engine::protocol::Norms) -> f64| -> Vec<(f64, f64)> {
        let max = app
            .steps
            .iter()
            .map(|r| get(&r.norms))
            .fold(0.0, f64::max)
            .max(1e-12);
        app.steps
            .iter()
            .map(|r| (r.step as f64, get(&r.norms) / max))
            .collect()
    };
    let linf = series(|n| n.linf);
    let l2 = series(|n| n.mean_l2);
    let grid = series(|n| n.grid_l2);
    let bound = series(|n| n.frac_at_bound);
    let title = match app.steps.last() {
        Some(r) => format!(
            " Linf {:.1} L2 {:.1} grid {:.3} at bound {:.0}% ",
            r.norms.linf,
            r.norms.mean_l2,
            r.norms.grid_l2,
            r.norms.frac_at_bound * 100.0
        ),
        None => " perturbation norms ".into(),
    };
    let xmax = (app.steps.len().max(2) - 1) as f64;
    fn mk<'a>(app: &App, name: &'static str, c: Color, d: &'a [(f64, f64)]) -> Dataset<'a> {
        Dataset::default()
            .name(name)
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(accent(app, c))
            .data(d)
    }
    let chart = Chart::new(vec![
        mk(app, "Linf", Color::Green, &linf),
        mk(app, "L2", Color::Cyan, &l2),
        mk(app, "grid", Color::Magenta, &grid),
        mk(app, "bound", Color::Yellow, &bound),
    ])
    .block(Block::bordered().title(title))
    .x_axis(Axis::default().bounds([0.0, xmax]))
    .y_axis(Axis::default().bounds([0.0, 1.05]));
    frame.render_widget(chart, area);
}

fn draw_target(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::bordered().title(format!(
        " {} -> {} ",
        app.class_names
            .get(app.target_class)
            .map(String::as_str)
            .unwrap_or("?"),
        app.class_names
            .get(app.adv_class)
            .map(String::as_str)
            .unwrap_or("?")
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(r) = app.steps.last() else {
        frame.render_widget(
            Paragraph::new("ensemble probabilities appear after the first step"),
            inner,
        );
        return;
    };
    let probs = r.target_probs.first().cloned().unwrap_or_default();
    let name_w = 11usize;
    let bar_w = (inner.width as usize).saturating_sub(name_w + 7).max(1);
    let mut lines = Vec::new();
    for (c, p) in probs.iter().enumerate() {
        let filled = (p * bar_w as f64).round() as usize;
        let name: String = app
            .class_names
            .get(c)
            .cloned()
            .unwrap_or_else(|| c.to_string())
            .chars()
            .take(name_w)
            .collect();
        let style = if c == app.adv_class {
            accent(app, Color::Red).add_modifier(Modifier::BOLD)
        } else if c == app.target_class {
            accent(app, Color::Green)
        } else {
            Style::default()
        };
        lines.push(Line::from(vec![
            Span::styled(format!("{name:<name_w$}"), style),
            Span::styled("█".repeat(filled), style),
            Span::raw(format!(
                "{} {:.3}",
                " ".repeat(bar_w - filled.min(bar_w)),
                p
            )),
        ]));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn draw_preview(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::bordered().title(format!(
        " poison {}/{}: base | poison | delta x10 ",
        app.slot + 1,
        app.poison_count
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(p) = &app.preview else {
        let msg = if app.run_dir.is_empty() || app.device.is_empty() {
            "preview: waiting for the engine"
        } else {
            "preview: shown once the engine answers ([ and ] choose a poison; none in a replay)"
        };
        frame.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), inner);
        return;
    };
    let ascii = app.ascii || app.palette == Palette::Mono;
    let imgs = [&p.base, &p.poison, &p.delta].map(|d| Pixels {
        height: p.height,
        width: p.width,
        channels: p.channels,
        data: d,
    });
    // The largest resolution at which three images fit side by side.
    let scale = (1..=8)
        .find(|&s| {
            let (w, h) = image::cells(&imgs[0], s, ascii);
            3 * w + 2 <= inner.width && h <= inner.height
        })
        .unwrap_or(8);
    let (w, _) = image::cells(&imgs[0], scale, ascii);
    let buf = frame.buffer_mut();
    for (k, img) in imgs.iter().enumerate() {
        let at = Rect {
            x: inner.x + k as u16 * (w + 1),
            y: inner.y,
            width: w,
            height: inner.height,
        };
        image::draw(buf, at, img, scale, ascii, app.palette);
    }
}

/// The events panel's least height: two lines of events.
const EVENTS_MIN_HEIGHT: u16 = 4;

/// Rows the machine panel may take from the side column (the events panel keeps its least
/// height).
fn system_rows(side: Rect) -> usize {
    side.height.saturating_sub(2 + EVENTS_MIN_HEIGHT).max(2) as usize
}

/// The machine panel's lines for an inner `width` and at most `rows` rows. Each GPU's memory
/// stays in view: a GPU gets its full line where that fits, else its name on a line above its
/// figures (where the rows allow), else its figures alone; GPUs past the rows are counted.
fn system_lines(system: Option<&SystemSample>, width: usize, rows: usize) -> Vec<String> {
    let Some(s) = system else {
        return vec!["sampling...".into()];
    };
    if s.gpus.is_empty() {
        let cpu = s
            .cpu_percent
            .map(|c| format!("{c:.0}%"))
            .unwrap_or_else(|| "-".into());
        let rss = s
            .process_rss_mib
            .map(|m| format!("{m:.0} MiB"))
            .unwrap_or_else(|| "-".into());
        let full = format!("CPU {cpu} on {} cores  process memory {rss}", s.cores);
        let short = format!("CPU {cpu} of {} cores, memory {rss}", s.cores);
        return vec![
            s.gpu_note.clone().unwrap_or_else(|| "no NVIDIA GPU".into()),
            if full.chars().count() <= width {
                full
            } else {
                short
            },
        ];
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    // Utilisation, temperature and power, as every form of the line shows them.
    let util = |g: &GpuSample| opt(g.utilisation.map(|u| format!("{u}%")));
    let heat = |g: &GpuSample| {
        (
            opt(g.temperature_c.map(|t| format!("{t}C"))),
            opt(g.power_w.map(|p| format!("{p:.0}W"))),
        )
    };
    let gib = |m: Option<u64>| opt(m.map(|m| format!("{:.1}", m as f64 / 1024.0)));
    let figures = |g: &GpuSample| {
        let (temp, power) = heat(g);
        let (used, total) = (gib(g.memory_used_mib), gib(g.memory_total_mib));
        format!("util {} {used}/{total} GiB {temp} {power}", util(g))
    };
    let full: Vec<String> = s
        .gpus
        .iter()
        .map(|g| {
            let (temp, power) = heat(g);
            let used = opt(g.memory_used_mib.map(|m| m.to_string()));
            let total = opt(g.memory_total_mib.map(|m| m.to_string()));
            format!(
                "GPU{} {}  util {}  mem {used}/{total} MiB  {temp}  {power}",
                g.index,
                g.name,
                util(g)
            )
        })
        .collect();
    let n = s.gpus.len();
    if n <= rows && full.iter().all(|l| l.chars().count() <= width) {
        return full;
    }
    if 2 * n <= rows {
        return s
            .gpus
            .iter()
            .flat_map(|g| [format!("GPU{} {}", g.index, g.name), figures(g)])
            .collect();
    }
    let mut lines: Vec<String> = s
        .gpus
        .iter()
        .map(|g| format!("GPU{} {}", g.index, figures(g)))
        .collect();
    if n > rows {
        lines.truncate(rows - 1);
        lines.push(format!("+{} more GPUs", n - (rows - 1)));
    }
    lines
}

fn draw_system(frame: &mut Frame, app: &App, lines: Vec<String>, area: Rect) {
    let lines: Vec<Line> = lines.into_iter().map(Line::from).collect();
    // The device the run uses, after the panel's name where both fit.
    let named = format!(" machine: run on {} ", app.device);
    let title = if app.device.is_empty() {
        " machine ".to_string()
    } else if named.chars().count() + 2 <= area.width as usize {
        named
    } else {
        format!(" run on {} ", app.device)
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

/// `text` cut into rows of at most `width` characters, the rows after the first indented by
/// two (events hold paths, which have no spaces to break at).
fn wrap_event(text: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let width = width.max(3);
    let mut rows = vec![chars.iter().take(width).collect::<String>()];
    let mut at = width.min(chars.len());
    while at < chars.len() {
        let end = (at + width - 2).min(chars.len());
        rows.push(format!("  {}", chars[at..end].iter().collect::<String>()));
        at = end;
    }
    rows
}

/// The newest events, each wrapped to the panel's width, bottom up as in a terminal: the
/// oldest one shown may be cut at its top.
fn draw_events(frame: &mut Frame, app: &App, area: Rect) {
    let rows = area.height.saturating_sub(2) as usize;
    let width = area.width.saturating_sub(2) as usize;
    let mut shown: Vec<String> = Vec::new();
    for event in app.events.iter().rev() {
        if shown.len() >= rows {
            break;
        }
        shown.splice(0..0, wrap_event(event, width));
    }
    let shown = shown.split_off(shown.len().saturating_sub(rows));
    let lines: Vec<Line> = shown.into_iter().map(Line::from).collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" events ")),
        area,
    );
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let (w, h) = (w.min(area.width), h.min(area.height));
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn draw_popup(frame: &mut Frame, app: &App, popup: &Popup, area: Rect) {
    let selected = Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD);
    let (title, lines, w, h): (&str, Vec<Line>, u16, u16) = match popup {
        Popup::Help => (
            " help ",
            app.help_lines().into_iter().map(Line::from).collect(),
            66,
            12,
        ),
        Popup::Export(form) => {
            let row = |i: usize| {
                if i == form.selected {
                    selected
                } else {
                    Style::default()
                }
            };
            let mut lines: Vec<Line> = EXPORT_PARTS
                .iter()
                .enumerate()
                .map(|(i, (label, _))| {
                    Line::styled(
                        format!(" [{}] {label}", if form.parts[i] { 'x' } else { ' ' }),
                        row(i),
                    )
                })
                .collect();
            lines.push(Line::from(" poisons.npz + manifest.json always"));
            lines.push(Line::styled(
                format!(
                    " step: < {} >",
                    form.step
                        .map_or("current".to_string(), |s| format!("{s} (checkpoint)"))
                ),
                row(4),
            ));
            lines.push(Line::styled(
                format!(
                    " to:   {}",
                    if form.dest.is_empty() && form.selected != 5 {
                        "RUN_DIR/export-step-NNNN"
                    } else {
                        &form.dest
                    }
                ),
                row(5),
            ));
            (" export ", lines, 50, 9)
        }
        Popup::Quit { selected: s } => (
            if app.attached { " leave? " } else { " quit? " },
            app.quit_choices()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    Line::styled(
                        format!(" {c} "),
                        if i == *s { selected } else { Style::default() },
                    )
                })
                .collect(),
            34,
            5,
        ),
        Popup::Params(form) => {
            let names = [
                if app.matching {
                    "step (fraction of eps)"
                } else {
                    "outer lr (0-255 scale)"
                },
                "inner lr (surrogate SGD)",
                "K (unrolled steps)",
            ];
            let mut lines: Vec<Line> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Line::styled(
                        format!(" {n:<26} {:<12}", form.values[i]),
                        if i == form.field {
                            selected
                        } else {
                            Style::default()
                        },
                    )
                })
                .collect();
            lines.push(Line::from(""));
            lines.push(match &form.error {
                Some(e) => Line::styled(e.clone(), accent(app, Color::Red)),
                None => Line::from("applied at the next craft step"),
            });
            (" parameters ", lines, 44, 7)
        }
    };
    let r = centered(area, w, h);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        r,
    );
}
