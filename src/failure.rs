//! libtorch reports its errors (a CUDA out-of-memory, a shape mismatch) as Rust panics from
//! tch's calls. This module turns them into the one-line messages users get everywhere else:
//! the panic hook writes the whole text (libtorch's C++ trace included) to the log file only,
//! and `message` distils the payload to its first line, with what to do about memory.

use std::any::Any;

/// Installs the hook: every panic is logged in full (tracing, to the log file), never printed
/// over the terminal; whoever catches it reports the one-line `message`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            "panic in thread {}{location}: {}",
            thread.name().unwrap_or("unnamed"),
            payload_text(info.payload())
        );
    }));
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "unknown failure".to_string()
    }
}

/// Whether a caught panic was the GPU running out of memory.
pub fn is_out_of_memory(payload: &(dyn Any + Send)) -> bool {
    payload_text(payload).contains("out of memory")
}

/// How one attempt at a group of networks trained as one grouped network ended.
pub enum GroupAttempt<T> {
    Done(T),
    /// The GPU ran out of memory with more than one network in the group: whatever the
    /// attempt changed must be restored, then tried again with `smaller` at a time.
    OutOfMemory {
        smaller: usize,
    },
}

/// Runs `run` (grouped over `group_size` networks), catching libtorch's out-of-memory panic
/// when halving the group could help; any other panic goes on unwinding.
pub fn attempt_group<T>(group_size: usize, run: impl FnOnce() -> T) -> GroupAttempt<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(value) => GroupAttempt::Done(value),
        Err(p) if group_size > 1 && is_out_of_memory(&*p) => GroupAttempt::OutOfMemory {
            smaller: group_size.div_ceil(2),
        },
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A caught panic as one line: libtorch's own message without its C++ trace, plus what to do
/// when the GPU ran out of memory.
pub fn message(payload: &(dyn Any + Send)) -> String {
    let text = payload_text(payload);
    // tch formats libtorch errors as `...: Torch("<message>\n<C++ trace>")`.
    let core = match text.find("Torch(\"") {
        Some(i) => {
            let rest = &text[i + 7..];
            let end = rest
                .find("\\n")
                .or_else(|| rest.find('"'))
                .unwrap_or(rest.len());
            format!("libtorch: {}", &rest[..end])
        }
        None => text.lines().next().unwrap_or("").to_string(),
    };
    if text.contains("out of memory") {
        format!(
            "{core} (lower craft.ensemble_size, surrogate.batch_size or craft.unroll_steps, or set craft.grouped_surrogates = false)"
        )
    } else {
        core
    }
}

/// An error and its causes as one line, "outer: cause: root". A cause whose text the line
/// already ends with is left out: our error types print their source in their own message
/// (so that they read whole without anyhow), which `{:#}` would otherwise repeat.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_is_one_line_without_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read {path}: {source}")]
        struct ReadError {
            path: String,
            source: std::io::Error,
        }
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let own = anyhow::Error::new(ReadError {
            path: "a.toml".into(),
            source: io(),
        });
        assert_eq!(one_line(&own), "cannot read a.toml: no such file");
        // A context above it is kept, and a cause not yet printed is added.
        let wrapped = own.context("loading the config");
        assert_eq!(
            one_line(&wrapped),
            "loading the config: cannot read a.toml: no such file"
        );
        let bare = anyhow::Error::new(io()).context("cannot open b.bin");
        assert_eq!(one_line(&bare), "cannot open b.bin: no such file");
    }

    #[test]
    fn a_libtorch_error_becomes_one_line_without_the_trace() {
        let payload: Box<dyn Any + Send> = Box::new(String::from(
            "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 190.00 MiB.\\nException raised from malloc at alloc.cpp:1\\nframe #0: c10::Error\")",
        ));
        let m = message(payload.as_ref());
        assert_eq!(
            m.split(" (").next().unwrap(),
            "libtorch: CUDA out of memory. Tried to allocate 190.00 MiB."
        );
        assert!(m.contains("craft.ensemble_size"), "{m}");
        assert!(!m.contains("frame"), "{m}");
        assert!(is_out_of_memory(payload.as_ref()));
        let other: Box<dyn Any + Send> = Box::new("index out of range\nmore");
        assert_eq!(message(other.as_ref()), "index out of range");
        assert!(!is_out_of_memory(other.as_ref()));
    }

    #[test]
    fn only_an_out_of_memory_of_a_real_group_asks_for_a_smaller_one() {
        let oom =
            || -> u8 { std::panic::panic_any(String::from("Torch(\"CUDA out of memory.\")")) };
        assert!(matches!(attempt_group(5, || 7), GroupAttempt::Done(7)));
        assert!(matches!(
            attempt_group(5, oom),
            GroupAttempt::OutOfMemory { smaller: 3 }
        ));
        // One network that does not fit, or another failure, is not retried.
        assert!(std::panic::catch_unwind(|| attempt_group(1, oom)).is_err());
        let other = || -> u8 { panic!("shape mismatch") };
        assert!(std::panic::catch_unwind(|| attempt_group(4, other)).is_err());
    }
}
