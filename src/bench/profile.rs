//! `bench --profile`: one of our steps under libtorch's Kineto profiler (`profile.cpp`), with
//! where its time went: on the host by operator (self time, an operator's span less its
//! children's), and on CUDA by kernel and by the operator that launched each kernel. The same
//! tables a PyTorch user reads from `key_averages()`, for our own step, on any device.

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;

extern "C" {
    fn mp_profile_start(cuda: std::ffi::c_int) -> *mut c_char;
    fn mp_profile_stop(trace_path: *const c_char, events: *mut *mut c_char) -> *mut c_char;
    fn mp_free_error(message: *mut c_char);
}

/// Takes ownership of a message allocated by the C++ side.
///
/// # Safety
/// `text` is a non-null, NUL-terminated string from `mp_error_copy`.
unsafe fn take_text(text: *mut c_char) -> String {
    let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
    mp_free_error(text);
    owned
}

fn check(what: &str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a message from mp_error_copy.
    let text = unsafe { take_text(err) };
    bail!(
        "{what}: {}",
        text.lines().next().unwrap_or("libtorch's profiler failed")
    )
}

/// A running profiler; `stop` ends it (dropping it unstopped ends it too, discarding events).
pub struct Session {
    running: bool,
}

/// Starts recording CPU operators (and with `cuda` kernel launches and device activity) on
/// this thread and the autograd threads it hands work to.
pub fn start(cuda: bool) -> Result<Session> {
    // SAFETY: plain call; errors come back as a message.
    check("cannot start libtorch's profiler", unsafe {
        mp_profile_start(std::ffi::c_int::from(cuda))
    })?;
    Ok(Session { running: true })
}

impl Session {
    /// Stops recording; writes Chrome's trace format (chrome://tracing, Perfetto) to `trace`.
    pub fn stop(mut self, trace: Option<&Path>) -> Result<Vec<Event>> {
        self.running = false;
        let path = trace
            .map(|p| {
                CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|_| anyhow!("the trace path {} holds a NUL byte", p.display()))
            })
            .transpose()?;
        let mut lines: *mut c_char = std::ptr::null_mut();
        // SAFETY: the path is a live C string or null; on success `lines` is a message to free.
        let err = unsafe {
            mp_profile_stop(
                path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                &mut lines,
            )
        };
        check("libtorch's profiler could not stop", err)?;
        // SAFETY: on success the C++ side set `lines`.
        let text = unsafe { take_text(lines) };
        Ok(parse(&text))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.running {
            let mut lines: *mut c_char = std::ptr::null_mut();
            // SAFETY: as in `stop`, without a trace; the events are freed unread.
            unsafe {
                let err = mp_profile_stop(std::ptr::null(), &mut lines);
                if err.is_null() {
                    mp_free_error(lines);
                } else {
                    mp_free_error(err);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An operator on a CPU thread.
    Op,
    /// A CUDA runtime or driver call (a kernel launch, a copy).
    Launch,
    /// Something that ran on the GPU.
    Device,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub thread: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Shared by a device event and the launch that queued it.
    pub correlation: u64,
    pub name: String,
}

impl Event {
    fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// The C++ side's lines (kind, thread, start, end, correlation, name; tab-separated). Lines
/// that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, '\t');
            let kind = match f.next()? {
                "o" => EventKind::Op,
                "r" => EventKind::Launch,
                "k" => EventKind::Device,
                _ => return None,
            };
            let mut num = || f.next()?.parse::<u64>().ok();
            let (thread, start_ns, end_ns, correlation) = (num()?, num()?, num()?, num()?);
            Some(Event {
                kind,
                thread,
                start_ns,
                end_ns,
                correlation,
                name: f.next()?.to_string(),
            })
        })
        .collect()
}

/// One line of a table: a name, how often it ran, its time and its share of the table's total.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub name: String,
    pub calls: u64,
    pub ms: f64,
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Sum of the host threads' self times (operators and launch calls).
    pub host_ms: f64,
    /// Sum of the device events' durations.
    pub device_ms: f64,
    /// Host self time by operator, largest first.
    pub host_by_op: Vec<Row>,
    /// Device time by kernel, largest first.
    pub device_by_kernel: Vec<Row>,
    /// Device time by the innermost operator around each kernel's launch, largest first.
    pub device_by_op: Vec<Row>,
}

