//! The dashboard without a terminal: keys to commands, and panels rendered into a ratatui
//! TestBackend from fixed telemetry.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyEventState, KeyModifiers};
use metapoison::config::{Auto, Config};
use metapoison::craft::crafter::LiveSettings;
use metapoison::craft::perturbation::Norms;
use metapoison::craft::plan::Plan;
use metapoison::data;
use metapoison::engine::protocol::{
    Command, Event, EventKind, LiveChange, LiveField, Phase, Preview, RunInfo, StepReport,
    Telemetry, PROTOCOL_VERSION,
};
use metapoison::tui::app::{App, Palette, Popup};
use metapoison::tui::draw::draw;
use metapoison::tui::image::{indexed, ASCII_RAMP};
use ratatui::backend::TestBackend;
use ratatui::style::Color;
use ratatui::Terminal;

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent {
        code: c,
        modifiers: KeyModifiers::NONE,
        kind: KeyEventKind::Press,
        state: KeyEventState::NONE,
    }
}

fn started() -> Telemetry {
    started_with(metapoison::config::CraftRecipe::Metapoison)
}

fn started_with(recipe: metapoison::config::CraftRecipe) -> Telemetry {
    let ds = data::embedded::load().unwrap();
    let mut config = Config::default();
    config.craft.ensemble_size = Auto::Value(2);
    config.threat.npoison = 200.into();
    let mut plan = Plan::resolve(&config, &ds).unwrap();
    plan.recipe = recipe;
    Telemetry::Started {
        protocol: PROTOCOL_VERSION,
        run_dir: "/runs/test".into(),
        device: "cpu (2 threads)".into(),
        config_summary: "convnet-bn on fashion-mnist-subset".into(),
        resumed_at: None,
        class_names: ds.class_names.clone(),
        plan: (&plan).into(),
        live: LiveSettings {
            outer_lr: 200.0,
            inner_lr: 0.1,
            unroll_steps: 2,
        },
        steps: 61,
    }
}

fn step(i: usize, loss: f64) -> Telemetry {
    let mut probs = vec![0.02; 10];
    probs[6] = 0.6;
    probs[0] = 0.24;
    Telemetry::Step(StepReport {
        step: i,
        steps: 61,
        adv_loss: Some(loss),
        adv_loss_per_surrogate: vec![Some(loss - 0.2), Some(loss + 0.2)],
        target_probs: vec![probs],
        target_fooled: vec![0.5],
        norms: Norms {
            linf: 18.2,
            mean_l2: 321.5,
            delta_linf: 8.0,
            grid_l2: 0.117,
            frac_at_bound: 0.83,
        },
        outer_lr: 200.0,
        inner_lr: 0.1,
        unroll_steps: 2,
        epochs: vec![i % 4, (i + 2) % 4],
        meta_batches: 12,
        seconds: 20.0,
        eta_seconds: 600.0,
        skipped: false,
        restart: None,
        comm_seconds: None,
    })
}

fn app_with_steps(palette: Palette) -> App {
    let mut app = App::new(palette);
    app.on_telemetry(started());
    app.on_telemetry(Telemetry::Phase(Phase::Crafting));
    for (i, l) in [1.6, 1.2, 0.9, 0.4].into_iter().enumerate() {
        app.on_telemetry(step(i, l));
    }
    app
}

fn render(app: &App, w: u16, h: u16) -> ratatui::buffer::Buffer {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| draw(f, app)).unwrap();
    t.backend().buffer().clone()
}

