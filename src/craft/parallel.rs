//! Surrogates crafted side by side on their own threads.
//!
//! A surrogate's meta-gradient is independent of the others' (they share only the read-only
//! perturbation), so several can run at once instead of splitting every small kernel across
//! the cores (libtorch's intra-op threading). Measured on 2 cores (BENCHMARKS.md): a whole
//! crafting step 1.19x faster once glibc keeps freed memory (`device::tune_host_allocator`),
//! so `craft.parallel_surrogates` is 2 on a CPU by default. Each surrogate's work is a
//! self-contained job, which is also the shape needed to place surrogates on several devices.
//! Results come back in job order and the callers sum them in that order, so the outcome does
//! not depend on which thread finished first.

/// Runs `work` on every job, each on its own scoped thread when there are several, and
/// returns the results in job order.
pub fn map<J: Send, R: Send>(jobs: Vec<J>, work: impl Fn(J) -> R + Sync) -> Vec<R> {
    if jobs.len() <= 1 {
        return jobs.into_iter().map(&work).collect();
    }
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| scope.spawn(move || work(job)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The indices 0..count in consecutive groups of `at_once` (the last may be shorter): the
/// surrogates that run together.
pub fn waves(count: usize, at_once: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let at_once = at_once.max(1);
    (0..count)
        .step_by(at_once)
        .map(move |start| start..(start + at_once).min(count))
}

/// Gives libtorch's intra-op threads to `workers` surrogates running at once, for as long as
/// it lives, then puts the old count back.
///
/// libtorch's thread count is process-wide and its convolution kernels remember the count
/// they were first built with, so it is set once for the whole job, not per worker thread:
/// switching it back and forth left workers oversubscribing the cores (measured: 2.08 s a step
/// against 1.73 s set once, 2 cores).
pub struct IntraOpThreads {
    /// The count to put back, when this guard changed it.
    previous: Option<i32>,
}

impl IntraOpThreads {
    /// Each of `workers` gets an equal share of the current threads (at least one); with one
    /// worker nothing changes.
    pub fn share_among(workers: usize) -> IntraOpThreads {
        let previous = tch::get_num_threads();
        let share = (previous.max(1) / workers.max(1) as i32).max(1);
        if share == previous {
            return IntraOpThreads { previous: None };
        }
        tch::set_num_threads(share);
        IntraOpThreads {
            previous: Some(previous),
        }
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            tch::set_num_threads(previous);
        }
    }
}
