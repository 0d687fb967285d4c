//! The PyTorch-eager reference as a child process: `reference.py` (embedded in the binary and
//! written next to the bench inputs) answers one JSON line per command on its stdin, so our
//! repetitions and its repetitions can alternate inside one invocation.

use super::timing::Agreement;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const SCRIPT: &str = include_str!("reference.py");

pub struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// What the reference said about itself when it started (torch version, device).
    pub about: Value,
}

/// The Python to run the reference with: `METAPOISON_PYTHON`, else the project's `.venv`
/// (what scripts/setup.sh installs torch into), else `python3` on PATH.
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("METAPOISON_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(".venv/bin/python3");
    if venv.exists() {
        return venv.to_path_buf();
    }
    PathBuf::from("python3")
}

impl Reference {
    /// Starts the reference on `device` ("cpu" or "cuda:N") with `threads` CPU threads.
    pub fn start(python: &Path, dir: &Path, device: &str, threads: i32) -> Result<Reference> {
        let script = dir.join("reference.py");
        std::fs::write(&script, SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        let mut child = Command::new(python)
            .arg("-u")
            .arg(&script)
            .arg(device)
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start the PyTorch reference with {} (set METAPOISON_PYTHON to a python with torch, or pass --no-reference)",
                    python.display()
                )
            })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut r = Reference {
            child,
            stdin,
            stdout,
            about: Value::Null,
        };
        r.about = r.read()?;
        Ok(r)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        if n == 0 {
            bail!("the PyTorch reference exited early (its error is printed above)");
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("the PyTorch reference said {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("the PyTorch reference failed: {e}");
        }
        Ok(v)
    }

    fn ask(&mut self, command: &str) -> Result<Value> {
        writeln!(self.stdin, "{command}").context("the PyTorch reference is gone")?;
        self.stdin.flush()?;
        self.read()
    }

    fn number(v: &Value, key: &str) -> Result<f64> {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("the PyTorch reference's answer lacks {key}: {v}"))
    }

    /// Loads timed inputs written by [`super::timing::StepInputs::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.ask(&format!("load {}", path.display())).map(|_| ())
    }

    /// Computes the meta-gradient of the agreement inputs and compares with the expected one.
    pub fn check(&mut self, path: &Path) -> Result<Agreement> {
        let v = self.ask(&format!("check {}", path.display()))?;
        Ok(Agreement {
            max_rel_error_delta: Self::number(&v, "max_rel_error_delta")?,
            max_rel_error_grid: Self::number(&v, "max_rel_error_grid")?,
            loss_ours: Self::number(&v, "loss_expected")?,
            loss_reference: Self::number(&v, "loss")?,
        })
    }

    /// One timed step of the loaded inputs; its wall time in seconds.
    pub fn step(&mut self) -> Result<f64> {
        let v = self.ask("step")?;
        Self::number(&v, "seconds")
    }

    /// Peak memory and the FLOPs of one step, as the reference measures them.
    pub fn stats(&mut self) -> Result<Value> {
        self.ask("stats")
    }

    /// Measured dense matmul throughput of the device (FLOP/s), fp32 with and without TF32.
    pub fn peak(&mut self) -> Result<Value> {
        self.ask("peak")
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}