fn text(buf: &ratatui::buffer::Buffer) -> String {
    let a = buf.area;
    (0..a.height)
        .map(|y| {
            (0..a.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
                + "\n"
        })
        .collect()
}

#[test]
fn a_gradient_matching_run_shows_its_matching_loss_restart_and_step_size() {
    let mut app = App::new(Palette::TrueColor);
    app.on_telemetry(started_with(
        metapoison::config::CraftRecipe::GradientMatching,
    ));
    app.on_telemetry(Telemetry::Phase(Phase::Crafting));
    let Telemetry::Step(mut report) = step(0, 0.42) else {
        unreachable!()
    };
    report.restart = Some((2, 4));
    app.on_telemetry(Telemetry::Step(report));
    let screen = text(&render(&app, 160, 48));
    assert!(screen.contains("matching loss, restart 2/4"), "{screen}");
    assert!(!screen.contains("adversarial loss"), "{screen}");
    app.on_key(key(KeyCode::Char('p')));
    let screen = text(&render(&app, 160, 48));
    assert!(screen.contains("step (fraction of eps)"), "{screen}");
    // A MetaPoison run keeps its labels.
    let screen = text(&render(&app_with_steps(Palette::TrueColor), 160, 48));
    assert!(screen.contains("adversarial loss"), "{screen}");
}

#[test]
fn keys_become_engine_commands() {
    let mut app = app_with_steps(Palette::TrueColor);
    assert_eq!(app.on_key(key(KeyCode::Char(' '))), vec![Command::Pause]);
    app.on_telemetry(Telemetry::Phase(Phase::Paused));
    assert_eq!(app.on_key(key(KeyCode::Char(' '))), vec![Command::Resume]);
    assert_eq!(
        app.on_key(key(KeyCode::Char('c'))),
        vec![Command::CheckpointNow]
    );
    assert_eq!(
        app.on_key(key(KeyCode::Char(']'))),
        vec![Command::Preview { slot: 1 }]
    );
    assert_eq!(
        app.on_key(key(KeyCode::Left)),
        vec![Command::Preview { slot: 0 }]
    );
    assert_eq!(
        app.on_key(key(KeyCode::Char('['))),
        vec![Command::Preview { slot: 199 }],
        "wraps around 200 poisons"
    );
    // Release events are ignored.
    let mut release = key(KeyCode::Char(' '));
    release.kind = KeyEventKind::Release;
    assert!(app.on_key(release).is_empty());

    // Parameters: type a new outer lr, raise K with +, apply.
    assert!(app.on_key(key(KeyCode::Char('p'))).is_empty());
    for _ in 0..5 {
        app.on_key(key(KeyCode::Backspace));
    }
    app.on_key(key(KeyCode::Char('5')));
    app.on_key(key(KeyCode::Char('0')));
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Char('+')));
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![
            Command::SetOuterLr { value: 50.0 },
            Command::SetUnrollSteps { value: 3 }
        ]
    );
    assert!(app.popup.is_none());

    // An invalid value is refused in the popup, with a message, and nothing is sent.
    app.on_key(key(KeyCode::Char('p')));
    app.on_key(key(KeyCode::Down));
    for _ in 0..6 {
        app.on_key(key(KeyCode::Backspace));
    }
    app.on_key(key(KeyCode::Char('2')));
    app.on_key(key(KeyCode::Char('0')));
    assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    match &app.popup {
        Some(Popup::Params(f)) => assert!(f
            .error
            .as_deref()
            .unwrap()
            .contains("inner lr 20 must be in (0, 10]")),
        other => panic!("expected the params popup, got {other:?}"),
    }
    assert!(app.on_key(key(KeyCode::Esc)).is_empty());
    assert!(app.popup.is_none());

    // Export menu: untick png, export.
    app.on_key(key(KeyCode::Char('e')));
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Char(' ')));
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![Command::ExportNow {
            formats: "npz,native,curves".into(),
            step: None,
            out: None,
        }]
    );
    assert!(app.popup.is_none());

    // Export menu: an earlier checkpointed step, to a typed destination (letters that are
    // keys elsewhere are text there).
    for s in [0, 2] {
        app.on_telemetry(Telemetry::Checkpoint {
            step: s,
            path: "/runs/test/checkpoint.safetensors".into(),
        });
    }
    app.on_key(key(KeyCode::Char('e')));
    for _ in 0..4 {
        app.on_key(key(KeyCode::Down));
    }
    assert!(
        app.footer().contains("checkpointed step"),
        "{}",
        app.footer()
    );
    app.on_key(key(KeyCode::Right)); // newest checkpoint: 2
    app.on_key(key(KeyCode::Right)); // then 0
    assert!(text(&render(&app, 80, 24)).contains("step: < 0 (checkpoint) >"));
    app.on_key(key(KeyCode::Down));
    for c in "/tmp/q-jk".chars() {
        app.on_key(key(KeyCode::Char(c)));
    }
    app.on_key(key(KeyCode::Backspace));
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![Command::ExportNow {
            formats: "npz,native,png,curves".into(),
            step: Some(0),
            out: Some("/tmp/q-j".into()),
        }]
    );

    // Quit asks; cancel keeps running; checkpoint-and-quit sends Stop.
    app.on_key(key(KeyCode::Char('q')));
    assert!(matches!(app.popup, Some(Popup::Quit { selected: 0 })));
    app.on_key(key(KeyCode::Char('n')));
    assert!(app.popup.is_none() && !app.quit);
    app.on_key(key(KeyCode::Char('q')));
    assert_eq!(app.on_key(key(KeyCode::Enter)), vec![Command::Stop]);
    assert!(app.quit);
    // Ctrl-c in the quit popup quits without a checkpoint.
    let mut app2 = app_with_steps(Palette::TrueColor);
    let ctrl_c = KeyEvent {
        code: KeyCode::Char('c'),
        modifiers: KeyModifiers::CONTROL,
        kind: KeyEventKind::Press,
        state: KeyEventState::NONE,
    };
    app2.on_key(ctrl_c);
    assert_eq!(app2.on_key(ctrl_c), vec![Command::Abort]);
}