/// Not launched by any recorded operator (or its launch was not recorded).
pub const UNATTRIBUTED: &str = "(no operator)";

/// Totals per name: (calls, ns).
#[derive(Default)]
struct Tally(HashMap<String, (u64, u64)>);

impl Tally {
    fn add(&mut self, name: &str, ns: u64) {
        let e = self.0.entry(name.to_string()).or_default();
        e.0 += 1;
        e.1 += ns;
    }

    fn total_ns(&self) -> u64 {
        self.0.values().map(|v| v.1).sum()
    }

    /// The `top` largest rows.
    fn rows(self, top: usize) -> Vec<Row> {
        let total = self.total_ns().max(1) as f64;
        let mut rows: Vec<Row> = self
            .0
            .into_iter()
            .map(|(name, (calls, ns))| Row {
                name,
                calls,
                ms: ns as f64 / 1e6,
                share: ns as f64 / total,
            })
            .collect();
        rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        rows.truncate(top);
        rows
    }
}

/// Where the time went, the `top` rows of each table.
pub fn summarize(events: &[Event], top: usize) -> Summary {
    // Host side, per thread in time order (a parent before the children it encloses): the
    // stack holds the operators still open, so the innermost one is on top.
    let mut by_thread: HashMap<u64, Vec<&Event>> = HashMap::new();
    for e in events.iter().filter(|e| e.kind != EventKind::Device) {
        by_thread.entry(e.thread).or_default().push(e);
    }
    let mut host = Tally::default();
    let mut launcher: HashMap<u64, &str> = HashMap::new();
    for mut list in by_thread.into_values() {
        list.sort_by(|a, b| {
            a.start_ns
                .cmp(&b.start_ns)
                .then(b.end_ns.cmp(&a.end_ns))
                .then((a.kind == EventKind::Launch).cmp(&(b.kind == EventKind::Launch)))
        });
        // (operator, its children's time)
        let mut open: Vec<(&Event, u64)> = Vec::new();
        let close = |open: &mut Vec<(&Event, u64)>, host: &mut Tally| {
            let (op, children) = open.pop().expect("an open operator");
            host.add(&op.name, op.duration_ns().saturating_sub(children));
        };
        for e in list {
            while open.last().is_some_and(|(op, _)| op.end_ns <= e.start_ns) {
                close(&mut open, &mut host);
            }
            if let Some((_, children)) = open.last_mut() {
                *children += e.duration_ns();
            }
            match e.kind {
                EventKind::Op => open.push((e, 0)),
                _ => {
                    host.add(&e.name, e.duration_ns());
                    let op = open.last().map_or(UNATTRIBUTED, |(op, _)| op.name.as_str());
                    launcher.insert(e.correlation, op);
                }
            }
        }
        while !open.is_empty() {
            close(&mut open, &mut host);
        }
    }
    let (mut kernels, mut ops) = (Tally::default(), Tally::default());
    for e in events.iter().filter(|e| e.kind == EventKind::Device) {
        kernels.add(&e.name, e.duration_ns());
        let op = launcher
            .get(&e.correlation)
            .copied()
            .unwrap_or(UNATTRIBUTED);
        ops.add(op, e.duration_ns());
    }
    Summary {
        host_ms: host.total_ns() as f64 / 1e6,
        device_ms: kernels.total_ns() as f64 / 1e6,
        host_by_op: host.rows(top),
        device_by_kernel: kernels.rows(top),
        device_by_op: ops.rows(top),
    }
}

