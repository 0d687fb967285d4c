//! Surrogates crafted side by side on their own threads.
//!
//! A surrogate's meta-gradient is independent of the others' (they share only the read-only
//! perturbation), so several can run at once instead of splitting every small kernel across
//! the cores (libtorch's intra-op threading). Measured on 2 cores (BENCHMARKS.md): the bench's
//! single step 1.25x faster, a whole crafting step no faster, so it is opt-in
//! (`craft.parallel_surrogates`). Each surrogate's work is a self-contained job, which is also
//! the shape needed to place surrogates on several devices. Results come back in job order and
//! the callers sum them in that order, so the outcome does not depend on which thread finished
//! first.

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

/// libtorch's intra-op threads while `workers` surrogates run at once on `cores` cores.
///
/// libtorch's thread count is process-wide and its convolution kernels remember the count
/// they were first built with, so it is set once for the whole crafting job (see
/// [`IntraOpThreads`]), not per worker thread: switching it back and forth left workers
/// oversubscribing the cores (measured: 2.08 s a step against 1.73 s set once, 2 cores).
pub fn intra_op_threads(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

/// Sets libtorch's intra-op thread count for as long as it lives, then puts the old one back.
pub struct IntraOpThreads {
    previous: i32,
}

impl IntraOpThreads {
    pub fn set(threads: usize) -> IntraOpThreads {
        let previous = tch::get_num_threads();
        if threads as i32 != previous {
            tch::set_num_threads(threads as i32);
        }
        IntraOpThreads { previous }
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        if tch::get_num_threads() != self.previous {
            tch::set_num_threads(self.previous);
        }
    }
}