#[test]
fn dashboard_shows_the_numbers_at_80x24_and_160x48() {
    let mut app = app_with_steps(Palette::TrueColor);
    app.on_telemetry(Telemetry::Phase(Phase::Paused));
    for (w, h) in [(80, 24), (160, 48)] {
        let s = text(&render(&app, w, h));
        for needle in [
            "PAUSED",
            "step 4/61",
            "adversarial loss",
            "now 0.400",
            "Linf 18.2",
            "L2 321.5",
            "at bound 83%",
            "Shirt -> T-shirt/top",
            "0.600",
            "0.240",
            "fooled 50%",
            "cpu (2 threads)",
            "Space resume",
            "q quit",
        ] {
            assert!(s.contains(needle), "{w}x{h}: `{needle}` missing from\n{s}");
        }
        // The full labels where they fit; on 80 columns shorter ones, so nothing is cut.
        let header = s.lines().nth(1).unwrap();
        let wide = w > 80;
        assert_eq!(
            header.contains("elapsed 1m20s  ETA 10m00s  surrogates fooled 50%  cpu (2 threads)"),
            wide,
            "{header}"
        );
        assert_eq!(
            header.contains("step 4/61  1m20s, ETA 10m00s  fooled 50%  cpu (2 threads)"),
            !wide,
            "{header}"
        );
        assert!(s.contains("machine: run on cpu (2 threads)"), "{s}");
    }
    // A longer device name on 80 columns: the panel's title keeps the device whole.
    app.device = "cpu (2 surrogates x 1 thread)".into();
    let s = text(&render(&app, 80, 24));
    assert!(s.contains("┌ run on cpu (2 surrogates x 1 thread) "), "{s}");
    let small = text(&render(&app, 70, 20));
    assert!(small.contains("needs at least 80x24"), "{small}");
}

fn preview(white_base: bool) -> Telemetry {
    let n = 4 * 4;
    let fill = |v: u8| vec![v; n];
    Telemetry::Preview(Preview {
        slot: 0,
        height: 4,
        width: 4,
        channels: 1,
        base: fill(if white_base { 255 } else { 0 }),
        poison: fill(128),
        delta: fill(0),
    })
}