/// The tables as text, for the terminal.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let mut table = |title: &str, total_ms: f64, rows: &[Row]| {
        if rows.is_empty() {
            return;
        }
        out.push_str(&format!("{title} ({total_ms:.1} ms in all)\n"));
        for r in rows {
            let name: String = r.name.chars().take(90).collect();
            out.push_str(&format!(
                "  {:>6.1}% {:>10.2} ms {:>7} calls  {name}\n",
                r.share * 100.0,
                r.ms,
                r.calls
            ));
        }
    };
    table("host self time by operator", s.host_ms, &s.host_by_op);
    table("device time by kernel", s.device_ms, &s.device_by_kernel);
    table(
        "device time by launching operator",
        s.device_ms,
        &s.device_by_op,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, thread: u64, start: u64, end: u64, corr: u64, name: &str) -> Event {
        Event {
            kind,
            thread,
            start_ns: start,
            end_ns: end,
            correlation: corr,
            name: name.into(),
        }
    }

    fn row<'a>(rows: &'a [Row], name: &str) -> &'a Row {
        rows.iter().find(|r| r.name == name).expect(name)
    }

    /// Self times subtract direct children only; launches count to their own row and name
    /// the innermost operator open around them; device time follows the correlation ids.
    #[test]
    fn self_times_and_launchers_follow_nesting_and_correlation() {
        use EventKind::*;
        let events = vec![
            // thread 1: outer [0, 100) holds mul [10, 40) (which launches k1 at [20, 25)) and
            // add [50, 70); a second outer [100, 130) with no children.
            ev(Op, 1, 0, 100, 0, "outer"),
            ev(Op, 1, 10, 40, 0, "mul"),
            ev(Launch, 1, 20, 25, 7, "cudaLaunchKernel"),
            ev(Op, 1, 50, 70, 0, "add"),
            ev(Launch, 1, 80, 90, 8, "cudaLaunchKernel"),
            ev(Op, 1, 100, 130, 0, "outer"),
            // thread 2, overlapping in time with thread 1: its own stack.
            ev(Op, 2, 5, 45, 0, "mul"),
            // device: k1 from mul, k2 launched by outer directly, k3 from no recorded launch.
            ev(Device, 0, 30, 1030, 7, "k1"),
            ev(Device, 0, 1030, 1530, 8, "k2"),
            ev(Device, 0, 1530, 1730, 99, "k1"),
        ];
        let s = summarize(&events, 10);
        // outer: 100 - (mul 30 + add 20 + launch 10) + 30 = 70; mul: 30 - 5 + 40 = 65.
        assert_eq!(row(&s.host_by_op, "outer").ms, 70e-6);
        assert_eq!(row(&s.host_by_op, "outer").calls, 2);
        assert_eq!(row(&s.host_by_op, "mul").ms, 65e-6);
        assert_eq!(row(&s.host_by_op, "add").ms, 20e-6);
        assert_eq!(row(&s.host_by_op, "cudaLaunchKernel").ms, 15e-6);
        assert_eq!(s.host_ms, 170e-6);
        assert_eq!(row(&s.device_by_kernel, "k1").ms, 1200e-6);
        assert_eq!(row(&s.device_by_kernel, "k1").calls, 2);
        assert_eq!(row(&s.device_by_op, "mul").ms, 1000e-6);
        assert_eq!(row(&s.device_by_op, "outer").ms, 500e-6);
        assert_eq!(row(&s.device_by_op, UNATTRIBUTED).ms, 200e-6);
        assert_eq!(s.device_ms, 1700e-6);
        // Largest first, shares of the table's total.
        assert_eq!(s.device_by_kernel[0].name, "k1");
        assert!((s.device_by_op[0].share - 1000.0 / 1700.0).abs() < 1e-12);
    }

    #[test]
    fn lines_parse_and_bad_ones_are_skipped() {
        let text = "o\t3\t10\t20\t0\taten::mul\nk\t0\t5\t9\t4\tvoid f<int, 2>(x)\nbad\nr\t1\t2\n";
        let events = parse(text);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "aten::mul");
        assert_eq!(events[1].kind, EventKind::Device);
        assert_eq!(events[1].name, "void f<int, 2>(x)");
    }

    /// The profiler around real libtorch work on the CPU records its operators.
    #[test]
    fn a_cpu_profile_records_the_operators_that_ran() {
        let session = start(false).unwrap();
        let a = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let b = a.matmul(&a).relu();
        assert_eq!(b.size(), [64, 64]);
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let events = session.stop(Some(&trace)).unwrap();
        let s = summarize(&events, 50);
        for op in ["aten::matmul", "aten::relu"] {
            assert!(
                s.host_by_op.iter().any(|r| r.name == op),
                "{op} in {:?}",
                s.host_by_op
            );
        }
        assert!(s.device_by_kernel.is_empty());
        let text = std::fs::read_to_string(&trace).unwrap();
        assert!(
            text.contains("aten::matmul"),
            "the trace names the operators"
        );
    }
}