fn find_preview_cell(buf: &ratatui::buffer::Buffer) -> (u16, u16) {
    // The preview panel's first inner cell: under the title "poison 1/200".
    let a = buf.area;
    for y in 0..a.height {
        let row: String = (0..a.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        if let Some(col) = row.find("poison 1/200") {
            let x = row[..col].chars().count() as u16;
            return (x - 2 + 1, y + 1);
        }
    }
    panic!("no preview panel");
}

#[test]
fn preview_cells_carry_the_image_colours_and_ascii_ramp() {
    let mut app = app_with_steps(Palette::TrueColor);
    app.on_telemetry(preview(true));
    let buf = render(&app, 80, 24);
    let (x, y) = find_preview_cell(&buf);
    let cell = &buf[(x, y)];
    assert_eq!(cell.symbol(), "▀");
    assert_eq!(cell.fg, Color::Rgb(255, 255, 255));
    assert_eq!(cell.bg, Color::Rgb(255, 255, 255));

    let mut app = app_with_steps(Palette::Indexed256);
    app.on_telemetry(preview(true));
    let buf = render(&app, 80, 24);
    let cell = &buf[find_preview_cell(&buf)];
    assert_eq!(cell.fg, Color::Indexed(231), "white is cube index 231");
    assert_eq!(
        (indexed(0, 0, 0), indexed(255, 0, 0), indexed(128, 128, 128)),
        (16, 196, 244)
    );

    let mut app = app_with_steps(Palette::Mono);
    assert!(app.ascii, "no colour means ASCII images");
    app.on_telemetry(preview(false));
    let buf = render(&app, 80, 24);
    let (x, y) = find_preview_cell(&buf);
    assert_eq!(
        buf[(x, y)].symbol(),
        " ",
        "black base is the ramp's first character"
    );
    // The poison image (mid grey) follows the base at the next image slot.
    let row: String = (0..80).map(|c| buf[(c, y)].symbol().to_string()).collect();
    let mid = ASCII_RAMP[(128 * (ASCII_RAMP.len() - 1) + 127) / 255] as char;
    assert!(row.contains(&mid.to_string().repeat(4)), "{row}");
}

#[test]
fn replay_file_round_trips_telemetry() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rec.jsonl");
    let lines: Vec<String> = [started(), step(0, 1.0)]
        .iter()
        .map(|t| serde_json::to_string(t).unwrap())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let back = metapoison::tui::read_replay(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert!(matches!(back[1], Telemetry::Step(ref r) if r.adv_loss == Some(1.0)));
    std::fs::write(&path, "{not json}\n").unwrap();
    let e = metapoison::tui::read_replay(&path).unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
}

/// Replay files say which protocol wrote them: a newer one is refused with a clear line; one
/// from before the version existed, and events as older checkpoints stored them (kind as
/// text, no structured change; a kind this build does not know), still read.
#[test]
fn replay_files_carry_the_protocol_version_and_old_records_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rec.jsonl");
    let mut newer = serde_json::to_value(started()).unwrap();
    assert_eq!(newer["protocol"], PROTOCOL_VERSION);
    newer["protocol"] = (PROTOCOL_VERSION + 1).into();
    std::fs::write(&path, newer.to_string() + "\n").unwrap();
    let e = metapoison::tui::read_replay(&path).unwrap_err().to_string();
    assert!(
        e.contains("newer metapoison") && e.contains("rec.jsonl"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    // Before the version existed, `started` also carried the crafter's whole plan.
    let mut older = serde_json::to_value(started()).unwrap();
    older.as_object_mut().unwrap().remove("protocol");
    let ds = data::embedded::load().unwrap();
    let whole_plan = Plan::resolve(&Config::default(), &ds).unwrap();
    older["plan"] = serde_json::to_value(&whole_plan).unwrap();
    let old_event =
        r#"{"type":"event","step":3,"kind":"set_outer_lr","message":"outer lr 200 -> 50"}"#;
    let future_event = r#"{"type":"event","step":4,"kind":"teleported","message":"?"}"#;
    std::fs::write(&path, format!("{older}\n{old_event}\n{future_event}\n")).unwrap();
    let back = metapoison::tui::read_replay(&path).unwrap();
    match &back[0] {
        Telemetry::Started { protocol, plan, .. } => {
            assert_eq!(*protocol, 0);
            assert_eq!(*plan, RunInfo::from(&whole_plan));
        }
        other => panic!("{other:?}"),
    }
    match (&back[1], &back[2]) {
        (Telemetry::Event(a), Telemetry::Event(b)) => {
            assert_eq!((a.kind, a.change), (EventKind::SetOuterLr, None));
            assert_eq!(b.kind, EventKind::Other);
        }
        other => panic!("{other:?}"),
    }
    // The dashboard takes the outer lr from the structured change, not from the text.
    let mut app = app_with_steps(Palette::Mono);
    let mut lr = Event::new(5, EventKind::SetOuterLr, "text that says nothing");
    lr.change = Some(LiveChange {
        field: LiveField::OuterLr,
        old: 200.0,
        new: 37.5,
    });
    app.on_telemetry(Telemetry::Event(lr));
    assert_eq!(app.live.outer_lr, 37.5);
}

fn with_preview(mut app: App) -> App {
    app.on_telemetry(preview(true));
    let mut lr = Event::new(2, EventKind::SetOuterLr, "outer lr 200 -> 100");
    lr.change = Some(LiveChange {
        field: LiveField::OuterLr,
        old: 200.0,
        new: 100.0,
    });
    app.on_telemetry(Telemetry::Event(lr));
    app
}

#[test]
fn whole_screen_snapshots_at_80x24_and_160x48() {
    // Mono: the snapshot is the text; colours are checked by the preview test above.
    let app = with_preview(app_with_steps(Palette::Mono));
    insta::assert_snapshot!("dashboard_80x24", text(&render(&app, 80, 24)));
    insta::assert_snapshot!("dashboard_160x48", text(&render(&app, 160, 48)));
    let mut help = with_preview(app_with_steps(Palette::Mono));
    help.on_key(key(KeyCode::Char('?')));
    insta::assert_snapshot!("help_80x24", text(&render(&help, 80, 24)));
}

#[test]
fn configured_keys_drive_the_dashboard_and_show_in_footer_and_help() {
    use metapoison::config::KeysConfig;
    use metapoison::tui::app::Keymap;
    let keys = KeysConfig {
        pause: "x".into(),
        evaluate: "V".into(),
        quit: "Q".into(),
        ..KeysConfig::default()
    };
    let mut app = App::with_keys(Palette::Mono, Keymap::from_config(&keys));
    app.on_telemetry(started());
    app.on_telemetry(Telemetry::Phase(Phase::Crafting));
    app.on_telemetry(step(0, 1.0));
    assert_eq!(app.on_key(key(KeyCode::Char(' '))), vec![]);
    assert_eq!(app.on_key(key(KeyCode::Char('x'))), vec![Command::Pause]);
    assert!(app.footer().starts_with("x pause"), "{}", app.footer());
    assert!(app.footer().contains("V victims"));
    // q is not quit any more; Q is.
    app.on_key(key(KeyCode::Char('q')));
    assert!(app.popup.is_none());
    app.on_key(key(KeyCode::Char('Q')));
    assert!(matches!(app.popup, Some(Popup::Quit { .. })));
    app.on_key(key(KeyCode::Esc));
    app.on_key(key(KeyCode::Char('?')));
    let screen = text(&render(&app, 80, 24));
    assert!(screen.contains("x          pause / resume"), "{screen}");
    assert!(screen.contains("V          victims"), "{screen}");
}

#[test]
fn bad_key_bindings_are_refused_naming_the_field() {
    let mut c = Config::default();
    c.keys.export = "p".into(); // params already has p
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("keys.export") && e.contains("keys.params"),
        "{e}"
    );
    let mut c = Config::default();
    c.keys.help = "F1".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("keys.help") && e.contains("one printable character"),
        "{e}"
    );
    let parsed = metapoison::config::Config::from_toml_str(
        "[keys]\npause = \"z\"\n",
        std::path::Path::new("k.toml"),
    )
    .unwrap();
    assert_eq!(parsed.keys.pause, "z");
}

#[test]
fn v_starts_one_evaluation_and_its_result_reaches_the_header() {
    use metapoison::victim::eval::{summarise, EvalReport, Trial};
    let mut app = app_with_steps(Palette::Mono);
    assert_eq!(
        app.on_key(key(KeyCode::Char('v'))),
        vec![Command::Evaluate { trials: None }]
    );
    // A second press while it runs sends nothing.
    assert_eq!(app.on_key(key(KeyCode::Char('v'))), vec![]);
    assert!(text(&render(&app, 160, 48)).contains("victims: training..."));
    // p(adv) per victim, against 0.2 for the strongest other class (6).
    let t = |arm: &str, seed: u64, p_adv: f64, success: bool, acc: f64| Trial {
        arm: arm.into(),
        seed,
        predicted: vec![if success { 0 } else { 6 }],
        target_probs: vec![{
            let mut p = vec![0.01; 10];
            (p[0], p[6]) = (p_adv, 0.2);
            p
        }],
        success: vec![success],
        clean_accuracy: acc,
        train_mode: vec![],
        seconds: 1.0,
        cached: false,
        class_margin: None,
    };
    let trials = vec![
        t("poisoned", 1, 0.6, true, 0.851),
        t("control", 1, 0.1, false, 0.855),
        t("poisoned", 2, 0.2, false, 0.853),
        t("control", 2, 0.1, false, 0.857),
    ];
    let pick = |arm: &str| trials.iter().filter(|x| x.arm == arm).collect::<Vec<_>>();
    let report = EvalReport {
        export: "/runs/test/export-step-0004".into(),
        victim_net: "convnet-bn".into(),
        surrogate_net: "convnet-bn".into(),
        setting: "gray-box".into(),
        epochs: 12,
        protocol: None,
        poisons_used: 200,
        adversarial: vec![0],
        poisoned: summarise(&pick("poisoned")),
        control: summarise(&pick("control")),
        noise: None,
        trials: trials.clone(),
        seconds: 1.0,
    };
    // Records from before the summary existed carried the whole report: they still read.
    let old = serde_json::json!({ "type": "evaluation" });
    let mut old = old.as_object().unwrap().clone();
    for (k, v) in serde_json::to_value(&report).unwrap().as_object().unwrap() {
        old.insert(k.clone(), v.clone());
    }
    let back: Telemetry = serde_json::from_value(old.into()).unwrap();
    let summary: metapoison::engine::protocol::EvaluationSummary = (&report).into();
    assert_eq!(
        back,
        Telemetry::Evaluation(metapoison::engine::protocol::EvaluationSummary {
            margin_shift: None,
            ..summary.clone()
        })
    );
    app.on_telemetry(back);
    let screen = text(&render(&app, 160, 48));
    assert!(
        screen.contains("victims 1/2 flipped (control 0/2), acc 85.2%/85.6%"),
        "{screen}"
    );
    // Today's summary carries how far the target moved: seed 1 by ln(0.6/0.1) = 1.79
    // logits against its control twin, seed 2 by ln(0.2/0.1) = 0.69; +1.24 on average.
    assert!((summary.margin_shift.unwrap() - (6f64.ln() + 2f64.ln()) / 2.0).abs() < 1e-9);
    app.on_telemetry(Telemetry::Evaluation(summary));
    let screen = text(&render(&app, 160, 48));
    assert!(
        screen.contains(
            "victims 1/2 flipped (control 0/2), target moved +1.2 logits, acc 85.2%/85.6%"
        ),
        "{screen}"
    );
    // Finished runs keep export and evaluation; quitting lets the lingering engine go.
    app.on_telemetry(Telemetry::Phase(Phase::Done));
    assert!(app.footer().contains("v victims"));
    assert_eq!(
        app.on_key(key(KeyCode::Char('v'))),
        vec![Command::Evaluate { trials: None }]
    );
    assert_eq!(app.on_key(key(KeyCode::Char('q'))), vec![Command::Abort]);
    assert!(app.quit);
}

fn gpu(index: u32) -> metapoison::telemetry::GpuSample {
    metapoison::telemetry::GpuSample {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        utilisation: Some(90 + index),
        memory_used_mib: Some(17_000 + 1024 * index as u64),
        memory_total_mib: Some(81_559),
        temperature_c: Some(45),
        power_w: Some(312.4),
    }
}

/// The rows of the machine panel: the text between its top border and the next border below.
fn machine_panel(buf: &ratatui::buffer::Buffer) -> Vec<String> {
    let screen = text(buf);
    let lines: Vec<&str> = screen.lines().collect();
    let (top, col) = lines
        .iter()
        .enumerate()
        .find_map(|(y, l)| l.find("┌ machine").map(|c| (y, l[..c].chars().count())))
        .expect("machine panel");
    let mut rows: Vec<String> = lines[top + 1..]
        .iter()
        .map(|l| l.chars().skip(col + 1).collect::<String>())
        .take_while(|l| !l.starts_with('─') && !l.starts_with('└'))
        .map(|l| l.trim_end_matches('│').trim_end().to_string())
        .collect();
    // The panel keeps two rows while it has one line.
    while rows.last().is_some_and(|r| r.is_empty()) {
        rows.pop();
    }
    rows
}

#[test]
fn machine_panel_keeps_every_gpus_memory_in_view() {
    let mut app = app_with_steps(Palette::TrueColor);
    // No GPU: the note, then CPU and memory, shortened where the full line would be cut.
    app.on_system(metapoison::telemetry::SystemSample {
        gpus: vec![],
        gpu_note: Some("no NVIDIA GPU (NVML library not found)".into()),
        cpu_percent: Some(74.0),
        cores: 2,
        process_rss_mib: Some(912.0),
    });
    assert_eq!(
        machine_panel(&render(&app, 80, 24)),
        [
            "no NVIDIA GPU (NVML library not found)",
            "CPU 74% of 2 cores, memory 912 MiB"
        ]
    );
    assert_eq!(
        machine_panel(&render(&app, 160, 48))[1],
        "CPU 74% on 2 cores  process memory 912 MiB"
    );
    // One GPU: the whole line where it fits; on 80 columns its name above its figures.
    let one = metapoison::telemetry::SystemSample {
        gpus: vec![gpu(0)],
        cores: 16,
        ..Default::default()
    };
    app.on_system(one);
    assert_eq!(
        machine_panel(&render(&app, 160, 48)),
        ["GPU0 NVIDIA H100 80GB HBM3  util 90%  mem 17000/81559 MiB  45C  312W"]
    );
    assert_eq!(
        machine_panel(&render(&app, 80, 24)),
        [
            "GPU0 NVIDIA H100 80GB HBM3",
            "util 90% 16.6/79.6 GiB 45C 312W"
        ]
    );
    // Eight GPUs: each its full line on a large screen; narrower, its figures alone (a name
    // line each would need 16 rows); on 80x24 those that fit and a count of the rest.
    app.on_system(metapoison::telemetry::SystemSample {
        gpus: (0..8).map(gpu).collect(),
        cores: 16,
        ..Default::default()
    });
    app.log("checkpoint at step 3".into());
    app.log("export done".into());
    let small = render(&app, 80, 24);
    assert!(
        text(&small).contains("│checkpoint at step 3") && text(&small).contains("│export done"),
        "the events panel keeps two lines:\n{}",
        text(&small)
    );
    let big = machine_panel(&render(&app, 160, 48));
    assert_eq!(big.len(), 8, "{big:?}");
    assert!(big
        .iter()
        .enumerate()
        .all(|(i, l)| l.starts_with(&format!("GPU{i} NVIDIA H100")) && l.ends_with("312W")));
    let medium = machine_panel(&render(&app, 120, 48));
    assert_eq!(medium.len(), 8, "{medium:?}");
    assert_eq!(medium[7], "GPU7 util 97% 23.6/79.6 GiB 45C 312W");
    assert_eq!(
        machine_panel(&render(&app, 80, 24)),
        [
            "GPU0 util 90% 16.6/79.6 GiB 45C 312W",
            "GPU1 util 91% 17.6/79.6 GiB 45C 312W",
            "+6 more GPUs"
        ]
    );
}

/// The rows of the panel titled `title` (its inner text, right-trimmed).
fn panel(buf: &ratatui::buffer::Buffer, title: &str) -> Vec<String> {
    let screen = text(buf);
    let lines: Vec<&str> = screen.lines().collect();
    let (top, col) = lines
        .iter()
        .enumerate()
        .find_map(|(y, l)| l.find(title).map(|c| (y, l[..c].chars().count())))
        .unwrap_or_else(|| panic!("no panel {title} in\n{screen}"));
    lines[top + 1..]
        .iter()
        .map(|l| l.chars().skip(col + 1).collect::<String>())
        .take_while(|l| !l.starts_with('─') && !l.starts_with('└'))
        .map(|l| {
            let inner: String = l.chars().take_while(|&c| c != '│').collect();
            inner.trim_end().to_string()
        })
        .collect()
}

#[test]
fn long_events_wrap_whole_and_the_run_folder_stays_in_the_header() {
    let mut app = app_with_steps(Palette::TrueColor);
    app.run_dir = "/home/researcher/metapoison/runs/cifar-resnet18-target-8745".into();
    let path = format!("{}/checkpoint.safetensors", app.run_dir);
    app.log("older event".into());
    app.log("export done".into());
    app.log(format!("checkpoint at step 7: {path}"));
    let buf = render(&app, 80, 24);
    let rows = panel(&buf, "┌ events");
    // The newest event, whole, over the three rows there are (38 columns, then 36 after the
    // indent); no room for the ones before it.
    assert_eq!(
        rows,
        [
            "checkpoint at step 7: /home/researcher",
            "  /metapoison/runs/cifar-resnet18-targ",
            "  et-8745/checkpoint.safetensors",
        ]
    );
    let joined: String = rows[0].clone()
        + &rows[1..]
            .iter()
            .map(|r| r.strip_prefix("  ").unwrap())
            .collect::<String>();
    assert_eq!(joined, format!("checkpoint at step 7: {path}"));
    // A newer event: the rows scroll up as in a terminal.
    app.log("export done".into());
    assert_eq!(
        panel(&render(&app, 80, 24), "┌ events"),
        [
            "  /metapoison/runs/cifar-resnet18-targ",
            "  et-8745/checkpoint.safetensors",
            "export done"
        ]
    );
    // Wide: one row each, the oldest too.
    let rows = panel(&render(&app, 220, 48), "┌ events");
    assert!(rows.contains(&"older event".to_string()), "{rows:?}");
    assert!(
        rows.contains(&format!("checkpoint at step 7: {path}")),
        "{rows:?}"
    );
    // The header's second line: the run folder first where the whole line would be cut.
    let header = text(&buf).lines().nth(2).unwrap().to_string();
    assert!(
        header.starts_with(&format!("│ run {}  convnet-bn", app.run_dir)),
        "{header}"
    );
    let header = text(&render(&app, 160, 48))
        .lines()
        .nth(2)
        .unwrap()
        .to_string();
    assert!(
        header.starts_with(&format!(
            "│ convnet-bn on fashion-mnist-subset  run {}",
            app.run_dir
        )),
        "{header}"
    );
}

#[test]
fn an_attached_dashboard_detaches_on_leaving_and_stops_the_run_only_when_asked() {
    let ctrl_c = KeyEvent {
        code: KeyCode::Char('c'),
        modifiers: KeyModifiers::CONTROL,
        kind: KeyEventKind::Press,
        state: KeyEventState::NONE,
    };
    // q opens the leave dialog; d detaches: no command reaches the run.
    let mut app = app_with_steps(Palette::Mono);
    app.attached = true;
    assert!(app.on_key(key(KeyCode::Char('q'))).is_empty());
    assert!(matches!(app.popup, Some(Popup::Quit { .. })));
    let screen = text(&render(&app, 100, 30));
    assert!(screen.contains("detach: crafting goes on"), "{screen}");
    assert!(screen.contains("checkpoint and stop the run"), "{screen}");
    assert!(app.footer().contains("d/q detach"), "{}", app.footer());
    assert!(app.on_key(key(KeyCode::Char('d'))).is_empty());
    assert!(app.quit && app.detach);
    // Enter on the first choice detaches too; c checkpoints and stops the run.
    let mut app = app_with_steps(Palette::Mono);
    app.attached = true;
    app.on_key(key(KeyCode::Char('q')));
    assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    assert!(app.detach);
    let mut app = app_with_steps(Palette::Mono);
    app.attached = true;
    app.on_key(key(KeyCode::Char('q')));
    assert_eq!(app.on_key(key(KeyCode::Char('c'))), vec![Command::Stop]);
    assert!(app.quit && !app.detach);
    // Ctrl-c detaches at once, and so does q after the last step (no abort of a lingering run).
    let mut app = app_with_steps(Palette::Mono);
    app.attached = true;
    assert!(app.on_key(ctrl_c).is_empty());
    assert!(app.quit && app.detach);
    let mut app = app_with_steps(Palette::Mono);
    app.attached = true;
    app.on_telemetry(Telemetry::Phase(Phase::Done));
    assert!(app.on_key(key(KeyCode::Char('q'))).is_empty());
    assert!(app.quit && app.detach);
    // In the dashboard's own process, the same keys keep their meaning.
    let mut app = app_with_steps(Palette::Mono);
    assert_eq!(app.on_key(ctrl_c), vec![]);
    assert!(matches!(app.popup, Some(Popup::Quit { .. })));
    assert_eq!(app.on_key(ctrl_c), vec![Command::Abort]);
    assert!(!app.detach);
}
